"""The replay benchmark on synthetic six-domain rewards: its bookkeeping, that LinUCB and update-policy both learn
the domains the offline policy never saw, bad settings, and the script's JSON / Markdown / PNG."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.learning.policy import PolicyConfig
from ctxdraft.selfdraft.learning.replay import (
    LinUCB,
    ReplayConfig,
    regret,
    replay_seed,
    run_replay,
    subset,
    synthetic_rewards,
)

FAST = dict(seeds=1, num_requests=60, update_every=30, checkpoint_every=30, folds=2, linucb_alphas=[1.0],
            policy=PolicyConfig(epochs=20))


@pytest.fixture(scope="module")
def data():
    return synthetic_rewards(per_domain=20, feature_dim=8)


def test_regret_is_one_minus_policy_over_oracle():
    rewards = torch.tensor([[1.0, 2.0], [1.0, 1.5]])
    assert regret(rewards, torch.tensor([1, 1])) == pytest.approx(0.0)
    assert regret(rewards, torch.tensor([0, 0])) == pytest.approx(1 - 2.0 / 3.5)


def test_run_replay_bookkeeping(data):
    result = run_replay(data, ReplayConfig(**FAST), at=60)
    assert result["checkpoints"] == [0, 30, 60]
    assert result["config"]["offline_domains"] == ["mt_bench", "translation", "summarization"]  # the first three
    assert set(result["learners"]) == {"frozen", "updated", "linucb-1"}
    frozen = result["learners"]["frozen"]["eval"]
    assert len({c["mean"] for c in frozen}) == 1 and 0 < frozen[0]["mean"] < 1  # never updated, and it has regret
    assert result["learners"]["updated"]["eval"][0] == frozen[0]  # starts from the offline policy
    assert result["learners"]["updated"]["online"][0]["mean"] is None  # nothing chosen yet at 0 requests
    assert [u["requests"] for u in result["runs"][0]["updates"]] == [30, 60]
    assert result["full_information_eval_regret"]["mean"] < frozen[0]["mean"]
    assert set(result["summary"]) >= {"frozen", "updated", "linucb-1", "target_half_of_frozen"}
    json.dumps(result)


def test_both_learners_learn_the_unseen_domains(data):
    """With uniform exploration, one update on 150 logged requests fixes most of the frozen policy's regret; LinUCB,
    exploring by its confidence bounds, learns too."""
    config = ReplayConfig(**{**FAST, "num_requests": 150, "update_every": 150, "checkpoint_every": 150, "explore": 1.0,
                             "folds": 3, "policy": PolicyConfig(epochs=60)})
    run = replay_seed(data, config, ["mt_bench", "translation", "summarization"], seed=0)
    frozen, updated, linucb = (run["curves"][k]["eval"][-1] for k in ("frozen", "updated", "linucb-1"))
    assert frozen > 0.05
    assert run["updates"][0]["replaced"] and updated < 0.5 * frozen, (frozen, updated)
    assert linucb < 0.75 * frozen, (frozen, linucb)
    assert run["curves"]["updated"]["online"][-1] > run["curves"]["frozen"]["online"][-1]  # exploring costs


def test_linucb_warm_start_knows_the_offline_domains(data):
    offline_idx = [i for i, d in enumerate(data.domains) if d == "mt_bench"]
    bandit = LinUCB(subset(data, offline_idx), alpha=1.0, dims=4)
    choices = bandit.choices(data.hidden[offline_idx])
    assert (choices == data.rewards[offline_idx].mean(0).argmax()).float().mean() > 0.9


@pytest.mark.parametrize("change, message", [
    (dict(offline_domains=["nope"]), "offline domains ['nope'] are not in the rewards"),
    (dict(offline_domains=["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]), "cover every domain"),
    (dict(explore=1.5), "explore must be <= 1.0"),
    (dict(update_every=0), "update_every must be >= 1"),
])
def test_bad_settings_are_one_clear_error(data, change, message):
    with pytest.raises(CtxdraftError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_replay(data, ReplayConfig(**{**FAST, **change}))


def test_rewards_without_hidden_features_are_refused(data):
    no_hidden = subset(data, list(range(len(data))))
    no_hidden.hidden = None
    with pytest.raises(CtxdraftError, match="needs rows with features.hidden"):
        run_replay(no_hidden, ReplayConfig(**FAST))


def test_script_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = Path(__file__).resolve().parents[1] / "scripts" / "replay_bench.py"
    spec = importlib.util.spec_from_file_location("replay_bench", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(["--synthetic", "--seeds", "1", "--requests", "50", "--update-every", "25", "--epochs", "5",
                        "--folds", "2", "--linucb-alpha", "1", "--at", "50", "--out", str(tmp_path), "--name", "r"])
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["summary"]["requests"] == 50
    text = (tmp_path / "r.md").read_text()
    assert "| offline policy, frozen |" in text and "LinUCB, alpha 1" in text and "![regret" in text
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert script.main(["--synthetic", "--offline-domains", "x", "--out", str(tmp_path)]) == 2
