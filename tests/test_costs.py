"""The one cost model: the formula, the stored profile, measuring it, and that add-exits' speed-up of an exit
is exactly the reward collect gives the same arm on the same prompts."""
from __future__ import annotations

import json

import pytest
from tiny import save_word_target, write_word_prompts

from ctxdraft.selfdraft.base.data import read_prompts
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.commands.add_exits import add_exits
from ctxdraft.selfdraft.commands.collect import CollectConfig, collect
from ctxdraft.selfdraft.drafting.drafts import LookupDraft, LookupSettings, NoneDraft
from ctxdraft.selfdraft.drafting.pool import build_drafts
from ctxdraft.selfdraft.learning.costs import CostProfile, max_positions, measure_profile, plain_steps, reward
from ctxdraft.selfdraft.learning.exit_train import ExitTrainConfig
from ctxdraft.selfdraft.learning.trajectories import Step, Trajectory
from ctxdraft.selfdraft.runtime.layers import LayerStack
from ctxdraft.selfdraft.runtime.target import load_target
from ctxdraft.selfdraft.serving.bundle import load_bundle

PROFILE = CostProfile(
    context_tokens=100,
    target_step_s={1: 1.0, 2: 1.2, 3: 1.5, 4: 2.0},
    drafts={"none": {"evaluation_s": 0.0}, "m": {"evaluation_s": 0.1},
            "e": {"evaluation_s": 0.25, "verify_s": {0: 1.0, 1: 0.9, 2: 1.1}, "verify_stopped_s": {0: 0.75, 1: 0.7, 2: 0.8}}},
    target_hash="abc",
)


def test_plain_steps_rule():
    """Plain decoding of n tokens: the prefill gives the first, so n - 1 steps, plus one for an EOS before the limit."""
    assert plain_steps(5, 10, ended_early=False) == 4
    assert plain_steps(5, 10, ended_early=True) == 5
    assert plain_steps(10, 10, ended_early=True) == 9  # the limit, not an EOS, ended it
    assert plain_steps(0, 10, ended_early=False) == 0


def test_formula():
    traj = Trajectory([Step(3, 3, 2), Step(1, 0, 0)], new_tokens=5)
    assert PROFILE.seconds(traj, "m") == pytest.approx(3 * 0.1 + 2.0 + 0.1 + 1.0)
    traj = Trajectory([Step(2, 2, 2), Step(2, 1, 0, stopped=True)], new_tokens=5)
    assert PROFILE.seconds(traj, "e") == pytest.approx(0.5 + 1.1 + 0.5 + 0.7)
    plain = Trajectory([Step(0, 0, 0)] * 4, new_tokens=5)
    assert PROFILE.plain_seconds(plain) == 4.0
    assert PROFILE.speedup(traj, plain, "e") == pytest.approx(4.0 / 2.8)
    assert reward(PROFILE, "e", traj, 4) == pytest.approx(4.0 / 2.8)  # the one reward: a step count, not a trajectory
    with pytest.raises(CtxdraftError, match="no timing for verifying 5"):
        PROFILE.seconds(Trajectory([Step(5, 5, 0)], 6), "m")
    with pytest.raises(CtxdraftError, match="no timings for draft 'x'"):
        PROFILE.seconds(traj, "x")


def test_profile_round_trips_through_json_and_rejects_other_versions():
    stored = json.loads(json.dumps(PROFILE.to_dict()))
    assert CostProfile.from_dict(stored) == PROFILE
    assert CostProfile.from_dict({**stored, "version": 1}) is None
    assert CostProfile.from_dict({"version": 2, "drafts": 5}) is None
    assert CostProfile.from_dict(None) is None


def test_fits_needs_every_draft_and_every_length():
    drafts = {"none": NoneDraft("none"), "l2": LookupDraft("l2", LookupSettings(2)), "l3": LookupDraft("l3", LookupSettings(3))}
    for name in ("l2", "l3"):
        drafts[name].cost_key = "m"  # two arms of one draft share one measurement
    assert PROFILE.fits(drafts, "abc")
    assert not PROFILE.fits(drafts, "other-target")
    drafts["l4"] = LookupDraft("l4", LookupSettings(4))
    drafts["l4"].cost_key = "m"
    assert not PROFILE.fits(drafts, "abc")  # 5 positions: target_step_s stops at 4
    assert not PROFILE.fits({"x": LookupDraft("x", LookupSettings(1))}, "abc")  # cost key "x" was never measured


