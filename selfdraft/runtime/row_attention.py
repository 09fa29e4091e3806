"""Attention over the rows of a batch cache, each row exactly as it runs alone.

A batched forward pads every row's keys to the longest row (``BatchView.update``). Masked keys add nothing in exact
arithmetic, but a bfloat16 SDPA kernel rounds differently when it sees more keys (its block split changes), and the
rounding, amplified over the layers, flips greedy tokens: measured on SmolLM2-135M, a padded row's logits differ by
~0.3 from the row alone, while float32 agrees to ~3e-5. So the batched forward calls attention once per row on that
row's own queries and keys (``RowSpan``), with the mask the single loop would pass (None where it passes None: the
GQA path of HF's SDPA depends on it); the projections and MLPs still run batched.

``use_row_attention(model)`` registers the wrapper once per base implementation and switches the model to it; a
forward without ``row_spans`` (the single loop) goes straight to the base implementation, unchanged. Only ``sdpa`` is
wrapped (eager attention is model-specific); other implementations keep the padded batched call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROW_SDPA = "ctxdraft_row_sdpa"


@dataclass(frozen=True)
class RowSpan:
    num_queries: int  # the row's real new positions (the rest of the forward's T are padding)
    num_keys: int  # its cached prefix + num_queries
    masked: bool  # False: the row sees all its keys in causal order where the single loop passes no mask
    offset: int | None = None  # a packed forward: where the row's queries start in the one packed sequence


def row_sdpa(module, query, key, value, attention_mask, row_spans: list[RowSpan] | None = None, **kwargs):
    """``sdpa_attention_forward``, per row when ``row_spans`` is given. query [B, H, T, Dh] -> [B, T, H, Dh]
    (a packed forward: query [1, H, N, Dh], every row's queries one after another at its ``offset``; keys and values
    [B, Hkv, W, Dh] per row as the batch cache returns them)."""
    if row_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    B, H, T, Dh = query.shape
    out = query.new_zeros(B, T, H, value.shape[-1])
    for b, span in enumerate(row_spans):
        n, kv = span.num_queries, span.num_keys
        qb, start = (b, 0) if span.offset is None else (0, span.offset)
        mask = attention_mask[b : b + 1, :, :n, :kv] if span.masked and attention_mask is not None else None
        row_out, _ = sdpa_attention_forward(module, query[qb : qb + 1, :, start : start + n], key[b : b + 1, :, :kv],
                                            value[b : b + 1, :, :kv], mask, **kwargs)
        out[qb, start : start + n] = row_out[0]
    return out, None


def use_row_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` (an ``sdpa`` model) to ``row_sdpa``; returns whether its batched forwards now run per row."""
    name = model.config._attn_implementation
    if name == ROW_SDPA:
        return True
    if name != "sdpa":
        return False
    AttentionInterface.register(ROW_SDPA, row_sdpa)
    AttentionMaskInterface.register(ROW_SDPA, sdpa_mask)
    model.config._attn_implementation = ROW_SDPA
    # Some blocks keep a reference to their own config object. An exit head's one-layer stack is a namespace
    # around the target's layer, not a module: walk its layers.
    subs = model.modules() if isinstance(model, torch.nn.Module) else (m for layer in model.model.layers for m in layer.modules())
    for sub in subs:
        config = getattr(sub, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = ROW_SDPA
    return True
