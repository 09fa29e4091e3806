"""The pool a bundle routes between: arm specs, the one registry of draft kinds, and building drafts.

An *arm* is a draft with its settings, ``{"name", "kind", "settings"}`` in bundle.json: ``lookup`` with
K = 2 and K = 8 are two arms of one draft. ``DRAFT_KINDS`` maps each kind to the function that builds its
draft from an arm spec; it is filled here, in one place.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable

from ..base import checks
from ..base.datastore import read_datastore
from ..base.errors import CtxdraftError
from ..base.layout import DATASTORE_FILE, SUCCESSORS_FILE
from .draft import Draft
from .drafts import LookupDraft, LookupSettings, ModelDraft, ModelDraftSettings, NoneDraft
from .exit_draft import ExitDraft, ExitSettings, exit_arm
from .exit_head import load_head
from .feature_draft import FeatureDraft, FeatureSettings, feature_arm
from .feature_head import load_feature_head
from .feature_tree import FeatureTreeDraft, FeatureTreeSettings, feature_tree_arm
from .merged_draft import MergedDraft, MergedSettings
from .successor_table import load_successor_table
from .suffix_draft import SuffixDraft, SuffixSettings
from .tree_drafts import LookupTreeDraft, LookupTreeSettings, SuccessorDraft, SuccessorSettings

# Prompt lookup with different draft lengths behaves very differently per prompt (short drafts are cheap
# when matches are rare, long ones pay off on copy-heavy prompts), so each length is its own arm.
BASE_ARMS = [
    {"name": "none", "kind": "none", "settings": {}},
    {"name": "lookup", "kind": "lookup", "settings": {"draft_len": 4, "ngram_sizes": [3, 2, 1]}},
    {"name": "lookup-k2", "kind": "lookup", "settings": {"draft_len": 2, "ngram_sizes": [3, 2, 1]}},
    {"name": "lookup-k8", "kind": "lookup", "settings": {"draft_len": 8, "ngram_sizes": [3, 2, 1]}},
]


def base_arms() -> list[dict]:
    return copy.deepcopy(BASE_ARMS)


def lookup_arm(draft_len: int, ngram_sizes=(3, 2, 1), name: str | None = None) -> dict:
    settings = LookupSettings(draft_len, list(ngram_sizes))  # validates
    return {"name": name or f"lookup-k{draft_len}", "kind": "lookup",
            "settings": {"draft_len": settings.draft_len, "ngram_sizes": list(ngram_sizes)}}


def model_arm(path: str, draft_len: int = 4, name: str | None = None) -> dict:
    """An external draft model: ``path`` is a model directory, a .gguf file or a registered name."""
    if not path:
        raise CtxdraftError("a model arm needs the draft model's path or registered name")
    checks.integer("model draft_len", draft_len, minimum=1)
    return {"name": name or f"model:{Path(path).name}", "kind": "model", "settings": {"path": str(path), "draft_len": draft_len}}


def _nodes_name(max_nodes) -> str:
    return "auto" if max_nodes == "auto" else f"n{max_nodes}"


def lookup_tree_arm(draft_len: int = 5, max_nodes: int | str = 16, ngram_sizes=(3, 2, 1), name: str | None = None) -> dict:
    """Prompt lookup with several earlier matches as the branches of one token tree."""
    settings = LookupTreeSettings(draft_len, max_nodes, list(ngram_sizes))  # validates
    return {"name": name or f"lookup-tree-{_nodes_name(settings.max_nodes)}", "kind": "lookup-tree",
            "settings": {"draft_len": settings.draft_len, "max_nodes": settings.max_nodes, "ngram_sizes": list(ngram_sizes)}}


def successor_arm(draft_len: int = 6, max_nodes: int | str = 16, top_k: int = 4, name: str | None = None) -> dict:
    """A tree from the target's own top-k successors of each token (Token Recycling)."""
    settings = SuccessorSettings(draft_len, max_nodes, top_k)  # validates
    return {"name": name or f"successor-{_nodes_name(settings.max_nodes)}", "kind": "successor",
            "settings": {"draft_len": settings.draft_len, "max_nodes": settings.max_nodes, "top_k": settings.top_k}}


