"""Learning from logged bandit feedback: the doubly robust estimator is unbiased (and a wrong propensity breaks
it), the reward model, training on offline rows plus logs, and `update-policy` end to end with every bad input
one clear error and nothing replaced unless the new policy was trained and saved whole."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.commands.update_policy import UpdateConfig, update_policy
from ctxdraft.selfdraft.learning.offpolicy import (
    Estimate,
    Feedback,
    RewardModel,
    compare,
    policy_value,
    pseudo_rewards,
    train_on_feedback,
)
from ctxdraft.selfdraft.learning.policy import PolicyConfig, choose_arms
from ctxdraft.selfdraft.learning.rewards import RewardData

A, D = 3, 4
W = torch.tensor([[1.0, -0.5, 0.3, 0.0], [-0.8, 0.9, 0.0, 0.4], [0.2, 0.2, -1.0, 0.7]])  # [A, D]


def true_reward(x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, A], not linear: a ridge model is biased
    return 1.5 + torch.sin(x @ W.T) + 0.6 * (x[:, :1] > 0.5) * torch.tensor([0.0, 0.0, 1.0])


def greedy(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return (x @ V.T).argmax(1)


LOGGING = torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.0, 1.0, 0.2, 0.0], [0.1, 0.0, 0.0, 1.0]])
TARGET = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.3], [0.0, 0.5, 0.0, 0.0]])


def reward_model(seed: int = 99) -> RewardModel:
    """Fitted on full-information rows from another context distribution (shifted): wrong where the logs are."""
    g = torch.Generator().manual_seed(seed)
    x = 1.5 + torch.randn(60, D, generator=g)
    return RewardModel.fit(true_reward(x) + 0.2 * torch.randn(60, A, generator=g), x)


def logged(seed: int, n: int = 300, explore: float = 0.3, claimed=None):
    """n requests routed epsilon-greedy over the LOGGING policy; ``claimed(true_propensity, arms)`` replaces the
    logged propensity (a bug in the logger)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    best = greedy(x, LOGGING)
    explored = torch.rand(n, generator=g) < explore
    arms = torch.where(explored, torch.randint(0, A, (n,), generator=g), best)
    propensity = (1 - explore) * (arms == best) + explore / A
    rewards = true_reward(x)[torch.arange(n), arms] + 0.3 * torch.randn(n, generator=g)
    if claimed is not None:
        propensity = claimed(propensity, arms)
    return x, Feedback(["a", "b", "c"], arms, propensity.double(), rewards.double(), hidden=x)


def dr_errors(model: RewardModel, seeds: int = 300, **kw) -> torch.Tensor:
    """Estimated minus true value of the TARGET policy on each seed's logged contexts."""
    errors = []
    for seed in range(seeds):
        x, feedback = logged(seed, **kw)
        G = pseudo_rewards(model.predict(len(feedback), x), feedback)
        choices = greedy(x, TARGET)
        truth = true_reward(x)[torch.arange(len(x)), choices].mean()
        errors.append(policy_value(G, choices).value - float(truth))
    return torch.tensor(errors, dtype=torch.float64)


def within(errors: torch.Tensor, num_se: float) -> bool:
    return abs(float(errors.mean())) < num_se * float(errors.std()) / math.sqrt(len(errors))


def test_doubly_robust_estimate_is_unbiased_with_a_wrong_reward_model():
    model = reward_model()
    x, _ = logged(0)
    direct = model.predict(len(x), x)[torch.arange(len(x)), greedy(x, TARGET)].mean()
    truth = true_reward(x)[torch.arange(len(x)), greedy(x, TARGET)].mean()
    assert abs(float(direct - truth)) > 0.05  # the reward model alone is off ...
    errors = dr_errors(model)
    assert within(errors, 3.0), (float(errors.mean()), float(errors.std()))  # ... the correction removes the bias
    assert within(dr_errors(RewardModel.fit(torch.zeros(4, A))), 3.0)  # q = 0: plain inverse propensity scoring


