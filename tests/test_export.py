"""ONNX export of the policy (parity, dynamic shapes, metadata) and the onnxruntime router."""
import json
import sys

import numpy as np
import onnx
import pytest
import torch

from ctxdraft.export import OnnxRouter, export_policy, read_metadata
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.learning.policy import PolicyConfig, build_policy, feature_spec, pad_token_ids
from ctxdraft.selfdraft.learning.rewards import rewards_from_rows

ort = pytest.importorskip("onnxruntime")

ARMS = [{"name": "none", "kind": "none", "settings": {}},
        {"name": "lookup", "kind": "lookup", "settings": {"draft_len": 5, "ngram_sizes": [3, 2, 1]}},
        {"name": "exit@20", "kind": "exit", "settings": {"exit_layer": 20, "draft_len": 4}},
        {"name": "exit@10", "kind": "exit", "settings": {"exit_layer": 10, "draft_len": 3}}]
ARM_NAMES = [a["name"] for a in ARMS]
TARGET = {"name": "tiny-llama", "hash": "0123abcd"}
FEATURE_DIM = 13
LAYER = 6


def make_data(num_rows=12):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(num_rows):
        num_tokens = int(torch.randint(1, 30, (), generator=g))
        rows.append({
            "id": i, "domain": "all", "prompt_len": num_tokens,
            # Offset and scale the features so the in-graph normalisation is far from identity.
            "features": {"hidden": (5.0 + 3.0 * torch.randn(FEATURE_DIM, generator=g)).tolist(),
                         "tokens": torch.randint(0, 49_152, (num_tokens,), generator=g).tolist()},
            "arms": {a: {"speedup": 1.0 + 0.1 * j} for j, a in enumerate(ARM_NAMES)},
        })
    return rewards_from_rows(rows)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One untrained-but-normalised policy of each kind, exported once."""
    data = make_data()
    out = {}
    for kind in ("hidden", "tokens"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            policy = build_policy(data, list(range(len(data))), PolicyConfig(feature_kind=kind, hidden_sizes=(32, 16)))
        policy.eval()
        path = tmp_path_factory.mktemp(kind) / "policy.onnx"
        export_policy(policy, path, ARMS, feature_spec(policy, layer=LAYER), TARGET, "0.1.0")
        out[kind] = (policy, path)
    return out


def torch_probs(policy, inputs):
    with torch.no_grad():
        return torch.softmax(policy(inputs), dim=-1).numpy()


def random_hidden(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return 5.0 + 3.0 * torch.randn(batch, FEATURE_DIM, generator=g)


def random_token_lists(batch, seed, max_len=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 49_152, (int(torch.randint(1, max_len, (), generator=g)),), generator=g).tolist()
            for _ in range(batch)]


@pytest.mark.parametrize("batch", [1, 5])
def test_hidden_parity(exported, batch):
    policy, path = exported["hidden"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    features = random_hidden(batch, seed=batch)
    probs, arm_names = session.run(["probs", "arm_names"], {"features": features.numpy()})
    assert probs.shape == (batch, len(ARMS)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, torch_probs(policy, features), atol=1e-5, rtol=0)
    assert list(arm_names) == ARM_NAMES


@pytest.mark.parametrize("batch, max_len", [(1, 2), (1, 300), (5, 3), (5, 60)])
def test_tokens_parity_over_batch_and_length(exported, batch, max_len):
    policy, path = exported["tokens"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    token_ids = pad_token_ids(random_token_lists(batch, seed=batch * max_len, max_len=max_len))
    (probs,) = session.run(["probs"], {"token_ids": token_ids.numpy()})
    assert probs.shape == (batch, len(ARMS))
    np.testing.assert_allclose(probs, torch_probs(policy, token_ids), atol=1e-5, rtol=0)


def test_padding_does_not_change_the_choice(exported):
    policy, path = exported["tokens"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens = [7, 49_151, 12, 3]
    short = np.array([tokens], dtype=np.int64)
    padded = np.array([tokens + [-1] * 9], dtype=np.int64)
    np.testing.assert_allclose(session.run(["probs"], {"token_ids": short})[0],
                               session.run(["probs"], {"token_ids": padded})[0], atol=1e-6)


def test_graph_shapes_checker_size_and_metadata(exported):
    for kind, (policy, path) in exported.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert isinstance(dims[0], str) and dims[0], "batch must be dynamic"
        if kind == "tokens":
            assert model.graph.input[0].name == "token_ids" and isinstance(dims[1], str) and dims[1]
        else:
            assert model.graph.input[0].name == "features" and dims[1] == FEATURE_DIM
        assert [o.name for o in model.graph.output] == ["probs", "arm_names"]
        props = {p.key: p.value for p in model.metadata_props}
        assert json.loads(props["ctxdraft.arms"]) == ARMS
        assert json.loads(props["ctxdraft.target"]) == TARGET
        assert props["ctxdraft.version"] == "0.1.0"
        features = json.loads(props["ctxdraft.features"])
        assert features == feature_spec(policy, layer=LAYER)
        assert features["kind"] == kind and features["pooling"] == "mean"
        assert path.stat().st_size < 1_000_000
        assert path.stat().st_mode & 0o777 == 0o644
        # The exporter's per-node stack traces would ship this machine's source paths in a file users hand on.
        assert b"onnx_export.py" not in path.read_bytes() and not any(n.metadata_props for n in model.graph.node)
        assert read_metadata(path) == {"arms": ARMS, "features": features, "target": TARGET, "version": "0.1.0"}
    assert json.loads({p.key: p.value for p in onnx.load(str(exported["hidden"][1])).metadata_props}[
        "ctxdraft.features"])["dim"] == FEATURE_DIM


def test_export_rejects_inconsistent_arguments(exported, tmp_path):
    policy, _ = exported["hidden"]
    spec = feature_spec(policy, layer=LAYER)
    with pytest.raises(CtxdraftError, match="4 outputs but 3 arms"):
        export_policy(policy, tmp_path / "p.onnx", ARM_NAMES[:3], spec, TARGET, "0.1.0")
    with pytest.raises(CtxdraftError, match="dim"):
        export_policy(policy, tmp_path / "p.onnx", ARMS, {**spec, "dim": 99}, TARGET, "0.1.0")
    with pytest.raises(CtxdraftError, match="kind"):
        export_policy(policy, tmp_path / "p.onnx", ARMS, feature_spec(exported["tokens"][0]), TARGET, "0.1.0")
    with pytest.raises(CtxdraftError, match="hash"):
        export_policy(policy, tmp_path / "p.onnx", ARMS, spec, {"name": "x"}, "0.1.0")
    with pytest.raises(CtxdraftError, match="unique"):
        export_policy(policy, tmp_path / "p.onnx", ["a", "a", "b", "c"], spec, TARGET, "0.1.0")
    with pytest.raises(CtxdraftError, match="layer"):
        feature_spec(policy)
    assert not (tmp_path / "p.onnx").exists()


def test_bare_arm_names_get_a_kind(exported, tmp_path):
    policy, _ = exported["hidden"]
    path = export_policy(policy, tmp_path / "p.onnx", ["none", "lookup", "exit@20", "model:smol"],
                         feature_spec(policy, layer=LAYER), TARGET, "0.1.0")
    assert [a["kind"] for a in read_metadata(path)["arms"]] == ["none", "lookup", "exit", "model"]


# ---- router


def test_router_matches_torch_and_reports_its_metadata(exported):
    policy, path = exported["hidden"]
    router = OnnxRouter(path, expected={"target": TARGET, "arms": ARMS, "features": {"kind": "hidden",
                                                                                    "dim": FEATURE_DIM,
                                                                                    "layer": LAYER}})
    assert router.arms == ARM_NAMES and router.arm_specs == ARMS
    assert router.target == TARGET and router.version == "0.1.0" and router.feature_kind == "hidden"
    assert router.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    features = random_hidden(5, seed=11)
    expected_probs = torch_probs(policy, features)
    np.testing.assert_allclose(router.probs(features.numpy()), expected_probs, atol=1e-5)
    for row in range(5):
        assert router.choose(features[row].numpy()) == ARM_NAMES[expected_probs[row].argmax()]
    assert router.choose(features[0].tolist()) == router.choose(features[0].numpy())


def test_token_router_pads_ragged_batches(exported):
    policy, path = exported["tokens"]
    router = OnnxRouter(path, expected={"target": TARGET, "arms": ARM_NAMES, "features": {"kind": "tokens"}})
    token_lists = random_token_lists(4, seed=3)
    expected_probs = torch_probs(policy, pad_token_ids(token_lists))
    np.testing.assert_allclose(router.probs(token_lists), expected_probs, atol=1e-5)
    assert [router.choose(t) for t in token_lists] == [ARM_NAMES[i] for i in expected_probs.argmax(1)]
    assert router.choose([]) in ARM_NAMES  # an empty prompt routes instead of crashing
    assert router.choose(np.array(token_lists[0])) == router.choose(token_lists[0])


def test_router_accepts_a_bundle_info_without_features(exported):
    # bundle.json before a policy exists has "features": null; arm order may differ from the policy's.
    policy, path = exported["tokens"]
    router = OnnxRouter(path, expected={"target": {**TARGET, "spec": "x"}, "arms": ARMS[::-1],
                                        "features": None, "policy": "policy.onnx"})
    # Columns keep the graph's order: a router that took the bundle's (reversed) order would name every choice
    # wrongly, since reversing 4 arms moves every index.
    assert router.arms == ARM_NAMES and router.features["kind"] == "tokens"
    token_lists = random_token_lists(6, seed=5)
    expected = torch_probs(policy, pad_token_ids(token_lists)).argmax(1)
    assert [router.choose(t) for t in token_lists] == [ARM_NAMES[i] for i in expected]


@pytest.mark.parametrize("expected, message", [
    ({"target": {"name": "smollm2", "hash": "ffff"}}, "trained for target 'tiny-llama'"),
    ({"arms": ARM_NAMES[:3]}, "missing ['exit@10']"),
    ({"arms": ARM_NAMES + ["lookup@7"]}, "new ['lookup@7']"),
    ({"features": {"kind": "hidden", "dim": FEATURE_DIM + 1}}, "dim=13 but the bundle gives dim=14"),
    ({"features": {"kind": "hidden", "dim": FEATURE_DIM, "layer": LAYER + 1}}, "layer=6"),
    ({"features": {"kind": "tokens"}}, "kind='hidden'"),
])
def test_router_rejects_a_mismatched_bundle(exported, expected, message):
    with pytest.raises(CtxdraftError, match="re-run `ctxdraft train-policy`") as info:
        OnnxRouter(exported["hidden"][1], expected=expected)
    assert message in str(info.value)


def test_router_rejects_bad_inputs(exported):
    router = OnnxRouter(exported["hidden"][1])
    with pytest.raises(CtxdraftError, match=r"shape \[batch, 13\]"):
        router.choose(np.zeros(FEATURE_DIM + 1))
    with pytest.raises(CtxdraftError, match="1-D"):
        router.choose(np.zeros((2, FEATURE_DIM)))
    with pytest.raises(CtxdraftError, match="non-negative"):
        OnnxRouter(exported["tokens"][1]).choose([1, -3])


def test_router_file_errors(exported, tmp_path):
    with pytest.raises(CtxdraftError, match="not found"):
        OnnxRouter(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(CtxdraftError, match="damaged or not ONNX"):
        OnnxRouter(corrupt)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported["hidden"][1].read_bytes()[:500])
    with pytest.raises(CtxdraftError, match="cannot load policy"):
        OnnxRouter(truncated)
    # A valid ONNX file that is not a ctxdraft policy.
    model = onnx.load(str(exported["hidden"][1]))
    del model.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(model, str(plain))
    with pytest.raises(CtxdraftError, match="not a ctxdraft policy"):
        OnnxRouter(plain)
    with pytest.raises(CtxdraftError, match="not a ctxdraft policy"):
        read_metadata(plain)


@pytest.mark.parametrize("dim", [577, 0, "wide"])
def test_router_refuses_metadata_that_does_not_fit_the_graph(exported, tmp_path, dim):
    model = onnx.load(str(exported["hidden"][1]))
    for prop in model.metadata_props:
        if prop.key == "ctxdraft.features":
            prop.value = json.dumps({**json.loads(prop.value), "dim": dim})
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    with pytest.raises(CtxdraftError, match=f"metadata says {dim!r} features but the graph takes {FEATURE_DIM}"):
        OnnxRouter(edited)


def test_router_without_onnxruntime_says_what_to_install(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(CtxdraftError, match=r"pip install 'ctxdraft\[cpu\]'"):
        OnnxRouter(exported["hidden"][1])


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_router_uses_cuda_only_when_the_session_really_gets_it(exported, monkeypatch):
    """onnxruntime may list CUDA yet give the session only the CPU provider (no driver, wrong CUDA): the router
    says which provider really runs and still routes. Only the list is faked; the session is onnxruntime's own,
    which here has no CUDA to give."""
    policy, path = exported["hidden"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    features = random_hidden(3, seed=9)
    for device in ("auto", "cpu"):
        router = OnnxRouter(path, device=device)
        assert router.provider == "CPUExecutionProvider"  # not the provider it asked for first
        np.testing.assert_allclose(router.probs(features.numpy()), torch_probs(policy, features), atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter says it is legacy
def test_falls_back_to_the_torchscript_exporter_when_dynamo_fails(exported, tmp_path, monkeypatch):
    policy, _ = exported["tokens"]
    real_export = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.warns(UserWarning, match="simulated dynamo failure"):
        path = export_policy(policy, tmp_path / "p.onnx", ARMS, feature_spec(policy), TARGET, "0.1.0")
    token_lists = random_token_lists(5, seed=4)
    np.testing.assert_allclose(OnnxRouter(path).probs(token_lists), torch_probs(policy, pad_token_ids(token_lists)),
                               atol=1e-5)
