"""`ctxdraft generate` and `ctxdraft info`."""
from __future__ import annotations

import sys

import click

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.fileio import display_path
from ctxdraft.selfdraft.serving.bundle import load_bundle

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
@dtype_option
@no_calibrate_option
def generate_cmd(prompt, bundle_dir, target, draft, max_new_tokens, temperature, top_p, seed, stop, no_chat, escape_special,
                 as_json, stream, log_path, log_features_only, explore, dtype, no_calibrate):
    """Generate text; the output is exactly what the target alone would produce.

    PROMPT is the text to continue, or '-' to read it from stdin.

    \b
    Examples:
      ctxdraft generate "Summarize the plot of Hamlet in two sentences."
      echo "What is 17*23?" | ctxdraft generate - --draft lookup --json
      ctxdraft generate --bundle my_bundle --temperature 0.7 --seed 1 "Write a haiku."
      ctxdraft generate --bundle my_bundle --log traffic.jsonl --explore 0.1 "..."   # then: ctxdraft update-policy
    """
    if (log_features_only or explore) and log_path is None:
        raise CtxdraftError("--log-features-only and --explore go with --log FILE (the traffic log update-policy learns from)")
    if log_path is not None and draft != "auto":
        raise CtxdraftError(f"--log records requests the policy routes; --draft {draft} names its arm, so use --draft auto")
    text = _read_prompt(prompt)
    bundle = load_bundle(bundle_dir, target=target, dtype=dtype, calibrate=False if no_calibrate else None,
                         log=log_path, log_features_only=log_features_only, explore=explore)
    with progress_bar(as_json) as bar:
        bundle.progress = bar  # a first calibration, on a terminal
        result = bundle.generate(text, draft=draft, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, chat=not no_chat, stop=list(stop), escape_special=escape_special,
                                 on_text=_print_piece if stream and not as_json else None)
    if as_json:
        echo_json(result.to_dict())
        return
    if stream:
        click.echo()
    else:
        click.echo(result.text)
    s = result.stats
    how = "chosen by the policy" if result.routed else ("the bundle's default arm; no policy yet" if draft == "auto" else "as asked")
    click.echo(
        f"[arm {result.arm} ({how}) | {s.new_tokens} tokens in {s.wall_s:.2f}s = {s.tokens_per_s:.1f} tok/s | "
        f"{s.target_forwards} target forwards, {s.accepted_tokens}/{s.drafted_tokens} drafted tokens accepted]",
        err=True,
    )


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
    bundle = load_bundle(bundle_dir, dtype=dtype, calibrate=False if no_calibrate else None)
    info = bundle.info
    calibration = bundle.calibration(create=False)
    summary = {
        "path": display_path(bundle.path),
        "target": info["target"],
        "arms": info["arms"],
        "default_arm": info.get("default_arm"),
        "exits": info.get("exits") or [],
        "feature_heads": info.get("feature_heads") or [],
        "features": info.get("features"),
        "policy": info.get("policy"),
        "cost_profile": bool(info.get("cost_profile")),
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "routing_policy": bundle.calibration_note(),
        "calibration": None if calibration is None else {
            "path": display_path(calibration.path), "machine": calibration.machine, "created": calibration.report.get("created"),
            "policy_speedup": calibration.report.get("policy", {}).get("policy")},
        "versions": info.get("versions"),
    }
    if as_json:
        echo_json(summary)
        return
    t = info["target"]
    click.echo(f"bundle   {display_path(bundle.path)}")
    click.echo(f"target   {t.get('name')} (spec {t.get('spec')}, hash {t.get('hash')})")
    click.echo(f"arms     {', '.join(bundle.arms)}  (default: {info.get('default_arm')})")
    for e in info.get("exits") or []:
        click.echo(f"exit     layer {e.get('layer')} head {e.get('head')}  agreement {e.get('agreement', float('nan')):.3f}")
    for e in info.get("feature_heads") or []:
        first = (e.get("acceptance_per_position") or {}).get("overall", {}).get("prefix") or [float("nan")]
        click.echo(f"feature  {e.get('name')} (arm {e.get('arm')}) layers {','.join(map(str, e.get('layers') or []))}  "
                   f"draft vocab {e.get('draft_vocab')}  acceptance of draft 1 {first[0]:.3f}")
    click.echo(f"policy   {info.get('policy') or 'none (generate --draft auto uses the default arm)'}")
    click.echo(f"routing  {bundle.calibration_note()} [{summary['dtype']}]")
    if info.get("features"):
        click.echo(f"features {info['features'].get('kind')} (layer {info['features'].get('layer')}, dim {info['features'].get('dim')})")
