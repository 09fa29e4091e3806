"""A KV cache for a batch of rows of different lengths (batched speculative decoding).

Each layer keeps keys and values ``[R, H, C, Dh]`` for R row slots, padded to a capacity C, and a valid length per
layer and row (``lengths [L, R]``): slot j of a row holds that row's position j (rows are left-aligned; a tree's
accepted path is moved into place by ``keep_rows``, a rejected tail is dropped by ``crop``, which only lowers the
length). A forward over some rows writes each row's T new K/V at that row's own length, so rows of any lengths
share one forward; padded positions of a short row are written too and dropped by the crop after verification.

Nothing is ever evicted: a sliding-window layer (Gemma 3) keeps the whole history and its window is applied by the
mask (``attention_mask``), so its memory grows like a full layer's. Rows live in slots 0..R-1; removing a row moves
the last one into its slot (``remove_row`` says which), so a forward over all rows reads the buffers without a copy.

``BatchView`` is what a forward (``LayerStack.run``) and a draft's ``DecodeState.cache`` see: a contiguous range of
row slots of the cache. It has the ``update`` method the models' attention layers call.
"""
from __future__ import annotations

import torch


class BatchCache:
    def __init__(self, num_layers: int, max_rows: int = 1):
        self.num_layers = num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [R', H, C, Dh], R' >= num_rows
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = torch.zeros(num_layers, 0, dtype=torch.long)  # [L, R]
        self.max_rows = max_rows  # row slots allocated at once (a batch's width): adding a row copies nothing
        self.min_width = 16  # positions allocated at once (``reserve``): a known length never regrows the buffers

    def reserve(self, width: int) -> None:
        """Allocate room for ``width`` positions per row when the buffers are next made or grown (a decoder knows
        its rows' prompt + max_new_tokens): growing copies every row's history, so it should happen rarely."""
        self.min_width = max(self.min_width, width)

    @property
    def num_rows(self) -> int:
        return self.lengths.shape[1]

    def add_row(self) -> int:
        """A new empty row; returns its slot."""
        self.lengths = torch.cat([self.lengths, torch.zeros(self.num_layers, 1, dtype=torch.long)], dim=1)
        return self.num_rows - 1

    def remove_row(self, slot: int) -> int | None:
        """Drop the row in ``slot``; the last row moves into it. Returns the slot that moved (None: none did)."""
        last = self.num_rows - 1
        moved = None
        if slot != last:
            for buffers in (self.keys, self.values):
                for buf in buffers:
                    if buf is not None and buf.shape[0] > last:
                        buf[slot] = buf[last]
            self.lengths[:, slot] = self.lengths[:, last]
            moved = last
        self.lengths = self.lengths[:, :last].clone()
        return moved

    def view(self, start: int = 0, stop: int | None = None) -> "BatchView":
        return BatchView(self, start, self.num_rows if stop is None else stop)

    def row(self, slot: int) -> "BatchView":
        return BatchView(self, slot, slot + 1)

    def _reserve(self, layer_idx: int, like: torch.Tensor, rows: int, width: int) -> torch.Tensor:
        """The layer's key buffer with room for ``rows`` rows and ``width`` positions. Rows and width grow
        independently (rows to ``max_rows``, width to ``min_width`` or by doubling): growing one must not double the
        other, or a batch admitted one row at a time multiplies the width by 2 per row."""
        buf = self.keys[layer_idx]
        _, H, _, Dh = like.shape
        if buf is None or buf.shape[0] < rows or buf.shape[2] < width:
            old_rows, old_width = (0, 0) if buf is None else (buf.shape[0], buf.shape[2])
            new_rows = max(rows, self.max_rows, old_rows)
            new_width = old_width if width <= old_width else max(width, 2 * old_width, self.min_width)
            for buffers in (self.keys, self.values):
                grown = like.new_zeros(new_rows, H, new_width, Dh)
                if buffers[layer_idx] is not None:
                    grown[:old_rows, :, :old_width] = buffers[layer_idx]
                buffers[layer_idx] = grown
        return self.keys[layer_idx]


class BatchView:
    """Rows [start, stop) of a ``BatchCache``: the cache one forward or one draft works on."""

    def __init__(self, cache: BatchCache, start: int, stop: int, packed: list[int] | None = None):
        self.cache, self.start, self.stop = cache, start, stop
        # A packed forward (``LayerStack.run`` with row attention): its new K/V come as one sequence [1, H, N, Dh],
        # ``packed[b]`` positions of row b after those of the rows before it; no row computes padding.
        self.packed = packed

    def packed_view(self, num_new: list[int]) -> "BatchView":
        return BatchView(self.cache, self.start, self.stop, list(num_new))

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def lengths(self, layer_idx: int) -> torch.Tensor:  # [B]
        return self.cache.lengths[layer_idx, self.start : self.stop]

    def seq_len(self, layer_idx: int) -> int:
        """The longest row's length in layer ``layer_idx`` (a one-row view: its length)."""
        lengths = self.lengths(layer_idx)
        return int(lengths.max()) if len(lengths) else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs=None, **_):
        """Write each row's T new K/V [B, H, T, Dh] at its own length; return the keys and values the mask of this
        forward is sized for: [B, H, max(length) + T, Dh]."""
        cache = self.cache
        B, H, T, Dh = key_states.shape
        starts = self.lengths(layer_idx).clone()
        if self.packed is not None:  # one sequence of N = sum(packed) positions: row b's run after row b-1's
            num_new = torch.tensor(self.packed)
            rows = torch.repeat_interleave(torch.arange(len(self.packed)), num_new)  # [N] the row of each position
            offsets = torch.cumsum(num_new, 0) - num_new
            slots = starts[rows] + torch.arange(T) - offsets[rows]  # [N]
            new_k, new_v = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)  # [N, H, Dh]
            grown = num_new
        else:
            rows = torch.arange(B)[:, None]  # [B, 1]
            slots = starts[:, None] + torch.arange(T)  # [B, T]
            new_k, new_v = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [B, T, H, Dh]
            grown = T
        width = int((starts + grown).max())
        cache._reserve(layer_idx, key_states, cache.num_rows, width)
        keys = cache.keys[layer_idx][self.start : self.stop]
        values = cache.values[layer_idx][self.start : self.stop]
        # index_put_ writes only the new slots (scatter_ on a bf16 CPU tensor copies the whole buffer).
        rows, slots = rows.to(keys.device), slots.to(keys.device)
        keys[rows, :, slots] = new_k.to(keys.dtype)
        values[rows, :, slots] = new_v.to(values.dtype)
        cache.lengths[layer_idx, self.start : self.stop] += grown
        return keys[:, :, :width], values[:, :, :width]

    def crop(self, length: int, start: int = 0, stop: int | None = None) -> None:
        """Drop every cached position past ``length`` of layers [start, stop) (a one-row view, or all its rows)."""
        lengths = self.cache.lengths[start:stop, self.start : self.stop]
        lengths.clamp_(max=length)

    def keep_rows(self, prefix_len: int, rows: list[int], start: int = 0, stop: int | None = None) -> None:
        """A one-row view: keep, after ``prefix_len``, only the new positions ``rows`` (in order), moved into place."""
        slot = self.start
        stop = self.cache.num_layers if stop is None else min(stop, self.cache.num_layers)
        if rows != list(range(len(rows))):
            for i in range(start, stop):
                if self.cache.keys[i] is None or int(self.cache.lengths[i, slot]) <= prefix_len:
                    continue
                src = torch.tensor(rows) + prefix_len
                dst = torch.arange(prefix_len, prefix_len + len(rows))
                for buf in (self.cache.keys[i], self.cache.values[i]):
                    row = buf[slot]  # [H, C, Dh]
                    row.index_copy_(1, dst.to(row.device), row.index_select(1, src.to(row.device)))
        self.crop(prefix_len + len(rows), start, stop)

    def attention_mask(self, layer_idx: int, positions: torch.Tensor, ancestors: torch.Tensor, window: int | None,
                       dtype: torch.dtype, additive: bool) -> torch.Tensor:  # [B, 1, T, max(length) + T]
        """Layer ``layer_idx``'s mask for a forward of T new positions per row: a row's query sees its cached prefix
        (within ``window`` on a sliding layer) and, among the new positions, the ones ``ancestors [B, T, T]`` allows
        (a chain: itself and those before it; a tree: its ancestors). ``positions [B, T]``: the queries' positions."""
        B, T = positions.shape
        prefix = self.lengths(layer_idx).to(positions.device)  # [B]
        width = int(prefix.max()) + T if B else T
        slots = torch.arange(width, device=positions.device)
        new_index = slots[None, :] - prefix[:, None]  # [B, W] which new position a slot holds (< 0: the prefix)
        is_prefix, is_new = new_index < 0, (new_index >= 0) & (new_index < T)
        clamped = new_index.clamp(0, T - 1)
        seen = ancestors.gather(2, clamped[:, None, :].expand(B, T, width))  # [B, T, W]
        allowed = is_prefix[:, None, :] | (is_new[:, None, :] & seen)
        if window is not None:
            key_pos = torch.where(is_prefix, slots[None, :], positions.gather(1, clamped))  # [B, W]
            allowed &= (positions[:, :, None] - key_pos[:, None, :]) < window
        mask = allowed[:, None]
        if additive:  # eager attention adds the mask to its scores
            return torch.where(mask, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
        return mask


def chain_ancestors(num_rows: int, T: int) -> torch.Tensor:  # [B, T, T] bool: causal
    return torch.ones(T, T, dtype=torch.bool).tril()[None].expand(num_rows, T, T)
