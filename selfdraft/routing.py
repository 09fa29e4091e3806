"""A bundle's routing policy: train it from collected rewards, save it, export it to ONNX.

``train_bundle_policy`` is what ``ctxdraft train-policy`` runs: ``policy.train_policies`` (REINFORCE and
the supervised baseline, held-out report) on the rows ``collect.collect`` wrote, then the REINFORCE network
goes to ``BUNDLE/policy.onnx`` (``export.export_policy``) and its weights to ``BUNDLE/policy.safetensors``
so ``export_bundle_policy`` can redo the ONNX file later. bundle.json gets ``policy``, ``policy_model``
(what rebuilds the network) and ``features`` (what the router feeds it).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .collect import pool_key
from .errors import CtxdraftError
from .fileio import read_jsonl, write_json_atomic, write_text_atomic
from .policy import (
    HiddenPolicy,
    PolicyConfig,
    TokenPolicy,
    feature_spec,
    policy_inputs,
    report_markdown,
    rewards_from_rows,
    train_policies,
)

POLICY_FILE = "policy.onnx"
WEIGHTS_FILE = "policy.safetensors"
REPORT_FILE = "reports/train_policy.json"


def _version() -> str:
    from .bundle import versions

    return versions().get("ctxdraft") or "0+unknown"


def _hidden_layer(rows: list[dict], source: str) -> int | None:
    layers = {r.get("features", {}).get("hidden_layer") for r in rows if isinstance(r.get("features"), dict)}
    if len(layers) > 1:
        raise CtxdraftError(f"{source}: rows pooled their hidden features at different layers {sorted(map(str, layers))}; "
                            "re-collect into a fresh file")
    return next(iter(layers), None)


def train_bundle_policy(bundle, rewards_path: str | Path, config: PolicyConfig | None = None, eval_frac: float = 0.25,
                        split_seed: int | None = None, ids: set | None = None) -> dict:
    """Train the bundle's policy on a rewards file and export it. ``ids``: use only these rows.

    Returns the report written to ``BUNDLE/reports/train_policy.json`` (and a Markdown table beside it).
    """
    if bundle.path is None:
        raise CtxdraftError("train-policy needs a bundle directory to write policy.onnx into")
    config = config or PolicyConfig()
    t0 = time.perf_counter()
    source = f"rewards file {rewards_path}"
    rows = read_jsonl(rewards_path, what="rewards file")
    if ids is not None:
        rows = [r for r in rows if r.get("id") in ids]
        if not rows:
            raise CtxdraftError(f"{source} has no rows for the prompts of the data file; collect them first")
    key = pool_key(bundle)
    stale = [i + 1 for i, r in enumerate(rows) if r.get("pool", key) != key]
    if stale:
        raise CtxdraftError(f"{source}: row {stale[0]} (and {len(stale) - 1} more) was collected for another pool of arms "
                            "or with --draft-len; re-run `ctxdraft collect` for this bundle")
    data = rewards_from_rows(rows, source=source)
    if set(data.arm_names) != set(bundle.arms):
        raise CtxdraftError(f"{source} has arms {data.arm_names} but the bundle has {bundle.arms}; "
                            "re-run `ctxdraft collect` for this bundle")
    layer = _hidden_layer(rows, source) if config.feature_kind == "hidden" else None
    if config.feature_kind == "hidden" and layer is None:
        raise CtxdraftError(f"{source} does not say which layer its hidden features come from (features.hidden_layer); "
                            "re-collect with `ctxdraft collect`")

    result = train_policies(data, config, eval_frac, split_seed)
    train_s = time.perf_counter() - t0
    policy = result.reinforce
    spec = feature_spec(policy, layer)
    arm_specs = [bundle.arm_spec(name) for name in data.arm_names]
    target = {"name": bundle.info["target"].get("name"), "hash": bundle.info["target"].get("hash")}
    _save_weights(bundle.path / WEIGHTS_FILE, policy)
    _export(bundle, policy, arm_specs, spec, target)
    bundle.info["policy"] = POLICY_FILE
    bundle.info["policy_model"] = {
        "weights": WEIGHTS_FILE,
        "feature_kind": config.feature_kind,
        "feature_dim": getattr(policy, "feature_dim", None),
        "layer": layer,
        "arms": list(data.arm_names),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
    }
    bundle.info["features"] = spec
    bundle._router = None
    bundle.save()

    report = result.report
    report["rewards"] = str(rewards_path)
    report["exported"] = "reinforce"
    report["train_s"] = round(train_s, 1)
    report["onnx"] = onnx_check(bundle, policy, data, result.eval_idx)
    write_json_atomic(bundle.path / REPORT_FILE, report)
    write_text_atomic((bundle.path / REPORT_FILE).with_suffix(".md"), report_markdown(report))
    return report


def _save_weights(path: Path, policy: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in policy.state_dict().items()}, str(tmp),
                  metadata={"format": "ctxdraft-policy"})


def _export(bundle, policy, arm_specs: list[dict], spec: dict, target: dict) -> Path:
    from ctxdraft.export.onnx_export import export_policy

    return export_policy(policy, bundle.path / POLICY_FILE, arm_specs, spec, target, _version())


def load_bundle_policy(bundle) -> torch.nn.Module:
    """Rebuild the bundle's trained policy network from ``policy_model`` and its saved weights."""
    from safetensors.torch import load_file

    meta = bundle.info.get("policy_model")
    if not meta or bundle.path is None:
        raise CtxdraftError(f"bundle {bundle.path} has no trained policy; run `ctxdraft train-policy` first")
    path = bundle.path / meta.get("weights", WEIGHTS_FILE)
    if not path.is_file():
        raise CtxdraftError(f"policy weights not found: {path}; run `ctxdraft train-policy` again")
    cfg = dict(meta["config"])
    cfg["hidden_sizes"] = tuple(cfg.get("hidden_sizes", ()))
    config = PolicyConfig(**cfg)
    num_arms = len(meta["arms"])
    policy = HiddenPolicy(meta["feature_dim"], num_arms, config) if meta["feature_kind"] == "hidden" else TokenPolicy(num_arms, config)
    try:
        policy.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as e:
        raise CtxdraftError(f"{path} does not fit the policy described in bundle.json ({str(e).splitlines()[0]}); "
                            "run `ctxdraft train-policy` again") from None
    return policy.eval()


