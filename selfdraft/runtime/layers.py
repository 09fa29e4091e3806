"""One forward over a layer range of a decoder-only transformers model.

``LayerStack.run(hidden, start, stop, cache, positions)`` runs blocks ``layers[start:stop]`` with the
model's real ``DynamicCache``. Full decoding is ``run(embed(ids), 0, L)``; an early-exit draft runs
``[0, E)`` and verification finishes with ``[E, L)``. Because different layer ranges may have seen
different numbers of tokens, attention masks are sized per layer (``create_causal_mask(layer_idx=...)``)
and positions are always passed explicitly.

A *token tree* (SpecInfer, Miao et al. 2024) is verified in one forward: ``run(..., tree=parents)`` where
``parents[t]`` is the index, among the T new positions, of position t's parent (-1: it hangs off the cached prefix).
Each new position sees the whole cached prefix (within a sliding layer's window), its ancestors and itself; its
position is prefix length + depth (``tree_positions``). After verification ``keep_rows`` moves the accepted path's
K/V rows into place and crops the rest.

Works for models whose blocks live in ``model.model.layers`` (Llama, Qwen2, Mistral, Gemma 3), including
hybrid sliding-window/full-attention stacks (``config.layer_types``).
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .batch_cache import BatchView, chain_ancestors
from .row_attention import RowSpan, use_row_attention
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
        self.row_attention = use_row_attention(model)  # batched forwards attend per row (``row_attention.py``)

    # -- cache ---------------------------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        cache = DynamicCache(config=self.config)
        for layer in cache.layers:
            # Sliding-window layers must remember what they drop so that rejected drafts can be rolled back.
            if hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording()
        return cache

    @staticmethod
    def seq_len(cache: DynamicCache | BatchView, layer_idx: int) -> int:
        if isinstance(cache, BatchView):
            return cache.seq_len(layer_idx)
        return cache.get_seq_length(layer_idx) if layer_idx < len(cache.layers) else 0

    @staticmethod
    def crop(cache: DynamicCache | BatchView, length: int, start: int = 0, stop: int | None = None) -> None:
        """Drop every cached token past ``length`` in layers [start, stop)."""
        if isinstance(cache, BatchView):
            return cache.crop(length, start, stop)
        stop = len(cache.layers) if stop is None else min(stop, len(cache.layers))
        for i in range(start, stop):
            extra = cache.get_seq_length(i) - length
            if extra > 0:
                cache.layers[i].crop(-extra)

    @staticmethod
    def keep_rows(cache: DynamicCache, prefix_len: int, rows: list[int], start: int = 0, stop: int | None = None) -> None:
        """Keep, after the first ``prefix_len`` cached tokens, only the new rows ``rows`` (offsets past prefix_len, in
        order) of layers [start, stop), moved into place: the accepted path of a tree forward. ``crop`` does the rest."""
        if isinstance(cache, BatchView):
            return cache.keep_rows(prefix_len, rows, start, stop)
        stop = len(cache.layers) if stop is None else min(stop, len(cache.layers))
        if rows != list(range(len(rows))):
            for i in range(start, stop):
                layer = cache.layers[i]
                if not layer.is_initialized or layer.get_seq_length() <= prefix_len:
                    continue
                # A sliding layer's tensors start past position 0 (its cumulative length counts what it dropped).
                first = prefix_len - (layer.get_seq_length() - layer.keys.shape[-2])
                src = torch.tensor(rows, device=layer.keys.device) + first
                dst = torch.arange(first, first + len(rows), device=layer.keys.device)
                layer.keys.index_copy_(-2, dst, layer.keys.index_select(-2, src))
                layer.values.index_copy_(-2, dst, layer.values.index_select(-2, src))
        LayerStack.crop(cache, prefix_len + len(rows), start, stop)

    @staticmethod
    def tree_positions(parents: list[int], start_pos: int) -> torch.Tensor:  # [T]
        """Position of each new tree position: ``start_pos`` + its depth (a root at depth 0)."""
        depths: list[int] = []
        for parent in parents:
            depths.append(0 if parent < 0 else depths[parent] + 1)
        return torch.tensor(depths) + start_pos

    # -- forward -------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        return self.backbone.embed_tokens(input_ids)

    def run(
        self,
        hidden: torch.Tensor,  # [B, T, D]
        start: int,
        stop: int,
        cache: DynamicCache,
        positions: torch.Tensor,  # [T] absolute positions of the T new tokens ([B, T] with a BatchView)
        capture: dict[int, torch.Tensor] | None = None,
        tree: list[int] | torch.Tensor | None = None,
        num_new: list[int] | None = None,
    ) -> torch.Tensor:  # [B, T, D], the residual stream after layer stop-1 (not normed)
        """``cache``: a ``DynamicCache``, or a ``BatchView`` of a batch cache (rows of different lengths: positions are
        then per row, [B, T] or [T] for all, and ``tree`` may be per-row ancestors [B, T, T], see ``batch_cache``).
        ``capture``: a dict whose keys are layer counts l in (start, stop]; each gets the residual stream after
        layer l-1 (entering layer l), the states a feature head reads, at no extra cost. ``tree``: the parent of each
        new position (see the module docstring; ``positions`` must then be ``tree_positions(tree, prefix length)``);
        None is the causal chain. ``num_new``: a batch's real new positions per row (the rest of T is padding)."""
        if isinstance(cache, BatchView):
            if self.row_attention and num_new is not None and hidden.shape[0] > 1 and cache.packed is None:
                return self._run_packed(hidden, start, stop, cache, positions, capture, tree, num_new)
            return self._run_batch(hidden, start, stop, cache, positions, capture, tree, num_new)
        position_ids = positions[None, :]
        ancestors = _ancestors(tree, hidden.device) if tree is not None else None
        rotary = {}
        masks = {}
        for i in range(start, stop):
            layer_type = self.layer_types[i]
            if layer_type not in rotary:
                rotary[layer_type] = self.rotary(hidden, position_ids, layer_type)
            mask_key = (layer_type, self.seq_len(cache, i))
            if mask_key not in masks and ancestors is not None:
                masks[mask_key] = self.tree_mask(hidden, cache, i, positions, ancestors)
            elif mask_key not in masks:
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

    def _run_batch(self, hidden, start, stop, cache: BatchView, positions, capture, tree, num_new,
                   packed: "_PackedSpans | None" = None, row_positions: torch.Tensor | None = None) -> torch.Tensor:
        """``run`` over a batch cache: each row writes at its own length and has its own mask (``attention_mask``);
        with row attention each row attends to its own keys only, as it would alone (``row_attention.py``).
        ``packed``: the rows come packed into one sequence (``_run_packed``); ``row_positions`` [B, T] padded."""
        B, T, _ = hidden.shape
        num_new = [T] * B if num_new is None else num_new
        position_ids = (positions if positions.dim() == 2 else positions[None, :]).expand(B, T).to(hidden.device)
        if packed is not None:  # masks and spans are per row: sized by the padded rows
            B, T = row_positions.shape
        if tree is None:
            ancestors = chain_ancestors(B, T)
        elif isinstance(tree, torch.Tensor):
            ancestors = tree
        else:
            ancestors = _ancestors(tree, torch.device("cpu"))[None].expand(B, T, T)
        ancestors = ancestors.to(hidden.device)
        additive = self.config._attn_implementation == "eager"
        causal = chain_ancestors(1, T)[0]
        is_chain = [tree is None or bool((ancestors[b, :n, :n] == causal[:n, :n]).all()) for b, n in enumerate(num_new)]
        rotary, masks, spans = {}, {}, {}
        for i in range(start, stop):
            layer_type = self.layer_types[i]
            if layer_type not in rotary:
                rotary[layer_type] = self.rotary(hidden, position_ids, layer_type)
            prefix = tuple(cache.lengths(i).tolist())
            mask_key = (layer_type, prefix)
            if mask_key not in masks:
                window = self.config.sliding_window if layer_type == "sliding_attention" else None
                spans[mask_key] = [RowSpan(n, p + n, not _unmasked(n, p, chain, window),
                                           None if packed is None else packed.offsets[b])
                                   for b, (n, p, chain) in enumerate(zip(num_new, prefix, is_chain))]
                masks[mask_key] = None  # row attention of rows that all attend unmasked (decode steps): no mask
                if not self.row_attention or any(span.masked for span in spans[mask_key]):
                    mask_positions = position_ids if packed is None else row_positions.to(hidden.device)
                    masks[mask_key] = cache.attention_mask(i, mask_positions, ancestors, window, hidden.dtype, additive)
            rows = {"row_spans": spans[mask_key]} if self.row_attention else {}
            hidden = self.layers[i](hidden, attention_mask=masks[mask_key], position_embeddings=rotary[layer_type],
                                    position_ids=position_ids, cache=cache, use_cache=True, **rows)
            if capture is not None and i + 1 in capture:
                capture[i + 1] = hidden
        return hidden

    def _run_packed(self, hidden, start, stop, cache: BatchView, positions, capture, tree, num_new) -> torch.Tensor:
        """``_run_batch`` with the rows' real positions packed into one sequence [1, N, D] (N = sum(num_new)): the
        projections and MLPs compute no padding (a batch of drafts of different lengths pads every row to the
        longest), attention runs per row at its offset. Returns [B, T, D] again (padding zero)."""
        B, T, D = hidden.shape
        position_ids = (positions if positions.dim() == 2 else positions[None, :]).expand(B, T)
        real = torch.arange(T)[None, :] < torch.tensor(num_new)[:, None]  # [B, T]
        packed_capture = dict.fromkeys(capture) if capture is not None else None
        spans = _PackedSpans(num_new)
        out = self._run_batch(hidden[real][None], start, stop, cache.packed_view(num_new), position_ids[real][None],
                              packed_capture, tree, num_new, spans, position_ids)
        for layer, states in (packed_capture or {}).items():
            capture[layer] = hidden.new_zeros(B, T, D).index_put_((real,), states[0])
        return hidden.new_zeros(B, T, D).index_put_((real,), out[0])

    def tree_mask(self, hidden: torch.Tensor, cache: DynamicCache, layer_idx: int, positions: torch.Tensor,
                  ancestors: torch.Tensor) -> torch.Tensor:  # [B, 1, T, kv_len]
        """Layer ``layer_idx``'s attention mask for a tree forward, sized like ``create_causal_mask``'s (the keys the
        cache layer returns: a sliding layer returns only its window), in the format of the model's attention."""
        B, T, _ = hidden.shape
        prefix_len = self.seq_len(cache, layer_idx)
        if layer_idx < len(cache.layers):
            kv_len, kv_offset = cache.layers[layer_idx].get_mask_sizes(T)
        else:
            kv_len, kv_offset = prefix_len + T, 0
        key_pos = torch.arange(kv_offset, kv_offset + kv_len, device=hidden.device)  # [kv_len] slots: prefix, then nodes
        is_prefix = key_pos < prefix_len
        allowed = is_prefix[None, :].expand(T, kv_len).clone()  # [T, kv_len]
        allowed[:, ~is_prefix] = ancestors[:, key_pos[~is_prefix] - prefix_len]
        if self.layer_types[layer_idx] == "sliding_attention":
            window = self.config.sliding_window
            query_pos = positions.to(hidden.device)  # prefix length + depth
            key_abs = torch.where(is_prefix, key_pos, query_pos[(key_pos - prefix_len).clamp(0, T - 1)])  # a node: its depth
            allowed &= (query_pos[:, None] - key_abs[None, :]) < window
        mask = allowed[None, None].expand(B, 1, T, kv_len)
        if self.config._attn_implementation == "eager":  # eager attention adds the mask to its scores
            zero, floor = torch.zeros((), dtype=hidden.dtype), torch.finfo(hidden.dtype).min
            return torch.where(mask, zero.to(hidden.device), floor)
        return mask

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str = "full_attention"):
        """The model's rotary (cos, sin) for ``position_ids`` [1, T] (per layer type where the model has several)."""
        if self._rotary_per_type:
            return self.backbone.rotary_emb(hidden, position_ids, layer_type)
        return self.backbone.rotary_emb(hidden, position_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, V]
        """The model's own final norm + LM head (+ logit soft-capping where the model has it)."""
        return softcap(self.model.lm_head(self.backbone.norm(hidden)), self.logit_softcap)


class _PackedSpans:
    """Where each row's positions start in a packed forward."""

    def __init__(self, num_new: list[int]):
        self.offsets = [sum(num_new[:b]) for b in range(len(num_new))]


def _unmasked(num_new: int, prefix: int, chain: bool, window: int | None) -> bool:
    """Whether the single loop attends without a mask: a chain's one new token or prefill, within the window."""
    return chain and (num_new == 1 or prefix == 0) and (window is None or prefix + num_new <= window)


def _ancestors(parents: list[int], device: torch.device) -> torch.Tensor:  # [T, T] bool
    """``[t, s]``: new position s is t itself or one of its ancestors (parents come before their children)."""
    T = len(parents)
    ancestors = torch.eye(T, dtype=torch.bool)
    for t, parent in enumerate(parents):
        if not -1 <= parent < t:
            raise ValueError(f"tree position {t} has parent {parent}: parents must come before their children")
        if parent >= 0:
            ancestors[t] |= ancestors[parent]
    return ancestors.to(device)
