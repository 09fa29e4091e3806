"""`ctxdraft add-exits`: train early-exit heads and add them to a bundle."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.commands.add_exits import add_exits_from_file
from ctxdraft.selfdraft.commands.report_text import add_exits_text
from ctxdraft.selfdraft.learning.exit_train import ExitTrainConfig

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
@click.option("--train-tokens", type=int, default=None, help="Train for about this many tokens instead of --steps "
              "(an exit head: batch positions per step; a feature head: 4 sequences of the mean length per step).")
@click.option("--use-answers", is_flag=True, help="Rows with both 'prompt' and 'text' (make-data's corpus): train on "
              "that text as the continuation instead of generating it again.")
@click.option("--aligned-loss", is_flag=True, help="--head feature: count draft position j's loss only where the head "
              "drafted positions 1..j-1 right (GRIFFIN-style; a chain stops at its first miss).")
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
                  draft_vocab, steps, train_tokens, use_answers, aligned_loss, self_distill_tokens, max_prompt_tokens,
                  max_prompts, draft_lens, thresholds, eval_frac, seed, resume, dtype, as_json):
    """Train early-exit heads on intermediate layers and add `exit@E` arms to a bundle.

    Training text is the prompts plus the target's own greedy continuations; each head is distilled
    from the target's next-token distribution (the target stays frozen). The report gives, per exit,
    its top-1 agreement with the target on held-out prompts, the cost of a draft token relative to a
    target step, and the draft length and confidence stop with the best modelled speed-up (the same
    cost model collect uses for the policy's rewards).

    \b
    Examples (the embedded default target):
      ctxdraft add-exits --layers 10,24 --draft-vocab 8192 --data prompts.jsonl --out my_bundle
      ctxdraft add-exits --head feature --layers 2,15,28 --data corpus.jsonl --use-answers \\
          --train-tokens 300000 --out my_bundle
      ctxdraft add-exits ./my-hf-model --layers 4 --head layer --draft-vocab 8192 \\
          --data prompts.jsonl --out my_bundle --json
    """

    config = ExitTrainConfig(
        layers=parse_ints(layers, "--layers", "10,16,22"), head=head, draft_vocab=draft_vocab, steps=steps,
        self_distill_tokens=self_distill_tokens, max_prompt_tokens=max_prompt_tokens, max_prompts=max_prompts,
        eval_frac=eval_frac, seed=seed, resume=resume, name=name, ttt_steps=ttt_steps, lr=lr, samples=samples,
        sample_temperature=sample_temperature, train_tokens=train_tokens, use_answers=use_answers,
        aligned_loss=aligned_loss,
        draft_lens=parse_ints(draft_lens, "--draft-lens", "1,2,4"),
        thresholds=parse_floats(thresholds, "--thresholds", "0,0.5,0.8"),
    )
    with ranks() as group, progress_bar(as_json, group.main) as bar:
        report = add_exits_from_file(data_path, out_dir, config, target=target, domains=domains, dtype=dtype,
                                     progress=bar, group=group)
    if not group.main:
        return
    if as_json:
        echo_json(report)
        return
    click.echo(add_exits_text(report, out_dir))