def export_bundle_policy(bundle) -> Path:
    """Redo ``BUNDLE/policy.onnx`` from the saved weights (e.g. after upgrading the exporter)."""
    policy = load_bundle_policy(bundle)
    meta = bundle.info["policy_model"]
    missing = [a for a in meta["arms"] if a not in bundle.arms]
    if missing:
        raise CtxdraftError(f"the saved policy routes to arms {missing} that the bundle no longer has; "
                            "run `ctxdraft train-policy` again")
    arm_specs = [bundle.arm_spec(name) for name in meta["arms"]]
    spec = feature_spec(policy, meta.get("layer"))
    target = {"name": bundle.info["target"].get("name"), "hash": bundle.info["target"].get("hash")}
    path = _export(bundle, policy, arm_specs, spec, target)
    bundle.info["policy"] = POLICY_FILE
    bundle.info["features"] = spec
    bundle._router = None
    bundle.save()
    return path


def onnx_check(bundle, policy, data, idx: list[int]) -> dict:
    """onnxruntime vs torch on the held-out rows (max abs difference of the probabilities), and the
    median time of one ``OnnxRouter.choose``."""
    try:
        from ctxdraft.export.router import OnnxRouter

        router = OnnxRouter(bundle.path / POLICY_FILE, expected=bundle.info)
    except CtxdraftError as e:
        return {"skipped": str(e)}
    inputs = policy_inputs(data, idx, policy.feature_kind)
    with torch.no_grad():
        expected = torch.softmax(policy(inputs), dim=-1).numpy()
    if policy.feature_kind == "tokens":
        batch = [data.tokens[i] for i in idx]
        singles = batch
    else:
        batch = inputs.numpy()
        singles = list(batch)
    got = router.probs(batch)
    times = []
    for features in singles[:50]:
        t = time.perf_counter()
        router.choose(features)
        times.append(time.perf_counter() - t)
    return {"provider": router.provider, "max_abs_diff": float(np.abs(got - expected).max()),
            "choose_median_ms": round(statistics.median(times) * 1e3, 4) if times else None}
