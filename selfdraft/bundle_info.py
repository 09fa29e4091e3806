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

import importlib.metadata

from .errors import CtxdraftError
from .pool import base_arms

BUNDLE_FORMAT = "ctxdraft-bundle"
BUNDLE_VERSION = 1


def versions() -> dict:
    def v(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: v(name) for name in ("ctxdraft", "torch", "transformers")}


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


def validate_info(info, where: str) -> dict:
    """The one check of a bundle.json's content, applied on every read."""
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT or not isinstance(info.get("arms"), list) \
            or not isinstance(info.get("target"), dict):
        raise CtxdraftError(f"{where} is not a ctxdraft bundle (missing format/target/arms)")
    if info.get("version", 0) > BUNDLE_VERSION:
        raise CtxdraftError(f"{where} has format version {info['version']}; this ctxdraft reads up to {BUNDLE_VERSION}")
    names = [a.get("name") if isinstance(a, dict) else None for a in info["arms"]]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise CtxdraftError(f"{where}: arm names must be unique non-empty strings, got {names}")
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
