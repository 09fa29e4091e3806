"""`ctxdraft add-arm`: put a draft model, a prompt-lookup variant or a token-tree arm into a bundle's pool."""
from __future__ import annotations

import click

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.fileio import display_path
from ctxdraft.selfdraft.commands.add_arm import ARM_KINDS, TreeOptions, add_arm_from_options

from .common import echo_json, parse_ints, parse_names


def _max_nodes(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise CtxdraftError(f"--max-nodes must be an integer in 1..1024 or auto, got {value!r}") from None


@click.command("add-arm")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--kind", type=click.Choice(list(ARM_KINDS)), required=True,
              help="model: an external draft model; lookup: n-gram prompt lookup; lookup-tree, successor, feature-tree, "
                   "merged, suffix: token trees verified in one forward (lookup matches; the target's successor table; "
                   "the feature head's EAGLE-2 tree; all of them at once; suffix decoding over the request and a "
                   "datastore of earlier outputs).")
@click.option("--path", "model_path", help="kind=model: the draft model (HF directory, .gguf or registered name) with the target's tokenizer.")
@click.option("--name", help="Arm name (default: model:<dir name>, lookup-k<K>, <kind>-n<max nodes>).")
@click.option("--draft-len", type=int, default=4, show_default=True, help="Tokens drafted per step (a tree: its depth, 1..64).")
@click.option("--ngram-sizes", default="3,2,1", show_default=True, help="kind=lookup / lookup-tree: n-gram sizes tried, longest first.")
@click.option("--max-nodes", default="16", show_default=True, help="Tree kinds: nodes verified per step, 1..1024 (lookup-tree, successor, merged: or auto, from the machine's costs).")
@click.option("--top-k", type=int, default=4, show_default=True, help="Tree kinds: branching (successors kept per token, the feature head's children per node), 1..64, at most --max-nodes.")
@click.option("--data", type=click.Path(dir_okay=False), help="kind=successor / merged: JSONL prompts to seed the bundle's successor table from (needed by merged when the bundle has none); kind=suffix: prompts whose greedy continuations fill the datastore.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="With --data: greedy tokens per prompt (the successor table learns them, the suffix datastore holds them).")
@click.option("--sources", help="kind=merged: the sources merged, comma-separated, from lookup,successor,feature,model "
                                 "(default: lookup, successor and whichever of the pool's feature head and draft model "
                                 "it has).")
@click.option("--target", help="Target spec when the bundle does not exist yet (default: the embedded default model).")
@click.option("--json", "as_json", is_flag=True)
def add_arm_cmd(bundle_dir, kind, model_path, name, draft_len, ngram_sizes, max_nodes, top_k, data, max_new_tokens, sources,
                target, as_json):
    """Add an arm to a bundle (created if missing); the draft is checked before anything is written.

    \b
    Examples:
      ctxdraft add-arm my_bundle --kind model --path ./smol-draft --draft-len 4
      ctxdraft add-arm my_bundle --kind lookup --draft-len 6 --ngram-sizes 4,3,2
      ctxdraft add-arm new_bundle --target ./my-llama --kind lookup --draft-len 3
      ctxdraft add-arm my_bundle --kind merged --draft-len 6 --max-nodes 24 --data train.jsonl
      ctxdraft add-arm my_bundle --kind merged --name merged-ls --max-nodes 12 --sources lookup,successor
      ctxdraft add-arm my_bundle --kind feature-tree --draft-len 5 --max-nodes 16 --top-k 4
      ctxdraft add-arm my_bundle --kind suffix --draft-len 8 --data train.jsonl --max-new-tokens 128
    """
    ngrams = parse_ints(ngram_sizes, "--ngram-sizes", "3,2,1") if kind in ("lookup", "lookup-tree") else ()
    chosen = tuple(parse_names(sources, "--sources", "lookup,successor")) if sources is not None else None
    tree = TreeOptions(_max_nodes(max_nodes), top_k, data, max_new_tokens, chosen)
    added = add_arm_from_options(bundle_dir, kind, draft_len, model_path=model_path, name=name, ngram_sizes=ngrams,
                                 target=target, tree=tree)
    bundle, spec = added.bundle, added.spec
    if as_json:
        echo_json({"bundle": display_path(bundle.path), "added": spec, "arms": bundle.arms, "seeded_table": added.seeded,
                   "datastore": added.datastore})
    else:
        seeded = " (successor table seeded from --data)" if added.seeded else ""
        click.echo(f"added arm {spec['name']} to {display_path(bundle.path)}{seeded}; arms: {', '.join(bundle.arms)}")
        if added.datastore:
            click.echo(f"datastore: {added.datastore['tokens']} tokens in {added.datastore['documents']} documents")
        click.echo("the pool changed: run `ctxdraft train-policy` again to route over it", err=True)
