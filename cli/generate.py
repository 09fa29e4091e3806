"""`ctxdraft generate` and `ctxdraft info`."""
from __future__ import annotations

import json
import sys

import click

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.commands.generate import generate, generate_batch, generation_line
from ctxdraft.selfdraft.commands.info import info

from .common import dtype_option, echo_json, no_calibrate_option, progress_bar


def _read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin is None or (prompt is None and sys.stdin.isatty()):
            raise CtxdraftError("no prompt given: pass it as an argument or pipe it on stdin with '-'")
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise CtxdraftError("stdin is not UTF-8 text") from None
    return prompt


def _print_piece(piece: str) -> None:
    click.echo(piece, nl=False)
    sys.stdout.flush()


@click.command("generate")
@click.argument("prompt", required=False)
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), help="Bundle directory (default: the shipped bundle of the default model).")
@click.option("--target", help="Target: registered name, HF model directory or .gguf file (default: the bundle's target).")
@click.option("--draft", default="auto", show_default=True, help="Arm to draft with: auto (the policy), none, lookup, exit@E, model:NAME.")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", type=int, help="Seed for sampling (temperature > 0).")
@click.option("--stop", multiple=True, help="Stop string (repeatable); the text is cut before it.")
@click.option("--no-chat", is_flag=True, help="Do not apply the model's chat template.")
@click.option("--escape-special", is_flag=True,
              help="Special tokens typed in the prompt (<|im_end|>) stay plain text, not control tokens "
                   "(for untrusted prompts).")
@click.option("--json", "as_json", is_flag=True, help="Print prompt_ids, token_ids, text, arm and stats as JSON.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False),
              help="Append the routed request to this traffic log (JSONL) for `ctxdraft update-policy`.")
@click.option("--log-features-only", is_flag=True, help="Keep the prompt's token ids out of the log (the routing features stay).")
@click.option("--explore", default=0.0, show_default=True, type=float,
              help="Epsilon-greedy routing: a uniformly random arm with this probability (logged with its propensity).")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False),
              help="Decode every prompt of this JSONL file ({\"prompt\": ...} per line) together; one JSON line out per prompt.")
@click.option("--max-batch", default=8, show_default=True, type=int, help="With --batch: the most rows decoded at once.")
@dtype_option
@no_calibrate_option
def generate_cmd(prompt, bundle_dir, target, draft, max_new_tokens, temperature, top_p, seed, stop, no_chat, escape_special,
                 as_json, stream, log_path, log_features_only, explore, batch_file, max_batch, dtype, no_calibrate):
    """Generate text; the output is exactly what the target alone would produce.

    PROMPT is the text to continue, or '-' to read it from stdin.

    \b
    Examples:
      ctxdraft generate "Summarize the plot of Hamlet in two sentences."
      echo "What is 17*23?" | ctxdraft generate - --draft lookup --json
      ctxdraft generate --bundle my_bundle --temperature 0.7 --seed 1 "Write a haiku."
      ctxdraft generate --bundle my_bundle --log traffic.jsonl --explore 0.1 "..."   # then: ctxdraft update-policy
      ctxdraft generate --batch prompts.jsonl --max-new-tokens 64 > outputs.jsonl
    """
    if batch_file is not None:
        if prompt is not None or stream or log_path is not None:
            raise CtxdraftError("--batch FILE takes its prompts from the file; drop the PROMPT argument, --stream and --log")
        with progress_bar() as bar:
            lines = generate_batch(batch_file, bundle_dir=bundle_dir, target=target, dtype=dtype, max_batch=max_batch,
                                   calibrate=False if no_calibrate else None, progress=bar, draft=draft,
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                   chat=not no_chat, stop=list(stop), escape_special=escape_special)
        for line in lines:
            click.echo(json.dumps(line, default=str))
        return
    text = _read_prompt(prompt)
    with progress_bar(as_json) as bar:  # a first calibration, on a terminal
        result = generate(text, bundle_dir=bundle_dir, target=target, dtype=dtype, calibrate=False if no_calibrate else None,
                          log=log_path, log_features_only=log_features_only, explore=explore, progress=bar, draft=draft,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          chat=not no_chat, stop=list(stop), escape_special=escape_special,
                          on_text=_print_piece if stream and not as_json else None)
    if as_json:
        echo_json(result.to_dict())
        return
    if stream:
        click.echo()
    else:
        click.echo(result.text)
    click.echo(generation_line(result, draft), err=True)


@click.command("info")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), help="Bundle directory (default: the shipped bundle).")
@click.option("--json", "as_json", is_flag=True)
@dtype_option
@no_calibrate_option
def info_cmd(bundle_dir, as_json, dtype, no_calibrate):
    """Show a bundle: its target, arms, exits and what has been trained.

    \b
    Example:
      ctxdraft info --bundle my_bundle --json
    """
    report = info(bundle_dir, dtype=dtype, calibrate=False if no_calibrate else None)
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(report.to_text())
