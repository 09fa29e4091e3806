"""collect: simulated (teacher-forced) trajectories equal real speculative runs exactly; costs; rows; resume."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from ctxdraft.selfdraft.bundle import Bundle, new_bundle_info
from ctxdraft.selfdraft.collect import (
    CollectConfig,
    LookupTeacherForced,
    PredictionTeacherForced,
    Step,
    TeacherForced,
    Trajectory,
    collect,
    plain_seconds,
    read_rows_for_resume,
    replay,
    teacher_forced,
    teacher_pass,
    trajectory_seconds,
)
from ctxdraft.selfdraft.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafts import LookupDraft, LookupSettings, ModelDraft, ModelDraftSettings, NoneDraft
from ctxdraft.selfdraft.errors import CtxdraftError
from ctxdraft.selfdraft.layers import LayerStack
from ctxdraft.selfdraft.policy import load_rewards
from ctxdraft.selfdraft.target import load_target
from tiny import tiny_llama

V = 61
REPEATING = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 10, 11, 12, 5, 6, 7]
PLAIN = [3, 17, 42, 8, 29, 33, 4, 51, 12]


pytestmark = pytest.mark.usefixtures("one_thread")


def varied_llama(seed: int, layers: int = 4):
    """A tiny Llama whose greedy text varies: with tied, scaled-up embeddings a random model mostly repeats
    its last token, so give it its own random LM head."""
    model = tiny_llama(V, seed=seed, layers=layers)
    g = torch.Generator().manual_seed(100 + seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, model.config.hidden_size, generator=g), requires_grad=False)
    return model


def truncated(model, num_layers: int):
    """The target's first layers (and its LM head) as a draft model: it agrees with the target part of the time."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:num_layers]
    draft.config.num_hidden_layers = num_layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:num_layers]
    return draft


@pytest.fixture(scope="module")
def target():
    return varied_llama(seed=0)


@pytest.fixture(scope="module")
def other_model():
    return varied_llama(seed=1, layers=2)


def exit_drafts(target):
    exits = pytest.importorskip("ctxdraft.selfdraft.exits", reason="selfdraft/exits.py (exit heads) is not in this checkout")
    ExitHead, ExitDraft, ExitSettings = exits.ExitHead, exits.ExitDraft, exits.ExitSettings
    # Untrained heads (the target's own norm + LM head on layer E): partial agreement, varied confidence.
    return [
        ExitDraft("exit@2", ExitHead(target, 2, "linear"), ExitSettings(2, draft_len=3)),
        ExitDraft("exit@3-thr", ExitHead(target, 3, "linear"), ExitSettings(3, draft_len=5, threshold=0.5)),
        ExitDraft("exit@1-layer", ExitHead(target, 1, "layer"), ExitSettings(1, draft_len=4, head="layer")),
    ]


def all_drafts(kind, target, other_model):
    if kind == "none":
        return [NoneDraft()]
    if kind == "lookup":
        return [LookupDraft("l1", LookupSettings(1)), LookupDraft("l3", LookupSettings(3)),
                LookupDraft("l7-unigram", LookupSettings(7, [1]))]
    if kind == "model":
        return [ModelDraft("self", target, ModelDraftSettings(draft_len=4)),  # accepts everything
                ModelDraft("truncated", truncated(target, 3), ModelDraftSettings(draft_len=3)),  # accepts some
                ModelDraft("other", other_model, ModelDraftSettings(draft_len=3))]  # rejects most
    return exit_drafts(target)


def greedy(stack, prompt, max_new, eos):
    return speculative_decode(stack, prefill(stack, prompt), NoneDraft(), GenerationConfig(max_new_tokens=max_new), eos)[0]


def late_eos(stack, prompt) -> set[int]:
    """A token the target first emits after a few steps: as EOS, generation ends on it mid-way."""
    ids = greedy(stack, prompt, 30, set())
    return {next(t for i, t in enumerate(ids) if i >= 6 and t not in ids[:i])}


def cases(target):
    """(prompt, max_new_tokens, eos ids): repeating and plain text, tiny budgets, and EOS mid-way."""
    stack = LayerStack(target)
    out = []
    for prompt in (REPEATING, PLAIN):
        out += [(prompt, 30, set()), (prompt, 2, set()), (prompt, 1, set()), (prompt, 30, late_eos(stack, prompt))]
    return out


@pytest.mark.parametrize("kind", ["none", "lookup", "model", "exit"])
def test_simulated_trajectories_equal_real_runs(kind, target, other_model):
    drafts = all_drafts(kind, target, other_model)
    stack = LayerStack(target)
    exit_layers = [d.head.exit_layer for d in drafts if d.kind == "exit"]
    for prompt, max_new, eos in cases(target):
        new_ids = greedy(stack, prompt, max_new, eos)
        tp = teacher_pass(stack, prompt, new_ids, exit_layers, eos, len(new_ids) < max_new, extend=8)
        for draft in drafts:
            got, stats = speculative_decode(stack, prefill(stack, prompt), draft, GenerationConfig(max_new_tokens=max_new), eos)
            assert got == new_ids
            traj = replay(teacher_forced(draft, tp, V), tp.token_ids, len(prompt), max_new, eos)
            where = f"{draft.name} on prompt {prompt[:3]}..., max_new {max_new}, eos {eos}"
            assert traj.target_forwards == stats.target_forwards, where
            assert traj.accepted_tokens == stats.accepted_tokens, where
            assert traj.new_tokens == stats.new_tokens, where
            # A confidence-stopped exit draft's rejected tail is estimated (see collect's docstring); all else is exact.
            if getattr(getattr(draft, "settings", None), "threshold", 0) == 0:
                assert traj.drafted_tokens == stats.drafted_tokens, where
            assert traj.tokens_per_forward == pytest.approx(stats.tokens_per_forward), where