@pytest.mark.parametrize("claimed", [
    lambda p, arms: torch.full_like(p, 1 / A),  # the logger claims uniform routing
    lambda p, arms: torch.where(p < 0.5, p * 2, p),  # explored arms' propensity doubled
])
def test_a_wrong_propensity_makes_the_estimate_biased(claimed):
    errors = dr_errors(reward_model(), claimed=claimed)
    assert not within(errors, 6.0), float(errors.mean())


def test_estimate_interval_covers_the_truth_about_95_percent_of_the_time():
    model = reward_model()
    covered = 0
    for seed in range(200):
        x, feedback = logged(seed)
        G = pseudo_rewards(model.predict(len(x), x), feedback)
        est = policy_value(G, greedy(x, TARGET))
        truth = float(true_reward(x)[torch.arange(len(x)), greedy(x, TARGET)].mean())
        covered += est.low <= truth <= est.high
    assert 0.88 <= covered / 200 <= 0.995, covered


def test_estimate_and_compare_are_paired():
    G = torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 2.5]], dtype=torch.float64)
    c = compare(G, torch.tensor([1, 0, 1]), torch.tensor([0, 1, 0]))
    assert c.new.value == pytest.approx(2.5) and c.old.value == pytest.approx(4 / 3)
    assert c.gain.value == pytest.approx(2.5 - 4 / 3) and c.gain.num_rows == 3
    assert Estimate.of(torch.tensor([2.0])).low is None  # one row: no interval
    with pytest.raises(CtxdraftError, match=r"propensity must be in \(0, 1\]"):
        Feedback(["a"], torch.tensor([0]), torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))


def test_reward_model_fits_a_linear_reward_and_falls_back_to_means():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=g)
    rewards = torch.stack([1 + x[:, 0], 2 - 0.5 * x[:, 1], torch.full((80,), 1.2)], dim=1)
    model = RewardModel.fit(rewards + 0.01 * torch.randn(80, 3, generator=g), x)
    x_new = torch.randn(20, 6, generator=g)
    expected = torch.stack([1 + x_new[:, 0], 2 - 0.5 * x_new[:, 1], torch.full((20,), 1.2)], dim=1)
    assert torch.allclose(model.predict(20, x_new).float(), expected, atol=0.05)
    means = RewardModel.fit(rewards)
    assert torch.allclose(means.predict(2).float(), rewards.mean(0).expand(2, -1))


def test_training_with_logs_learns_a_domain_the_offline_rows_never_saw():
    """Offline rows: contexts near +c where arm 0 is best. Logs: contexts near -c where arm 2 is best, seen only
    through the chosen arm (epsilon-greedy around arm 0) and its propensity."""
    g = torch.Generator().manual_seed(0)
    c = torch.tensor([2.0, 0.0, 0.0])
    x_off = c + 0.3 * torch.randn(40, 3, generator=g)
    r_off = torch.tensor([1.6, 1.0, 1.2]).expand(40, -1).clone()
    offline = RewardData(list(range(40)), ["seen"] * 40, ["a", "b", "c"], r_off, [5] * 40, hidden=x_off)
    n = 90
    x_log = -c + 0.3 * torch.randn(n, 3, generator=g)
    explored = torch.rand(n, generator=g) < 0.3
    arms = torch.where(explored, torch.randint(0, 3, (n,), generator=g), torch.zeros(n, dtype=torch.long))
    propensity = 0.7 * (arms == 0) + 0.1
    truth = torch.tensor([1.0, 1.1, 1.9])
    feedback = Feedback(["a", "b", "c"], arms, propensity.double(), truth[arms].double(), hidden=x_log)
    model = RewardModel.fit(r_off, x_off)
    G = pseudo_rewards(model.predict(n, x_log), feedback)
    config = PolicyConfig(epochs=60, seed=0)
    policy = train_on_feedback(offline, feedback, G, config)
    assert (choose_arms(policy, x_log) == 2).float().mean() > 0.9  # learned from the logs
    assert (choose_arms(policy, x_off) == 0).float().mean() > 0.9  # and kept what the offline rows taught
    frozen = train_on_feedback(offline, feedback, G, config, logged_rows=[])
    assert (choose_arms(frozen, x_log) == 2).float().mean() < 0.5  # without the logs it could not know


