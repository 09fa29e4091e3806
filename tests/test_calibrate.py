"""Calibration: rewards recomputed from stored trajectories for this machine's costs, a policy retrained and
stored per (bundle, machine), used by routing, replaced when damaged, never written into the bundle."""
from __future__ import annotations

import json

import pytest

from ctxdraft.selfdraft.base.fileio import write_json_atomic
from ctxdraft.selfdraft.commands.collect import CollectConfig
from ctxdraft.selfdraft.commands.train_policy import train_policy
from ctxdraft.selfdraft.drafting.pool import lookup_tree_arm
from ctxdraft.selfdraft.learning.costs import CostProfile
from ctxdraft.selfdraft.learning.policy import PolicyConfig, choose_arms, policy_inputs, train_reinforce
from ctxdraft.selfdraft.learning.rewards import read_trajectories, recompute_rewards, rewards_from_rows
from ctxdraft.selfdraft.runtime.target import load_target
from ctxdraft.selfdraft.serving.bundle import load_bundle
from ctxdraft.selfdraft.serving.bundle_info import new_bundle_info
from ctxdraft.selfdraft.serving.calibration import CALIBRATION_FILE, calibrate, find_calibration


def synthetic_rows(n=12):
    """Lookup accepts 2 of 2 drafted tokens every step on half the prompts, nothing on the others."""
    rows = []
    for i in range(n):
        good = i % 2 == 0
        steps = [[1, 2, 2, 0]] * 10 if good else [[1, 2, 0, 0]] * 30
        rows.append({"id": i, "domain": "ab"[i % 2], "prompt_len": 5, "new_tokens": 30, "plain_steps": 29,
                     "features": {"hidden": [1.0 if good else -1.0, 0.5], "hidden_layer": 1},
                     "arms": {"none": {"trajectory": {"new_tokens": 30, "steps": [[0, 0, 0, 0]] * 29}},
                              "lookup": {"trajectory": {"new_tokens": 30, "steps": steps}}}})
    return rows


def profile(evaluation_s):
    return CostProfile(64, {1: 1.0, 2: 1.1, 3: 1.2}, {"none": {"evaluation_s": 0.0}, "lookup": {"evaluation_s": evaluation_s}})


def test_rewards_follow_the_machines_costs_and_the_policy_follows_the_rewards():
    keys = {"none": "none", "lookup": "lookup"}
    cheap = recompute_rewards(synthetic_rows(), keys, profile(0.01))
    dear = recompute_rewards(synthetic_rows(), keys, profile(3.0))
    assert cheap[0]["arms"]["lookup"]["speedup"] == pytest.approx(29 / (10 * (0.01 + 1.2)))
    assert cheap[0]["arms"]["lookup"]["speedup"] > 1 > dear[0]["arms"]["lookup"]["speedup"]
    # On a machine where a lookup costs 3 target steps, lookup is slower than none everywhere: a policy trained on
    # the recomputed rewards never picks it.
    data = rewards_from_rows(dear)
    policy = train_reinforce(data, list(range(len(data))), PolicyConfig(epochs=60))
    choices = choose_arms(policy, policy_inputs(data, list(range(len(data))), "hidden")).tolist()
    assert set(choices) == {data.arm_names.index("none")}
    cheap_policy = train_reinforce(rewards_from_rows(cheap), list(range(12)), PolicyConfig(epochs=120))
    cheap_choices = choose_arms(cheap_policy, policy_inputs(data, list(range(12)), "hidden")).tolist()
    assert cheap_choices == [data.arm_names.index("lookup" if i % 2 == 0 else "none") for i in range(12)]


@pytest.fixture()
def trained_bundle(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CTXDRAFT_CALIBRATIONS", str(tmp_path / "calibrations"))
    info = new_bundle_info(load_target(tiny_model_dir), str(tiny_model_dir))
    info["arms"] = info["arms"][:3]  # none, lookup, lookup-k2
    write_json_atomic(tmp_path / "b" / "bundle.json", info)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": i, "domain": "ab"[i % 2], "prompt": f"abc abc {i} abc abc"}) + "\n"
                            for i in range(8)))
    train_policy(load_bundle(tmp_path / "b", calibrate=False), data=data,
                 collect_config=CollectConfig(max_new_tokens=8, profile_reps=1), config=PolicyConfig(epochs=5))
    return tmp_path / "b"


def test_train_policy_ships_the_trajectories(trained_bundle):
    rows = read_trajectories(trained_bundle)
    assert len(rows) == 8 and set(rows[0]["arms"]) == {"none", "lookup", "lookup-k2"}
    assert all("speedup" not in a for a in rows[0]["arms"].values())  # hardware-dependent numbers stay out


def test_calibrate_stores_a_policy_for_this_machine_and_routing_uses_it(trained_bundle):
    shipped = {p.name: p.read_bytes() for p in trained_bundle.rglob("*") if p.is_file()}
    bundle = load_bundle(trained_bundle, calibrate=True)
    assert find_calibration(bundle) is None
    calibration = calibrate(bundle, reps=1, epochs=5)
    assert calibration.policy_path.is_file() and (calibration.path / CALIBRATION_FILE).is_file()
    assert not calibration.path.is_relative_to(trained_bundle)
    assert {p.name: p.read_bytes() for p in trained_bundle.rglob("*") if p.is_file()} == shipped  # bundle untouched
    assert calibration.machine["dtype"] == "float32" and calibration.report["rows"] == 8
    assert set(calibration.report["arms"]["overall"]["speedup"]) == {"none", "lookup", "lookup-k2"}
    again = load_bundle(trained_bundle, calibrate=True)
    assert find_calibration(again).path == calibration.path
    assert again.router().path == calibration.policy_path
    assert load_bundle(trained_bundle, calibrate=False).router().path == trained_bundle / "policy.onnx"
    assert "calibrated" in again.calibration_note()


