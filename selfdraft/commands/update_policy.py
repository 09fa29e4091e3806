"""``ctxdraft update-policy``: learn from served traffic and write the updated bundle.

The logged requests (``serving/traffic.py`` lines) are checked against the bundle and costed under this machine's
profile from the trajectory each request realised; ``learning/offpolicy.py`` trains on them beside the bundle's
offline rows and estimates the new policy against the one in use. ``update_policy`` writes policy.onnx (and its
weights, report, bundle.json) whole or not at all, records in bundle.json what it learned from, and stores the new
policy as this machine's calibration of the new bundle (the policy was trained for this machine's costs).
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..base import checks
from ..base.datastore import datastore_lock
from ..base.errors import CtxdraftError
from ..base.fileio import (
    check_sealed,
    copy_files,
    display_path,
    file_sha256,
    inside,
    remove_stale_temps,
    staged,
    write_json_atomic,
    write_text_atomic,
)
from ..base.layout import (
    BUNDLE_FILE,
    POLICY_FILE,
    POLICY_WEIGHTS_FILE,
    TRAJECTORIES_FILE,
    UPDATE_REPORT,
    UPDATE_REPORT_MD,
    bundle_files,
)
from ..base.report import Report, Table
from ..drafting.pool import cost_key, pool_key
from ..learning.costs import reward
from ..learning.offpolicy import TIE, Feedback, learn_from_feedback
from ..learning.policy import PolicyConfig
from ..learning.rewards import finite_number, read_trajectories, recompute_rewards, rewards_from_rows, row_features
from ..learning.trajectories import Trajectory
from ..serving.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from ..serving.bundle_info import bundle_hash
from ..serving.calibration import calibrations_dir, copy_policy, store_calibration
from ..serving.profiles import profile_for
from ..serving.suffix_store import datastore_path, merge_bundle_datastore, suffix_arms
from ..serving.traffic import read_traffic
from .train_policy import save_policy

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
MAX_FEATURE = 1e6  # a logged feature beyond this is damage, not a pooled hidden state (it would overflow the fit)
# Two arms with the same speed-up are a tie, not "the policy in use is estimated better": rewards carry about 7
# significant digits (float32 tables, collect's rounding), so gains below this are rounding.


# ----------------------------------------------------------------------------------------------
# Logged feedback, the reward model and the pseudo-rewards


# ----------------------------------------------------------------------------------------------
# Training on offline rows plus logged feedback


# ----------------------------------------------------------------------------------------------
# update-policy: a bundle on disk


@dataclass
class UpdateConfig:
    folds: int = 5  # cross-fitting folds of the logs for the estimate of the new policy
    seed: int = 0  # which logged rows go into which fold
    epochs: int | None = None  # training epochs (None: the bundle's policy config)

    def validate(self) -> None:
        checks.integer("folds (--folds)", self.folds, minimum=2)
        checks.seed("seed (--seed)", self.seed)
        if self.epochs is not None:
            checks.integer("epochs (--epochs)", self.epochs, minimum=1)


@dataclass
class UpdateResult:
    replaced: bool  # False: the policy in use is estimated better, nothing was written
    path: Path | None  # the bundle written (None when nothing was)
    report: dict


class _Skip(Exception):
    """A logged row that cannot be true (a value out of bounds, an impossible trajectory): skipped and counted."""


def _row_features(row: dict, where: str, meta: dict) -> tuple[list[float] | None, list[int] | None]:
    raw = row.get("features")
    raw_hidden = raw.get("hidden") if isinstance(raw, dict) else None
    if meta["feature_kind"] == "hidden" and isinstance(raw_hidden, list):  # values a real request cannot log: skipped
        for i, v in enumerate(raw_hidden):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise _Skip(f"features.hidden[{i}] is not a number ({v!r})")
            if not math.isfinite(v):
                raise _Skip(f"features.hidden[{i}] is not finite ({v!r})")
            if abs(v) > MAX_FEATURE:
                raise _Skip(f"features.hidden[{i}] = {v!r} is out of bounds (|x| <= {MAX_FEATURE:g})")
    hidden, tokens = row_features(row, where)
    features = row["features"]
    if meta["feature_kind"] == "tokens":
        if tokens is None:
            raise CtxdraftError(f"{where}: features.tokens must be the prompt's token ids (this bundle routes on tokens)")
        return None, tokens
    if hidden is None or len(hidden) != meta["feature_dim"]:
        got = len(hidden) if isinstance(hidden, list) else hidden
        raise CtxdraftError(f"{where}: features.hidden must be {meta['feature_dim']} finite numbers (got {got!r}); "
                            "the row was logged by a bundle with other features")
    if features.get("hidden_layer") != meta.get("layer"):
        raise CtxdraftError(f"{where}: features pooled at layer {features.get('hidden_layer')}, but this bundle's policy "
                            f"reads layer {meta.get('layer')}; pass only this bundle's logs")
    return hidden, None


def feedback_from_traffic(traffic, bundle, profile, arm_names: list[str], bundle_hashes: set[str],
                          skipped: list[str] | None = None) -> Feedback:
    """Check every logged row against ``bundle`` and recompute its reward under ``profile`` from the logged
    trajectory. A row from another target, bundle or pool, a propensity outside (0, 1], or a row without its
    trajectory is one CtxdraftError naming the line. A row that cannot be true (a feature that is not a finite
    number or is out of bounds, more loop steps than new tokens) is skipped with a warning and listed in
    ``skipped`` ("file:line: why")."""
    skipped = [] if skipped is None else skipped
    meta = bundle.info["policy_model"]
    target = bundle.info["target"]
    pool = pool_key(bundle.info["arms"])
    keys = {a["name"]: cost_key(a) for a in bundle.info["arms"]}
    arms, propensity, rewards, hidden, tokens = [], [], [], [], []
    for row, where in zip(traffic.rows, traffic.where):
        if row.get("target") != target.get("hash"):
            raise CtxdraftError(f"{where}: logged for another target (hash {row.get('target')}), not this bundle's "
                                f"{target.get('name')} (hash {target.get('hash')}); pass only this bundle's logs")
        if row.get("bundle") not in bundle_hashes:
            raise CtxdraftError(f"{where}: logged by another bundle (content hash {row.get('bundle')}); this one is "
                                f"{bundle_hash(bundle)} (earlier versions it learned from: {len(bundle_hashes) - 1}); "
                                "pass only this bundle's logs")
        if row.get("pool") != pool:
            raise CtxdraftError(f"{where}: logged for another pool of arms; pass only this bundle's logs")
        arm, p = row.get("arm"), row.get("propensity")
        if arm not in arm_names:
            raise CtxdraftError(f"{where}: arm {arm!r} is not in this bundle's pool {arm_names}")
        if not finite_number(p) or not 0 < p <= 1:
            raise CtxdraftError(f"{where}: propensity {p!r} must be in (0, 1]; a row whose arm had no chance of being "
                                "chosen cannot be reweighted (the log is damaged or was written by another program)")
        m = row.get("measurement")
        if not isinstance(m, dict) or not isinstance(m.get("trajectory"), dict) or not isinstance(m.get("plain_steps"), int) \
                or m["plain_steps"] < 0:
            raise CtxdraftError(f"{where}: no measurement.trajectory / plain_steps; the line is not a complete traffic row")
        traj = Trajectory.from_dict(m["trajectory"], f"{where}: measurement.trajectory")
        if 1 + sum(s.accepted + 1 for s in traj.steps) < traj.new_tokens or m["plain_steps"] > traj.new_tokens:
            raise CtxdraftError(f"{where}: the trajectory's steps emit fewer tokens than its new_tokens (or plain_steps "
                                "exceeds them); the line was edited or damaged")
        try:
            if len(traj.steps) > max(traj.new_tokens, 1):  # every loop step commits at least one token
                raise _Skip(f"impossible trajectory: {len(traj.steps):,} steps for {traj.new_tokens} new tokens")
            row_hidden, row_tokens = _row_features(row, where, meta)
        except _Skip as e:
            skipped.append(f"{where}: {e}")
            log.warning("skipping %s: %s", where, e)
            continue
        arms.append(arm_names.index(arm))
        propensity.append(float(p))
        rewards.append(reward(profile, keys[arm], traj, m["plain_steps"]))
        hidden.append(row_hidden)
        tokens.append(row_tokens)
    if not arms:
        raise CtxdraftError(f"no logged request is usable ({len(skipped)} skipped: {skipped[0] if skipped else ''}); "
                            "pass logs that `ctxdraft generate --log` wrote")
    return Feedback(arm_names, torch.tensor(arms, dtype=torch.long), torch.tensor(propensity, dtype=torch.float64),
                    torch.tensor(rewards, dtype=torch.float64),
                    torch.tensor(hidden, dtype=torch.float32) if meta["feature_kind"] == "hidden" else None,
                    tokens if meta["feature_kind"] == "tokens" else None)


def _profile(bundle):
    """The cost profile rewards are computed with on this machine: the bundle's calibration (made now if routing
    would make it), else the profile in bundle.json."""
    profile, calibration = profile_for(bundle, calibration="create")
    if profile is None:
        raise CtxdraftError(f"bundle {display_path(bundle.path)} has no cost profile of this version to compute rewards "
                            "with; calibrate it (`ctxdraft calibrate`) or collect with it once")
    return profile, calibration


def _old_choices(bundle, feedback: Feedback, arm_names: list[str]) -> torch.Tensor:
    """What the routing policy in use (``Bundle.router``: this machine's calibration or the shipped policy) picks
    on every logged row, without exploration."""
    router = bundle.router()
    batch = feedback.tokens if feedback.hidden is None else feedback.hidden.numpy()
    picks = router.probs(batch).argmax(1)
    return torch.tensor([arm_names.index(router.arms[int(k)]) for k in picks], dtype=torch.long)


def update_policy(bundle, logs, out: str | os.PathLike | None = None, force: bool = False,
                  config: UpdateConfig | None = None, progress: Progress | None = None) -> UpdateResult:
    """What ``ctxdraft update-policy`` does (module docstring): learn from the traffic ``logs`` (files ``generate
    --log`` wrote) and write the updated bundle to ``out`` (None: in place), unless the policy in use is estimated
    better and ``force`` is False; then nothing is written."""
    config = config or UpdateConfig()
    config.validate()
    checks.flag("force", force)
    t0 = time.perf_counter()
    meta = bundle.info.get("policy_model")
    if bundle.path is None or not meta or not bundle.info.get("policy"):
        raise CtxdraftError(f"bundle {display_path(bundle.path)} has no trained policy to update; "
                            "run `ctxdraft train-policy` first")
    final = _output_dir(bundle, out)
    traffic = read_traffic(logs)
    if not (bundle.path / TRAJECTORIES_FILE).is_file():
        raise CtxdraftError(f"bundle {display_path(bundle.path)} carries no offline data ({TRAJECTORIES_FILE}) to learn "
                            "alongside the logs; train its policy with `ctxdraft train-policy --data ...`")
    online = bundle.info.get("online") or {}
    hashes = {bundle_hash(bundle), *online.get("lineage", [])}
    rows = read_trajectories(bundle.path)
    profile, calibration = _profile(bundle)
    if progress:
        progress("update-policy: rewards", 0, 1)
    offline = rewards_from_rows(recompute_rewards(rows, {a["name"]: cost_key(a) for a in bundle.info["arms"]}, profile,
                                                  source=TRAJECTORIES_FILE), source=TRAJECTORIES_FILE)
    if set(offline.arm_names) != set(bundle.arms) or set(meta["arms"]) != set(bundle.arms):
        raise CtxdraftError(f"the trajectories in {display_path(bundle.path / TRAJECTORIES_FILE)} are for arms "
                            f"{offline.arm_names}, not the bundle's {bundle.arms}; train the policy again")
    skipped_rows: list[str] = []
    feedback = feedback_from_traffic(traffic, bundle, profile, offline.arm_names, hashes, skipped_rows)
    learned = learn_from_feedback(offline, feedback, PolicyConfig.from_dict(meta["config"], epochs=config.epochs), _old_choices(bundle, feedback, offline.arm_names),
                                  config.folds, config.seed, force, progress)
    comparison, model = learned.comparison, learned.model
    # the served outputs logged into the suffix datastore since the last update join its index (oldest evicted)
    merged = merge_bundle_datastore(bundle) if suffix_arms(bundle.info) else None
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "logs": traffic.files, "skipped_lines": traffic.skipped, "skipped_rows": skipped_rows,
        "logged_requests": len(feedback),
        "explored": sum(r.get("arm") != r.get("greedy_arm") for r in traffic.rows),
        "logged_arms": {name: int((feedback.arms == a).sum()) for a, name in enumerate(offline.arm_names)},
        "from_bundles": sorted({r["bundle"] for r in traffic.rows}),
        "offline_rows": len(offline),
        "profile": f"calibration {calibration.machine.get('hash')}" if calibration is not None else "bundle.json",
        "reward_model": {"kind": "ridge" if model.weights is not None else "mean",
                         "penalties": dict(zip(offline.arm_names, model.penalties)) if model.penalties else None},
        "mean_logged_speedup": round(float(feedback.rewards.mean()), 6),
        "estimate": comparison.to_dict(), "folds": min(config.folds, len(feedback)),
        "replaced": learned.replace, "forced": bool(force and comparison.gain.value < -TIE),
        "datastore": None if merged is None else {"tokens": merged.num_tokens, "documents": len(merged.documents())},
    }
    if not learned.replace:
        report["total_s"] = round(time.perf_counter() - t0, 1)
        return UpdateResult(False, None, report)
    policy = learned.policy
    report["total_s"] = round(time.perf_counter() - t0, 1)
    record = {"created": report["created"], "logs": [dict(f, sha256=file_sha256(p)) for f, p in zip(traffic.files, logs)],
              "logged_requests": len(feedback), "from_bundles": report["from_bundles"], "estimate": report["estimate"],
              "forced": report["forced"]}
    info = dict(bundle.info, online={"lineage": sorted(hashes), "updates": online.get("updates", []) + [record]})
    # in place, appends to the datastore log wait for the swap and then go to the new bundle's log
    with datastore_lock(datastore_path(bundle)) if merged is not None and final == bundle.path else nullcontext():
        _write_bundle(bundle, final, info, policy, meta, offline.arm_names, report, calibration, profile)
    return UpdateResult(True, final, report)


def _writable_dir(path: Path, what: str) -> None:
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise CtxdraftError(f"{display_path(path)}: {what} is not a writable directory; the updated bundle is written "
                            "beside its final place and swapped in (write it elsewhere with --out DIR)")


def _output_dir(bundle, out) -> Path:
    """Where the updated bundle goes, checked before any work: in place (a bundle that may be replaced, in a
    writable directory) or a new or empty directory outside the bundle."""
    check_sealed(bundle.path)
    if out is None:
        if bundle.path.resolve() == DEFAULT_BUNDLE_DIR.resolve():
            raise CtxdraftError("the shipped default bundle is part of the installed package; write the update "
                                "elsewhere with --out DIR")
        final = bundle.path
    else:
        final = Path(out)
        if final.resolve() == bundle.path.resolve():
            final = bundle.path
        elif inside(bundle.path, final):
            raise CtxdraftError(f"--out {display_path(final)} is inside the bundle {display_path(bundle.path)}; give a "
                                "directory outside it")
        elif final.is_symlink() or (final.exists() and (not final.is_dir() or any(final.iterdir()))):
            raise CtxdraftError(f"--out {display_path(final)} exists and is not an empty directory; give a new directory "
                                "(or leave --out out to update the bundle in place)")
    _writable_dir(final.parent if str(final.parent) else Path("."), f"the directory of {display_path(final)}")
    if final == bundle.path:
        _writable_dir(final, f"the bundle {display_path(final)}")
    return final


def _bundle_entries(root: Path) -> list[str]:
    """Every regular file under ``root`` (relative paths; ``check_sealed`` has refused links and devices)."""
    found = []
    for dirpath, _, filenames in os.walk(root, followlinks=False):
        found += [str((Path(dirpath) / name).relative_to(root)) for name in filenames]
    return sorted(found)


def _write_bundle(bundle, final: Path, info: dict, policy, meta: dict, arm_names: list[str], report: dict,
                  calibration, profile) -> None:
    """Build the updated bundle in a staging directory beside ``final`` and swap it in with one directory entry
    (``fileio.staged``): a kill at any point leaves the old bundle or the new one, never a mix, and a staging
    directory that the next run removes. In place, every regular file of the bundle is carried over; a new
    bundle (``--out``) takes the bundle's own files only (``layout.bundle_files``). The policy files have their
    fixed names. When the profile came from this machine's calibration, the new policy is also stored as the
    calibration of the new bundle, so that routing uses it instead of recalibrating from the offline
    trajectories alone."""
    in_place = final == bundle.path
    remove_stale_temps(final.parent, final.name)
    names = _bundle_entries(bundle.path) if in_place else bundle_files(bundle.path)
    info["policy_model"] = dict(meta, weights=POLICY_WEIGHTS_FILE)
    with staged(final, directory=True) as stage:
        copy_files(bundle.path, stage, names)
        info["features"] = save_policy(bundle, policy, meta.get("layer"), arm_names, stage / POLICY_FILE,
                                       stage / POLICY_WEIGHTS_FILE)
        info["policy"] = POLICY_FILE
        write_json_atomic(stage / UPDATE_REPORT, report)
        write_text_atomic(stage / UPDATE_REPORT_MD, update_report(report).to_markdown())
        write_json_atomic(stage / BUNDLE_FILE, info)
        if calibration is not None:
            _store_calibration(bundle_hash(stage), calibration, profile, stage, report)
    bundle._router = None


def _store_calibration(new_hash: str, calibration, profile, stage: Path, report: dict) -> None:
    """The updated policy as this machine's calibration of the new bundle (``calibration.store_calibration``)."""
    store_calibration(calibrations_dir() / f"{new_hash}-{calibration.machine['hash']}", {
        "bundle_hash": new_hash, "machine": calibration.machine, "profile": profile.to_dict(),
        "report": {"created": report["created"], "update_policy": True, "logged_requests": report["logged_requests"],
                   "rows": report["offline_rows"], "estimate": report["estimate"]}},
        copy_policy(stage / POLICY_FILE, stage / POLICY_WEIGHTS_FILE))


def update_report(report: dict) -> Report:
    """update-policy's report: the off-policy estimates and what was learned from."""
    e = report["estimate"]

    def cell(est: dict) -> str:
        if est["low"] is None:
            return f"{est['value']:.3f}"
        return f"{est['value']:.3f} [{est['low']:.3f}, {est['high']:.3f}]"

    decision = "replaced" + (" (forced)" if report["forced"] else "") if report["replaced"] else "kept the policy in use"
    return Report("update-policy", [
        f"{report['logged_requests']} logged requests ({report['explored']} explored) from "
        f"{len(report['logs'])} log(s), {len(report['skipped_lines'])} unreadable line(s) and "
        f"{len(report.get('skipped_rows', []))} impossible row(s) skipped; "
        f"{report['offline_rows']} offline rows; rewards under the {report['profile']} cost profile.",
        Table(["policy", "off-policy value (mean speed-up, 95% CI)"],
              [["in use", cell(e["old"])], [f"updated ({report['folds']}-fold cross-fitted)", cell(e["new"])],
               ["gain", cell(e["gain"])]]),
        f"Decision: {decision}.",
    ])


def update_policy_at(bundle_dir: str | os.PathLike, logs, *, out: str | os.PathLike | None = None, force: bool = False,
                     config: UpdateConfig | None = None, dtype: str = "auto", progress: Progress | None = None) -> UpdateResult:
    """``update_policy`` on the bundle directory ``bundle_dir`` opened in ``dtype`` (``progress`` also hears of a
    first calibration)."""
    bundle = load_bundle(bundle_dir, dtype=dtype)
    bundle.progress = progress
    return update_policy(bundle, logs, out=out, force=force, config=config, progress=progress)
