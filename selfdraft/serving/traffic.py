"""Served traffic as logged bandit feedback: which arm a routed request used, how likely that choice was, and
what the arm did.

``Bundle.generate`` (with ``load_bundle(..., log=PATH)``, or ``ctxdraft generate --log PATH``) appends one JSON
line per *routed* request (``draft="auto"`` with a policy; a request that names its arm is not a bandit
decision and is not logged)::

    {"format": "ctxdraft-traffic", "version": 1, "time": "2026-11-29T13:49:00.123Z",
     "bundle": "<calibrate.bundle_hash>", "target": "<target content hash>", "pool": "<pool.pool_key>",
     "features": {"hidden": [F floats], "hidden_layer": 10} | {"tokens": [prompt ids]},
     "prompt_len": 57, "prompt_ids": [...],          # prompt_ids left out with log_features_only
     "arm": "lookup-k2", "propensity": 0.9167, "greedy_arm": "lookup-k2", "explore": 0.1,
     "measurement": {"new_tokens", "max_new_tokens", "temperature", "target_forwards", "drafted_per_position",
                     "accepted_per_position", "trajectory": {"new_tokens", "steps"}, "plain_steps",
                     "nodes_per_step", "tokens_per_forward",
                     "wall_s", "prefill_s", "route_s", "decode_s", "dtype", "machine": machine_fingerprint},
     "reward": {"speedup", "modelled_s", "plain_s", "profile": "<machine hash of the cost profile>"} | null}

*propensity*: the probability with which the routing chose the logged arm: 1.0 for the policy's argmax without
exploration; with epsilon-greedy exploration ``(1 - eps) [arm = argmax] + eps / A``. *reward*: the realised
trajectory's modelled speed-up over plain decoding of the same tokens, with the one cost model (``costs.py``)
and the profile the bundle routes with on this machine (null when it has none); ``online.update_policy``
recomputes it from the logged trajectory under its own machine's profile, exactly as the offline rewards are.

Appends are one ``os.write`` of the whole line on an ``O_APPEND`` descriptor under an exclusive ``flock``, so
concurrent writers (threads or processes) never interleave lines. ``read_traffic`` skips a line that does not
parse (a torn or truncated write) with a warning and counts it; it never fails on one.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.errors import CtxdraftError
from ..base.fileio import append_lines, display_path, regular_file
from ..drafting.draft import Draft
from ..drafting.pool import pool_key
from ..learning import costs
from ..learning.offpolicy import Choice
from ..learning.trajectories import Step, Trajectory
from ..runtime.machine import dtype_name, machine_fingerprint
from .bundle_info import bundle_hash
from .profiles import profile_for

log = logging.getLogger(__name__)

TRAFFIC_FORMAT = "ctxdraft-traffic"
TRAFFIC_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Choosing an arm, with exploration


# ----------------------------------------------------------------------------------------------
# The realised trajectory of a request


class StepRecorder(Draft):
    """A draft that records what the real one did, step by step, as a ``Trajectory`` (``trajectories.Step``:
    evaluations, drafted, accepted, stopped on confidence, nodes verified), so that a served request is costed
    exactly like the offline rows. ``tests/test_traffic.py`` checks it against ``trajectories.replay`` for every kind."""

    def __init__(self, draft: Draft):
        super().__init__(draft.name)
        self.inner = draft
        # What the decoding loop reads of a draft besides its methods.
        self.kind, self.draft_len, self.cost_key, self.state_layers = draft.kind, draft.draft_len, draft.cost_key, draft.state_layers
        self.observe_top_k = draft.observe_top_k
        self.steps: list[Step] = []
        self._proposed: tuple[int, int, bool] | None = None

    def start(self, state) -> None:
        self.steps, self._proposed = [], None
        self.inner.start(state)

    def propose(self, state, max_len: int):
        out = self.inner.propose(state, max_len)
        drafted = len(out.ids)
        stopped = getattr(out, "stopped", None)
        if stopped is None:  # an exit draft that stopped on confidence hands over states for one more position
            stopped = out.exit_hidden is not None and out.exit_hidden.shape[1] > drafted
        evaluations = getattr(out, "evaluations", None)
        if evaluations is None:  # one lookup proposes all its tokens; a draft_loop draft evaluates once per token
            evaluations = 1 if self.inner.kind == "lookup" else drafted + stopped  # and once more when it stops
        self._proposed = (evaluations, drafted, stopped)
        return out

    def observe(self, state, token_ids, topk_ids) -> None:
        self.inner.observe(state, token_ids, topk_ids)

    def max_verified(self) -> int:
        return self.inner.max_verified()

    @property
    def proposes_trees(self) -> bool:
        return self.inner.proposes_trees

    def set_costs(self, step_s) -> None:
        self.inner.set_costs(step_s)

    def accept(self, state, committed_len: int) -> None:
        evaluations, drafted, stopped = self._proposed or (0, 0, False)  # no proposal when the budget was 0
        self.steps.append(Step(evaluations, drafted, committed_len - len(state.tokens), stopped, drafted))
        self._proposed = None
        self.inner.accept(state, committed_len)

    def trajectory(self, new_tokens: int) -> Trajectory:
        return Trajectory(list(self.steps), new_tokens)


# ----------------------------------------------------------------------------------------------
# Writing


def log_path(path) -> Path | None:
    """``path`` checked as a traffic log to append to (None: no logging)."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise CtxdraftError(f"log must be a file path, got {path!r}")
    path = Path(path)
    if path.is_dir():
        raise CtxdraftError(f"log {display_path(path)} is a directory; give a file to append requests to")
    if os.path.lexists(path):  # checked now, before any generating: a request's answer is never spent on a bad log
        regular_file(path, "log")
        if not os.access(path, os.W_OK):
            raise CtxdraftError(f"log {display_path(path)} is not writable; give a file you can append to")
    elif not path.parent.is_dir():
        raise CtxdraftError(f"the directory of log {display_path(path)} does not exist; create it first")
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        raise CtxdraftError(f"log {display_path(path)} cannot be created: its directory is not writable")
    return path