def test_first_use_calibrates_once_and_a_damaged_calibration_is_replaced(trained_bundle):
    bundle = load_bundle(trained_bundle, calibrate=True)
    router = bundle.router()  # no calibration yet: made now
    calibration = find_calibration(bundle)
    assert calibration is not None and router.path == calibration.policy_path
    (calibration.path / CALIBRATION_FILE).write_text("{broken")
    assert find_calibration(load_bundle(trained_bundle, calibrate=True)) is None
    fresh = load_bundle(trained_bundle, calibrate=True)
    assert fresh.router().path == calibration.policy_path and find_calibration(fresh) is not None


def test_drafts_built_before_the_calibration_size_their_trees_with_it(trained_bundle):
    """An auto-sized tree arm built before the machine's calibration existed (calibrate itself builds every arm;
    bundle.json holds no profile) gets the calibrated costs once it exists: without them it verifies its whole cap."""
    info = json.loads((trained_bundle / "bundle.json").read_text())
    info["arms"][1] = lookup_tree_arm(4, "auto", name="lookup")  # same name: the trajectories still fit
    write_json_atomic(trained_bundle / "bundle.json", info)
    bundle = load_bundle(trained_bundle, calibrate=True)
    draft = bundle.draft("lookup")
    assert draft.step_s is None  # no profile that reaches its widest tree yet
    calibration = bundle.calibration(create=True)
    assert calibration is not None and draft.step_s is not None
    assert draft.step_s[1:] == calibration.profile.step_curve(draft.max_verified() + 1, True)[1:]


def test_a_changed_bundle_is_calibrated_anew(trained_bundle):
    bundle = load_bundle(trained_bundle, calibrate=True)
    first = calibrate(bundle, reps=1, epochs=5)
    info = json.loads((trained_bundle / "bundle.json").read_text())
    info["default_arm"] = "none"
    write_json_atomic(trained_bundle / "bundle.json", info)
    changed = load_bundle(trained_bundle, calibrate=True)
    assert find_calibration(changed) is None
    assert calibrate(changed, reps=1, epochs=5).path != first.path


def test_cli_calibrate_info_and_dtype_errors(trained_bundle, tmp_path, monkeypatch):
    from cli_helpers import assert_clean_error
    from click.testing import CliRunner

    from ctxdraft.cli.main import main
    from ctxdraft.selfdraft.runtime import machine

    monkeypatch.delenv("CTXDRAFT_NO_CALIBRATE")  # the suite turns calibration off; this test is about it
    runner = CliRunner()
    r = runner.invoke(main, ["calibrate", "--bundle", str(trained_bundle), "--reps", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["machine"]["dtype"] == "float32" and out["report"]["rows"] == 8
    r = runner.invoke(main, ["calibrate", "--bundle", str(trained_bundle), "--reps", "1"])
    assert r.exit_code == 0, r.output
    assert "Policy on " in r.output and f"Stored in {out['path']};" in r.output
    r = runner.invoke(main, ["info", "--bundle", str(trained_bundle)])
    assert r.exit_code == 0 and "routing  calibrated" in r.output, r.output
    r = runner.invoke(main, ["info", "--bundle", str(trained_bundle), "--json"])
    info = json.loads(r.output)
    assert info["calibration"]["path"] and info["routing_policy"].startswith("calibrated")
    stats = info["arm_stats"]  # from the shipped trajectories: tokens per forward and nodes per step per arm
    assert set(stats) == {"none", "lookup", "lookup-k2"} and stats["none"]["nodes_per_step"] == 0
    assert stats["lookup-k2"]["num_prompts"] == 8 and 0 < stats["lookup-k2"]["nodes_per_step"] <= 2
    r = runner.invoke(main, ["info", "--bundle", str(trained_bundle), "--no-calibrate", "--json"])
    assert json.loads(r.output)["routing_policy"] == "the shipped policy (calibration is off)"
    assert_clean_error(runner.invoke(main, ["calibrate", "--bundle", str(trained_bundle), "--reps", "0"]), "--reps must be >= 1")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    monkeypatch.setattr(machine, "CPUINFO", cpuinfo)
    assert_clean_error(runner.invoke(main, ["generate", "hi", "--bundle", str(trained_bundle), "--dtype", "float16"]),
                       "float16 needs a CPU with native fp16")
    r = runner.invoke(main, ["generate", "hi", "--bundle", str(trained_bundle), "--dtype", "half"])
    assert r.exit_code == 2 and "Invalid value for '--dtype'" in r.output


def test_a_bundle_without_trajectories_keeps_its_shipped_policy(trained_bundle):
    (trained_bundle / "trajectories.jsonl.gz").unlink()
    bundle = load_bundle(trained_bundle, calibrate=True)
    assert bundle.router().path == trained_bundle / "policy.onnx"
    assert "carries no trajectories" in bundle.calibration_note()
    from ctxdraft.selfdraft.base.errors import CtxdraftError

    with pytest.raises(CtxdraftError, match="carries no trajectories"):
        calibrate(bundle, reps=1)
