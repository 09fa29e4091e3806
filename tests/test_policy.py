"""The routing policy's networks and training on toy contextual bandits whose best arm depends on the context."""
import dataclasses

import pytest
import torch
from toy_rewards import BEST_ARM, toy_rows

from ctxdraft.selfdraft.base.data import stratified_split
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.learning.policy import (
    PolicyConfig,
    choose_arms,
    policy_inputs,
    train_reinforce,
    train_supervised,
)
from ctxdraft.selfdraft.learning.policy_report import evaluate
from ctxdraft.selfdraft.learning.rewards import rewards_from_rows


@pytest.fixture(scope="module")
def toy():
    data = rewards_from_rows(toy_rows())
    train_idx, eval_idx = stratified_split(data.domains, 0.3, seed=0)
    return data, train_idx, eval_idx


def assert_learned(policy, data, eval_idx):
    choices = choose_arms(policy, policy_inputs(data, eval_idx, policy.feature_kind))
    for row, arm in zip(eval_idx, choices.tolist()):
        assert data.arm_names[arm] == BEST_ARM[data.domains[row]], data.ids[row]
    report = evaluate(policy, data, eval_idx)
    overall = report["overall"]
    assert overall["best_single_arm"] == "exit@20"
    assert overall["policy"] > 1.05 * overall["best_single_arm_speedup"]
    assert overall["regret"] < 0.03
    for domain, summary in report["domains"].items():
        assert summary["choices"][BEST_ARM[domain]] == summary["num_prompts"]


@pytest.mark.parametrize("feature_kind", ["hidden", "tokens"])
def test_reinforce_learns_the_context_dependent_best_arm(toy, feature_kind):
    data, train_idx, eval_idx = toy
    policy = train_reinforce(data, train_idx, PolicyConfig(feature_kind=feature_kind, epochs=150))
    assert_learned(policy, data, eval_idx)


@pytest.mark.parametrize("feature_kind", ["hidden", "tokens"])
def test_supervised_baseline_learns_it_too(toy, feature_kind):
    data, train_idx, eval_idx = toy
    policy = train_supervised(data, train_idx, PolicyConfig(feature_kind=feature_kind, epochs=100))
    assert_learned(policy, data, eval_idx)


@pytest.mark.parametrize("baseline", ["batch", "running"])
def test_reinforce_other_baselines(toy, baseline):
    data, train_idx, eval_idx = toy
    policy = train_reinforce(data, train_idx, PolicyConfig(epochs=150, baseline=baseline))
    assert_learned(policy, data, eval_idx)


def test_token_policy_reads_the_tokens_not_just_the_length():
    """Same length distribution everywhere; only whether id 31337 occurs decides the best arm."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(160):
        tokens = torch.randint(0, 30_000, (12,), generator=g).tolist()
        marked = i % 2 == 0
        if marked:
            tokens[int(torch.randint(0, 12, (), generator=g))] = 31337
        rows.append({"id": i, "domain": "all", "features": {"tokens": tokens},
                     "arms": {"none": {"speedup": 1.0}, "lookup": {"speedup": 2.0 if marked else 1.1},
                              "exit@8": {"speedup": 1.3 if marked else 1.6}}})
    data = rewards_from_rows(rows)
    assert data.hidden is None and data.prompt_lens == [12] * 160
    train_idx, eval_idx = stratified_split(data.domains, 0.25, seed=0)
    policy = train_reinforce(data, train_idx, PolicyConfig(feature_kind="tokens", epochs=200))
    choices = choose_arms(policy, policy_inputs(data, eval_idx, "tokens")).tolist()
    expected = [data.arm_names.index("lookup" if data.ids[i] % 2 == 0 else "exit@8") for i in eval_idx]
    assert choices == expected


def test_training_is_deterministic_and_leaves_global_rng_alone(toy):
    data, train_idx, _ = toy
    config = PolicyConfig(epochs=3, seed=7)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = train_reinforce(data, train_idx, config)
    after = torch.rand(3)
    b = train_reinforce(data, train_idx, config)
    c = train_reinforce(data, train_idx, PolicyConfig(epochs=3, seed=8))
    assert torch.equal(before, after)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.mlp[0].weight, c.mlp[0].weight)


def test_missing_feature_kind_is_a_clear_error():
    rows = toy_rows(num_rows=4, feature_dim=3)
    for r in rows:
        r["features"].pop("tokens")
    data = rewards_from_rows(rows)
    with pytest.raises(CtxdraftError, match="no features.tokens"):
        train_reinforce(data, [0, 1, 2, 3], PolicyConfig(feature_kind="tokens", epochs=1))


@pytest.mark.parametrize("field, value, match", [
    ("epochs", True, "epochs .* must be an integer"),  # a bool is not a count
    ("epochs", 0, "epochs .* must be >= 1"),
    ("lr", float("nan"), "lr must be a finite number"),
    ("dropout", -0.1, "dropout must be >= 0"),
    ("hidden_sizes", (64, -1), "hidden_sizes .* must be >= 1"),
    ("baseline", "mean", "baseline must be one of"),
    ("feature_kind", "pixels", "feature_kind must be one of"),
])
def test_policy_config_validate_refuses(field, value, match):
    with pytest.raises(CtxdraftError, match=match):
        PolicyConfig(**{field: value}).validate()


def test_policy_config_from_dict():
    stored = {**dataclasses.asdict(PolicyConfig(hidden_sizes=(32, 16))), "hidden_sizes": [32, 16]}  # as bundle.json
    config = PolicyConfig.from_dict(stored, epochs=7, seed=None)
    assert config == PolicyConfig(hidden_sizes=(32, 16), epochs=7)  # a list becomes a tuple; None keeps the seed
    with pytest.raises(CtxdraftError, match="unknown fields \\['depth'\\]"):
        PolicyConfig.from_dict({"depth": 3})
    with pytest.raises(CtxdraftError, match="epochs"):
        PolicyConfig.from_dict({"epochs": -1})
