"""Served traffic: epsilon-greedy choices and their propensities, the realised trajectory of a request (equal to
collect's replay), whole lines from concurrent writers, corrupt lines skipped, and Bundle.generate / the CLI
writing one line per routed request."""
from __future__ import annotations

import json
import logging
import multiprocessing
from collections import Counter

import numpy as np
import pytest
from tiny import tiny_random

from ctxdraft.selfdraft.base.datastore import SuffixStore
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.draft import TeacherForced
from ctxdraft.selfdraft.drafting.drafts import LookupDraft, ModelDraft, ModelDraftSettings, NoneDraft
from ctxdraft.selfdraft.drafting.exit_draft import ExitDraft, ExitSettings
from ctxdraft.selfdraft.drafting.exit_head import ExitHead
from ctxdraft.selfdraft.drafting.suffix_draft import SuffixDraft, SuffixSettings
from ctxdraft.selfdraft.drafting.tree_drafts import (
    LookupTreeDraft,
    LookupTreeSettings,
    SuccessorDraft,
    SuccessorSettings,
)
from ctxdraft.selfdraft.learning.costs import plain_steps
from ctxdraft.selfdraft.learning.offpolicy import choose_arm
from ctxdraft.selfdraft.learning.trajectories import replay, teacher_pass
from ctxdraft.selfdraft.runtime.layers import LayerStack
from ctxdraft.selfdraft.serving.traffic import TRAFFIC_FORMAT, StepRecorder, append_line, read_traffic

ARMS = ["none", "lookup", "exit@2"]


# --------------------------------------------------------------------------------------------------
# Choosing with exploration
# --------------------------------------------------------------------------------------------------
def test_choose_arm_without_exploration_is_the_argmax_with_propensity_one():
    choice = choose_arm(ARMS, [0.2, 0.5, 0.3])
    assert (choice.arm, choice.propensity, choice.greedy_arm) == ("lookup", 1.0, "lookup")
    with pytest.raises(CtxdraftError, match="2 probabilities for 3 arms"):
        choose_arm(ARMS, [0.5, 0.5])


@pytest.mark.parametrize("explore", [0.3, 1.0])
def test_logged_propensities_are_the_frequencies_of_the_choices(explore):
    rng = np.random.default_rng(0)
    n = 30_000
    choices = [choose_arm(ARMS, [0.1, 0.3, 0.6], explore, rng) for _ in range(n)]
    counts = Counter(c.arm for c in choices)
    for arm in ARMS:
        logged = {c.propensity for c in choices if c.arm == arm}
        assert len(logged) == 1  # one propensity per arm for one context
        p = logged.pop()
        assert abs(counts[arm] / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9, (arm, counts[arm] / n, p)
    assert all(c.greedy_arm == "exit@2" for c in choices)


# --------------------------------------------------------------------------------------------------
# The realised trajectory: what collect's replay says the arm does
# --------------------------------------------------------------------------------------------------
def _drafts(model):
    def exit_draft(threshold):
        head = ExitHead(model, 2, "linear").eval().requires_grad_(False)
        return ExitDraft(f"exit@2-t{threshold}", head, ExitSettings(2, 3, threshold, "linear"))

    other = tiny_random(seed=3)
    return {"none": NoneDraft(), "lookup": LookupDraft(), "exit": exit_draft(0.0), "exit-stop": exit_draft(0.1),
            "model": ModelDraft("model", other, ModelDraftSettings("other", 3)),
            "lookup-tree": LookupTreeDraft("lookup-tree", LookupTreeSettings(draft_len=3, max_nodes=8)),
            "successor": SuccessorDraft("successor", SuccessorSettings(draft_len=3, max_nodes=8, top_k=4)),
            "suffix": SuffixDraft("suffix", SuffixSettings(draft_len=4, max_nodes=8, min_prob=0.0), _store())}


def _store():
    """A datastore holding part of the continuation below and a near miss of it (drafts that fail and succeed)."""
    store = SuffixStore(None, 61)
    for doc in ([48, 60, 41, 29, 29, 27, 5, 29], [5, 6, 9, 10, 11, 5, 6, 48, 60, 40], [29, 31, 27, 53, 1, 2]):
        store.add(doc)
    return store


@pytest.mark.parametrize("max_new_tokens, eos", [(1, set()), (2, set()), (17, set()), (17, {53})])
def test_recorded_steps_equal_collects_replay_for_every_kind(max_new_tokens, eos):
    model = tiny_random()
    stack = LayerStack(model)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6, 9, 10, 11, 5, 6]
    # eos {53}: the greedy continuation [48, 60, 41, 29, 29, 27, 5, 29, 31, 27, 53, ...] ends on it
    recorded = {}
    for name, draft in _drafts(model).items():
        recorder = StepRecorder(draft)
        assert (recorder.kind, recorder.draft_len, recorder.cost_key, recorder.state_layers) == (
            draft.kind, draft.draft_len, draft.cost_key, draft.state_layers)  # what the decoding loop reads
        assert (recorder.observe_top_k, recorder.max_verified()) == (draft.observe_top_k, draft.max_verified())
        new_ids, stats = speculative_decode(stack, prefill(stack, prompt), recorder,
                                            GenerationConfig(max_new_tokens=max_new_tokens), eos)
        traj = recorder.trajectory(len(new_ids))
        assert (traj.target_forwards, traj.drafted_tokens, traj.accepted_tokens, traj.nodes_verified) == (
            stats.target_forwards, stats.drafted_tokens, stats.accepted_tokens, stats.nodes_verified)
        recorded[name] = (traj, new_ids)
    new_ids = recorded["none"][1]
    ended_on_eos = len(new_ids) < max_new_tokens
    tp = teacher_pass(stack, prompt, new_ids, eos, ended_on_eos=ended_on_eos, layers=[2], extend=4, topk=4)
    for name, draft in _drafts(model).items():
        expected = replay(draft.teacher_forced(tp, 61), tp.token_ids, len(prompt), max_new_tokens, eos)
        got = recorded[name][0]
        if name != "exit-stop":
            assert got == expected, name
            continue
        # With a confidence stop the replay estimates the rejected tokens drafted after a step's first rejection
        # (draft.PredictionTeacherForced); what it says exactly is each step's accepted tokens.
        assert [s.accepted for s in got.steps] == [s.accepted for s in expected.steps]
        assert all(s.evaluations == s.drafted + s.stopped for s in got.steps)
    if max_new_tokens == 17:
        assert any(s.stopped for s in recorded["exit-stop"][0].steps)  # the confidence stop was exercised
        assert ended_on_eos == bool(eos)
    plain = replay(TeacherForced(), tp.token_ids, len(prompt), max_new_tokens, eos)
    assert plain_steps(len(new_ids), max_new_tokens, ended_on_eos) == len(plain.steps)


