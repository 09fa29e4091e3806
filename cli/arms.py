"""`ctxdraft add-arm`: put a draft model or a prompt-lookup variant into a bundle's pool."""
from __future__ import annotations

from pathlib import Path

import click

from ctxdraft.selfdraft.bundle import add_arm
from ctxdraft.selfdraft.errors import CtxdraftError

from .common import echo_json
from .main import main


@main.command("add-arm")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--kind", type=click.Choice(["model", "lookup", "none"]), required=True, help="model: an external draft model; lookup: n-gram prompt lookup.")
@click.option("--path", "model_path", type=click.Path(), help="kind=model: the draft model (HF directory or .gguf) with the target's tokenizer.")
@click.option("--name", help="Arm name (default: model:<dir name>, lookup-k<K>).")
@click.option("--draft-len", type=int, default=4, show_default=True, help="Tokens drafted per step.")
@click.option("--ngram-sizes", default="3,2,1", show_default=True, help="kind=lookup: n-gram sizes tried, longest first.")
@click.option("--target", help="Target spec when the bundle does not exist yet (default: the embedded default model).")
@click.option("--json", "as_json", is_flag=True)
def add_arm_cmd(bundle_dir, kind, model_path, name, draft_len, ngram_sizes, target, as_json):
    """Add an arm to a bundle (created if missing); the draft is checked before anything is written.

    \b
    Examples:
      ctxdraft add-arm my_bundle --kind model --path ./smol-draft --draft-len 4
      ctxdraft add-arm my_bundle --kind lookup --draft-len 6 --ngram-sizes 4,3,2
      ctxdraft add-arm new_bundle --target ./my-llama --kind lookup --draft-len 3
    """
    if draft_len < 1:
        raise CtxdraftError(f"--draft-len must be >= 1, got {draft_len}")
    if kind == "model":
        if not model_path:
            raise CtxdraftError("--kind model needs --path to the draft model")
        path = Path(model_path).expanduser().resolve()
        spec = {"name": name or f"model:{path.name}", "kind": "model", "settings": {"path": str(path), "draft_len": draft_len}}
    elif kind == "lookup":
        try:
            sizes = [int(x) for x in ngram_sizes.split(",") if x.strip()]
        except ValueError:
            raise CtxdraftError(f"--ngram-sizes must be comma-separated integers, got {ngram_sizes!r}") from None
        spec = {"name": name or f"lookup-k{draft_len}", "kind": "lookup", "settings": {"draft_len": draft_len, "ngram_sizes": sizes}}
    else:
        spec = {"name": name or "none", "kind": "none", "settings": {}}
    bundle = add_arm(bundle_dir, spec, target=target)
    if as_json:
        echo_json({"bundle": str(bundle.path), "added": spec, "arms": bundle.arms})
    else:
        click.echo(f"added arm {spec['name']} to {bundle.path}; arms: {', '.join(bundle.arms)}")
        click.echo("the pool changed: run `ctxdraft train-policy` again to route over it", err=True)
