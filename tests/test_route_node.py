"""examples/route-node routes like the Python router (runs only where node and npm can install onnxruntime-node)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ctxdraft.export import OnnxRouter, export_policy
from ctxdraft.selfdraft.learning.policy import PolicyConfig, build_policy, feature_spec
from ctxdraft.selfdraft.learning.rewards import rewards_from_rows

pytest.importorskip("onnxruntime")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "route-node"
ARMS = ["none", "lookup", "exit@20", "exit@10", "model:smol"]
INSTALL_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def route_js(tmp_path_factory):
    """A copy of the example with onnxruntime-node installed (CPU binaries only)."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are not installed")
    workdir = tmp_path_factory.mktemp("route-node")
    for name in ("package.json", "route.js"):
        shutil.copy(EXAMPLE / name, workdir / name)
    # Without this the install script downloads CUDA binaries from a host that may be unreachable.
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL_CUDA": "skip"}
    try:
        result = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=workdir,
                                env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install of onnxruntime-node took over {INSTALL_TIMEOUT_S}s")
    if result.returncode != 0:
        pytest.skip(f"npm install of onnxruntime-node failed: {result.stderr.strip()[-300:]}")
    return workdir / "route.js"


def export_tiny(kind: str, path: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    rows = [{"id": i, "domain": "all", "prompt_len": 8,
             "features": {"hidden": torch.randn(9, generator=g).tolist(),
                          "tokens": torch.randint(0, 49_152, (8,), generator=g).tolist()},
             "arms": {a: {"speedup": 1.0 + j / 10} for j, a in enumerate(ARMS)}} for i in range(6)]
    data = rewards_from_rows(rows)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        # Wide, large initial weights so different queries really get different arms.
        policy = build_policy(data, list(range(6)), PolicyConfig(feature_kind=kind, embed_dim=8, num_buckets=64))
        for p in policy.mlp.parameters():
            torch.nn.init.normal_(p, std=2.0)
        if kind == "tokens":
            torch.nn.init.normal_(policy.embedding.weight, std=2.0)
    policy.eval()
    return export_policy(policy, path, ARMS, feature_spec(policy, layer=4), {"name": "tiny", "hash": "abc"}, "0.1.0")


@pytest.fixture(scope="module")
def tokens_model(tmp_path_factory):
    return export_tiny("tokens", tmp_path_factory.mktemp("tokens") / "policy.onnx")


def run_node(route_js: Path, model: Path, query, stdin: bool = False) -> dict:
    args = ["node", str(route_js), str(model)] + ([] if stdin else [json.dumps(query)])
    result = subprocess.run(args, input=json.dumps(query) if stdin else None, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_node_routes_token_ids_like_the_python_router(route_js, tokens_model):
    model = tokens_model
    router = OnnxRouter(model)
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(0, 49_152, (n,), generator=g).tolist() for n in (1, 3, 17, 64, 200, 9)]
    chosen = set()
    for i, token_ids in enumerate(queries):
        out = run_node(route_js, model, token_ids, stdin=i % 2 == 1)
        assert out["arm"] == router.choose(token_ids)
        assert list(out["probs"]) == ARMS
        np.testing.assert_allclose(list(out["probs"].values()), router.probs([token_ids])[0], atol=1e-6)
        chosen.add(out["arm"])
    assert len(chosen) >= 2, "the test policy should route different queries to different arms"


def test_node_routes_hidden_features_too(route_js, tmp_path):
    model = export_tiny("hidden", tmp_path / "policy.onnx")
    features = np.linspace(-2, 2, 9).astype(np.float32)
    assert run_node(route_js, model, features.tolist())["arm"] == OnnxRouter(model).choose(features)


def test_node_reports_bad_queries(route_js, tokens_model):
    result = subprocess.run(["node", str(route_js), str(tokens_model), '[1, -2]'], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "non-negative" in result.stderr