def suffix_arm(draft_len: int = 8, max_nodes: int | str = 16, factor: float = 1.0, offset: float = 1.0,
               min_prob: float = 0.1, name: str | None = None) -> dict:
    """Suffix decoding over the request and the bundle's datastore of earlier outputs."""
    settings = SuffixSettings(draft_len, max_nodes, factor, offset, min_prob)  # validates
    return {"name": name or f"suffix-{_nodes_name(settings.max_nodes)}", "kind": "suffix",
            "settings": {"draft_len": settings.draft_len, "max_nodes": settings.max_nodes, "factor": settings.factor,
                         "offset": settings.offset, "min_prob": settings.min_prob}}


def merged_arm(draft_len: int = 6, max_nodes: int | str = 24, lookup: dict | None = None, successor: dict | None = None,
               feature: dict | None = None, model: dict | None = None, name: str | None = None) -> dict:
    """One tree per step merged from several sources; each given source's settings are those of its own arm
    (lookup: lookup-tree's, successor: successor's, e.g. ``{"table": SUCCESSORS_FILE}``, feature: a feature-tree
    arm's, model: a model arm's ``{"path", "draft_len"}``). No source given: lookup and successor with defaults."""
    given = {"lookup": lookup, "successor": successor, "feature": feature, "model": model}
    sources = {source: dict(settings) for source, settings in given.items() if settings is not None}
    settings = MergedSettings(draft_len, max_nodes, sources or {"lookup": {}, "successor": {}})  # validates
    return {"name": name or f"merged-{_nodes_name(settings.max_nodes)}", "kind": "merged",
            "settings": {"draft_len": settings.draft_len, "max_nodes": settings.max_nodes, "sources": settings.sources}}


def merged_arm_for(arms: list[dict], draft_len: int = 6, max_nodes: int = 24, table: str | None = None,
                   name: str | None = None, sources: list[str] | tuple | None = None) -> dict:
    """The merged arm of a pool: lookup and successor (from ``table`` when given), plus the first feature head of
    ``arms`` (as a tree) and its first draft model, when it has them. ``sources``: only these (each must be
    available; None: every one the pool has)."""
    feature = next((a["settings"] for a in arms if a.get("kind") in ("feature", "feature-tree")), None)
    model = next((a["settings"] for a in arms if a.get("kind") == "model"), None)
    if feature is not None:
        keep = ("name", "layers", "draft_vocab", "weights")
        feature = {key: value for key, value in feature.items() if key in keep}
    given = {"lookup": {}, "successor": {} if table is None else {"table": table}, "feature": feature, "model": model}
    if sources is not None:
        unknown = [source for source in sources if source not in given]
        if unknown or not sources:
            raise CtxdraftError(f"merged sources must be some of {', '.join(given)}, got {','.join(sources) or 'none'}")
        missing = [source for source in sources if given[source] is None]
        if missing:
            needs = {"feature": "a feature head (`ctxdraft add-exits --head feature`)", "model": "a model arm"}
            raise CtxdraftError(f"merged source {missing[0]} needs {needs[missing[0]]} in the bundle")
        given = {source: settings if source in sources else None for source, settings in given.items()}
    return merged_arm(draft_len, max_nodes, name=name, **given)


def none_arm(name: str = "none") -> dict:
    return {"name": name, "kind": "none", "settings": {}}


def _build_none(spec, target, bundle_dir, shared):
    return NoneDraft(spec["name"])


def _build_lookup(spec, target, bundle_dir, shared):
    return LookupDraft(spec["name"], LookupSettings(**spec.get("settings", {})))


def _build_lookup_tree(spec, target, bundle_dir, shared):
    return LookupTreeDraft(spec["name"], LookupTreeSettings(**spec.get("settings", {})))


def _build_successor(spec, target, bundle_dir, shared):
    settings = SuccessorSettings(**spec.get("settings", {}))
    draft = SuccessorDraft(spec["name"], settings)
    if settings.table is not None:
        if not isinstance(settings.table, str) or not settings.table:
            raise CtxdraftError(f"arm {spec['name']!r}: table must name a file in the bundle (e.g. {SUCCESSORS_FILE!r}), "
                                f"got {settings.table!r}")
        if bundle_dir is None:
            raise CtxdraftError(f"arm {spec['name']!r} needs the bundle directory that holds its successor table")
        path = Path(bundle_dir) / settings.table
        key = ("successors", str(path), settings.top_k)
        if key not in shared:
            shared[key] = load_successor_table(path, target.vocab_size, settings.top_k)
        draft.seed = shared[key]  # each generation starts from a copy of it (SuccessorDraft.start)
    return draft


