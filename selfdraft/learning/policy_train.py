"""Training a bundle's routing networks on a reward table, and writing them (ONNX + safetensors weights).

``train_policies`` splits the rows (stratified by domain), trains REINFORCE (the paper's method) and the
supervised baseline and reports both on the held-out rows; ``save_policy`` exports a network to ONNX
(``export.onnx_export``) with its torch weights beside it; ``load_bundle_policy`` rebuilds the saved network.
"""
from __future__ import annotations

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
from ..base.fileio import display_path
from ..base.layout import POLICY_FILE, POLICY_WEIGHTS_FILE
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
    export_policy(policy, onnx_path, [bundle.arm_spec(name) for name in arm_names], spec, _target_identity(bundle),
                  versions().get("ctxdraft") or "0+unknown")
    save_container(weights_path, {k: v.detach().contiguous() for k, v in policy.state_dict().items()},
                   file_format="ctxdraft-policy")
    return spec


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


def onnx_check(bundle, policy, data: RewardData, idx: list[int]) -> dict:
    """onnxruntime vs torch on the held-out rows (max abs difference of the probabilities), and the
    median time of one ``OnnxRouter.choose``."""
    try:
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
