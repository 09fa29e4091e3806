"""Training a bundle's routing networks on a reward table, and writing them (ONNX + safetensors weights).

``train_policies`` splits the rows (stratified by domain), trains REINFORCE (the paper's method) and the
supervised baseline and reports both on the held-out rows; ``save_policy`` exports a network to ONNX
(``export.onnx_export``) with its torch weights beside it; ``save_checked_policy`` does the same but first checks
the ONNX file against torch (``onnx_check``, within ``ONNX_TOLERANCE``) and writes nothing when it fails;
``load_bundle_policy`` rebuilds the saved network.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctxdraft.export.onnx_export import export_policy
from ctxdraft.export.router import OnnxRouter

from ..base.data import stratified_split
from ..base.errors import CtxdraftError
from ..base.fileio import atomic_path, display_path
from ..base.layout import POLICY_WEIGHTS_FILE
from ..base.versions import versions
from ..runtime.checkpoint import load_container, save_container
from .policy import (
    HiddenPolicy,
    PolicyConfig,
    TokenPolicy,
    feature_spec,
    policy_inputs,
    train_reinforce,
    train_supervised,
)
from .policy_report import policy_report
from .rewards import RewardData

# The most an exported policy's probabilities may differ from the torch network's on the held-out rows
# (max |p_onnxruntime - p_torch|): float32 graph-vs-eager rounding is ~1e-7; anything near 1e-4 is a wrong export.
ONNX_TOLERANCE = 1e-4


@dataclass
class PolicyTrainResult:
    """What ``train_policies`` produced: both networks, the split and the report."""

    reinforce: torch.nn.Module
    supervised: torch.nn.Module
    train_idx: list[int]
    eval_idx: list[int]
    report: dict = field(default_factory=dict)


def train_policies(data: RewardData, config: PolicyConfig | None = None, eval_frac: float = 0.25,
                   split_seed: int | None = None) -> PolicyTrainResult:
    """Split (stratified by domain), train REINFORCE and the supervised baseline on the training rows,
    and build the held-out report. The REINFORCE policy is the one to export."""
    config = config or PolicyConfig()
    train_idx, eval_idx = stratified_split(data.domains, eval_frac, config.seed if split_seed is None else split_seed)
    reinforce = train_reinforce(data, train_idx, config)
    supervised = train_supervised(data, train_idx, config)
    report = policy_report(data, train_idx, eval_idx, {"reinforce": reinforce, "supervised": supervised}, config)
    return PolicyTrainResult(reinforce, supervised, train_idx, eval_idx, report)


def _target_identity(bundle) -> dict:
    return {"name": bundle.info["target"].get("name"), "hash": bundle.info["target"].get("hash")}


def save_policy(bundle, policy: torch.nn.Module, layer: int | None, arm_names: list[str], onnx_path: Path,
                weights_path: Path) -> dict:
    """Write ``policy`` as ONNX (with the bundle's arms, features and target in its metadata) and its torch
    weights, each atomically; returns its feature spec."""

    spec = feature_spec(policy, layer)
    _export(bundle, policy, arm_names, spec, onnx_path)
    _save_weights(policy, weights_path)
    return spec


@dataclass
class SavedPolicy:
    spec: dict  # the feature spec (bundle.json ``features``)
    onnx: dict  # onnx_check's result: provider, max_abs_diff, choose_median_ms (or skipped)


def save_checked_policy(bundle, policy: torch.nn.Module, layer: int | None, arm_names: list[str], data: RewardData,
                        idx: list[int], onnx_path: Path, weights_path: Path) -> SavedPolicy:
    """``save_policy``, with the ONNX file checked before anything is written: it is exported under a temporary
    name, run with onnxruntime on rows ``idx`` and compared with torch (max |p_onnx - p_torch| <= ONNX_TOLERANCE);
    only then are it and the weights renamed into place. A failing check raises CtxdraftError and leaves both
    paths as they were. Without onnxruntime installed the check is skipped (and said so in the result)."""
    spec = feature_spec(policy, layer)
    expected = {"target": _target_identity(bundle), "arms": list(arm_names), "features": spec}
    with atomic_path(onnx_path) as onnx_tmp, atomic_path(weights_path) as weights_tmp:
        _export(bundle, policy, arm_names, spec, onnx_tmp)
        check = onnx_check(onnx_tmp, expected, policy, data, idx)
        diff = check.get("max_abs_diff", 0.0)
        if not diff <= ONNX_TOLERANCE:  # also refuses NaN
            raise CtxdraftError(f"the exported policy disagrees with the trained network on the held-out rows: max "
                                f"|onnxruntime - torch| = {diff:.2e} > {ONNX_TOLERANCE:.0e}; nothing was written")
        _save_weights(policy, weights_tmp)
    return SavedPolicy(spec, check)


def _export(bundle, policy: torch.nn.Module, arm_names: list[str], spec: dict, path: Path) -> None:
    export_policy(policy, path, [bundle.arm_spec(name) for name in arm_names], spec, _target_identity(bundle),
                  versions().get("ctxdraft") or "0+unknown")


def _save_weights(policy: torch.nn.Module, path: Path) -> None:
    save_container(path, {k: v.detach().contiguous() for k, v in policy.state_dict().items()},
                   file_format="ctxdraft-policy")


def load_bundle_policy(bundle) -> torch.nn.Module:
    """Rebuild the bundle's trained policy network from ``policy_model`` and its saved weights."""
    meta = bundle.info.get("policy_model")
    if not meta or bundle.path is None:
        raise CtxdraftError(f"bundle {display_path(bundle.path)} has no trained policy; run `ctxdraft train-policy` first")
    path = bundle.path / meta.get("weights", POLICY_WEIGHTS_FILE)
    if not path.is_file():
        raise CtxdraftError(f"policy weights not found: {display_path(path)}; run `ctxdraft train-policy` again")
    config = PolicyConfig.from_dict(meta["config"])
    num_arms = len(meta["arms"])
    policy = HiddenPolicy(meta["feature_dim"], num_arms, config) if meta["feature_kind"] == "hidden" else TokenPolicy(num_arms, config)
    tensors, _ = load_container(path, "policy weights", "run `ctxdraft train-policy` again")
    try:
        policy.load_state_dict(tensors)
    except RuntimeError as e:
        raise CtxdraftError(f"{display_path(path)} does not fit the policy described in bundle.json "
                            f"({str(e).splitlines()[0]}); run `ctxdraft train-policy` again") from None
    return policy.eval()


def onnx_check(path: Path, expected: dict, policy, data: RewardData, idx: list[int]) -> dict:
    """onnxruntime vs torch on rows ``idx`` (max abs difference of the probabilities) of the ONNX file at
    ``path`` (which must fit ``expected``, as ``OnnxRouter`` checks), and the median time of one
    ``OnnxRouter.choose``; ``{"skipped": why}`` when onnxruntime is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return {"skipped": "onnxruntime is not installed (pip install 'ctxdraft[cpu]')"}
    router = OnnxRouter(path, expected=expected)
    inputs = policy_inputs(data, idx, policy.feature_kind)
    with torch.no_grad():
        expected_probs = torch.softmax(policy(inputs), dim=-1).numpy()
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
    return {"provider": router.provider, "max_abs_diff": float(np.abs(got - expected_probs).max()),
            "choose_median_ms": round(statistics.median(times) * 1e3, 4) if times else None}