def _build_suffix(spec, target, bundle_dir, shared):
    settings = SuffixSettings(**spec.get("settings", {}))
    store = None
    if settings.use_datastore and bundle_dir is not None:
        path = Path(bundle_dir) / DATASTORE_FILE
        key = ("datastore", str(path))
        if key not in shared:  # every suffix arm of a bundle reads (and records into) one datastore
            shared[key] = read_datastore(path, target.content_hash or None, target.vocab_size)
        store = shared[key]
    return SuffixDraft(spec["name"], settings, store)


def _build_model(spec, target, bundle_dir, shared):
    settings = dict(spec.get("settings", {}))
    path = settings.get("path", "")
    if bundle_dir is not None and not Path(path).is_absolute() and (Path(bundle_dir) / path).exists():
        path = str(Path(bundle_dir) / path)
    key = ("model", str(path))
    if key not in shared:  # arms that differ only in draft length share one loaded draft model
        shared[key] = ModelDraft.load(path, target)
    return ModelDraft(spec["name"], shared[key], ModelDraftSettings(str(path), settings.get("draft_len", 4)))


def _build_exit(spec, target, bundle_dir, shared):
    settings = ExitSettings(**spec.get("settings", {}))
    if bundle_dir is None:
        raise CtxdraftError(f"arm {spec['name']!r} needs the bundle directory that holds its weights")
    if not settings.exit_layer < target.num_layers:
        raise CtxdraftError(f"arm {spec['name']!r}: exit layer {settings.exit_layer} is outside 1..{target.num_layers - 1}")
    head = load_head(target.model, Path(bundle_dir) / settings.weights, settings.exit_layer, settings.head)
    return ExitDraft(spec["name"], head, settings)


# kind -> builder(arm spec, target, bundle directory, shared) -> Draft; ``shared`` holds what several arms can
# share (a loaded draft model) for as long as the caller keeps it.
def _build_feature(spec, target, bundle_dir, shared):
    settings = FeatureSettings(**spec.get("settings", {}))
    return FeatureDraft(spec["name"], _feature_head(spec, settings, target, bundle_dir, shared), settings)


def _feature_head(spec, settings: FeatureSettings, target, bundle_dir, shared):
    if bundle_dir is None:
        raise CtxdraftError(f"arm {spec['name']!r} needs the bundle directory that holds its weights")
    if max(settings.layers) > target.num_layers:
        raise CtxdraftError(f"arm {spec['name']!r}: feature layers {settings.layers} go past the target's {target.num_layers}")
    key = ("feature", settings.name, str(Path(bundle_dir) / settings.weights))
    if key not in shared:  # arms of one head (other draft lengths) share it
        shared[key] = load_feature_head(target.model, Path(bundle_dir) / settings.weights, settings.name, settings.layers)
    return shared[key]


def _build_feature_tree(spec, target, bundle_dir, shared):
    settings = FeatureTreeSettings(**spec.get("settings", {}))
    return FeatureTreeDraft(spec["name"], _feature_head(spec, settings, target, bundle_dir, shared), settings)


# a merged arm's source -> the kind its settings build
MERGED_SOURCE_KINDS = {"lookup": "lookup-tree", "successor": "successor", "feature": "feature-tree", "model": "model"}


def _build_merged(spec, target, bundle_dir, shared):
    settings = MergedSettings(**spec.get("settings", {}))
    sources = {}
    for source in sorted(settings.sources, key=list(MERGED_SOURCE_KINDS).index):
        sub = {"name": f"{spec['name']}/{source}", "kind": MERGED_SOURCE_KINDS[source], "settings": settings.sources[source]}
        sources[source] = DRAFT_KINDS[sub["kind"]](sub, target, bundle_dir, shared)
    return MergedDraft(spec["name"], sources, settings)