def test_measure_profile_shares_one_measurement_per_draft(tiny_model_dir):
    target = load_target(tiny_model_dir)
    arms = [{"name": "none", "kind": "none", "settings": {}},
            {"name": "lookup", "kind": "lookup", "settings": {"draft_len": 4}},
            {"name": "lookup-k2", "kind": "lookup", "settings": {"draft_len": 2}}]
    drafts = build_drafts(arms, target)
    stack = LayerStack(target.model)
    profile = measure_profile(stack, drafts, target.encode("abc abc abc") * 3, target.vocab_size, reps=1,
                              target_hash=target.content_hash)
    assert set(profile.drafts) == {"none", "lookup"}
    assert sorted(profile.target_step_s) == list(range(1, max_positions(drafts) + 1)) == [1, 2, 3, 4, 5]
    assert all(s > 0 for s in profile.target_step_s.values()) and profile.drafts["none"]["evaluation_s"] == 0.0
    assert profile.fits(drafts, target.content_hash)


TREE_PROFILE = CostProfile(context_tokens=100, target_step_s={**PROFILE.target_step_s, 17: 3.0, 33: 5.0},
                           drafts={"successor": {"evaluation_s": 0.01}})


def test_a_tree_step_costs_the_step_over_its_nodes_plus_one():
    """Catches a tree costed by its accepted path or its depth instead of the positions the target verified."""
    assert TREE_PROFILE.step_seconds(21) == pytest.approx(3.0 + 2.0 * 4 / 16)  # between the measured 17 and 33
    assert TREE_PROFILE.step_seconds(4) == 2.0 and TREE_PROFILE.step_seconds(34) is None
    tree = Trajectory([Step(1, 20, 3, nodes=20), Step(1, 2, 0)], new_tokens=6)
    assert TREE_PROFILE.seconds(tree, "successor") == pytest.approx(0.01 + 3.5 + 0.01 + 1.5)
    assert reward(TREE_PROFILE, "successor", tree, 5) == pytest.approx(5.0 / 5.02)
    assert TREE_PROFILE.step_curve(5) == pytest.approx([0.0, 1.0, 1.2, 1.5, 2.0, 2.0 + 1.0 / 13])
    with pytest.raises(CtxdraftError, match="no timing for verifying 40"):
        TREE_PROFILE.seconds(Trajectory([Step(1, 40, 1)], 2), "successor")
    with pytest.raises(CtxdraftError, match="up to 40 positions"):
        TREE_PROFILE.step_curve(40)


def test_a_tree_arm_is_costed_on_the_tree_curve_and_a_chain_on_the_chain_curve():
    """Catches tree steps costed as chain steps of as many positions (a tree forward's 4D mask and path gather cost
    more on a CPU: a chain-shaped profile over-values big trees) and chain arms costed as trees."""
    profile = CostProfile(context_tokens=100, target_step_s={1: 1.0, 2: 1.2, 3: 1.5, 4: 2.0},
                          tree_step_s={2: 1.5, 3: 2.0, 4: 3.0},
                          drafts={"t": {"evaluation_s": 0.0, "tree": True}, "c": {"evaluation_s": 0.0}})
    steps = Trajectory([Step(1, 3, 1, nodes=3), Step(0, 0, 0)], new_tokens=3)
    assert profile.seconds(steps, "t") == pytest.approx(3.0 + 1.0)  # an empty tree is a plain step
    assert profile.seconds(Trajectory([Step(3, 3, 1)], 2), "c") == pytest.approx(2.0)
    assert profile.step_curve(4, tree=True) == [0.0, 1.0, 1.5, 2.0, 3.0]
    assert profile.step_curve(4) == [0.0, 1.0, 1.2, 1.5, 2.0]
    assert CostProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    old = CostProfile.from_dict({**profile.to_dict(), "tree_step_s": None})  # measured before trees were timed
    assert old is not None and old.step_curve(4, tree=True) == old.step_curve(4)


def test_batch_curve_fits_rows_and_positions_and_falls_back_to_one_rows_curve():
    """Catches a batch priced as one row's forward over as many positions (it pays per row too) and a profile without
    batch timings failing instead of falling back."""
    timed = [[b, m, 0.010 + 0.004 * b + 0.001 * m] for b in (2, 4, 8) for m in (b, 2 * b, 3 * b)]
    profile = CostProfile(context_tokens=100, target_step_s={1: 1.0, 2: 1.2, 3: 1.5, 4: 2.0}, batch_step_s=timed)
    curve = profile.batch_curve(8, 40)
    assert curve[8] == pytest.approx(0.010 + 0.032 + 0.008) and curve[40] == pytest.approx(0.010 + 0.032 + 0.040)
    assert profile.batch_curve(2, 40)[8] < curve[8]  # the same positions over fewer rows cost less
    assert CostProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    alone = CostProfile(context_tokens=100, target_step_s={1: 1.0, 2: 1.2, 3: 1.5, 4: 2.0})
    assert alone.batch_curve(4, 6) == pytest.approx([0.0, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0])  # one row's, extrapolated