def test_plain_steps_cases():
    assert plain_steps(10, 10, ended_early=False) == 9  # ran to max_new_tokens: the first token is the prefill's
    assert plain_steps(4, 10, ended_early=True) == 4  # one more step produced the EOS
    assert plain_steps(0, 10, ended_early=True) == 0  # EOS straight after the prompt


# --------------------------------------------------------------------------------------------------
# Appending and reading
# --------------------------------------------------------------------------------------------------
def _row(writer: int, i: int, size: int) -> dict:
    return {"format": TRAFFIC_FORMAT, "version": 1, "writer": writer, "i": i, "pad": "x" * size}


def _write_many(path, writer: int, n: int) -> None:
    for i in range(n):
        append_line(path, _row(writer, i, 50 + (i * 7919) % 150_000))  # up to 150 KB: far past PIPE_BUF and 64 KB


def test_concurrent_writers_leave_only_whole_lines(tmp_path):
    path = tmp_path / "traffic.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    rows = [json.loads(line) for line in lines[:-1]]  # every line parses: no interleaving
    assert sorted((r["writer"], r["i"]) for r in rows) == [(w, i) for w in range(4) for i in range(40)]
    assert all(len(r["pad"]) == 50 + (r["i"] * 7919) % 150_000 for r in rows)


