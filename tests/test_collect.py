"""collect() on a tiny bundle: rows that load as rewards, the stored profile, resume, malformed inputs."""
from __future__ import annotations

import json

import pytest

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.commands.collect import CollectConfig, collect, read_rows_for_resume
from ctxdraft.selfdraft.learning.rewards import load_rewards
from ctxdraft.selfdraft.runtime.target import load_target
from ctxdraft.selfdraft.serving.bundle import Bundle
from ctxdraft.selfdraft.serving.bundle_info import new_bundle_info

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
    summary = collect(tiny_bundle, rows(3), out, CollectConfig(**FAST), progress=lambda s, i, n: done.append((s, i, n)))
    assert done[-1] == ("collect", 3, 3) and summary["num_new"] == 3
    assert summary["exactness_check"] == {"arm": "lookup", "prompts": 3, "exact": 3}
    info = json.loads((tiny_bundle.path / "bundle.json").read_text())
    assert info["cost_profile"]["target_step_s"]["1"] > 0
    assert set(info["cost_profile"]["drafts"]) == {"none", "lookup"}  # lookup-k2 shares lookup's measurement
    assert info["features"]["kind"] == "hidden" and info["features"]["layer"] == 1  # round(4 / 3)
    data = load_rewards(out)
    assert data.arm_names == tiny_bundle.arms and len(data) == 3
    assert data.hidden.shape == (3, tiny_bundle.target.model.config.hidden_size + 1)
    assert (data.rewards[:, 0] == 1.0).all()  # none
    row = json.loads(out.read_text().splitlines()[0])
    assert row["features"]["tokens"] == tiny_bundle.target.encode(rows(1)[0]["prompt"])
    assert row["arms"]["lookup"]["target_forwards"] >= 1
    # The stored trajectory is the arm's record: recomputing the reward from it gives the logged one.
    from ctxdraft.selfdraft.learning.costs import CostProfile
    from ctxdraft.selfdraft.learning.rewards import recompute_rewards

    again = recompute_rewards([row], {"none": "none", "lookup": "lookup", "lookup-k2": "lookup"},
                              CostProfile.from_dict(info["cost_profile"]))[0]
    for arm in tiny_bundle.arms:
        assert again["arms"][arm]["speedup"] == pytest.approx(row["arms"][arm]["speedup"], rel=1e-6)

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


def test_collect_replays_tree_arms_exactly_as_the_bundle_serves_them(tiny_bundle, tmp_path):
    """Tree arms' rows: the profile covers their node caps, and each stored trajectory (nodes and accepted tokens
    per step) is what the bundle's own draft does on the prompt, node budget from the same costs included. Catches
    a teacher pass without the target's top-k (successor), or collect sizing trees without the bundle's costs."""
    from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
    from ctxdraft.selfdraft.drafting.pool import lookup_tree_arm, successor_arm, suffix_arm
    from ctxdraft.selfdraft.learning.trajectories import Trajectory
    from ctxdraft.selfdraft.serving.traffic import StepRecorder

    tiny_bundle.info["arms"] += [lookup_tree_arm(draft_len=4, max_nodes="auto"), successor_arm(draft_len=4, max_nodes=8),
                                 suffix_arm(draft_len=4, max_nodes="auto", min_prob=0.0)]
    tiny_bundle.save()
    out = tmp_path / "rewards.jsonl"
    collect(tiny_bundle, rows(2), out, CollectConfig(max_new_tokens=20, profile_reps=1))
    info = json.loads((tiny_bundle.path / "bundle.json").read_text())
    assert "65" in info["cost_profile"]["target_step_s"]  # lookup-tree-auto: up to 64 nodes
    target = tiny_bundle.target
    for row, spec in zip([json.loads(line) for line in out.read_text().splitlines()], rows(2)):
        prompt_ids = target.encode(spec["prompt"], chat=True)
        for name in ("lookup-tree-auto", "successor-n8", "suffix-auto"):
            stored = Trajectory.from_dict(row["arms"][name]["trajectory"])
            recorder = StepRecorder(tiny_bundle.draft(name))
            speculative_decode(tiny_bundle.stack, prefill(tiny_bundle.stack, prompt_ids), recorder,
                               GenerationConfig(max_new_tokens=20), target.eos_ids)
            assert [(s.nodes, s.accepted) for s in recorder.steps] == [(s.nodes, s.accepted) for s in stored.steps]
            assert row["arms"][name]["nodes_per_step"] == pytest.approx(stored.nodes_per_step, abs=1e-3)
