"""`ctxdraft collect`, `ctxdraft train-policy` and `ctxdraft export-policy`."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.base.fileio import display_path
from ctxdraft.selfdraft.commands.collect import CollectConfig, collect_file
from ctxdraft.selfdraft.commands.report_text import collect_text, policy_report_text
from ctxdraft.selfdraft.commands.train_policy import export_policy_at, train_policy_at
from ctxdraft.selfdraft.learning.policy import PolicyConfig

from .common import dtype_option, echo_json, progress_bar, ranks, with_options

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
    with ranks() as group, progress_bar(as_json, group.main) as bar:
        summary = collect_file(bundle_dir, data_path, out_path, config, dtype=dtype, progress=bar, group=group)
    if not group.main:
        return
    if as_json:
        echo_json(summary)
    else:
        click.echo(collect_text(summary))


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

    collect_config = CollectConfig(max_new_tokens=max_new_tokens, draft_len=draft_len, wallclock_sample=wallclock_sample,
                                   reprofile=reprofile)
    with ranks() as group, progress_bar(as_json, group.main) as bar:
        result = train_policy_at(bundle_dir, rewards=rewards_path, data=data_path, collect_config=collect_config,
                                 config=PolicyConfig(feature_kind=feature_kind, epochs=epochs, seed=seed),
                                 eval_frac=eval_frac, dtype=dtype, progress=bar, group=group)
    if not group.main:
        return
    policy_path = display_path(result.policy_path)
    if as_json:
        echo_json({"report": result.report, "collect": result.collected, "policy": policy_path})
        return
    if result.collected is not None:
        click.echo(collect_text(result.collected))
        click.echo()
    click.echo(policy_report_text(result.report))
    click.echo(f"Wrote {policy_path}; `ctxdraft generate --bundle {display_path(result.bundle_path)} ...` now routes with it.")


@click.command("export-policy")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the file's metadata as JSON.")
def export_policy_cmd(bundle_dir, as_json):
    """Re-export BUNDLE/policy.onnx from the saved policy weights (BUNDLE/policy.safetensors).

    \b
    Example:
      ctxdraft export-policy my_bundle --json
    """

    exported = export_policy_at(bundle_dir)
    meta = exported.meta
    if as_json:
        echo_json({"path": display_path(exported.path), **meta})
        return
    click.echo(f"Wrote {display_path(exported.path)}: {meta['features']['kind']} features, "
               f"arms {', '.join(a['name'] for a in meta['arms'])}.")
