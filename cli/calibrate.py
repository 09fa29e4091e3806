"""`ctxdraft calibrate`: the bundle's policy recomputed for this machine's costs and dtype."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.serving.bundle import load_bundle
from ctxdraft.selfdraft.serving.calibration import calibrate

from .common import dtype_option, echo_json, progress_bar


@click.command("calibrate")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), help="Bundle directory (default: the shipped bundle).")
@click.option("--reps", type=int, default=5, show_default=True, help="Timing repetitions per cost (medians of interleaved runs).")
@dtype_option
@click.option("--json", "as_json", is_flag=True, help="Print the calibration report as JSON.")
def calibrate_cmd(bundle_dir, reps, dtype, as_json):
    """Measure this machine's costs, recompute every arm's reward on the bundle's stored trajectories, retrain
    the policy and store it for this machine (under the cache directory; the bundle is not changed).

    `generate --draft auto` then routes with it; without one it calibrates once on first use. The result is
    keyed by the bundle's content and this machine's fingerprint (CPU or GPU, torch threads, dtype, torch).

    \b
    Examples:
      ctxdraft calibrate                        # the shipped bundle, in bfloat16 where the CPU has it
      ctxdraft calibrate --bundle my_bundle --dtype float32 --json
    """

    bundle = load_bundle(bundle_dir, dtype=dtype)
    with progress_bar(as_json) as bar:
        calibration = calibrate(bundle, progress=bar, reps=reps)
    report = calibration.report
    if as_json:
        echo_json({"path": str(calibration.path), "machine": calibration.machine, "report": report,
                   "profile": calibration.profile.to_dict()})
        return
    profile = calibration.profile
    m = calibration.machine
    step = profile.target_step_s
    click.echo(f"Calibrated {bundle.info['target'].get('name')} on {m['processor']} ({m['threads']} threads, {m['dtype']}) "
               f"in {report['total_s']:.0f} s ({report['profile_s']:.0f} s measuring costs).")
    click.echo(f"Target step at {profile.context_tokens} context tokens: {step[1] * 1e3:.1f} ms for 1 position; "
               + ", ".join(f"{m_}: {step[m_] / step[1]:.2f}x" for m_ in sorted(step) if m_ > 1))
    overall = report["arms"].get("overall", {})
    if overall:
        click.echo("Modelled mean speed-up over plain decoding on the bundle's trajectories ("
                   f"{report['rows']} prompts): " + ", ".join(f"{a} {v:.2f}x" for a, v in overall["speedup"].items())
                   + f"; oracle {overall['oracle']:.2f}x")
    p = report["policy"]
    click.echo(f"Policy on {report['num_eval']} held-out prompts: {p['policy']:.3f}x (best single arm "
               f"{p['best_single_arm']} {p['best_single_arm_speedup']:.3f}x, oracle {p['oracle']:.3f}x); chose "
               + ", ".join(f"{a} {n}" for a, n in p["choices"].items() if n) + ".")
    click.echo(f"Stored in {calibration.path}; `ctxdraft generate --draft auto` routes with it on this machine.")
