"""`ctxdraft calibrate`: the bundle's policy recomputed for this machine's costs and dtype."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.commands.calibrate import calibrate_at

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

    with progress_bar(as_json) as bar:
        run = calibrate_at(bundle_dir, reps=reps, dtype=dtype, progress=bar)
    if as_json:
        echo_json(run.to_dict())
        return
    click.echo(run.to_text())
