"""`ctxdraft bench`: ctxdraft's arms and policy against HF generate, interleaved, with an equality check."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.base.fileio import display_path
from ctxdraft.selfdraft.commands.bench import BenchConfig, bench
from ctxdraft.selfdraft.commands.bench_batch import batch_markdown, bench_batch
from ctxdraft.selfdraft.commands.bench_report import bench_markdown

from .common import dtype_option, echo_json, no_calibrate_option, parse_names, progress_bar


def _parse_arms(value: str) -> list[str] | None:
    if value.strip() == "all":
        return None
    return parse_names(value, "--arms", "lookup,auto")


@click.command("bench")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), help="Bundle directory (default: the shipped bundle of the default model).")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL prompts: 'prompt' (or 'text'), optional 'id' and 'domain'.")
@click.option("--per-domain", type=int, help="Bench only the first N prompts of each domain (after the split).")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--arms", default="all", show_default=True, help="Comma-separated arms to run (may include 'auto'), or 'all'.")
@click.option("--baselines", type=click.Choice(["hf", "lookup", "none"]), default="hf", show_default=True,
              help="hf: also HF prompt lookup, HF early exit (bundles with exits) and HF assisted generation with the "
                   "pool's draft model (bundles with a model arm); lookup: only HF prompt lookup; none: only plain HF "
                   "generate (always run: the reference).")
@click.option("--repeats", default=1, show_default=True, type=int, help="Time each prompt and method R times; the median counts.")
@click.option("--split", type=click.Choice(["eval", "all"]), default="eval", show_default=True,
              help="eval: only the prompts no part of the bundle trained on (all prompts if it records none).")
@click.option("--out", "out_dir", default="bench_out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for bench.json, bench.md and bench.png.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="> 0: seeded sampling runs (no equality check).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", type=int, help="torch threads during the bench (default: torch's; 1 avoids spin-waiting on a busy shared machine).")
@click.option("--tie-tolerance", type=float, help="Logit gap under which a greedy divergence counts as a tie: both tokens "
              "within it of the target's best logit (default by dtype: float32 1e-3, bfloat16 0.5, float16 0.1).")
@click.option("--batch", type=int, help="Decode B prompts together: aggregate tokens/s of each arm's batch against HF "
              "generate on the same B prompts (left-padded) and the B requests one after another; every batch row is "
              "checked against its single-request output. --arms defaults to auto (none without a policy).")
@dtype_option
@no_calibrate_option
@click.option("--json", "as_json", is_flag=True, help="Print bench.json instead of the Markdown table.")
def bench_cmd(bundle_dir, data, per_domain, max_new_tokens, arms, baselines, repeats, split, out_dir, temperature, seed, threads,
              tie_tolerance, batch, dtype, no_calibrate, as_json):
    """Time ctxdraft against HF generate on a prompt file; check greedy outputs are identical.

    Every prompt runs every method (HF generate, HF prompt lookup, HF early exit, each arm of the
    bundle, auto, and the per-prompt oracle) before the next prompt, in rotating order, so machine
    drift hits all alike. A greedy output that differs from HF generate is reported as a MISMATCH
    and the exit code is 1 (a divergence at a near-tie of the target's best logits is not one).
    With --batch B, a batch row that differs from its own single-request output is a MISMATCH.

    \b
    Examples:
      ctxdraft bench --data prompts.jsonl --per-domain 3 --max-new-tokens 64 --out /tmp/bench
      ctxdraft bench --bundle my_bundle --data prompts.jsonl --arms lookup,auto --repeats 3 --json
      ctxdraft bench --data prompts.jsonl --temperature 0.7 --seed 1
      ctxdraft bench --data prompts.jsonl --batch 8 --arms none,auto --threads 1
    """
    config = BenchConfig(max_new_tokens=max_new_tokens, arms=_parse_arms(arms), baselines=baselines, repeats=repeats,
                         temperature=temperature, seed=seed, threads=threads, tie_tolerance=tie_tolerance)
    if batch is not None:
        return _bench_batch(config, batch, data, bundle_dir, split, per_domain, out_dir, dtype, no_calibrate, as_json)
    with progress_bar(as_json) as bar:
        run = bench(data, config, bundle_dir=bundle_dir, split=split, per_domain=per_domain, out_dir=out_dir, dtype=dtype,
                    calibrate=False if no_calibrate else None, progress=bar)
    _show(run.report, bench_markdown, run.written, as_json)


def _bench_batch(config, batch, data, bundle_dir, split, per_domain, out_dir, dtype, no_calibrate, as_json):
    with progress_bar(as_json) as bar:
        report, written = bench_batch(data, config, batch, bundle_dir=bundle_dir, split=split, per_domain=per_domain,
                                      out_dir=out_dir, dtype=dtype, calibrate=False if no_calibrate else None, progress=bar)
    _show(report, batch_markdown, written, as_json)


def _show(report, markdown, written: dict, as_json: bool) -> None:
    """Print a bench report (JSON or its Markdown and the files written); a MISMATCH exits 1."""
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(markdown(report))
        click.echo(f"wrote {', '.join(display_path(p) for p in written.values())}")
    if not report.ok:
        click.echo(report.status_line(), err=True)
        raise SystemExit(1)