DRAFT_KINDS: dict[str, Callable[[dict, object, Path | None, dict], Draft]] = {
    "none": _build_none,
    "lookup": _build_lookup,
    "lookup-tree": _build_lookup_tree,
    "successor": _build_successor,
    "suffix": _build_suffix,
    "model": _build_model,
    "exit": _build_exit,
    "feature": _build_feature,
    "feature-tree": _build_feature_tree,
    "merged": _build_merged,
}


def arm_feature_layers(spec: dict) -> list[int]:
    """The target layers an arm's feature head reads (a feature or feature-tree arm, a merged arm's feature source):
    the prefill keeps them for it."""
    settings = spec.get("settings") or {}
    if spec.get("kind") == "merged":
        settings = (settings.get("sources") or {}).get("feature") or {}
        return list(settings.get("layers", []))
    return list(settings.get("layers", [])) if spec.get("kind") in ("feature", "feature-tree") else []


def arm_table(spec: dict) -> str | None:
    """The bundle file holding the successor table an arm starts from (a successor arm's, a merged arm's successor
    source's), or None."""
    settings = spec.get("settings") or {}
    if spec.get("kind") == "merged":
        settings = (settings.get("sources") or {}).get("successor") or {}
    elif spec.get("kind") != "successor":
        return None
    return settings.get("table")


def cost_key(spec: dict) -> str:
    """What the cost profile measures an arm under: its draft without the settings that leave the cost of one
    draft evaluation alone (draft length, threshold, n-gram sizes)."""
    kind, settings = spec.get("kind"), spec.get("settings") or {}
    if kind == "exit":
        return f"exit@{settings.get('exit_layer')}:{settings.get('head', 'linear')}:{settings.get('draft_vocab') or 'full'}"
    if kind == "model":
        return f"model:{settings.get('path')}"
    if kind in ("feature", "feature-tree"):
        return f"{kind}:{settings.get('name')}:{settings.get('draft_vocab') or 'full'}"
    return str(kind)


def build_draft(spec: dict, target, bundle_dir: Path | None = None, shared: dict | None = None) -> Draft:
    """Instantiate the draft for one arm spec ``{"name", "kind", "settings"}``. ``shared``: a dict the caller keeps
    so that arms of one draft model load it once."""
    kind = spec.get("kind")
    if kind not in DRAFT_KINDS:
        raise CtxdraftError(f"arm {spec.get('name')!r} has unknown kind {kind!r} (known: {', '.join(sorted(DRAFT_KINDS))})")
    try:
        draft = DRAFT_KINDS[kind](spec, target, bundle_dir, {} if shared is None else shared)
    except TypeError as e:
        raise CtxdraftError(f"arm {spec.get('name')!r}: bad settings ({e})") from None
    draft.cost_key = cost_key(spec)
    return draft


def build_drafts(arms: list[dict], target, bundle_dir: Path | None = None, shared: dict | None = None) -> dict[str, Draft]:
    shared = {} if shared is None else shared
    return {spec["name"]: build_draft(spec, target, bundle_dir, shared) for spec in arms}


def with_draft_len(arms: list[dict], draft_len: int | None) -> list[dict]:
    """A copy of ``arms`` with every drafting arm's draft length set to ``draft_len`` (None: unchanged)."""
    arms = copy.deepcopy(arms)
    if draft_len is not None:
        for arm in arms:
            if arm["kind"] != "none":
                arm.setdefault("settings", {})["draft_len"] = draft_len
    return arms


def pool_key(arms: list[dict]) -> str:
    """A short hash of the arms and their settings: rows collected for another pool cannot train this one."""
    return hashlib.sha256(json.dumps(arms, sort_keys=True).encode()).hexdigest()[:12]


__all__ = ["BASE_ARMS", "DRAFT_KINDS", "arm_feature_layers", "arm_table", "base_arms", "build_draft", "build_drafts",
           "cost_key", "exit_arm", "feature_arm", "feature_tree_arm", "lookup_arm", "lookup_tree_arm", "merged_arm",
           "merged_arm_for", "model_arm", "none_arm", "pool_key", "successor_arm", "suffix_arm", "with_draft_len"]
