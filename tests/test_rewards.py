"""Reading the logged bandit table (rewards files) with clear errors."""
import pytest
import torch
from toy_rewards import ARMS, toy_rows, write_rows

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.learning.rewards import load_rewards, row_features


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


@pytest.mark.parametrize("features, message", [
    (None, "needs a 'features' object"),
    ({"hidden": [1.0, float("nan")]}, "features.hidden must be a non-empty list of finite numbers"),
    ({"hidden": [1.0, True]}, "features.hidden must be"),  # a bool is not a feature value
    ({"tokens": [3, True]}, "features.tokens must be a list of non-negative integer token ids"),
])
def test_row_features_is_the_one_feature_check(features, message):
    with pytest.raises(CtxdraftError, match=f"row 7: {message}"):
        row_features({"features": features}, "row 7")
    assert row_features({"features": {"hidden": [0.5], "tokens": [1, 2]}}, "row 7") == ([0.5], [1, 2])