def test_corrupt_and_truncated_lines_are_skipped_with_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("ctxdraft"), "propagate", True)  # the CLI tests give it its own handler
    path = tmp_path / "traffic.jsonl"
    good = [json.dumps(_row(0, i, 3)) for i in range(3)]
    path.write_text("\n".join([good[0], '{"format": "ctxdraft-traffic", "ver', good[1], "", "[1, 2]",
                               json.dumps({"format": "other"}), json.dumps({**_row(0, 9, 1), "version": 99}),
                               good[2][: len(good[2]) // 2] + good[2]]) + "\n" + good[2][:-5])
    with caplog.at_level(logging.WARNING, logger="ctxdraft"):
        traffic = read_traffic([path])
    assert [r["i"] for r in traffic.rows] == [0, 1]
    assert traffic.where == ["traffic.jsonl:1", "traffic.jsonl:3"] or traffic.where[0].endswith(":1")
    assert len(traffic.skipped) == 6 and traffic.files[0] == {**traffic.files[0], "rows": 2, "skipped": 6}
    assert "line 2: not valid JSON" in caplog.text and "format version 99" in caplog.text
    assert "line 9" in caplog.text  # the truncated last line, without its newline


def test_reading_nothing_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CtxdraftError, match="hold no requests"):
        read_traffic([empty])
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{torn\n")
    with pytest.raises(CtxdraftError, match=r"hold no requests \(1 unreadable"):
        read_traffic([garbage])
    with pytest.raises(CtxdraftError, match="traffic log not found"):
        read_traffic([tmp_path / "missing.jsonl"])
    with pytest.raises(CtxdraftError, match="no traffic logs given"):
        read_traffic([])
    ok = tmp_path / "ok.jsonl"
    append_line(ok, _row(0, 0, 1))
    assert len(read_traffic([empty, ok])) == 1  # an empty file beside others only warns


# --------------------------------------------------------------------------------------------------
# Bundle.generate and `ctxdraft generate` write the log
# --------------------------------------------------------------------------------------------------
PROMPTS = [f"abc abc {i} abc abc" for i in range(8)]


def _fixed_profile():
    from ctxdraft.selfdraft.learning.costs import CostProfile

    return CostProfile(40, {m: 1.0 + 0.1 * (m - 1) for m in range(1, 10)},
                       {"none": {"evaluation_s": 0.0}, "lookup": {"evaluation_s": 0.01}})


FIXED_PROFILE = _fixed_profile()


def train_tiny_bundle(model_dir, path, num_prompts: int = 8, max_new_tokens: int = 8):
    """A tiny bundle (none, lookup, lookup-k2) with a policy trained on collected rows (BUNDLE/rewards.jsonl,
    BUNDLE/trajectories.jsonl.gz) and a fixed cost profile in bundle.json."""
    from ctxdraft.selfdraft.base.fileio import write_json_atomic
    from ctxdraft.selfdraft.commands.collect import CollectConfig
    from ctxdraft.selfdraft.commands.train_policy import train_policy
    from ctxdraft.selfdraft.learning.policy import PolicyConfig
    from ctxdraft.selfdraft.runtime.target import load_target
    from ctxdraft.selfdraft.serving.bundle import load_bundle
    from ctxdraft.selfdraft.serving.bundle_info import new_bundle_info

    target = load_target(model_dir)
    info = new_bundle_info(target, str(model_dir))
    info["arms"] = info["arms"][:3]
    info["cost_profile"] = FIXED_PROFILE.to_dict() | {"target_hash": target.content_hash}  # rewards do not depend on timing noise
    write_json_atomic(path / "bundle.json", info)
    data = path.parent / f"{path.name}-prompts.jsonl"
    data.write_text("".join(json.dumps({"id": i, "domain": "ab"[i % 2], "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // 8)})
                            + "\n" for i in range(num_prompts)))
    train_policy(load_bundle(path, calibrate=False), data=data,
                 collect_config=CollectConfig(max_new_tokens=max_new_tokens, profile_reps=1), config=PolicyConfig(epochs=5))
    return path


@pytest.fixture(scope="module")
def trained_bundle(tiny_model_dir, tmp_path_factory):
    return train_tiny_bundle(tiny_model_dir, tmp_path_factory.mktemp("traffic") / "bundle")


def test_generate_logs_each_routed_request_with_the_offline_reward(trained_bundle, tmp_path):
    from ctxdraft.selfdraft.serving.bundle import load_bundle
    from ctxdraft.selfdraft.serving.bundle_info import bundle_hash

    log = tmp_path / "traffic.jsonl"
    bundle = load_bundle(trained_bundle, calibrate=False, log=log)
    results = [bundle.generate(p, max_new_tokens=8) for p in PROMPTS[:3]]
    bundle.generate(PROMPTS[0], draft="lookup", max_new_tokens=8)  # names its arm: not a bandit decision, not logged
    rows = read_traffic([log]).rows
    assert len(rows) == 3
    collected = {json.loads(line)["features"]["tokens"].__repr__(): json.loads(line)
                 for line in (trained_bundle / "rewards.jsonl").read_text().splitlines()}
    for row, result in zip(rows, results):
        assert row["bundle"] == bundle_hash(bundle) and row["target"] == bundle.info["target"]["hash"]
        assert row["arm"] == result.arm == row["greedy_arm"] and row["propensity"] == 1.0 and row["explore"] == 0.0
        assert row["prompt_ids"] == result.prompt_ids and row["prompt_len"] == len(result.prompt_ids)
        m = row["measurement"]
        assert m["new_tokens"] == len(result.token_ids) and m["target_forwards"] == result.stats.target_forwards
        assert m["machine"]["dtype"] == m["dtype"] == "float32" and m["decode_s"] > 0
        # Greedy: the served request did what collect says the arm does on this prompt, and earns its reward.
        offline = collected[repr(result.prompt_ids)]
        assert m["trajectory"] == offline["arms"][row["arm"]]["trajectory"] and m["plain_steps"] == offline["plain_steps"]
        assert row["reward"]["speedup"] == pytest.approx(offline["arms"][row["arm"]]["speedup"], rel=1e-5)
        assert row["reward"]["profile"] == "bundle.json"
        assert row["features"]["hidden"] == pytest.approx(offline["features"]["hidden"], rel=1e-4, abs=1e-5)
        assert row["features"]["hidden_layer"] == offline["features"]["hidden_layer"]


def test_exploration_is_logged_with_its_propensity(trained_bundle, tmp_path):
    from ctxdraft.selfdraft.serving.bundle import load_bundle

    log = tmp_path / "traffic.jsonl"
    bundle = load_bundle(trained_bundle, calibrate=False, log=log, log_features_only=True, explore=1.0)
    bundle.explore_rng = np.random.default_rng(1)
    arms = [bundle.generate(PROMPTS[0], max_new_tokens=4).arm for _ in range(6)]
    rows = read_traffic([log]).rows
    assert [r["arm"] for r in rows] == arms and len(set(arms)) > 1  # explore=1: uniformly random arms
    assert all(r["propensity"] == pytest.approx(1 / 3) and "prompt_ids" not in r for r in rows)
    assert len({r["greedy_arm"] for r in rows}) == 1
    half = load_bundle(trained_bundle, calibrate=False, log=log, explore=0.5)
    half.explore_rng = np.random.default_rng(0)
    for _ in range(4):
        half.generate(PROMPTS[0], max_new_tokens=4)
    for row in read_traffic([log]).rows[6:]:
        expected = 0.5 + 0.5 / 3 if row["arm"] == row["greedy_arm"] else 0.5 / 3
        assert row["propensity"] == pytest.approx(expected)


def test_logging_needs_a_policy_and_a_usable_path(trained_bundle, tiny_model_dir, tmp_path):
    from ctxdraft.selfdraft.serving.bundle import load_bundle

    with pytest.raises(CtxdraftError, match="is a directory"):
        load_bundle(trained_bundle, log=tmp_path)
    with pytest.raises(CtxdraftError, match="does not exist"):
        load_bundle(trained_bundle, log=tmp_path / "no" / "such.jsonl")
    with pytest.raises(CtxdraftError, match="explore must be <= 1.0"):
        load_bundle(trained_bundle, explore=1.5)
    plain = load_bundle(target=str(tiny_model_dir), log=tmp_path / "t.jsonl")  # no policy: nothing is routed
    with pytest.raises(CtxdraftError, match="no policy, so no request is routed"):
        plain.generate("abc", max_new_tokens=3)
    assert plain.generate("abc", draft="lookup", max_new_tokens=3).arm == "lookup"
    assert not (tmp_path / "t.jsonl").exists()


def test_cli_generate_log_options(trained_bundle, tmp_path):
    from cli_helpers import assert_clean_error
    from click.testing import CliRunner

    from ctxdraft.cli.main import main

    log = tmp_path / "traffic.jsonl"
    runner = CliRunner()
    base = ["generate", PROMPTS[1], "--bundle", str(trained_bundle), "--max-new-tokens", "4", "--no-calibrate"]
    r = runner.invoke(main, base + ["--log", str(log), "--log-features-only", "--explore", "0.2", "--json"])
    assert r.exit_code == 0, r.output
    (row,) = read_traffic([log]).rows
    assert row["explore"] == 0.2 and "prompt_ids" not in row and row["arm"] == json.loads(r.output)["arm"]
    assert_clean_error(runner.invoke(main, base + ["--log", str(log), "--draft", "lookup"]), "use --draft auto")
    assert_clean_error(runner.invoke(main, base + ["--explore", "0.2"]), "go with --log FILE")
    assert_clean_error(runner.invoke(main, base + ["--log", str(log), "--explore", "-1"]), "explore must be >= 0.0")
    assert_clean_error(runner.invoke(main, base + ["--log", str(tmp_path / "x" / "t.jsonl")]), "does not exist")
    assert len(read_traffic([log]).rows) == 1
