"""ctxdraft's library: targets, the draft pool, the speculative decoding loop, exits, collection, the policy.

    from ctxdraft.selfdraft import load_bundle
    b = load_bundle()                     # the default bundle of the embedded default target
    r = b.generate("...", draft="auto")   # r.text, r.token_ids, r.arm, r.stats

The names below are imported on first use, so that light modules (``errors``, ``features``, ``fileio``)
can be imported without torch: ``ctxdraft.export.router`` routes with onnxruntime alone.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bundle import Bundle, GenerationResult, add_arm, load_bundle
    from .decoding import GenerationConfig, GenerationStats, prefill, speculative_decode
    from .draft import Draft, DraftOutput
    from .drafts import LookupDraft, ModelDraft, NoneDraft
    from .errors import CtxdraftError
    from .layers import LayerStack
    from .target import Target, load_target

_PUBLIC = {
    "Bundle": "bundle", "GenerationResult": "bundle", "add_arm": "bundle", "load_bundle": "bundle",
    "GenerationConfig": "decoding", "GenerationStats": "decoding", "prefill": "decoding",
    "speculative_decode": "decoding", "Draft": "draft", "DraftOutput": "draft", "LookupDraft": "drafts",
    "ModelDraft": "drafts", "NoneDraft": "drafts", "CtxdraftError": "errors", "LayerStack": "layers",
    "Target": "target", "load_target": "target",
}

__all__ = [
    "Bundle", "CtxdraftError", "Draft", "DraftOutput", "GenerationConfig", "GenerationResult", "GenerationStats",
    "LayerStack", "LookupDraft", "ModelDraft", "NoneDraft", "Target", "add_arm", "load_bundle", "load_target",
    "prefill", "speculative_decode",
]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