def append_line(path: str | os.PathLike, row: dict) -> None:
    """Append ``row`` as one whole JSON line (``fileio.append_lines``: one write under an exclusive ``flock``, so
    concurrent writers never interleave, and a failed write is taken back)."""
    append_lines(path, [row])


def _rounded(values) -> list[float]:
    return [float(f"{x:.6g}") for x in np.asarray(values, dtype=np.float32).tolist()]


def _utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


@dataclass
class RequestLog:
    """Everything one routed request contributes to its log line (``Bundle.generate`` fills it in)."""

    features: object  # the routing input: [F] floats (hidden) or the prompt ids (tokens)
    feature_spec: dict  # the router's features (kind, layer)
    prompt_ids: list[int]
    choice: Choice
    explore: float
    trajectory: Trajectory
    max_new_tokens: int
    temperature: float
    ended_early: bool  # EOS (or a stop string) before max_new_tokens
    stats: object  # decoding.GenerationStats


def log_identity(bundle) -> dict:
    """The bundle's content hash, target hash and pool key, computed once per Bundle object (the files of a
    running bundle do not change under it; an updated bundle is opened anew)."""
    if bundle._log_identity is None:
        bundle._log_identity = {"bundle": bundle_hash(bundle), "target": bundle.info["target"].get("hash"),
                                "pool": pool_key(bundle.info["arms"])}
    return bundle._log_identity


