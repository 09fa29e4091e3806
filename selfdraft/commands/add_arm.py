"""``ctxdraft add-arm``: an arm spec from the command's options, added to a bundle's pool.

Tree arms: ``lookup-tree``, ``successor`` (Token Recycling's successor table), ``feature-tree`` (the bundle's feature
head as an EAGLE-2 tree) and ``merged`` (one tree per step from lookup, the successor table and the pool's feature head
and draft model). A ``successor`` or ``merged`` arm starts from the bundle's successor table (``SUCCESSORS_FILE``),
seeded from ``--data`` prompts (the target's logits over each prompt and its greedy continuation); a merged arm needs
one, so a bundle without it needs ``--data``. A ``suffix`` arm with ``--data`` fills the bundle's datastore with the
target's greedy continuations of those prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..base import checks
from ..base.data import read_prompts
from ..base.errors import CtxdraftError
from ..base.fileio import atomic_path
from ..base.layout import BUNDLE_FILE, SUCCESSORS_FILE
from ..drafting.feature_tree import FeatureTreeSettings, feature_tree_arm
from ..drafting.pool import lookup_arm, lookup_tree_arm, merged_arm_for, model_arm, none_arm, successor_arm, suffix_arm
from ..drafting.successor_table import build_successor_table, save_successor_table
from ..learning.trajectories import greedy_continuation
from ..serving.bundle import Bundle, add_arm, load_bundle
from ..serving.suffix_store import merge_bundle_datastore

CHAIN_KINDS = ("model", "lookup", "none")
TREE_KINDS = ("lookup-tree", "successor", "feature-tree", "merged", "suffix")
DATA_KINDS = ("successor", "merged", "suffix")  # the kinds --data builds a file for
ARM_KINDS = CHAIN_KINDS + TREE_KINDS


@dataclass
class TreeOptions:
    """The size of a tree arm's tree (``--max-nodes``, ``--top-k``) and where its successor table comes from."""
    max_nodes: int | str = 16  # an integer cap, or "auto" (lookup-tree and successor: the budget from the costs)
    top_k: int = 4  # branching: successors per token, the feature head's children per node
    data: str | None = None  # prompts to seed the successor table or fill the suffix datastore from (None: keep them)
    max_new_tokens: int = 64  # the greedy continuation of each --data prompt (the table learns it, the datastore holds it)
    sources: tuple[str, ...] | None = None  # a merged arm's sources (None: every one the pool has)


def arm_spec(kind: str, draft_len: int, model_path: str | None = None, name: str | None = None,
             ngram_sizes: list[int] | tuple = (3, 2, 1), tree: TreeOptions | None = None, arms: list[dict] = (),
             table: str | None = None) -> dict:
    """The pool entry for ``kind`` (one of ``ARM_KINDS``); a model path that exists is made absolute, so the bundle
    finds it from any working directory. A tree arm's size comes from ``tree``; ``arms`` is the bundle's pool (a
    feature-tree or merged arm takes its feature head from it), ``table`` the successor table file it starts from."""
    if draft_len < 1:
        raise CtxdraftError(f"--draft-len must be >= 1, got {draft_len}")
    tree = tree or TreeOptions()
    if tree.sources is not None and kind != "merged":
        raise CtxdraftError(f"--sources chooses a merged arm's sources, not --kind {kind}'s")
    if kind == "model":
        if not model_path:
            raise CtxdraftError("--kind model needs --path to the draft model")
        path = Path(model_path).expanduser()
        return model_arm(str(path.resolve()) if path.exists() else model_path, draft_len, name)
    if kind == "lookup":
        return lookup_arm(draft_len, ngram_sizes, name)
    if kind == "none":
        return none_arm(name or "none")
    if kind not in TREE_KINDS:
        raise CtxdraftError(f"arm kind must be one of {', '.join(ARM_KINDS)}, got {kind!r}")
    if draft_len > 64:
        raise CtxdraftError(f"--draft-len is a tree's depth here: 1..64, got {draft_len}")
    if kind == "lookup-tree":
        return lookup_tree_arm(draft_len, tree.max_nodes, ngram_sizes, name)
    if kind == "suffix":
        return suffix_arm(draft_len, tree.max_nodes, name=name)
    if kind == "successor":
        spec = successor_arm(draft_len, tree.max_nodes, tree.top_k, name)
        if table is not None:
            spec["settings"]["table"] = table
        return spec
    if kind == "feature-tree":
        if tree.max_nodes == "auto":
            raise CtxdraftError("--kind feature-tree needs an integer --max-nodes (\"auto\" sizes lookup-tree, successor "
                                "and merged trees)")
        head = next((a["settings"] for a in arms if a.get("kind") == "feature"), None)
        if head is None:
            raise CtxdraftError("--kind feature-tree needs a feature head in the bundle (`ctxdraft add-exits --feature`)")
        keep = {key: head[key] for key in ("name", "layers", "draft_vocab", "weights") if key in head}
        return feature_tree_arm(FeatureTreeSettings(**keep, draft_len=draft_len, top_k=tree.top_k,
                                                    max_nodes=tree.max_nodes)) | ({"name": name} if name else {})
    if table is None and "successor" in (tree.sources if tree.sources is not None else ("successor",)):
        raise CtxdraftError(f"--kind merged needs a successor table: the bundle has no {SUCCESSORS_FILE}; "
                            "give --data prompts to seed it from")
    spec = merged_arm_for(arms, draft_len, tree.max_nodes, table=table, name=name, sources=tree.sources)
    for source in ("successor", "feature"):
        if source in spec["settings"]["sources"]:
            spec["settings"]["sources"][source]["top_k"] = tree.top_k
    return spec


