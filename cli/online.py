"""`ctxdraft update-policy`."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.fileio import display_path
from ctxdraft.selfdraft.commands.update_policy import UpdateConfig, update_policy_at, update_report

from .common import dtype_option, echo_json, progress_bar


@click.command("update-policy")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.argument("more_logs", nargs=-1, type=click.Path(dir_okay=False), metavar="")
@click.option("--logs", "logs", multiple=True, type=click.Path(dir_okay=False),
              help="Traffic log(s) from `generate --log` (repeatable; files after the first are read too).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Write the updated bundle here (default: in place).")
@click.option("--force", is_flag=True, help="Replace the policy even when the one in use is estimated better.")
@click.option("--folds", default=5, show_default=True, type=int, help="Cross-fitting folds for the estimate of the new policy.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--epochs", type=int, help="Training epochs (default: the bundle's policy config).")
@dtype_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def update_policy_cmd(bundle_dir, more_logs, logs, out_dir, force, folds, seed, epochs, dtype, as_json):
    """Learn from served traffic: retrain BUNDLE's policy on its offline data plus the logged requests (only the
    chosen arm's speed-up is known, corrected by its propensity: doubly robust), and replace the policy unless
    the one in use is estimated better on the logs.

    Prints the off-policy estimate (mean speed-up, 95% interval) of the policy in use and of the updated one.
    Exit status: 0 replaced, 1 kept (the policy in use is estimated better; --force replaces it), 2 bad input.

    \b
    Examples:
      ctxdraft generate --bundle my_bundle --log traffic.jsonl --explore 0.1 "..."   # (a service, many times)
      ctxdraft update-policy my_bundle --logs traffic.jsonl --out my_bundle_v2
      ctxdraft update-policy my_bundle --logs day1.jsonl day2.jsonl --json
    """

    paths = list(logs) + list(more_logs)
    if not logs:
        raise CtxdraftError("give the traffic logs to learn from with --logs FILE [FILE...]")
    with progress_bar(as_json) as bar:
        result = update_policy_at(bundle_dir, paths, out=out_dir, force=force, dtype=dtype,
                                  config=UpdateConfig(folds=folds, seed=seed, epochs=epochs), progress=bar)
    if as_json:
        echo_json({"replaced": result.replaced, "bundle": display_path(result.path), "report": result.report})
    else:
        click.echo(update_report(result.report).to_markdown(), nl=False)
        if result.replaced:
            click.echo(f"Wrote {display_path(result.path)}; `ctxdraft generate --bundle {display_path(result.path)} ...` "
                       "routes with the updated policy.")
        else:
            click.echo("Nothing written: the policy in use is estimated better on these logs (--force replaces it).")
    if not result.replaced:
        raise SystemExit(1)