def test_measure_profile_times_batched_steps_when_asked(tiny_model_dir):
    target = load_target(tiny_model_dir)
    drafts = build_drafts([{"name": "none", "kind": "none", "settings": {}}], target)
    stack = LayerStack(target.model)
    profile = measure_profile(stack, drafts, target.encode("abc abc abc") * 3, target.vocab_size, reps=1, batch=True)
    assert sorted((b, m) for b, m, _ in profile.batch_step_s) == sorted(
        (b, b * (k + 1)) for b in (2, 4, 8, 16) for k in (0, 1, 2, 4))
    assert all(s > 0 for _, _, s in profile.batch_step_s) and len(profile.batch_curve(16, 80)) == 81
    assert measure_profile(stack, drafts, target.encode("abc") * 3, target.vocab_size, reps=1).batch_step_s == []


def test_trajectory_rows_keep_nodes_and_old_rows_read_as_chains():
    old = Trajectory.from_dict({"new_tokens": 4, "steps": [[1, 3, 2, 0], [2, 1, 0, 1]]})
    assert [s.nodes for s in old.steps] == [3, 1] and old.nodes_per_step == 2.0
    assert old.to_dict()["steps"] == [[1, 3, 2, 0], [2, 1, 0, 1]]  # a chain's row is written as before
    tree = Trajectory([Step(1, 12, 3, nodes=12), Step(1, 9, 1, nodes=9)], 6)
    assert Trajectory.from_dict(tree.to_dict()) == tree and tree.nodes_per_step == 10.5
    mixed = Trajectory.from_dict({"new_tokens": 4, "steps": [[1, 2, 1, 0, 9]]})
    assert mixed.steps[0].nodes == 9 and mixed.to_dict()["steps"] == [[1, 2, 1, 0, 9]]
    for bad in ([[1, 3, 2, 0, 1]], [[1, 3, 2, 0, 3, 3]], [[1, 3, 2, 0, "x"]]):  # fewer nodes than accepted; too long
        with pytest.raises(CtxdraftError):
            Trajectory.from_dict({"new_tokens": 4, "steps": bad})


def test_measure_profile_covers_the_tree_sizes_in_use(tiny_model_dir):
    target = load_target(tiny_model_dir)
    drafts = build_drafts([{"name": "none", "kind": "none", "settings": {}},
                           {"name": "t", "kind": "successor", "settings": {"max_nodes": 40}}], target)
    stack = LayerStack(target.model)
    profile = measure_profile(stack, drafts, target.encode("abc abc abc") * 3, target.vocab_size, reps=1)
    assert max_positions(drafts) == 41
    assert sorted(profile.target_step_s) == list(range(1, 18)) + [25, 33, 41]
    assert sorted(profile.tree_step_s) == list(range(2, 18)) + [25, 33, 41]  # the tree arm's steps, timed as trees
    assert profile.drafts[drafts["t"].cost_key].get("tree") and not profile.drafts["none"].get("tree")
    assert profile.fits(drafts, None) and len(profile.step_curve(41, tree=True)) == 42
    smaller = CostProfile.from_dict({**profile.to_dict(), "target_step_s": {str(m): 1.0 for m in range(1, 18)}})
    assert smaller is not None and not smaller.fits(drafts, None)  # an old profile: readable, too small for the tree
    chain_shaped = CostProfile.from_dict({**profile.to_dict(), "tree_step_s": {}})
    assert chain_shaped is not None and not chain_shaped.fits(drafts, None)  # trees not timed as trees: measure again


def test_add_exits_speedup_is_collects_reward_on_the_same_prompts(tmp_path):
    model_dir = save_word_target(tmp_path / "model")
    data = write_word_prompts(tmp_path / "data.jsonl", n=8)
    target = load_target(model_dir)
    out = tmp_path / "bundle"
    config = ExitTrainConfig(layers=[2], steps=5, self_distill_tokens=12, eval_frac=0.25, draft_lens=[1, 2, 3],
                             thresholds=[0.0, 0.5], timing_reps=1)
    report = add_exits(target, str(model_dir), read_prompts(data), out, config)
    entry = report["exits"][0]
    held = {str(i) for i in report["data"]["heldout_ids"]}
    rows = [r for r in read_prompts(data) if str(r["id"]) in held]
    summary = collect(load_bundle(out, target=str(model_dir)), rows, tmp_path / "rewards.jsonl",
                      CollectConfig(max_new_tokens=12))
    assert not summary["profiled_now"]  # the profile add-exits measured serves collect
    assert summary["overall"]["speedup"]["exit@2"] == pytest.approx(entry["speedup"], rel=1e-6)
    assert summary["overall"]["tokens_per_forward"]["exit@2"] == pytest.approx(entry["tokens_per_forward"], rel=1e-6)
    assert entry["speedup"] != pytest.approx(1.0)  # not a vacuous agreement of two 1.0s
