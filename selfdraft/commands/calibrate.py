"""``ctxdraft calibrate``: a bundle's policy recomputed for this machine's costs (``serving.calibration``), as one
report."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..base import checks
from ..serving.bundle import load_bundle
from ..serving.calibration import Calibration, calibrate

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class CalibrationRun:
    """What ``calibrate_at`` made: ``to_dict()`` is ``calibrate --json``, ``to_text()`` what ``calibrate`` prints."""

    calibration: Calibration
    target_name: str | None

    def to_dict(self) -> dict:
        c = self.calibration
        return {"path": str(c.path), "machine": c.machine, "report": c.report, "profile": c.profile.to_dict()}

    def to_text(self) -> str:
        c = self.calibration
        report, profile, m = c.report, c.profile, c.machine
        step = profile.target_step_s
        lines = [f"Calibrated {self.target_name} on {m['processor']} ({m['threads']} threads, {m['dtype']}) "
                 f"in {report['total_s']:.0f} s ({report['profile_s']:.0f} s measuring costs).",
                 f"Target step at {profile.context_tokens} context tokens: {step[1] * 1e3:.1f} ms for 1 position; "
                 + ", ".join(f"{m_}: {step[m_] / step[1]:.2f}x" for m_ in sorted(step) if m_ > 1)]
        overall = report["arms"].get("overall", {})
        if overall:
            lines.append("Modelled mean speed-up over plain decoding on the bundle's trajectories ("
                         f"{report['rows']} prompts): " + ", ".join(f"{a} {v:.2f}x" for a, v in overall["speedup"].items())
                         + f"; oracle {overall['oracle']:.2f}x")
        p = report["policy"]
        lines.append(f"Policy on {report['num_eval']} held-out prompts: {p['policy']:.3f}x (best single arm "
                     f"{p['best_single_arm']} {p['best_single_arm_speedup']:.3f}x, oracle {p['oracle']:.3f}x); chose "
                     + ", ".join(f"{a} {n}" for a, n in p["choices"].items() if n) + ".")
        lines.append(f"Stored in {c.path}; `ctxdraft generate --draft auto` routes with it on this machine.")
        return "\n".join(lines)


def calibrate_at(bundle_dir: str | Path | None = None, reps: int = 5, dtype: str = "auto",
                 progress: Progress | None = None) -> CalibrationRun:
    """What ``ctxdraft calibrate`` does: open the bundle (None: the shipped one) in ``dtype`` and calibrate it with
    ``reps`` timing repetitions per cost."""
    checks.integer("--reps", reps, minimum=1)
    bundle = load_bundle(bundle_dir, dtype=dtype)
    return CalibrationRun(calibrate(bundle, progress=progress, reps=reps), bundle.info["target"].get("name"))
