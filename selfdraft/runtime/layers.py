"""One forward over a layer range of a decoder-only transformers model.

``LayerStack.run(hidden, start, stop, cache, positions)`` runs blocks ``layers[start:stop]`` with the
model's real ``DynamicCache``. Full decoding is ``run(embed(ids), 0, L)``; an early-exit draft runs
``[0, E)`` and verification finishes with ``[E, L)``. Because different layer ranges may have seen
different numbers of tokens, attention masks are sized per layer (``create_causal_mask(layer_idx=...)``)
and positions are always passed explicitly.

Works for models whose blocks live in ``model.model.layers`` (Llama, Qwen2, Mistral, Gemma 3), including
hybrid sliding-window/full-attention stacks (``config.layer_types``).
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .sampling import softcap


class LayerStack:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config
        self.backbone = model.model
        self.layers = self.backbone.layers
        self.num_layers = len(self.layers)
        self.layer_types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * self.num_layers)
        rotary_params = inspect.signature(self.backbone.rotary_emb.forward).parameters
        self._rotary_per_type = "layer_type" in rotary_params
        self.logit_softcap = getattr(self.config, "final_logit_softcapping", None)

    # -- cache ---------------------------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        cache = DynamicCache(config=self.config)
        for layer in cache.layers:
            # Sliding-window layers must remember what they drop so that rejected drafts can be rolled back.
            if hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording()
        return cache

    @staticmethod
    def seq_len(cache: DynamicCache, layer_idx: int) -> int:
        return cache.get_seq_length(layer_idx) if layer_idx < len(cache.layers) else 0

    @staticmethod
    def crop(cache: DynamicCache, length: int, start: int = 0, stop: int | None = None) -> None:
        """Drop every cached token past ``length`` in layers [start, stop)."""
        stop = len(cache.layers) if stop is None else min(stop, len(cache.layers))
        for i in range(start, stop):
            extra = cache.get_seq_length(i) - length
            if extra > 0:
                cache.layers[i].crop(-extra)

    # -- forward -------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        return self.backbone.embed_tokens(input_ids)

    def run(
        self,
        hidden: torch.Tensor,  # [B, T, D]
        start: int,
        stop: int,
        cache: DynamicCache,
        positions: torch.Tensor,  # [T] absolute positions of the T new tokens
        capture: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [B, T, D], the residual stream after layer stop-1 (not normed)
        """``capture``: a dict whose keys are layer counts l in (start, stop]; each gets the residual stream after
        layer l-1 (entering layer l), the states a feature head reads, at no extra cost."""
        position_ids = positions[None, :]
        rotary = {}
        masks = {}
        for i in range(start, stop):
            layer_type = self.layer_types[i]
            if layer_type not in rotary:
                rotary[layer_type] = self.rotary(hidden, position_ids, layer_type)
            mask_key = (layer_type, self.seq_len(cache, i))
            if mask_key not in masks:
                make_mask = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
                masks[mask_key] = make_mask(
                    config=self.config,
                    inputs_embeds=hidden,
                    attention_mask=None,
                    cache=cache,
                    position_ids=position_ids,
                    layer_idx=i,
                )
            hidden = self.layers[i](
                hidden,
                attention_mask=masks[mask_key],
                position_embeddings=rotary[layer_type],
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            if capture is not None and i + 1 in capture:
                capture[i + 1] = hidden
        return hidden

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str = "full_attention"):
        """The model's rotary (cos, sin) for ``position_ids`` [1, T] (per layer type where the model has several)."""
        if self._rotary_per_type:
            return self.backbone.rotary_emb(hidden, position_ids, layer_type)
        return self.backbone.rotary_emb(hidden, position_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, V]
        """The model's own final norm + LM head (+ logit soft-capping where the model has it)."""
        return softcap(self.model.lm_head(self.backbone.norm(hidden)), self.logit_softcap)