def test_real_runs_do_draft_past_eos(target):
    """The EOS cases above are not vacuous: a draft proposes, and the target accepts, tokens past EOS
    (tokens emitted > returned tokens + the EOS), which the simulation must reproduce."""
    stack = LayerStack(target)
    past = 0
    for prompt in (REPEATING, PLAIN):
        eos = late_eos(stack, prompt)
        for k in (3, 4, 5):
            draft = ModelDraft("self", target, ModelDraftSettings(draft_len=k))
            _, stats = speculative_decode(stack, prefill(stack, prompt), draft, GenerationConfig(max_new_tokens=30), eos)
            assert stats.new_tokens >= 6
            past += stats.accepted_tokens + stats.target_forwards - 1 > stats.new_tokens + 1
    assert past > 0


def test_replay_hand_built():
    prompt = [1, 2, 3]
    seq = prompt + [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    perfect = PredictionTeacherForced("model", seq[1:] + [0], draft_len=3)
    # new = [10]; budget 8 -> 3 accepted + bonus (5 new); budget 4 -> 3 + bonus (9); budget 0 -> no draft (10).
    traj = replay(perfect, seq, len(prompt), 10, set())
    assert [(s.drafted, s.accepted) for s in traj.steps] == [(3, 3), (3, 3), (0, 0)]
    assert (traj.target_forwards, traj.new_tokens) == (4, 10)
    # EOS = 14 is the first step's bonus token: generation ends, the tokens before it are returned.
    traj = replay(perfect, seq, len(prompt), 10, {14})
    assert [(s.drafted, s.accepted) for s in traj.steps] == [(3, 3)] and traj.new_tokens == 4
    # A draft that is always wrong: one token per forward, like none.
    wrong = PredictionTeacherForced("model", [0] * len(seq), draft_len=2)
    traj = replay(wrong, seq, len(prompt), 10, set())
    assert traj.target_forwards == replay(TeacherForced(), seq, len(prompt), 10, set()).target_forwards == 10
    assert traj.accepted_tokens == 0 and traj.drafted_tokens == 2 * 7 + 1  # budgets 8..2, then 1, then 0
    # Confidence stop: below the threshold the draft stops and its last evaluation covers one more position.
    shy = PredictionTeacherForced("exit", seq[1:] + [0], draft_len=3, confidence=[0.9, 0.9, 0.9, 0.9, 0.2] + [0.9] * 8,
                                  threshold=0.5)
    step = replay(shy, seq, len(prompt), 10, set()).steps[0]
    assert (step.drafted, step.accepted, step.draft_steps, step.covered) == (1, 1, 2, True)


def test_lookup_teacher_forced_reads_only_the_true_prefix():
    seq = [7, 8, 9, 7, 8, 4, 7, 8]
    tf = LookupTeacherForced(LookupSettings(draft_len=3))
    assert tf.propose(seq, 4, 10).ids == [9, 7, 8]  # "7 8" was followed by 9 ... in the prefix [7 8 9 7 8]
    assert tf.propose(seq, 7, 10).ids == [4, 7, 8]  # latest occurrence wins once "7 8 4" is in the prefix
    assert tf.propose(seq, 7, 1).ids == [4]  # the budget caps the draft


def test_cost_model_formula():
    profile = {"target_forward_s": {"1": 1.0, "2": 1.2, "3": 1.5, "4": 2.0},
               "arms": {"none": {"draft_step_s": 0.0}, "m": {"draft_step_s": 0.1},
                        "e": {"draft_step_s": 0.25, "verify_s": {"0": 1.0, "1": 0.9, "2": 1.1},
                              "verify_covered_s": {"0": 0.75, "1": 0.7, "2": 0.8}}}}
    traj = Trajectory([Step(3, 3, 2), Step(1, 0, 0)], new_tokens=5)
    assert trajectory_seconds(traj, profile, "m") == pytest.approx(3 * 0.1 + 2.0 + 0.1 + 1.0)
    traj = Trajectory([Step(2, 2, 2), Step(2, 1, 0, covered=True)], new_tokens=5)
    assert trajectory_seconds(traj, profile, "e") == pytest.approx(0.5 + 1.1 + 0.5 + 0.7)
    plain = Trajectory([Step(0, 0, 0)] * 4, new_tokens=5)
    assert plain_seconds(plain, profile) == 4.0
    with pytest.raises(CtxdraftError, match="reprofile"):
        trajectory_seconds(Trajectory([Step(5, 5, 0)], 6), profile, "m")


# -- collect() on a tiny bundle ------------------------------------------------------------------

PROMPTS = ["abc abc abc", "hello there", "1 2 3 4 1 2 3", "go go go go", "xyz", "the cat sat", "a b a b a b"]


@pytest.fixture()
def tiny_bundle(tiny_model_dir, tmp_path):
    target = load_target(tiny_model_dir)
    info = new_bundle_info(target, str(tiny_model_dir))
    info["arms"] = [a for a in info["arms"] if a["name"] in ("none", "lookup")]
    info["arms"].append({"name": "lookup-k2", "kind": "lookup", "settings": {"draft_len": 2, "ngram_sizes": [2, 1]}})
    path = tmp_path / "bundle"
    path.mkdir()
    bundle = Bundle(path, info, _target=target)
    bundle.save()
    return bundle


def rows(n, offset=0):
    return [{"id": f"p{i}", "domain": ["qa", "math"][i % 2], "prompt": PROMPTS[i % len(PROMPTS)] + f" {i}"}
            for i in range(offset, offset + n)]


FAST = dict(max_new_tokens=12, profile_reps=1)


def test_collect_rows_load_as_rewards_and_resume(tiny_bundle, tmp_path):
    out = tmp_path / "rewards.jsonl"
    done = []
    summary = collect(tiny_bundle, rows(3), out, CollectConfig(**FAST), progress=lambda i, n: done.append((i, n)))
    assert done[-1] == (3, 3) and summary["num_new"] == 3
    assert summary["exactness_check"] == {"arm": "lookup", "prompts": 3, "exact": 3}
    info = json.loads((tiny_bundle.path / "bundle.json").read_text())
    assert info["cost_profile"]["target_forward_s"]["1"] > 0 and set(info["cost_profile"]["arms"]) == set(tiny_bundle.arms)
    assert info["features"]["kind"] == "hidden" and info["features"]["layer"] == 1  # round(4 / 3)
    data = load_rewards(out)
    assert data.arm_names == tiny_bundle.arms and len(data) == 3
    assert data.hidden.shape == (3, tiny_bundle.target.model.config.hidden_size + 1)
    assert (data.rewards[:, 0] == 1.0).all()  # none
    row = json.loads(out.read_text().splitlines()[0])
    assert row["features"]["tokens"] == tiny_bundle.target.encode(rows(1)[0]["prompt"])
    assert row["arms"]["lookup"]["target_forwards"] >= 1

    # An interrupted run left half a row behind: --resume drops it and collects only what is missing.
    with open(out, "a") as f:
        f.write('{"id": "p3", "arms": {')
    summary = collect(tiny_bundle, rows(5), out, CollectConfig(resume=True, **FAST))
    assert (summary["num_new"], summary["num_skipped"], summary["num_rows"]) == (2, 3, 5)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"p{i}" for i in range(5)]
    assert not summary["profiled_now"]  # the bundle's profile fits: not measured again

    with pytest.raises(CtxdraftError, match="max-new-tokens"):
        collect(tiny_bundle, rows(5), out, CollectConfig(resume=True, max_new_tokens=7, profile_reps=1))
    with pytest.raises(CtxdraftError, match="another pool"):
        collect(tiny_bundle, rows(5), out, CollectConfig(resume=True, draft_len=3, **FAST))
    changed = rows(5)
    changed[0]["prompt"] = "something else"
    with pytest.raises(CtxdraftError, match="another prompt"):
        collect(tiny_bundle, changed, out, CollectConfig(resume=True, **FAST))
    # Without --resume the file starts over.
    collect(tiny_bundle, rows(1), out, CollectConfig(**FAST))
    assert len(out.read_text().splitlines()) == 1


