"""Routing features: the one schema and the values computed from the prefill."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.features import (
    INPUT_NAMES,
    PADDING_ID,
    default_feature_layer,
    features_from_prefill,
    hidden_features,
    hidden_spec,
    tokens_spec,
)


def test_specs_describe_the_graph_input():
    spec = hidden_spec(10, 577)
    assert (spec["kind"], spec["layer"], spec["dim"]) == ("hidden", 10, 577)
    assert spec["input"] == {**spec["input"], "name": INPUT_NAMES["hidden"], "dtype": "float32", "shape": ["batch", 577]}
    assert "after decoder layer 10" in spec["input"]["description"] and "576 values" in spec["input"]["description"]
    tokens = tokens_spec(4096)
    assert (tokens["kind"], tokens["num_buckets"], tokens["padding_id"]) == ("tokens", 4096, PADDING_ID)
    assert tokens["input"]["name"] == INPUT_NAMES["tokens"] and tokens["input"]["dtype"] == "int64"


def test_hidden_features_append_log_length_in_float32():
    pooled = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    out = hidden_features(pooled, 20)
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_allclose(out, [1.5, -2.0, math.log(20)], rtol=1e-6)
    np.testing.assert_allclose(hidden_features(np.array([0.0]), 0), [0.0, 0.0])  # log(max(len, 1))


def test_features_from_prefill_by_kind():
    assert features_from_prefill(tokens_spec(8), [4, 5, 6], None) == [4, 5, 6]
    np.testing.assert_allclose(features_from_prefill(hidden_spec(2, 3), [4, 5], torch.tensor([1.0, 2.0])),
                               [1.0, 2.0, math.log(2)], rtol=1e-6)
    with pytest.raises(CtxdraftError, match="pooled layer-2"):
        features_from_prefill(hidden_spec(2, 3), [4, 5], None)


@pytest.mark.parametrize("layers, expected", [(30, 10), (4, 1), (1, 1), (2, 1), (24, 8)])
def test_default_feature_layer(layers, expected):
    assert default_feature_layer(layers) == expected
