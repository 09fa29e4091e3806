"""``ctxdraft info``: what a bundle holds (target, arms, exits, feature heads, policy, routing) as one report."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..base.fileio import display_path
from ..base.layout import TRAJECTORIES_FILE
from ..learning.rewards import read_trajectories
from ..learning.trajectories import Trajectory
from ..serving.bundle import Bundle, load_bundle


@dataclass
class BundleReport:
    """A bundle's summary: ``to_dict()`` is ``info --json``, ``to_text()`` what ``info`` prints."""

    summary: dict

    def to_dict(self) -> dict:
        return self.summary

    def to_text(self) -> str:
        s = self.summary
        t = s["target"]
        lines = [f"bundle   {s['path']}",
                 f"target   {t.get('name')} (spec {t.get('spec')}, hash {t.get('hash')})",
                 f"arms     {', '.join(a['name'] for a in s['arms'])}  (default: {s['default_arm']})"]
        for name, a in s.get("arm_stats", {}).items():
            lines.append(f"arm      {name:<20} {a['tokens_per_forward']:.2f} tokens/forward  {a['nodes_per_step']:.2f} nodes/step "
                         f"(greedy, {a['num_prompts']} collected prompts)")
        for e in s["exits"]:
            lines.append(f"exit     layer {e.get('layer')} head {e.get('head')}  agreement {e.get('agreement', float('nan')):.3f}")
        for e in s["feature_heads"]:
            first = (e.get("acceptance_per_position") or {}).get("overall", {}).get("prefix") or [float("nan")]
            lines.append(f"feature  {e.get('name')} (arm {e.get('arm')}) layers {','.join(map(str, e.get('layers') or []))}  "
                         f"draft vocab {e.get('draft_vocab')}  acceptance of draft 1 {first[0]:.3f}")
        lines.append(f"policy   {s['policy'] or 'none (generate --draft auto uses the default arm)'}")
        lines.append(f"routing  {s['routing_policy']} [{s['dtype']}]")
        features = s["features"]
        if features:
            lines.append(f"features {features.get('kind')} (layer {features.get('layer')}, dim {features.get('dim')})")
        return "\n".join(lines)


def bundle_report(bundle: Bundle) -> BundleReport:
    """The summary of an open bundle, its calibration for this machine included when one exists (none is made)."""
    info = bundle.info
    calibration = bundle.calibration(create=False)
    return BundleReport({
        "path": display_path(bundle.path),
        "target": info["target"],
        "arms": info["arms"],
        "default_arm": info.get("default_arm"),
        "arm_stats": arm_stats(bundle),
        "exits": info.get("exits") or [],
        "feature_heads": info.get("feature_heads") or [],
        "features": info.get("features"),
        "policy": info.get("policy"),
        "cost_profile": bool(info.get("cost_profile")),
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "routing_policy": bundle.calibration_note(),
        "calibration": None if calibration is None else {
            "path": display_path(calibration.path), "machine": calibration.machine, "created": calibration.report.get("created"),
            "policy_speedup": calibration.report.get("policy", {}).get("policy")},
        "versions": info.get("versions"),
    })


def arm_stats(bundle: Bundle) -> dict:
    """Per arm of the bundle's collected trajectories: tokens per target forward and draft nodes verified per step
    (a chain's drafted tokens, a tree's nodes), over all prompts. Empty when the bundle carries none."""
    if bundle.path is None or not (bundle.path / TRAJECTORIES_FILE).is_file():
        return {}
    totals: dict[str, list[int]] = {}  # arm -> [prompts, new tokens, steps, nodes]
    for i, row in enumerate(read_trajectories(bundle.path)):
        for name, record in (row.get("arms") or {}).items():
            traj = Trajectory.from_dict((record or {}).get("trajectory"), f"{TRAJECTORIES_FILE}, row {i + 1}, arm {name!r}")
            t = totals.setdefault(name, [0, 0, 0, 0])
            t[0], t[1], t[2], t[3] = t[0] + 1, t[1] + traj.new_tokens, t[2] + len(traj.steps), t[3] + traj.nodes_verified
    return {name: {"num_prompts": n, "tokens_per_forward": round(tokens / steps if steps else float(tokens), 4),
                   "nodes_per_step": round(nodes / steps if steps else 0.0, 4)}
            for name, (n, tokens, steps, nodes) in totals.items()}


def info(bundle_dir: str | Path | None = None, dtype: str = "auto", calibrate: bool | None = None) -> BundleReport:
    """What ``ctxdraft info`` does: open the bundle (None: the shipped one) and summarise it."""
    return bundle_report(load_bundle(bundle_dir, dtype=dtype, calibrate=calibrate))
