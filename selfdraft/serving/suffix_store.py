"""The bundle's suffix datastore as served traffic grows it: after each logged request the output joins the
datastore in memory (the next request matches it) and is appended to ``datastore.log.jsonl`` (``base/datastore.py``)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..base.datastore import SuffixStore, append_document, merge_datastore
from ..base.errors import CtxdraftError
from ..base.fileio import display_path
from ..base.layout import DATASTORE_FILE
from ..drafting.suffix_draft import SuffixDraft

log = logging.getLogger(__name__)


def datastore_path(bundle) -> Path | None:
    return Path(bundle.path) / DATASTORE_FILE if bundle.path is not None else None


def suffix_arms(info: dict) -> list[str]:
    return [a["name"] for a in info["arms"] if a["kind"] == "suffix" and (a.get("settings") or {}).get("use_datastore", True)]


def record_output(bundle, new_ids: list[int]) -> bool:
    """Add one served output to the datastore of every suffix arm (one shared store per bundle). False: the bundle
    has no suffix arm with a datastore, or the update was skipped (a warning: the request's answer is not lost for a
    full disk or a datastore that became unreadable)."""
    path = datastore_path(bundle)
    if path is None or not new_ids:
        return False
    stores: dict[int, SuffixStore] = {}
    try:
        for name in suffix_arms(bundle.info):
            draft = bundle.draft(name)
            if isinstance(draft, SuffixDraft) and draft.store is not None:
                stores[id(draft.store)] = draft.store
    except CtxdraftError as e:
        log.warning("the output is not added to the datastore %s: %s", display_path(path), e)
        return False
    for store in stores.values():
        store.add(new_ids)
    return bool(stores) and append_document(path, new_ids, next(iter(stores.values())).log_id)


def merge_bundle_datastore(bundle, documents=(), max_tokens: int | None = None) -> SuffixStore:
    """Fold the bundle's datastore log (and ``documents``) into its sealed datastore file."""
    path = datastore_path(bundle)
    target = bundle.target
    return merge_datastore(path, target.content_hash or None, target.vocab_size, documents, max_tokens)