def greedy_continuations(bundle: Bundle, rows: list[dict], max_new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the target's greedy continuation of ``max_new_tokens`` tokens) per prompt row, chat-formatted as
    the bundle serves it (and as collect encodes it)."""
    max_new_tokens = checks.integer("--max-new-tokens", max_new_tokens, minimum=0)
    target = bundle.target
    out = []
    for row in rows:
        ids = target.encode(row["prompt"], chat=True)[: target.max_context - max_new_tokens - 1]
        new_ids = greedy_continuation(bundle.stack, ids, max_new_tokens, target.eos_ids).new_ids if max_new_tokens else []
        out.append((ids, new_ids))
    return out


def seed_table(bundle: Bundle, rows: list[dict], top_k: int, max_new_tokens: int):
    """The successor table [V, top_k] from the target's logits over each prompt and its greedy continuation."""
    sequences = [ids + new_ids for ids, new_ids in greedy_continuations(bundle, rows, max_new_tokens)]
    return build_successor_table(bundle.stack, sequences, top_k)


def build_datastore(bundle: Bundle, rows: list[dict], max_new_tokens: int):
    """The target's greedy continuations of ``rows``' prompts merged into the bundle's suffix datastore (with the
    outputs logged since)."""
    return merge_bundle_datastore(bundle, [new_ids for _, new_ids in greedy_continuations(bundle, rows, max_new_tokens)])


@dataclass
class AddedArm:
    bundle: Bundle  # the bundle as saved
    spec: dict  # the arm added
    seeded: bool = False  # whether the successor table was (re)built from --data
    datastore: dict | None = None  # kind suffix with --data: what the datastore holds now


def add_arm_from_options(bundle_dir: str | Path, kind: str, draft_len: int, *, model_path: str | None = None,
                         name: str | None = None, ngram_sizes: list[int] | tuple = (3, 2, 1),
                         target: str | None = None, tree: TreeOptions | None = None) -> AddedArm:
    """What ``ctxdraft add-arm`` does: build the arm (``arm_spec``) and add it to the bundle (created for
    ``target`` when missing); the draft is checked before anything is written (a seeded table that the arm then
    refuses is removed again)."""
    bundle_dir, tree = Path(bundle_dir), tree or TreeOptions()
    exists = (bundle_dir / BUNDLE_FILE).is_file()
    bundle = load_bundle(bundle_dir, target=target) if exists else None
    arms = bundle.info["arms"] if bundle is not None else []
    uses_table = kind in ("successor", "merged")
    if tree.data is not None and kind not in DATA_KINDS:
        raise CtxdraftError(f"--data seeds a successor table (--kind successor, merged) or fills the suffix datastore "
                            f"(--kind suffix), not --kind {kind}")
    rows = read_prompts(tree.data) if tree.data is not None else []  # a bad data file fails before anything is written
    checks.integer("--max-new-tokens", tree.max_new_tokens, minimum=0)
    if tree.data is not None and bundle is None and uses_table:
        raise CtxdraftError(f"--data needs an existing bundle (add a lookup arm first to create {bundle_dir})")
    has_table = (bundle_dir / SUCCESSORS_FILE).is_file()
    table = SUCCESSORS_FILE if uses_table and (has_table or tree.data is not None) else None
    spec = arm_spec(kind, draft_len, model_path, name, ngram_sizes, tree, arms, table)  # bad options: nothing written
    if tree.data is None:
        return AddedArm(add_arm(bundle_dir, spec, target=target), spec)
    if kind == "suffix":
        bundle = add_arm(bundle_dir, spec, target=target)
        store = build_datastore(bundle, rows, tree.max_new_tokens)
        return AddedArm(bundle, spec, datastore={"tokens": store.num_tokens, "documents": len(store.documents()),
                                                 "prompts": len(rows)})
    seeded = seed_table(bundle, rows, tree.top_k, tree.max_new_tokens)
    path = bundle_dir / SUCCESSORS_FILE
    old = path.read_bytes() if has_table else None
    save_successor_table(path, seeded)  # atomic
    try:
        return AddedArm(add_arm(bundle_dir, spec, target=target), spec, seeded=True)
    except CtxdraftError:
        if old is None:
            path.unlink()
        else:
            with atomic_path(path) as tmp:  # the old table back whole, as save_successor_table wrote the new one
                tmp.write_bytes(old)
        raise
