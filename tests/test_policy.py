"""The routing policy on toy contextual bandits whose best arm depends on the context."""
import json

import pytest
import torch

from ctxdraft.selfdraft.errors import CtxdraftError
from ctxdraft.selfdraft.policy import (
    HiddenPolicy,
    PolicyConfig,
    choose_arms,
    evaluate,
    load_rewards,
    policy_inputs,
    report_markdown,
    rewards_from_rows,
    split_indices,
    train_policies,
    train_reinforce,
    train_supervised,
)

ARMS = ["none", "lookup@2", "lookup@7", "exit@10", "exit@20", "model:tiny"]
DOMAINS = ["qa", "math", "translation"]
BEST_ARM = {"qa": "lookup@7", "math": "exit@20", "translation": "exit@10"}


def toy_rows(num_rows: int = 210, feature_dim: int = 24, seed: int = 0) -> list[dict]:
    """Three domains, each a cluster in feature space and in vocabulary, each with its own best arm.
    `exit@20` is decent everywhere, so it is the best single arm; a good policy beats it by far."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(len(DOMAINS), feature_dim, generator=g)
    rows = []
    for i in range(num_rows):
        c = i % len(DOMAINS)
        domain = DOMAINS[c]
        rewards = {arm: 1.0 + 0.2 * torch.rand((), generator=g).item() for arm in ARMS}
        rewards["none"] = 1.0
        rewards["exit@20"] += 0.35
        rewards[BEST_ARM[domain]] += 0.8 if BEST_ARM[domain] != "exit@20" else 0.45
        num_tokens = int(torch.randint(5, 40, (), generator=g))
        # Each domain draws mostly from its own id range (large ids, so hashing matters), plus shared filler.
        own = (40_000 + 500 * c + torch.randint(0, 50, (num_tokens,), generator=g)).tolist()
        filler = torch.randint(0, 100, (num_tokens // 2,), generator=g).tolist()
        hidden = centers[c] + torch.randn(feature_dim, generator=g)
        rows.append({
            "id": f"{domain}-{i}",
            "domain": domain,
            "prompt_len": num_tokens + len(filler),
            "features": {"hidden": hidden.tolist() + [float(torch.log(torch.tensor(num_tokens + len(filler))))],
                         "tokens": own + filler},
            "arms": {arm: {"speedup": r, "accepted_per_forward": 2.0} for arm, r in rewards.items()},
        })
    return rows


@pytest.fixture(scope="module")
def toy():
    data = rewards_from_rows(toy_rows())
    train_idx, eval_idx = split_indices(data.domains, eval_frac=0.3, seed=0)
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
    train_idx, eval_idx = split_indices(data.domains, 0.25, seed=0)
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


def test_evaluate_exact_numbers():
    """A hand-set policy on 4 rows: arm 1 when the feature is positive, else arm 0."""
    rows = [{"id": i, "domain": d, "features": {"hidden": [x]},
             "arms": {"none": {"speedup": r0}, "lookup": {"speedup": r1}}, "prompt_len": 1}
            for i, (d, x, r0, r1) in enumerate([("a", 1.0, 1.0, 2.0), ("a", -1.0, 1.0, 3.0),
                                                ("b", 1.0, 1.0, 1.5), ("b", -1.0, 1.0, 0.5)])]
    data = rewards_from_rows(rows)
    policy = HiddenPolicy(1, 2, PolicyConfig(hidden_sizes=()))
    with torch.no_grad():
        policy.mlp[0].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        policy.mlp[0].bias.zero_()
    report = evaluate(policy, data, [0, 1, 2, 3])
    overall = report["overall"]
    assert overall["policy"] == pytest.approx((2.0 + 1.0 + 1.5 + 1.0) / 4)
    assert overall["oracle"] == pytest.approx((2.0 + 3.0 + 1.5 + 1.0) / 4)
    assert overall["regret"] == pytest.approx(1 - 5.5 / 7.5)
    assert overall["arms"] == pytest.approx({"none": 1.0, "lookup": 7.0 / 4})
    assert overall["best_single_arm"] == "lookup"
    assert overall["choices"] == {"none": 2, "lookup": 2}
    assert report["domains"]["a"]["policy"] == pytest.approx(1.5)
    assert report["domains"]["b"]["oracle"] == pytest.approx(1.25)


def test_split_is_stratified_seeded_and_disjoint():
    domains = ["a"] * 10 + ["b"] * 3 + ["c"] * 1
    train_idx, eval_idx = split_indices(domains, 0.3, seed=5)
    assert sorted(train_idx + eval_idx) == list(range(14))
    assert [domains[i] for i in eval_idx].count("a") == 3
    assert [domains[i] for i in eval_idx].count("b") == 1
    assert 13 in train_idx  # a one-row domain stays in training
    assert split_indices(domains, 0.3, seed=5) == (train_idx, eval_idx)
    assert split_indices(domains, 0.3, seed=6) != (train_idx, eval_idx)
    with pytest.raises(CtxdraftError, match="eval fraction"):
        split_indices(domains, 1.0)


def test_train_policies_report_and_markdown(toy):
    data, _, _ = toy
    result = train_policies(data, PolicyConfig(epochs=40), eval_frac=0.3)
    report = result.report
    json.dumps(report)  # goes to reports/train_policy.json
    assert set(report["policies"]) == {"reinforce", "supervised"}
    assert report["num_eval"] == len(result.eval_idx) and report["num_train"] == len(result.train_idx)
    assert not set(result.train_idx) & set(result.eval_idx)
    table = report_markdown(report)
    for name in ["policy (reinforce)", "policy (supervised)", "oracle (per prompt)", *ARMS, *DOMAINS, "overall"]:
        assert name in table
    assert len([line for line in table.splitlines() if line.startswith("|")]) == 2 + 1 + 2 + len(ARMS) + 1


# ---- load_rewards


def write_rows(tmp_path, rows):
    path = tmp_path / "rewards.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_rewards_round_trip(tmp_path):
    rows = toy_rows(num_rows=6, feature_dim=3)
    data = load_rewards(write_rows(tmp_path, rows))
    assert data.ids == [r["id"] for r in rows]
    assert data.arm_names == ARMS
    assert data.rewards.shape == (6, len(ARMS)) and data.rewards.dtype == torch.float32
    assert data.hidden.shape == (6, 4)
    assert data.tokens[2] == rows[2]["features"]["tokens"]
    assert data.rewards[0, ARMS.index("none")] == 1.0


def test_load_rewards_arm_order_follows_first_row(tmp_path):
    rows = toy_rows(num_rows=2, feature_dim=3)
    rows[1]["arms"] = dict(reversed(list(rows[1]["arms"].items())))
    data = load_rewards(write_rows(tmp_path, rows))
    assert data.rewards[1, 0] == rows[1]["arms"]["none"]["speedup"]


@pytest.mark.parametrize("break_row, message", [
    (lambda r: r["arms"].pop("lookup@2"), "arms differ from row 1"),
    (lambda r: r["arms"].update({"extra": {"speedup": 1.0}}), "extra"),
    (lambda r: r["arms"]["exit@10"].pop("speedup"), "positive finite 'speedup'"),
    (lambda r: r["arms"]["exit@10"].update({"speedup": -1.0}), "positive finite 'speedup'"),
    (lambda r: r["arms"]["exit@10"].update({"speedup": "fast"}), "positive finite 'speedup'"),
    (lambda r: r.pop("arms"), "needs an 'arms' object"),
    (lambda r: r.pop("features"), "needs a 'features' object"),
    (lambda r: r["features"]["hidden"].pop(), "has 3 values but row 1 has 4"),
    (lambda r: r["features"].pop("hidden"), "present in some rows and missing in others"),
    (lambda r: r["features"].update({"tokens": [1, -5]}), "non-negative integer token ids"),
    (lambda r: r.update({"id": "qa-0"}), "already appeared in row 1"),
    (lambda r: r.update({"prompt_len": "long"}), "prompt_len"),
])
def test_load_rewards_rejects_malformed_rows(tmp_path, break_row, message):
    rows = toy_rows(num_rows=3, feature_dim=3)
    break_row(rows[1])
    with pytest.raises(CtxdraftError, match=r"row 2|some rows") as info:
        load_rewards(write_rows(tmp_path, rows))
    assert message in str(info.value)


def test_load_rewards_file_errors(tmp_path):
    with pytest.raises(CtxdraftError, match="not found"):
        load_rewards(tmp_path / "missing.jsonl")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n{not json\n')
    with pytest.raises(CtxdraftError, match="line 2"):
        load_rewards(path)


def test_missing_feature_kind_is_a_clear_error():
    rows = toy_rows(num_rows=4, feature_dim=3)
    for r in rows:
        r["features"].pop("tokens")
    data = rewards_from_rows(rows)
    with pytest.raises(CtxdraftError, match="no features.tokens"):
        train_reinforce(data, [0, 1, 2, 3], PolicyConfig(feature_kind="tokens", epochs=1))
