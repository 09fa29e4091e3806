"""A bundle calibrated to the machine it runs on.

Costs are a property of the machine and the dtype; acceptance is not. A bundle therefore carries its
trajectories (``BUNDLE/trajectories.jsonl.gz``, hardware-independent: every arm's exact greedy loop steps on
its training prompts, with the routing features), and ``calibrate`` turns them into a policy for *this*
machine: it measures this machine's cost profile with the one cost model (``costs.measure_profile``, well
under a minute), recomputes every arm's reward on the stored trajectories (``rewards.recompute_rewards``),
retrains the policy (seconds) and exports it to ONNX.

The result lives under the cache directory (``CTXDRAFT_CALIBRATIONS``, default ``$CTXDRAFT_CACHE/calibrations``),
never inside the bundle or an installed package, keyed by the bundle's content hash and the machine's
fingerprint (CPU model or GPU name, torch threads, dtype, torch version)::

    calibrations/<bundle hash>-<machine hash>/calibration.json   what was measured and trained (written last)
                                             /policy.onnx         the calibrated policy
                                             /policy.safetensors  its torch weights

``Bundle.router`` uses the calibration for this machine when one exists; without one it calibrates once on
first use (``CTXDRAFT_NO_CALIBRATE=1`` or ``load_bundle(..., calibrate=False)`` keeps the shipped policy).
A calibration that is damaged (a policy.onnx onnxruntime cannot load or that disagrees with the bundle, a
calibration.json that does not parse, a non-finite cost) or was made for other files is never used: a warning
names it and a fresh one replaces it. ``store_calibration`` is the one writer of a calibration (``calibrate``
and ``update-policy`` both use it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ctxdraft.export.router import OnnxRouter

from ..base import checks
from ..base.errors import CtxdraftError
from ..base.fileio import display_path, remove_stale_temps, staged, write_json_atomic
from ..base.layout import POLICY_FILE, POLICY_WEIGHTS_FILE, TRAJECTORIES_FILE
from ..drafting.pool import cost_key
from ..learning.costs import BATCH_POSITIONS, CostProfile, context_ids, max_positions, measure_profile
from ..learning.policy import PolicyConfig
from ..learning.policy_train import save_policy, train_policies
from ..learning.rewards import read_trajectories, recompute_rewards, rewards_from_rows, summarize
from ..runtime.cache import cache_dir, item_lock
from ..runtime.machine import machine_fingerprint, resolve_dtype
from .bundle_info import bundle_hash

log = logging.getLogger(__name__)

CALIBRATIONS_ENV = "CTXDRAFT_CALIBRATIONS"
NO_CALIBRATE_ENV = "CTXDRAFT_NO_CALIBRATE"
CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 3  # 2: tree steps timed as trees (CostProfile.tree_step_s); 3: batched steps (batch_step_s)
Progress = Callable[[str, int, int], None]  # (stage, done, total)
_WARNED: set[Path] = set()  # calibrations already reported stale or damaged by this process


def calibrations_dir() -> Path:
    return Path(os.environ.get(CALIBRATIONS_ENV) or cache_dir() / "calibrations")


def auto_calibrate_default() -> bool:
    """Whether a bundle calibrates itself on first use unless told otherwise (``CTXDRAFT_NO_CALIBRATE``)."""
    return os.environ.get(NO_CALIBRATE_ENV, "").strip().lower() in ("", "0", "false", "no")


@dataclass
class Calibration:
    path: Path  # the calibration's directory
    bundle_hash: str
    machine: dict  # machine_fingerprint
    profile: CostProfile
    report: dict
    router: object = None  # the loaded policy.onnx (checked when the calibration was found)

    @property
    def policy_path(self) -> Path:
        return self.path / POLICY_FILE

    def describe(self) -> str:
        m = self.machine
        return (f"calibrated {self.report.get('created', '?')} for {m.get('processor')}, {m.get('threads')} threads, "
                f"{m.get('dtype')} ({display_path(self.path)})")


def _fingerprint(bundle) -> dict:
    return machine_fingerprint(resolve_dtype(bundle.dtype))


def calibration_path(bundle, machine: dict | None = None) -> Path:
    machine = machine or _fingerprint(bundle)
    return calibrations_dir() / f"{bundle_hash(bundle)}-{machine['hash']}"


def _all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def find_calibration(bundle, machine: dict | None = None) -> Calibration | None:
    """This machine's calibration of ``bundle``, or None (also when the stored one is damaged or stale: a warning
    names it, and the next ``calibrate`` replaces it)."""
    if bundle.path is None:
        return None
    machine = machine or _fingerprint(bundle)
    path = calibration_path(bundle, machine)
    remove_stale_temps(path.parent)  # staging directories of calibrations that a killed process left
    if not (path / CALIBRATION_FILE).exists():
        return None
    try:
        record = json.loads((path / CALIBRATION_FILE).read_text())
        profile = CostProfile.from_dict(record["profile"])
        if profile is None or not _all_finite([profile.target_step_s, profile.drafts]):
            raise ValueError("a cost in its profile is not a finite number")
        if (record.get("version") != CALIBRATION_VERSION or record.get("bundle_hash") != bundle_hash(bundle)
                or record.get("machine", {}).get("hash") != machine["hash"]):
            raise ValueError("made for other files or another machine")
        router = OnnxRouter(path / POLICY_FILE, expected=bundle.info)
        return Calibration(path, record["bundle_hash"], record["machine"], profile, record.get("report", {}), router)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, CtxdraftError) as e:
        if path not in _WARNED:  # once per process: every draft a bundle builds looks its calibration up
            _WARNED.add(path)
            log.warning("ignoring the damaged or stale calibration %s (%s); it will be made again",
                        display_path(path), str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def store_calibration(final: Path, record: dict, write_policy: Callable[[Path, Path], None]) -> None:
    """The one writer of a calibration: ``write_policy(onnx_path, weights_path)`` writes the policy files into a
    staging directory, ``record`` (version, bundle_hash, machine, profile, report) goes into calibration.json
    last, and the directory replaces ``final`` in one step (under the calibration's lock)."""
    with item_lock(f"calibration-{final.name}"):
        remove_stale_temps(final.parent, final.name)
        with staged(final, directory=True) as tmp:
            write_policy(tmp / POLICY_FILE, tmp / POLICY_WEIGHTS_FILE)
            write_json_atomic(tmp / CALIBRATION_FILE, {"version": CALIBRATION_VERSION, **record})


def copy_policy(onnx_path: Path, weights_path: Path) -> Callable[[Path, Path], None]:
    """A ``write_policy`` for ``store_calibration`` that copies policy files that exist already."""
    def write(onnx_dst: Path, weights_dst: Path) -> None:
        shutil.copy2(onnx_path, onnx_dst, follow_symlinks=False)
        shutil.copy2(weights_path, weights_dst, follow_symlinks=False)

    return write


def calibrate(bundle, progress: Progress | None = None, reps: int = 5, epochs: int | None = None) -> Calibration:
    """Measure this machine's costs, recompute the rewards of the bundle's trajectories, retrain and export the
    policy, and store the result under the calibration directory (see the module docstring)."""
    checks.integer("--reps", reps, minimum=1)
    if bundle.path is None:
        raise CtxdraftError("only a bundle directory can be calibrated")
    meta = bundle.info.get("policy_model")
    if not meta:
        raise CtxdraftError(f"bundle {display_path(bundle.path)} has no trained policy to calibrate; "
                            "run `ctxdraft train-policy` first")
    t0 = time.perf_counter()
    rows = read_trajectories(bundle.path)
    arms = bundle.info["arms"]
    names = [a["name"] for a in arms]
    if set(rows[0]["arms"]) != set(names):
        raise CtxdraftError(f"the trajectories in {display_path(bundle.path / TRAJECTORIES_FILE)} are for arms "
                            f"{sorted(rows[0]['arms'])}, not the bundle's {names}; train the policy again")
    machine = _fingerprint(bundle)
    target = bundle.target
    drafts = {name: bundle.draft(name) for name in names}
    if progress:
        progress("calibrate: costs", 0, 3)
    max_new = max(int(r.get("max_new_tokens") or r.get("new_tokens") or 1) for r in rows)
    context = context_ids([r["features"]["tokens"] for r in rows if r["features"].get("tokens")], max_new,
                          target.max_context, max(max_positions(drafts), BATCH_POSITIONS))
    profile = measure_profile(bundle.stack, drafts, context, target.vocab_size, reps, target.content_hash,
                              widest=BATCH_POSITIONS, batch=True)
    profile_s = time.perf_counter() - t0
    if progress:
        progress("calibrate: policy", 1, 3)
    rewarded = recompute_rewards(rows, {a["name"]: cost_key(a) for a in arms}, profile, source=TRAJECTORIES_FILE)
    data = rewards_from_rows(rewarded, source=TRAJECTORIES_FILE)
    result = train_policies(data, PolicyConfig.from_dict(meta["config"], epochs=epochs))
    if progress:
        progress("calibrate: export", 2, 3)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": len(rows),
        "profile_s": round(profile_s, 1),
        "arms": summarize(rewarded, names),
        "policy": result.report["policies"]["reinforce"]["overall"],
        "num_train": len(result.train_idx), "num_eval": len(result.eval_idx),
    }
    final = calibration_path(bundle, machine)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    store_calibration(final, {"bundle_hash": bundle_hash(bundle), "machine": machine, "profile": profile.to_dict(),
                              "report": report},
                      lambda onnx, weights: save_policy(bundle, result.reinforce, meta.get("layer"),
                                                        list(data.arm_names), onnx, weights))
    if progress:
        progress("calibrate: export", 3, 3)
    return Calibration(final, bundle_hash(bundle), machine, profile, report)