# --------------------------------------------------------------------------------------------------
# update-policy on a tiny bundle
# --------------------------------------------------------------------------------------------------
@pytest.fixture()
def bundle_dir(trained_tiny_bundle, tmp_path):
    return shutil.copytree(trained_tiny_bundle, tmp_path / "bundle")


def serve(bundle_dir, log, n: int = 12, explore: float = 0.5, seed: int = 0, **kw):
    from test_traffic import PROMPTS

    from ctxdraft.selfdraft.serving.bundle import load_bundle

    bundle = load_bundle(bundle_dir, log=log, explore=explore, **kw)
    bundle.explore_rng = np.random.default_rng(seed)
    for i in range(n):
        bundle.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=8)
    return bundle


def snapshot(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_update_policy_writes_a_whole_bundle_that_records_what_it_learned_from(bundle_dir, tmp_path):
    from ctxdraft.selfdraft.serving.bundle import load_bundle
    from ctxdraft.selfdraft.serving.bundle_info import bundle_hash

    log = tmp_path / "traffic.jsonl"
    old = serve(bundle_dir, log)
    before = snapshot(bundle_dir)
    result = update_policy(load_bundle(bundle_dir), [log], out=tmp_path / "v2", force=True)
    assert result.replaced and result.path == tmp_path / "v2"
    assert snapshot(bundle_dir) == before  # --out: the original is untouched
    report = result.report
    assert report["logged_requests"] == 12 and report["offline_rows"] == 16 and report["profile"] == "bundle.json"
    assert sum(report["logged_arms"].values()) == 12 and report["explored"] >= 1
    est = report["estimate"]
    assert est["new"]["num_rows"] == 12 and est["new"]["low"] <= est["new"]["value"] <= est["new"]["high"]
    assert est["gain"]["value"] == pytest.approx(est["new"]["value"] - est["old"]["value"], abs=1e-5)
    v2 = load_bundle(tmp_path / "v2")
    online = v2.info["online"]
    assert online["lineage"] == [bundle_hash(old)]
    (update,) = online["updates"]
    assert update["logs"][0]["rows"] == 12 and len(update["logs"][0]["sha256"]) == 16
    assert json.loads((tmp_path / "v2" / "reports" / "update_policy.json").read_text())["replaced"] is True
    assert v2.router().path == tmp_path / "v2" / "policy.onnx" and v2.generate("abc abc", max_new_tokens=4).routed
    # Logs of the earlier version stay usable (lineage); the new version's own logs too.
    log2 = tmp_path / "traffic2.jsonl"
    serve(tmp_path / "v2", log2, n=4)
    again = update_policy(load_bundle(tmp_path / "v2"), [log, log2], force=True)
    assert again.path == tmp_path / "v2" and again.report["logged_requests"] == 16
    assert len(again.report["from_bundles"]) == 2
    assert len(load_bundle(tmp_path / "v2").info["online"]["updates"]) == 2


def test_the_policy_in_use_is_kept_when_it_is_estimated_better_unless_forced(bundle_dir, tmp_path):
    """The offline rows say prompt lookup is fast on these prompts; the policy in use routes everything to `none`
    (trained on rewards that said lookup is slow), and the served traffic agrees with it (its lookup trajectories
    rewritten to accept nothing after 100 lookups a step). A policy retrained mostly on the offline rows picks
    lookup and is estimated worse on these logs: kept, nothing written; --force replaces it."""
    from ctxdraft.selfdraft.commands.train_policy import train_bundle_policy
    from ctxdraft.selfdraft.serving.bundle import load_bundle

    said_slow = _rows(bundle_dir / "rewards.jsonl")
    for row in said_slow:
        for name, arm in row["arms"].items():
            arm["speedup"] = 1.0 if name == "none" else 0.5
    train_bundle_policy(load_bundle(bundle_dir), _write(tmp_path / "slow.jsonl", said_slow), PolicyConfig(epochs=60))
    log = tmp_path / "traffic.jsonl"
    serve(bundle_dir, log, n=30, explore=1.0)
    rows = _rows(log)
    assert {r["greedy_arm"] for r in rows} == {"none"} and {r["arm"] for r in rows} == {"none", "lookup", "lookup-k2"}
    for r in rows:
        if r["arm"] != "none":
            r["measurement"]["trajectory"]["steps"] = [[100, 2, 0, 0]] * r["measurement"]["plain_steps"]
    _write(log, rows)
    before = snapshot(bundle_dir)
    kept = update_policy(load_bundle(bundle_dir), [log], config=UpdateConfig(epochs=100))
    est = kept.report["estimate"]
    assert not kept.replaced and kept.path is None and est["new"]["value"] < est["old"]["value"], est
    assert snapshot(bundle_dir) == before
    forced = update_policy(load_bundle(bundle_dir), [log], force=True, config=UpdateConfig(epochs=100))
    assert forced.replaced and forced.report["forced"] and forced.path == bundle_dir
    assert load_bundle(bundle_dir).info["online"]["updates"][0]["forced"] is True


def _rows(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def _write(path, rows, tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(bundle="0123456789abcdef"), "logged by another bundle (content hash 0123456789abcdef)"),
    (lambda r: r.update(target="feedfacefeedface"), "logged for another target (hash feedfacefeedface)"),
    (lambda r: r.update(propensity=0), "propensity 0 must be in (0, 1]"),
    (lambda r: r.update(propensity=1.5), "propensity 1.5 must be in (0, 1]"),
    (lambda r: r.update(arm="model:gone"), "arm 'model:gone' is not in this bundle's pool"),
    (lambda r: r.update(pool="abc"), "logged for another pool of arms"),
    (lambda r: r["measurement"].pop("trajectory"), "no measurement.trajectory"),
    (lambda r: r["measurement"]["trajectory"].update(steps=[[1, 1, 2, 0]]), "0 <= accepted <= drafted"),
    (lambda r: r["measurement"]["trajectory"].update(steps=[[1, 1, 1, 0]]), "emit fewer tokens than its new_tokens"),
    (lambda r: r["features"].update(hidden=[1.0, 2.0]), "features.hidden must be"),
    (lambda r: r["features"].update(hidden_layer=3), "features pooled at layer 3"),
])
def test_bad_logs_are_one_clear_error_and_nothing_is_written(bundle_dir, tmp_path, edit, message):
    from ctxdraft.selfdraft.serving.bundle import load_bundle

    log = tmp_path / "traffic.jsonl"
    serve(bundle_dir, log, n=4)
    rows = _rows(log)
    edit(rows[2])
    bad = _write(tmp_path / "bad.jsonl", rows)
    before = snapshot(bundle_dir)
    with pytest.raises(CtxdraftError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as e:
        update_policy(load_bundle(bundle_dir), [bad], force=True)
    assert "bad.jsonl:3" in str(e.value) or message.startswith("0 <=")
    assert "\n" not in str(e.value)
    assert snapshot(bundle_dir) == before and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_torn_lines_are_skipped_and_reported_empty_logs_refused(bundle_dir, tmp_path, caplog, monkeypatch):
    import logging

    from ctxdraft.selfdraft.serving.bundle import load_bundle

    monkeypatch.setattr(logging.getLogger("ctxdraft"), "propagate", True)  # the CLI tests give it its own handler
    log = tmp_path / "traffic.jsonl"
    serve(bundle_dir, log, n=5)
    text = log.read_text().splitlines()
    torn = tmp_path / "torn.jsonl"
    torn.write_text(text[0] + "\n" + text[1][:40] + "\n" + "\n".join(text[2:]) + "\n" + text[0][:-10])
    with caplog.at_level(logging.WARNING, logger="ctxdraft"):
        result = update_policy(load_bundle(bundle_dir), [torn], out=tmp_path / "v2", force=True)
    assert result.report["logged_requests"] == 4 and len(result.report["skipped_lines"]) == 2
    assert "torn.jsonl line 2" in caplog.text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    before = snapshot(bundle_dir)
    with pytest.raises(CtxdraftError, match="hold no requests"):
        update_policy(load_bundle(bundle_dir), [empty])
    with pytest.raises(CtxdraftError, match="exists and is not an empty directory"):
        update_policy(load_bundle(bundle_dir), [log], out=tmp_path / "v2")
    with pytest.raises(CtxdraftError, match="folds"):
        update_policy(load_bundle(bundle_dir), [log], config=UpdateConfig(folds=1))
    assert snapshot(bundle_dir) == before


def test_a_bundle_without_policy_or_offline_data_cannot_be_updated(bundle_dir, tmp_path):
    from ctxdraft.selfdraft.serving.bundle import load_bundle

    log = tmp_path / "traffic.jsonl"
    serve(bundle_dir, log, n=2)
    (bundle_dir / "trajectories.jsonl.gz").unlink()
    with pytest.raises(CtxdraftError, match="carries no offline data"):
        update_policy(load_bundle(bundle_dir), [log])
    info = json.loads((bundle_dir / "bundle.json").read_text())
    info["policy"] = None
    (bundle_dir / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(CtxdraftError, match="has no trained policy to update"):
        update_policy(load_bundle(bundle_dir), [log])


def test_with_calibration_the_update_becomes_this_machines_policy_of_the_new_bundle(bundle_dir, tmp_path, monkeypatch):
    from ctxdraft.selfdraft.serving.bundle import load_bundle
    from ctxdraft.selfdraft.serving.calibration import find_calibration

    monkeypatch.setenv("CTXDRAFT_CALIBRATIONS", str(tmp_path / "calibrations"))
    log = tmp_path / "traffic.jsonl"
    serve(bundle_dir, log, n=6, calibrate=True)  # the first routed request calibrates the bundle
    row = _rows(log)[0]
    assert row["reward"]["profile"] == find_calibration(load_bundle(bundle_dir, calibrate=True)).machine["hash"]
    result = update_policy(load_bundle(bundle_dir, calibrate=True), [log], out=tmp_path / "v2", force=True)
    assert result.report["profile"].startswith("calibration ")
    v2 = load_bundle(tmp_path / "v2", calibrate=True)
    calibration = find_calibration(v2)
    assert calibration is not None and calibration.report["update_policy"] is True
    assert calibration.policy_path.read_bytes() == (tmp_path / "v2" / "policy.onnx").read_bytes()
    assert v2.router().path == calibration.policy_path  # routing uses the update, not a fresh offline calibration


def test_cli_update_policy(bundle_dir, tmp_path):
    from cli_helpers import assert_clean_error
    from click.testing import CliRunner

    from ctxdraft.cli.main import main

    log, log2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    serve(bundle_dir, log, n=4)
    serve(bundle_dir, log2, n=3, seed=1)
    runner = CliRunner()
    r = runner.invoke(main, ["update-policy", str(bundle_dir), "--logs", str(log), str(log2), "--out", str(tmp_path / "v2"),
                             "--force", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["replaced"] and out["report"]["logged_requests"] == 7 and (tmp_path / "v2" / "policy.onnx").is_file()
    r = runner.invoke(main, ["update-policy", str(tmp_path / "v2"), "--logs", str(log), "--force"])
    assert r.exit_code == 0 and "off-policy value" in r.output and "Wrote" in r.output, r.output
    assert_clean_error(runner.invoke(main, ["update-policy", str(bundle_dir)]), "give the traffic logs")
    assert_clean_error(runner.invoke(main, ["update-policy", str(bundle_dir), "--logs", str(tmp_path / "none.jsonl")]),
                       "traffic log not found")
    bad = _rows(log)
    bad[0]["propensity"] = 0.0
    assert_clean_error(runner.invoke(main, ["update-policy", str(bundle_dir), "--logs", str(_write(tmp_path / "z.jsonl", bad))]),
                       "propensity 0.0 must be in (0, 1]")
