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
    from .base.errors import CtxdraftError
    from .drafting.decoding import GenerationConfig, GenerationStats, prefill, speculative_decode
    from .drafting.draft import Draft, DraftOutput
    from .drafting.drafts import LookupDraft, ModelDraft, NoneDraft
    from .runtime.layers import LayerStack
    from .runtime.target import Target, load_target
    from .serving.bundle import Bundle, GenerationResult, add_arm, load_bundle

_PUBLIC = {
    "Bundle": "serving.bundle", "GenerationResult": "serving.bundle", "add_arm": "serving.bundle", "load_bundle": "serving.bundle",
    "GenerationConfig": "drafting.decoding", "GenerationStats": "drafting.decoding", "prefill": "drafting.decoding",
    "speculative_decode": "drafting.decoding", "Draft": "drafting.draft", "DraftOutput": "drafting.draft", "LookupDraft": "drafting.drafts",
    "ModelDraft": "drafting.drafts", "NoneDraft": "drafting.drafts", "CtxdraftError": "base.errors", "LayerStack": "runtime.layers",
    "Target": "runtime.target", "load_target": "runtime.target",
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
