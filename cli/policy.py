"""`ctxdraft collect`, `ctxdraft train-policy` and `ctxdraft export-policy`."""
from __future__ import annotations

import click

from ctxdraft.export.onnx_export import read_metadata
from ctxdraft.selfdraft.base.data import read_prompts
from ctxdraft.selfdraft.base.fileio import display_path
from ctxdraft.selfdraft.commands.collect import CollectConfig, collect
from ctxdraft.selfdraft.commands.train_policy import export_bundle_policy, train_policy
from ctxdraft.selfdraft.learning.policy import PolicyConfig
from ctxdraft.selfdraft.learning.policy_report import training_report
from ctxdraft.selfdraft.serving.bundle import load_bundle

from .common import dtype_option, echo_json, progress_bar, ranks, with_options


def _print_collect(summary: dict) -> None:
    click.echo(f"Collected {summary['num_new']} prompt(s) into {summary['out']} "
               f"({summary['num_skipped']} already there; {summary['num_rows']} rows in all) "
               f"in {summary['seconds']['total']:.0f} s.")
    prof = summary["cost_profile"]
    step = prof["target_step_ms"]
    longest = max(step, key=int)
    click.echo(f"Cost profile at {prof['context_tokens']} context tokens"
               f"{' (measured now)' if summary['profiled_now'] else ''}: target step {step['1']:.1f} ms for 1 position, "
               f"{step[longest]:.1f} ms for {longest}.")
    check = summary["exactness_check"]
    if check["arm"]:
        click.echo(f"Simulated trajectories of {check['arm']} equal the real run on {check['exact']}/{check['prompts']} prompts.")
    overall = summary.get("overall")
    if overall:
        domains = summary["domains"]
        names = list(overall["speedup"])
        width = max(len(n) for n in names + ["oracle"]) + 1
        cols = list(domains) + ["overall"]
        click.echo("\nModelled mean speed-up over plain decoding:")
        click.echo(f"{'arm':<{width}}" + "".join(f"{c[:12]:>13}" for c in cols))
        for name in names + ["oracle"]:
            cells = []
            for c in cols:
                block = overall if c == "overall" else domains[c]
                cells.append(block["oracle"] if name == "oracle" else block["speedup"][name])
            click.echo(f"{name:<{width}}" + "".join(f"{v:>13.3f}" for v in cells))
    wall = summary.get("wallclock")
    if wall and "skipped" not in wall:
        r = wall["pearson_speedup"]
        click.echo(f"\nWall-clock check on {wall['num_prompts']} prompt(s): Pearson r "
                   f"{'n/a' if r is None else f'{r:.3f}'} between modelled and measured speed-ups, mean abs error "
                   f"{wall['mean_abs_error_speedup']:.3f}; trajectories exact {wall['trajectories_exact']}.")
    elif wall:
        click.echo(f"\nWall-clock check skipped: {wall['skipped']}")


_COLLECT_OPTIONS = [
    click.option("--max-new-tokens", default=128, show_default=True, type=int, help="Tokens generated per prompt."),
    click.option("--draft-len", type=int, default=None, help="Override every drafting arm's draft length for this collection."),
    click.option("--wallclock-sample", type=int, default=0, show_default=True,
                 help="Also run N prompts for real with every arm and compare measured with modelled speed-ups."),
    click.option("--reprofile", is_flag=True, help="Measure the cost profile again even if the bundle has one."),
]


@click.command("collect")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), help="JSONL prompts: 'prompt' (or 'text'), optional 'id', 'domain'.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Rewards JSONL to write (one row per prompt).")
@with_options(_COLLECT_OPTIONS)
@click.option("--resume", is_flag=True, help="Keep the rows already in --out and collect only the missing prompts.")
@dtype_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def collect_cmd(bundle_dir, data_path, out_path, max_new_tokens, draft_len, wallclock_sample, reprofile, resume, dtype, as_json):
    """Log every arm's speed-up on every prompt: the offline data for `train-policy`.

    Per prompt the target's greedy continuation is generated once; every arm's exact speculative
    trajectory then follows from one teacher-forced pass of its draft, and its reward is the modelled
    speed-up over plain decoding (costs profiled once on this machine, stored in bundle.json).

    \b
    Examples:
      ctxdraft collect my_bundle --data prompts.jsonl --out rewards.jsonl
      ctxdraft collect my_bundle --data prompts.jsonl --out rewards.jsonl --resume --wallclock-sample 6 --json
    """

    config = CollectConfig(max_new_tokens=max_new_tokens, draft_len=draft_len, resume=resume,
                           wallclock_sample=wallclock_sample, reprofile=reprofile)
    config.validate()
    rows = read_prompts(data_path)
    with ranks() as group, progress_bar(as_json, group.main) as bar:
        summary = collect(load_bundle(bundle_dir, dtype=dtype, calibrate=False), rows, out_path, config, bar, group)
    if not group.main:
        return
    if as_json:
        echo_json(summary)
    else:
        _print_collect(summary)


