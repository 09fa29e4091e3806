"""`ctxdraft add-arm`: put a draft model or a prompt-lookup variant into a bundle's pool."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.base.fileio import display_path
from ctxdraft.selfdraft.commands.add_arm import add_arm_from_options

from .common import echo_json, parse_ints


@click.command("add-arm")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--kind", type=click.Choice(["model", "lookup", "suffix", "none"]), required=True, help="model: an external draft model; lookup: n-gram prompt lookup; suffix: suffix decoding over the request and a datastore of earlier outputs.")
@click.option("--path", "model_path", help="kind=model: the draft model (HF directory, .gguf or registered name) with the target's tokenizer.")
@click.option("--name", help="Arm name (default: model:<dir name>, lookup-k<K>).")
@click.option("--draft-len", type=int, default=4, show_default=True, help="Tokens drafted per step.")
@click.option("--ngram-sizes", default="3,2,1", show_default=True, help="kind=lookup: n-gram sizes tried, longest first.")
@click.option("--target", help="Target spec when the bundle does not exist yet (default: the embedded default model).")
@click.option("--data", type=click.Path(dir_okay=False), help="kind=suffix: prompts (JSONL) whose greedy continuations fill the datastore.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="kind=suffix with --data: tokens per continuation.")
@click.option("--json", "as_json", is_flag=True)
def add_arm_cmd(bundle_dir, kind, model_path, name, draft_len, ngram_sizes, target, data, max_new_tokens, as_json):
    """Add an arm to a bundle (created if missing); the draft is checked before anything is written.

    \b
    Examples:
      ctxdraft add-arm my_bundle --kind model --path ./smol-draft --draft-len 4
      ctxdraft add-arm my_bundle --kind lookup --draft-len 6 --ngram-sizes 4,3,2
      ctxdraft add-arm new_bundle --target ./my-llama --kind lookup --draft-len 3
      ctxdraft add-arm my_bundle --kind suffix --draft-len 8 --data train.jsonl
    """
    ngrams = parse_ints(ngram_sizes, "--ngram-sizes", "3,2,1") if kind == "lookup" else ()
    added = add_arm_from_options(bundle_dir, kind, draft_len, model_path=model_path, name=name, ngram_sizes=ngrams,
                                 target=target, data=data, max_new_tokens=max_new_tokens)
    bundle, spec = added.bundle, added.spec
    if as_json:
        echo_json({"bundle": display_path(bundle.path), "added": spec, "arms": bundle.arms, "datastore": added.datastore})
    else:
        click.echo(f"added arm {spec['name']} to {display_path(bundle.path)}; arms: {', '.join(bundle.arms)}")
        if added.datastore:
            click.echo(f"datastore: {added.datastore['tokens']} tokens in {added.datastore['documents']} documents")
        click.echo("the pool changed: run `ctxdraft train-policy` again to route over it", err=True)
