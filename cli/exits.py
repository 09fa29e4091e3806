"""`ctxdraft add-exits`: train early-exit heads and add them to a bundle."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.base.data import read_prompts
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.fileio import display_path
from ctxdraft.selfdraft.commands.add_exits import add_exits
from ctxdraft.selfdraft.learning.exit_train import ExitTrainConfig
from ctxdraft.selfdraft.runtime.target import DEFAULT_TARGET, load_target

from .common import dtype_option, echo_json, parse_floats, parse_ints, progress_bar, ranks


@click.command("add-exits")
@click.argument("target", required=False)
@click.option("--layers", required=True, help="Comma-separated exit layers, each in 1..L-1 (e.g. 10,16,22).")
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), help="JSONL with a 'prompt' (or 'text') field.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle directory (created or extended).")
@click.option("--head", type=click.Choice(["linear", "layer", "feature"]), default="linear", show_default=True,
              help="linear / layer: one exit head per layer in --layers; feature: ONE feature head (EAGLE-3 style) "
                   "reading the target's states at all of --layers (e.g. 2,15,28).")
@click.option("--name", default="general", show_default=True, help="--head feature: the head's name (arm `feature` for "
              "general, else `feature:NAME`); several heads can coexist, e.g. one per domain.")
@click.option("--domain", "domains", help="Train on the prompts of these domains only (comma-separated), e.g. for a "
              "domain's own feature head.")
@click.option("--ttt-steps", type=int, default=5, show_default=True, help="--head feature: draft positions unrolled in "
              "training (training-time test).")
@click.option("--lr", type=float, default=None, help="Learning rate (default 1e-3).")
@click.option("--samples", type=int, default=0, show_default=True, help="Also train on N sampled continuations of every "
              "training prompt (more of the target's own text).")
@click.option("--sample-temperature", type=float, default=0.8, show_default=True)
@click.option("--draft-vocab", type=int, default=None, help="Restrict the exit's LM head to the N most frequent ids.")
@click.option("--steps", type=int, default=200, show_default=True, help="Distillation steps per exit.")
@click.option("--self-distill-tokens", type=int, default=64, show_default=True, help="Target continuation tokens per prompt.")
@click.option("--max-prompt-tokens", type=int, default=192, show_default=True, help="Cut prompts to this many tokens.")
@click.option("--max-prompts", type=int, default=None, help="Use a deterministic sample of this many prompts.")
@click.option("--draft-lens", default="1,2,3,4,6", show_default=True, help="Draft lengths tried on the held-out prompts; "
              "the best modelled one becomes the arm's (give one value to fix it).")
@click.option("--thresholds", default="0,0.3,0.5,0.6,0.7,0.8,0.9", show_default=True, help="Confidence stops tried "
              "likewise (0: none; give one value to fix it).")
@click.option("--eval-frac", type=float, default=0.2, show_default=True, help="Fraction of prompts held out for evaluation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoints in BUNDLE/.add_exits_work.")
@dtype_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def add_exits_cmd(target, layers, data_path, out_dir, head, name, domains, ttt_steps, lr, samples, sample_temperature,
                  draft_vocab, steps, self_distill_tokens, max_prompt_tokens, max_prompts, draft_lens, thresholds,
                  eval_frac, seed, resume, dtype, as_json):
    """Train early-exit heads on intermediate layers and add `exit@E` arms to a bundle.

    Training text is the prompts plus the target's own greedy continuations; each head is distilled
    from the target's next-token distribution (the target stays frozen). The report gives, per exit,
    its top-1 agreement with the target on held-out prompts, the cost of a draft token relative to a
    target step, and the draft length and confidence stop with the best modelled speed-up (the same
    cost model collect uses for the policy's rewards).

    \b
    Examples (the embedded default target):
      ctxdraft add-exits --layers 10,24 --draft-vocab 8192 --data prompts.jsonl --out my_bundle
      ctxdraft add-exits ./my-hf-model --layers 4 --head layer --draft-vocab 8192 \\
          --data prompts.jsonl --out my_bundle --json
    """

    config = ExitTrainConfig(
        layers=parse_ints(layers, "--layers", "10,16,22"), head=head, draft_vocab=draft_vocab, steps=steps,
        self_distill_tokens=self_distill_tokens, max_prompt_tokens=max_prompt_tokens, max_prompts=max_prompts,
        eval_frac=eval_frac, seed=seed, resume=resume, name=name, ttt_steps=ttt_steps, lr=lr, samples=samples,
        sample_temperature=sample_temperature, draft_lens=parse_ints(draft_lens, "--draft-lens", "1,2,4"),
        thresholds=parse_floats(thresholds, "--thresholds", "0,0.5,0.8"),
    )
    rows = read_prompts(data_path)
    if domains:
        wanted = {d.strip() for d in domains.split(",") if d.strip()}
        rows = [r for r in rows if r["domain"] in wanted]
        if not rows:
            raise CtxdraftError(f"--domain {domains}: no prompt of the data file has that domain")
    spec = target or DEFAULT_TARGET
    loaded = load_target(spec, dtype=dtype)
    config.validate(loaded.num_layers, loaded.vocab_size)
    with ranks() as group, progress_bar(as_json, group.main) as bar:
        report = add_exits(loaded, spec, rows, out_dir, config, progress=bar, group=group)
    if not group.main:
        return
    if as_json:
        echo_json(report)
        return
    click.echo(f"Added {len(report['exits'])} exit(s) to {display_path(out_dir)} in {report['total_s']:.0f} s "
               f"({report['data']['num_train']} training / {report['data']['num_heldout']} held-out prompts).")
    click.echo(f"{'arm':<16} {'head':<8} {'vocab':>6} {'params':>8} {'agree':>6} {'cost':>5} {'K':>2} {'thr':>4} "
               f"{'accept':>6} {'tok/fwd':>7} {'speed-up':>8}")
    for e in report["exits"]:
        vocab = e["draft_vocab"] or "full"
        agree = e["agreement"] if e["kind"] == "exit" else e["acceptance_per_position"]["overall"]["prefix"][0]
        kind = e["head"] if e["kind"] == "exit" else "feature"
        click.echo(f"{e['arm']:<16} {kind:<8} {vocab:>6} {e['num_params']:>8} {agree:>6.1%} "
                   f"{e['cost_ratio']:>5.2f} {e['draft_len']:>2} {e['threshold']:>4.1f} {e['acceptance']:>6.1%} "
                   f"{e['tokens_per_forward']:>7.2f} {e['speedup']:>7.2f}x")
        if e["kind"] == "feature":
            acc = e["acceptance_per_position"]["overall"]["conditional"]
            click.echo("  held-out acceptance per draft position (given the earlier ones): "
                       + ", ".join(f"{j + 1}: {a:.0%}" for j, a in enumerate(acc)))