def request_row(bundle, request: RequestLog, features_only: bool) -> dict:
    """The log line of one routed request (see the module docstring)."""
    spec = request.feature_spec
    if spec.get("kind") == "tokens":
        features = {"tokens": [int(t) for t in request.features]}
    else:
        features = {"hidden": _rounded(request.features), "hidden_layer": spec.get("layer")}
    stats = request.stats
    traj = request.trajectory
    steps = costs.plain_steps(traj.new_tokens, request.max_new_tokens, request.ended_early)
    draft = bundle.draft(request.choice.arm)
    profile, calibration = profile_for(bundle)
    reward = None
    if profile is not None and profile.fits({request.choice.arm: draft}, bundle.target.content_hash):
        reward = {"speedup": round(costs.reward(profile, draft.cost_key, traj, steps), 6),
                  "profile": calibration.machine.get("hash") if calibration is not None else "bundle.json"}
    dtype = bundle.target.model.dtype
    row = {
        "format": TRAFFIC_FORMAT, "version": TRAFFIC_VERSION, "time": _utc_now(), **log_identity(bundle),
        "features": features, "prompt_len": len(request.prompt_ids),
        **({} if features_only else {"prompt_ids": list(request.prompt_ids)}),
        "arm": request.choice.arm, "propensity": request.choice.propensity,
        "greedy_arm": request.choice.greedy_arm, "explore": request.explore,
        "measurement": {
            "new_tokens": traj.new_tokens, "max_new_tokens": request.max_new_tokens,
            "temperature": request.temperature, "target_forwards": stats.target_forwards,
            "drafted_per_position": list(stats.drafted_per_position),
            "accepted_per_position": list(stats.accepted_per_position),
            "trajectory": traj.to_dict(), "plain_steps": steps,
            "nodes_per_step": round(traj.nodes_per_step, 4), "tokens_per_forward": round(traj.tokens_per_forward, 4),
            "wall_s": round(stats.wall_s, 6), "prefill_s": round(stats.prefill_s, 6), "route_s": round(stats.route_s, 6),
            "decode_s": round(stats.wall_s - stats.prefill_s - stats.route_s, 6),
            "dtype": dtype_name(dtype), "machine": machine_fingerprint(dtype),
            **({"suffix_hits": dict(draft.hits)} if getattr(draft, "hits", None) is not None else {}),
        },
        "reward": reward,
    }
    return row


def log_request(bundle, request: RequestLog) -> None:
    """Append the log line of one routed request to ``bundle.log``. A failed append (a full disk, a log made
    read-only meanwhile) is a warning: the request's answer is not lost for it."""
    row = request_row(bundle, request, bundle.log_features_only)
    try:
        append_line(bundle.log, row)
    except OSError as e:
        log.warning("could not append the request to the traffic log %s (%s); it is not logged",
                    display_path(bundle.log), e.strerror or e)


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class TrafficRows:
    """The rows of one or more logs, each with where it came from (``file:line``)."""

    rows: list[dict]
    where: list[str]
    skipped: list[str]  # "file:line: why" of every line that did not parse
    files: list[dict]  # per file: path, rows, skipped

    def __len__(self) -> int:
        return len(self.rows)


def _parse_line(raw: bytes) -> tuple[dict | None, str]:
    """A log line as a row, or None and why not."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None, "not valid JSON (a torn or truncated line)"
    if not isinstance(row, dict) or row.get("format") != TRAFFIC_FORMAT:
        return None, "not a ctxdraft traffic row"
    if not isinstance(row.get("version"), int) or row["version"] > TRAFFIC_VERSION:
        return None, f"format version {row.get('version')!r}; this ctxdraft reads up to {TRAFFIC_VERSION}"
    return row, ""


def read_traffic(paths) -> TrafficRows:
    """Read traffic logs. A line that is not a JSON object of this format (a torn or truncated write, garbage)
    is skipped with a warning; a missing file, or logs that hold no rows at all, are a ``CtxdraftError``."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else list(paths))]
    if not paths:
        raise CtxdraftError("no traffic logs given; pass the files `ctxdraft generate --log` wrote")
    rows, where, skipped, files = [], [], [], []
    for path in paths:
        regular_file(path, "traffic log")
        count = bad = 0
        for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
            if not raw.strip():
                continue
            row, reason = _parse_line(raw)
            if row is None:
                skipped.append(f"{display_path(path)}:{lineno}: {reason}")
                log.warning("skipping %s line %d: %s", display_path(path), lineno, reason)
                bad += 1
                continue
            rows.append(row)
            where.append(f"{display_path(path)}:{lineno}")
            count += 1
        if not count:
            log.warning("traffic log %s holds no requests%s", display_path(path), f" ({bad} unreadable lines)" if bad else "")
        files.append({"path": display_path(path), "rows": count, "skipped": bad})
    if not rows:
        detail = f" ({len(skipped)} unreadable line(s) skipped)" if skipped else ""
        raise CtxdraftError(f"the traffic log(s) {', '.join(display_path(p) for p in paths)} hold no requests{detail}; "
                            "log some with `ctxdraft generate --log FILE` (or load_bundle(..., log=FILE))")
    return TrafficRows(rows, where, skipped, files)
