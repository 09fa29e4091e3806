"""``ctxdraft train-policy`` end to end: (collect, then) train a bundle's routing policy and export it.

``train_policy`` is the whole flow: with a prompt file it first collects rewards into
``BUNDLE/rewards.jsonl`` (continuing that file when it was made for the same pool and settings), then
``train_bundle_policy`` splits the rows (stratified by domain), trains REINFORCE (the paper's method) and the
supervised baseline, writes the held-out report, exports the REINFORCE network to ``BUNDLE/policy.onnx``
(``export.export_policy``) and its weights to ``BUNDLE/policy.safetensors`` so that ``export_bundle_policy``
can redo the ONNX file later. The ONNX file is checked against torch on the held-out rows (max |p_onnx - p_torch|
<= ``ONNX_TOLERANCE``) before anything is written; a failing check leaves the bundle as it was.
bundle.json gets ``policy``, ``policy_model`` (what rebuilds the network),
``features`` (what the router feeds it) and the ids it trained on (``trained_on``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ctxdraft.export.onnx_export import read_metadata

from ..base import checks
from ..base.data import read_prompts
from ..base.errors import CtxdraftError
from ..base.fileio import display_path, read_jsonl, write_json_atomic, write_text_atomic
from ..base.layout import POLICY_FILE, POLICY_REPORT, POLICY_WEIGHTS_FILE, REWARDS_FILE, TRAJECTORIES_FILE
from ..drafting.pool import pool_key, with_draft_len
from ..learning.policy import PolicyConfig
from ..learning.policy_report import training_report
from ..learning.policy_train import load_bundle_policy, save_checked_policy, save_policy, train_policies
from ..learning.rewards import rewards_from_rows, write_trajectories
from ..runtime.distributed import Group
from ..serving.bundle import load_bundle
from ..serving.bundle_info import record_training_ids
from .collect import CollectConfig, can_resume, collect

Progress = Callable[[str, int, int], None]  # (stage, done, total)


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
    source = f"rewards file {display_path(rewards_path)}"
    rows = read_jsonl(rewards_path, what="rewards file")
    if ids is not None:
        rows = [r for r in rows if r.get("id") in ids]
        if not rows:
            raise CtxdraftError(f"{source} has no rows for the prompts of the data file; collect them first")
    key = pool_key(bundle.info["arms"])
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
    # Checked against torch before anything is written: a failing export leaves the bundle as it was.
    saved = save_checked_policy(bundle, policy, layer, data.arm_names, data, result.eval_idx, bundle.path / POLICY_FILE,
                                bundle.path / POLICY_WEIGHTS_FILE)
    num_trajectories = write_trajectories(bundle.path / TRAJECTORIES_FILE, rows)
    if not num_trajectories:
        (bundle.path / TRAJECTORIES_FILE).unlink(missing_ok=True)  # trajectories of an older pool would mislead
    bundle.info["policy"] = POLICY_FILE
    bundle.info["policy_model"] = {
        "weights": POLICY_WEIGHTS_FILE,
        "feature_kind": config.feature_kind,
        "feature_dim": getattr(policy, "feature_dim", None),
        "layer": layer,
        "arms": list(data.arm_names),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
    }
    bundle.info["features"] = saved.spec
    record_training_ids(bundle.info, "train-policy", [data.ids[i] for i in result.train_idx])
    bundle._router = None
    bundle.save()

    report = result.report
    report["rewards"] = display_path(rewards_path)
    report["exported"] = "reinforce"
    report["train_s"] = round(train_s, 1)
    report["trajectories"] = num_trajectories  # rows calibrate can retrain from (0: rows without trajectories)
    report["onnx"] = saved.onnx
    write_json_atomic(bundle.path / POLICY_REPORT, report)
    write_text_atomic((bundle.path / POLICY_REPORT).with_suffix(".md"), training_report(report).to_markdown())
    return report


@dataclass
class TrainPolicyResult:
    report: dict  # train_bundle_policy's report
    collected: dict | None  # collect's summary when the flow collected first
    bundle_path: Path | None = None  # train_policy_at, on rank 0: the bundle and the policy file it now routes with
    policy_path: Path | None = None


def train_policy(bundle, *, rewards: str | Path | None = None, data: str | Path | None = None,
                 collect_config: CollectConfig | None = None, config: PolicyConfig | None = None,
                 eval_frac: float = 0.25, progress: Progress | None = None, group: Group | None = None) -> TrainPolicyResult:
    """What ``ctxdraft train-policy`` does: train on a rewards file, or on a prompt file it collects first into
    ``BUNDLE/rewards.jsonl`` (continued when that file was made for this pool and these settings). Under torchrun
    (``group``) the collection is sharded over the ranks and rank 0 trains."""
    group = group or Group.single()
    if (rewards is None) == (data is None):
        raise CtxdraftError("give either --rewards FILE (from `ctxdraft collect`) or --data FILE (collects first)")
    checks.number("eval_frac (--eval-frac)", eval_frac, above=0.0, below=1.0)
    config = (config or PolicyConfig()).validate()
    if bundle.path is None:
        raise CtxdraftError("train-policy needs a bundle directory to write policy.onnx into")
    ids = None
    collected = None
    if data is not None:
        collect_config = collect_config or CollectConfig()
        collect_config.validate()
        rewards = bundle.path / REWARDS_FILE
        key = pool_key(with_draft_len(bundle.info["arms"], collect_config.draft_len))
        collect_config.resume = group.broadcast(can_resume(rewards, key, collect_config.max_new_tokens) if group.main else None)
        rows = read_prompts(data)
        collected = collect(bundle, rows, rewards, collect_config, progress, group)
        ids = {r["id"] for r in rows}
    report = group.broadcast(group.run(lambda: train_bundle_policy(bundle, rewards, config, eval_frac, ids=ids)
                                       if group.main else None))
    return TrainPolicyResult(report, collected)


def export_bundle_policy(bundle) -> Path:
    """Redo ``BUNDLE/policy.onnx`` from the saved weights (e.g. after upgrading the exporter)."""
    policy = load_bundle_policy(bundle)
    meta = bundle.info["policy_model"]
    missing = [a for a in meta["arms"] if a not in bundle.arms]
    if missing:
        raise CtxdraftError(f"the saved policy routes to arms {missing} that the bundle no longer has; "
                            "run `ctxdraft train-policy` again")
    path = bundle.path / POLICY_FILE
    spec = save_policy(bundle, policy, meta.get("layer"), meta["arms"], path, bundle.path / meta.get("weights", POLICY_WEIGHTS_FILE))
    bundle.info["policy"] = POLICY_FILE
    bundle.info["features"] = spec
    bundle._router = None
    bundle.save()
    return path


def train_policy_at(bundle_dir: str | Path, *, rewards: str | Path | None = None, data: str | Path | None = None,
                    collect_config: CollectConfig | None = None, config: PolicyConfig | None = None,
                    eval_frac: float = 0.25, dtype: str = "auto", progress: Progress | None = None,
                    group: Group | None = None) -> TrainPolicyResult:
    """What ``ctxdraft train-policy`` does: load the bundle (its shipped policy, no calibration), ``train_policy``,
    then, on rank 0, read the bundle back as it was written to say where its policy is."""
    group = group or Group.single()
    result = train_policy(load_bundle(bundle_dir, dtype=dtype, calibrate=False), rewards=rewards, data=data,
                          collect_config=collect_config, config=config, eval_frac=eval_frac, progress=progress, group=group)
    if group.main:
        bundle = load_bundle(bundle_dir, calibrate=False)  # as rank 0 wrote it
        result.bundle_path = bundle.path
        result.policy_path = bundle.path / bundle.info["policy"]
    return result


@dataclass
class ExportedPolicy:
    path: Path
    meta: dict  # the ONNX file's ctxdraft metadata (export.onnx_export.read_metadata)


def export_policy_at(bundle_dir: str | Path) -> ExportedPolicy:
    """What ``ctxdraft export-policy`` does: redo ``BUNDLE/policy.onnx`` from the saved weights, and read its
    metadata back."""
    path = export_bundle_policy(load_bundle(bundle_dir, calibrate=False))
    return ExportedPolicy(path, read_metadata(path))
