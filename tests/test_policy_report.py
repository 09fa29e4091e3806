"""The held-out report of a policy: exact numbers on a hand-set policy."""
import pytest
import torch

from ctxdraft.selfdraft.learning.policy import HiddenPolicy, PolicyConfig
from ctxdraft.selfdraft.learning.policy_report import evaluate
from ctxdraft.selfdraft.learning.rewards import rewards_from_rows


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
