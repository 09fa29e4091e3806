"""bundle.json: its one schema, a new bundle's content, and what commands record in it.

What the file holds (the other files of a bundle are named in ``layout.py``)::

    {"format": "ctxdraft-bundle", "version": 1,
     "target": {"spec": "smollm2-135m-instruct", "name": "...", "hash": "<content hash>"},
     "arms": [{"name": "none", "kind": "none", "settings": {}}, {"name": "lookup", "kind": "lookup", ...}],
     "default_arm": "lookup",
     "exits": [...], "features": {...}, "policy": "policy.onnx" | null, "policy_model": {...},
     "cost_profile": {...}, "trained_on": {"add-exits": [ids], "train-policy": [ids]}, "versions": {...}}
"""
from __future__ import annotations

import hashlib

from ..base.errors import CtxdraftError
from ..base.fileio import hash_file_into
from ..base.layout import BUNDLE_FILE, EXITS_FILE, NAMED_BY_FIELD, TRAJECTORIES_FILE
from ..base.versions import versions
from ..drafting.pool import base_arms

BUNDLE_FORMAT = "ctxdraft-bundle"
BUNDLE_VERSION = 1


def new_bundle_info(target, spec: str) -> dict:
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "target": {"spec": spec, "name": target.name, "hash": target.content_hash},
        "arms": base_arms(),
        "default_arm": "lookup",
        "exits": [],
        "features": None,
        "policy": None,
        "cost_profile": None,
        "versions": versions(),
    }


_INT = {"type": "integer"}
_POS_INT = {"type": "integer", "minimum": 1}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_NAME = {"type": "string", "minLength": 1}
# A file field names the one fixed file of that field (layout.NAMED_BY_FIELD): a crafted name cannot make a
# command read or overwrite another file of the bundle, or one outside it.
_EXITS = {"const": NAMED_BY_FIELD["arms[].settings.weights"]}
_SUCCESSORS = {"const": NAMED_BY_FIELD["arms[].settings.table"]}
_POLICY = {"const": NAMED_BY_FIELD["policy"]}
_POLICY_WEIGHTS = {"const": NAMED_BY_FIELD["policy_model.weights"]}

# A token tree's size: the deepest node, and the node cap or "auto" (the budget from the machine's costs; tree_budget.py).
_TREE_SIZE = {"draft_len": {"type": "integer", "minimum": 1, "maximum": 64},
              "max_nodes": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 1024}, {"const": "auto"}]}}
# Tree settings any tree arm may carry (the feature head's expansion, the merged arm): checked by the arm's builder.
_TOP_K = {"type": "integer", "minimum": 1, "maximum": 64}
_TREE = {"type": "object", "properties": {**_TREE_SIZE, "top_k": _TOP_K}}
_MAX_NODES = {"type": "integer", "minimum": 1, "maximum": 1024}  # the feature head's tree: its size is not "auto" yet

ARM_SETTINGS = {
    "none": {"type": "object", "additionalProperties": False, "properties": {}},
    "lookup": {"type": "object", "additionalProperties": False,
               "properties": {"draft_len": _POS_INT, "ngram_sizes": {"type": "array", "minItems": 1, "items": _POS_INT}}},
    "lookup-tree": {"type": "object", "additionalProperties": False,
                    "properties": {**_TREE_SIZE, "ngram_sizes": {"type": "array", "minItems": 1, "items": _POS_INT}}},
    "successor": {"type": "object", "additionalProperties": False,
                  "properties": {**_TREE_SIZE, "top_k": _TOP_K, "table": _SUCCESSORS}},
    "suffix": {"type": "object", "additionalProperties": False,
               "properties": {**_TREE_SIZE, "factor": {"type": "number", "minimum": 0, "maximum": 64},
                              "offset": {"type": "number", "minimum": -64, "maximum": 64},
                              "min_prob": {"type": "number", "minimum": 0, "maximum": 1},
                              "max_match": {"type": "integer", "minimum": 1, "maximum": 256},
                              "use_datastore": {"type": "boolean"}}},
    "model": {"type": "object", "additionalProperties": False, "required": ["path"],
              "properties": {"path": _NAME, "draft_len": _POS_INT}},
    "exit": {"type": "object", "additionalProperties": False, "required": ["exit_layer"],
             "properties": {"exit_layer": _POS_INT, "draft_len": _POS_INT,
                            "threshold": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                            "head": {"enum": ["linear", "layer"]}, "draft_vocab": {"type": ["integer", "null"], "minimum": 1},
                            "weights": _EXITS}},
    "feature": {"type": "object", "additionalProperties": False, "required": ["name", "layers"],
                "properties": {"name": _NAME, "layers": {"type": "array", "minItems": 1, "items": _POS_INT},
                               "draft_len": _POS_INT, "threshold": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                               "draft_vocab": {"type": ["integer", "null"], "minimum": 1}, "weights": _EXITS,
                               "tree": _TREE}},
}
# The feature head's EAGLE-2 tree: the feature arm's settings with the tree's size (feature_tree.py).
ARM_SETTINGS["feature-tree"] = {
    "type": "object", "additionalProperties": False, "required": ["name", "layers"],
    "properties": {**{k: v for k, v in ARM_SETTINGS["feature"]["properties"].items() if k != "tree"},
                   "draft_len": _TREE_SIZE["draft_len"], "max_nodes": _MAX_NODES, "top_k": _TOP_K}}
# One tree per step from several sources, each with its own arm's settings (merged_draft.py).
_MERGED_SOURCES = {"lookup": "lookup-tree", "successor": "successor", "feature": "feature-tree", "model": "model"}
ARM_SETTINGS["merged"] = {
    "type": "object", "additionalProperties": False,
    "properties": {**_TREE_SIZE,
                   "sources": {"type": "object", "minProperties": 1, "additionalProperties": False,
                               "properties": {source: ARM_SETTINGS[kind] for source, kind in _MERGED_SOURCES.items()}}}}

