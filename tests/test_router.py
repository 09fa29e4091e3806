"""export/router.py alone: routing with policies built here by hand with onnx.helper (no torch policy, no exporter),
so what the router computes is checked against numbers this file computes itself."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctxdraft.export.router import OnnxRouter
from ctxdraft.selfdraft.base.errors import CtxdraftError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

ARMS = ["none", "lookup", "exit@2"]
TARGET = {"name": "tiny", "hash": "abcd1234"}
DIM = 4
RNG = np.random.default_rng(0)
WEIGHT = RNG.normal(size=(DIM, len(ARMS))).astype(np.float32)
BIAS = RNG.normal(size=(len(ARMS),)).astype(np.float32)
PER_TOKEN = np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)  # tokens policy: logits = num_tokens * PER_TOKEN


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def save_policy(path, kind="hidden", metadata=None, arm_names=ARMS, input_name=None, graph_dim=DIM):
    """A linear hidden policy (softmax(x W + b)) or a tokens policy whose logits grow with the prompt's length
    (non-padding ids, padding is -1), with its arm names as a constant output and ctxdraft metadata."""
    names = helper.make_tensor("names", TensorProto.STRING, [len(arm_names)], [a.encode() for a in arm_names])
    nodes = [helper.make_node("Constant", [], ["arm_names"], value=names)]
    if kind == "hidden":
        input_name = input_name or "features"
        inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", graph_dim])]
        init = [helper.make_tensor("W", TensorProto.FLOAT, WEIGHT.shape, WEIGHT.flatten()),
                helper.make_tensor("b", TensorProto.FLOAT, BIAS.shape, BIAS)]
        nodes += [helper.make_node("MatMul", [input_name, "W"], ["xw"]),
                  helper.make_node("Add", ["xw", "b"], ["logits"])]
    else:
        input_name = input_name or "token_ids"
        inputs = [helper.make_tensor_value_info(input_name, TensorProto.INT64, ["batch", "tokens"])]
        init = [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
                helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
                helper.make_tensor("per_token", TensorProto.FLOAT, PER_TOKEN.shape, PER_TOKEN.flatten())]
        nodes += [helper.make_node("GreaterOrEqual", [input_name, "zero"], ["real"]),
                  helper.make_node("Cast", ["real"], ["real_f"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceSum", ["real_f", "axis"], ["length"], keepdims=1),
                  helper.make_node("Mul", ["length", "per_token"], ["logits"])]
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(arm_names)]),
               helper.make_tensor_value_info("arm_names", TensorProto.STRING, [len(arm_names)])]
    model = helper.make_model(helper.make_graph(nodes, "policy", inputs, outputs, init),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    features = {"kind": "hidden", "dim": DIM, "layer": 2} if kind == "hidden" else {"kind": "tokens"}
    props = {"ctxdraft.arms": json.dumps(ARMS), "ctxdraft.features": json.dumps(features),
             "ctxdraft.target": json.dumps(TARGET), "ctxdraft.version": "0.1.0"}
    props.update(metadata or {})
    for key, value in props.items():
        if value is not None:
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(path))
    return path


@pytest.fixture
def hidden_path(tmp_path):
    return save_policy(tmp_path / "hidden.onnx")


def test_hidden_routing_is_the_graphs_softmax(hidden_path):
    router = OnnxRouter(hidden_path, device="cpu")
    assert router.arms == ARMS and router.feature_kind == "hidden" and router.target == TARGET
    features = RNG.normal(size=(5, DIM)).astype(np.float32)
    probs = router.probs(features)
    expected = softmax(features @ WEIGHT + BIAS)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), np.ones(5), rtol=1e-6)
    assert [router.choose(f) for f in features] == [ARMS[i] for i in expected.argmax(1)]
    assert len({router.choose(f) for f in 5 * RNG.normal(size=(30, DIM))}) > 1  # not a constant answer


def test_tokens_routing_pads_with_an_id_the_graph_ignores(tmp_path):
    router = OnnxRouter(save_policy(tmp_path / "tokens.onnx", kind="tokens"))
    lists = [[5, 0, 9], [7], [1, 2, 3, 4, 5, 6], []]
    probs = router.probs(lists)
    # Padding a short row next to a long one must not change it: padded ids would count as tokens.
    np.testing.assert_allclose(probs, softmax(np.array([[3], [1], [6], [0]], dtype=np.float32) * PER_TOKEN), rtol=1e-5)
    np.testing.assert_allclose(probs.sum(1), np.ones(4), rtol=1e-6)
    assert router.choose([1, 2]) == "exit@2" and router.choose([]) in ARMS
    assert router.choose(np.array([3, 3, 3])) == router.choose([3, 3, 3])


def test_expected_bundle_fits_or_is_refused(hidden_path):
    OnnxRouter(hidden_path, expected={"target": TARGET, "arms": [{"name": a} for a in ARMS[::-1]],
                                      "features": {"kind": "hidden", "dim": DIM, "layer": 2}})
    with pytest.raises(CtxdraftError, match="trained for target 'tiny' .*re-run `ctxdraft train-policy`"):
        OnnxRouter(hidden_path, expected={"target": {"name": "other", "hash": "ffff"}})
    with pytest.raises(CtxdraftError, match=r"missing \['exit@2'\], new \['exit@3'\]"):
        OnnxRouter(hidden_path, expected={"arms": ["none", "lookup", "exit@3"]})
    with pytest.raises(CtxdraftError, match="layer=2 but the bundle gives layer=3"):
        OnnxRouter(hidden_path, expected={"features": {"kind": "hidden", "layer": 3}})


@pytest.mark.parametrize("edit, message", [
    (dict(metadata={"ctxdraft.target": None}), "is not a ctxdraft policy .*ctxdraft.target missing"),
    (dict(metadata={"ctxdraft.arms": "[not json"}), "ctxdraft metadata is not valid JSON"),
    (dict(metadata={"ctxdraft.features": json.dumps({"kind": "pixels"})}), "unknown feature kind 'pixels'"),
    (dict(metadata={"ctxdraft.features": json.dumps({"kind": "hidden", "dim": DIM + 1})}),
     f"metadata says {DIM + 1} features but the graph takes {DIM}"),
    (dict(metadata={"ctxdraft.features": json.dumps({"kind": "tokens"})}), "are not a ctxdraft tokens policy"),
    (dict(input_name="x"), r"graph inputs \['x'\]"),
    (dict(arm_names=["none", "exit@2", "lookup"]), "disagree with metadata"),
])
def test_metadata_that_does_not_fit_the_graph_is_refused(tmp_path, edit, message):
    path = save_policy(tmp_path / "policy.onnx", **edit)
    with pytest.raises(CtxdraftError, match=message):
        OnnxRouter(path)


def test_bad_files_and_inputs_are_clear_errors(tmp_path, hidden_path):
    with pytest.raises(CtxdraftError, match="policy file not found"):
        OnnxRouter(tmp_path / "nothing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(CtxdraftError, match="cannot load policy .*junk.onnx"):
        OnnxRouter(tmp_path / "junk.onnx")
    with pytest.raises(CtxdraftError, match="router device must be 'auto' or 'cpu'"):
        OnnxRouter(hidden_path, device="cuda")
    router = OnnxRouter(hidden_path)
    with pytest.raises(CtxdraftError, match=rf"shape \[batch, {DIM}\], got \[2, 3\]"):
        router.probs(np.zeros((2, 3)))
    with pytest.raises(CtxdraftError, match=r"one query's 1-D features, got shape \[1, 4\]"):
        router.choose(np.zeros((1, DIM)))
    tokens = OnnxRouter(save_policy(tmp_path / "tokens.onnx", kind="tokens"))
    with pytest.raises(CtxdraftError, match="non-negative"):
        tokens.choose([3, -2])
    with pytest.raises(CtxdraftError, match="empty batch"):
        tokens.probs([])