def test_collect_malformed_inputs(tiny_bundle, tmp_path):
    out = tmp_path / "r.jsonl"
    with pytest.raises(CtxdraftError, match="duplicate id"):
        collect(tiny_bundle, rows(2) + rows(1), out, CollectConfig(**FAST))
    with pytest.raises(CtxdraftError, match="max-new-tokens"):
        collect(tiny_bundle, rows(1), out, CollectConfig(max_new_tokens=0))
    with pytest.raises(CtxdraftError, match="draft-len"):
        collect(tiny_bundle, rows(1), out, CollectConfig(draft_len=0))
    with pytest.raises(CtxdraftError, match="context"):
        collect(tiny_bundle, [{"id": 1, "prompt": "x" * 300}], out, CollectConfig(**FAST))
    with pytest.raises(CtxdraftError, match="no prompts"):
        collect(tiny_bundle, [], out, CollectConfig(**FAST))
    out.write_text('{"id": "p0"}\nnot json\n{"id": "p1"}\n')
    with pytest.raises(CtxdraftError, match="line 2"):
        read_rows_for_resume(out)
    spec = {"name": "weird", "kind": "weird", "settings": {}}
    tiny_bundle.info["arms"].append(spec)
    with pytest.raises(CtxdraftError, match="unknown kind"):
        collect(tiny_bundle, rows(1), out, CollectConfig(**FAST))
