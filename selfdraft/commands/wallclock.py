"""A wall-clock check of the cost model: run a few prompts for real with every arm and compare the measured
speed-ups over ``none`` with the modelled ones collect logged for them."""
from __future__ import annotations

import math
import statistics

from ..base.data import rotated, round_robin


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy)


def wallclock_check(bundle, rows: list[dict], collected: list[dict], arm_names: list[str], sample: int,
                    max_new_tokens: int) -> dict:
    """Run ``sample`` prompts (round-robin over the domains) with every arm through ``Bundle.generate``, arms in a
    rotating order per prompt, and compare measured decoding speed-ups over ``none`` with the modelled ones."""
    by_id = {r["id"]: r for r in collected}
    prompts = [r for r in round_robin(rows, sample) if r["id"] in by_id]
    pairs = []
    exact = total = 0
    for i, r in enumerate(prompts):
        decode_s = {}
        for arm in rotated(arm_names, i):
            result = bundle.generate(r["prompt"], draft=arm, max_new_tokens=max_new_tokens)
            s = result.stats
            decode_s[arm] = s.wall_s - s.prefill_s - s.route_s
            logged = by_id[r["id"]]["arms"][arm]
            total += 1
            exact += (s.target_forwards, s.drafted_tokens, s.accepted_tokens) == (
                logged["target_forwards"], logged["drafted_tokens"], logged["accepted_tokens"])
        for arm in arm_names:
            logged = by_id[r["id"]]["arms"][arm]
            pairs.append({"id": r["id"], "arm": arm, "modelled": logged["speedup"],
                          "measured": decode_s["none"] / decode_s[arm] if "none" in decode_s else None,
                          "modelled_s": logged["modelled_s"], "measured_s": decode_s[arm]})
    scored = [p for p in pairs if p["arm"] != "none" and p["measured"] is not None]
    modelled = [p["modelled"] for p in scored]
    measured = [p["measured"] for p in scored]
    return {
        "num_prompts": len(prompts),
        "pearson_speedup": pearson(modelled, measured),
        "mean_abs_error_speedup": statistics.fmean(abs(a - b) for a, b in zip(modelled, measured)) if scored else None,
        "mean_modelled_speedup": statistics.fmean(modelled) if scored else None,
        "mean_measured_speedup": statistics.fmean(measured) if scored else None,
        # Absolute calibration: measured / modelled decoding seconds (1.0 = the profile's machine state).
        "time_ratio_measured_over_modelled": statistics.fmean(p["measured_s"] / p["modelled_s"] for p in pairs
                                                              if p["modelled_s"] > 0) if pairs else None,
        "trajectories_exact": f"{exact}/{total}",
        "pairs": pairs,
    }
