"""ctxdraft's library: targets, the draft pool, the speculative decoding loop, exits, collection, the policy.

    from ctxdraft.selfdraft import load_bundle
    b = load_bundle()                     # the default bundle of the embedded default target
    r = b.generate("...", draft="auto")   # r.text, r.token_ids, r.arm, r.stats
"""
from .bundle import Bundle, GenerationResult, add_arm, load_bundle
from .decoding import GenerationConfig, GenerationStats, prefill, speculative_decode
from .drafts import Draft, DraftOutput, LookupDraft, ModelDraft, NoneDraft
from .errors import CtxdraftError
from .layers import LayerStack
from .target import Target, load_target

__all__ = [
    "Bundle",
    "CtxdraftError",
    "Draft",
    "DraftOutput",
    "GenerationConfig",
    "GenerationResult",
    "GenerationStats",
    "LayerStack",
    "LookupDraft",
    "ModelDraft",
    "NoneDraft",
    "Target",
    "add_arm",
    "load_bundle",
    "load_target",
    "prefill",
    "speculative_decode",
]