# The one declared schema of bundle.json (JSON Schema, checked with the jsonschema library on every read).
SCHEMA = {
    "type": "object",
    "required": ["format", "version", "target", "arms"],
    "properties": {
        "format": {"const": "ctxdraft-bundle"},
        "version": {"type": "integer", "minimum": 1},
        "target": {"type": "object", "required": ["spec"],
                   "properties": {"spec": _NAME, "name": {"type": ["string", "null"]}, "hash": {"type": ["string", "null"]}}},
        "arms": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "kind"],
            "properties": {"name": _NAME, "kind": {"enum": sorted(ARM_SETTINGS)}, "settings": {"type": "object"}},
            "allOf": [{"if": {"properties": {"kind": {"const": kind}}}, "then": {"properties": {"settings": schema}}}
                      for kind, schema in ARM_SETTINGS.items()]}},
        "default_arm": {"type": ["string", "null"]},
        "exits": {"type": ["array", "null"], "items": {"type": "object", "required": ["layer"], "properties": {
            "layer": _POS_INT, "arm": _STR, "head": {"enum": ["linear", "layer"]}, "draft_vocab": {"type": ["integer", "null"]},
            "agreement": {"type": ["number", "null"]}, "speedup": {"type": ["number", "null"]},
            "draft_len": _POS_INT, "threshold": _NUM}}},
        "feature_heads": {"type": ["array", "null"], "items": {"type": "object", "required": ["name", "layers"], "properties": {
            "name": _NAME, "layers": {"type": "array", "items": _POS_INT}, "draft_vocab": {"type": ["integer", "null"]},
            "speedup": {"type": ["number", "null"]}}}},
        "features": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["kind"], "properties": {
            "kind": {"enum": ["hidden", "tokens"]}, "layer": {"type": ["integer", "null"], "minimum": 1},
            "dim": {"type": ["integer", "null"], "minimum": 1}}}]},
        "policy": {"anyOf": [{"type": "null"}, _POLICY]},
        "policy_model": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["feature_kind", "arms", "config"], "properties": {
            "weights": _POLICY_WEIGHTS, "feature_kind": {"enum": ["hidden", "tokens"]}, "feature_dim": {"type": ["integer", "null"], "minimum": 1},
            "layer": {"type": ["integer", "null"], "minimum": 1}, "arms": {"type": "array", "items": _NAME},
            "config": {"type": "object"}}}]},
        "cost_profile": {"type": ["object", "null"]},
        "trained_on": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": ["string", "integer"]}}},
        "versions": {"type": ["object", "null"]},
    },
}


def _where(error) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def validate_info(info, where: str) -> dict:
    """The one check of a bundle.json's content (``SCHEMA``, then what a schema cannot say), applied on every
    read. A failure is one CtxdraftError naming the field."""
    import jsonschema

    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        raise CtxdraftError(f"{where} is not a ctxdraft bundle (no \"format\": \"{BUNDLE_FORMAT}\")")
    if isinstance(info.get("version"), int) and not isinstance(info["version"], bool) and info["version"] > BUNDLE_VERSION:
        raise CtxdraftError(f"{where} has format version {info['version']}; this ctxdraft reads up to {BUNDLE_VERSION}")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(info))
    if error is not None:
        if error.validator == "const" or (error.validator == "anyOf" and isinstance(error.instance, str)):
            fixed = error.validator_value if error.validator == "const" else NAMED_BY_FIELD["policy"]
            message = (f"{error.instance!r} must be a file inside the bundle directory, and this field names only "
                       f"{fixed!r} (a bundle's files have fixed names)")
        elif error.validator == "anyOf":
            message = f"{error.instance!r} is neither null nor what the field holds"
        else:
            message = error.message if len(error.message) < 160 else error.message[:157] + "..."
        raise CtxdraftError(f"{where}: {_where(error)}: {message}; fix the file or rebuild the bundle")
    names = [a["name"] for a in info["arms"]]
    if len(set(names)) != len(names):
        raise CtxdraftError(f"{where}: arm names must be unique, got {names}")
    if info.get("default_arm") is not None and info["default_arm"] not in names:
        raise CtxdraftError(f"{where}: default_arm {info['default_arm']!r} is not one of the arms {names}")
    model = info.get("policy_model") or {}
    missing = [a for a in model.get("arms", []) if a not in names]
    if missing and info.get("policy"):
        raise CtxdraftError(f"{where}: policy_model.arms names arms the bundle does not have: {missing}")
    return info


def record_training_ids(info: dict, command: str, ids: list) -> None:
    """Remember which prompt ids ``command`` trained on, so that ``bench --split eval`` can leave them out."""
    info.setdefault("trained_on", {})[command] = list(ids)


def trained_ids(info: dict) -> set[str] | None:
    """Every prompt id any part of the bundle trained on (as strings), or None when nothing is recorded."""
    recorded = info.get("trained_on") or {}
    if not recorded:
        return None
    return {str(i) for ids in recorded.values() for i in ids}


def bundle_hash(bundle_or_path) -> str:
    """A content hash of what a calibration depends on: bundle.json, the exit weights and the trajectories (of a
    Bundle, or of a bundle directory)."""
    root = getattr(bundle_or_path, "path", bundle_or_path)
    h = hashlib.sha256()
    for name in (BUNDLE_FILE, EXITS_FILE, TRAJECTORIES_FILE):
        path = root / name
        h.update(name.encode())
        if path.is_file():
            hash_file_into(h, path)
    return h.hexdigest()[:16]