def _print_report(report: dict) -> None:

    click.echo(training_report(report).to_markdown(), nl=False)
    onnx = report.get("onnx", {})
    if "max_abs_diff" in onnx:
        click.echo(f"- policy.onnx ({onnx['provider']}): max |onnxruntime - torch| = {onnx['max_abs_diff']:.2e}, "
                   f"one routing decision {onnx['choose_median_ms']:.3f} ms")


@click.command("train-policy")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--rewards", "rewards_path", type=click.Path(dir_okay=False), help="Rewards JSONL from `ctxdraft collect`.")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="Prompts JSONL: collect into BUNDLE/rewards.jsonl first (resumes).")
@click.option("--features", "feature_kind", type=click.Choice(["hidden", "tokens"]), default="hidden", show_default=True,
              help="hidden: the target's pooled prefill state; tokens: the prompt's token ids.")
@click.option("--epochs", type=int, default=300, show_default=True)
@click.option("--eval-frac", type=float, default=0.25, show_default=True, help="Held-out fraction (stratified by domain).")
@click.option("--seed", type=int, default=0, show_default=True)
@with_options(_COLLECT_OPTIONS)
@dtype_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def train_policy_cmd(bundle_dir, rewards_path, data_path, feature_kind, epochs, eval_frac, seed, max_new_tokens, draft_len,
                     wallclock_sample, reprofile, dtype, as_json):
    """Train the routing policy (REINFORCE, as in the paper; plus a supervised baseline) and write
    BUNDLE/policy.onnx, which `generate --draft auto` then uses.

    The report compares, on held-out prompts and per domain, the policy's mean speed-up with every
    single arm and with the per-prompt oracle (BUNDLE/reports/train_policy.json and .md).

    \b
    Examples:
      ctxdraft train-policy my_bundle --rewards rewards.jsonl
      ctxdraft train-policy my_bundle --data prompts.jsonl --features tokens --json
    """

    bundle = load_bundle(bundle_dir, dtype=dtype, calibrate=False)
    collect_config = CollectConfig(max_new_tokens=max_new_tokens, draft_len=draft_len, wallclock_sample=wallclock_sample,
                                   reprofile=reprofile)
    with ranks() as group, progress_bar(as_json, group.main) as bar:
        result = train_policy(bundle, rewards=rewards_path, data=data_path, collect_config=collect_config,
                              config=PolicyConfig(feature_kind=feature_kind, epochs=epochs, seed=seed),
                              eval_frac=eval_frac, progress=bar, group=group)
    if not group.main:
        return
    bundle = load_bundle(bundle_dir, calibrate=False)  # as rank 0 wrote it
    policy_path = display_path(bundle.path / bundle.info["policy"])
    if as_json:
        echo_json({"report": result.report, "collect": result.collected, "policy": policy_path})
        return
    if result.collected is not None:
        _print_collect(result.collected)
        click.echo()
    _print_report(result.report)
    click.echo(f"Wrote {policy_path}; `ctxdraft generate --bundle {display_path(bundle.path)} ...` now routes with it.")


@click.command("export-policy")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the file's metadata as JSON.")
def export_policy_cmd(bundle_dir, as_json):
    """Re-export BUNDLE/policy.onnx from the saved policy weights (BUNDLE/policy.safetensors).

    \b
    Example:
      ctxdraft export-policy my_bundle --json
    """

    path = export_bundle_policy(load_bundle(bundle_dir, calibrate=False))
    meta = read_metadata(path)
    if as_json:
        echo_json({"path": display_path(path), **meta})
        return
    click.echo(f"Wrote {display_path(path)}: {meta['features']['kind']} features, arms {', '.join(a['name'] for a in meta['arms'])}.")
