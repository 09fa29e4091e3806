"""Greedy verification: accept the longest prefix of the draft that matches the target's argmax.

The Triton path runs two kernels: ``_argmax_kernel`` reduces each live (row, position) of the logits to
its argmax, tiled over V; ``_greedy_accept_kernel`` counts the leading matches per row and writes
``out_ids``. Positions past ``num_draft[b]`` (the bonus position) are never read.
"""
from __future__ import annotations

import torch

from .dispatch import VerifyResult, check_verify_inputs, jit, launch_shape, tl, triton, use_triton


def verify_greedy_ref(
    target_logits: torch.Tensor,  # [B, K+1, V]
    draft_ids: torch.Tensor,  # [B, K]
    num_draft: torch.Tensor,  # [B]
) -> VerifyResult:
    B, K1, V = target_logits.shape
    K = K1 - 1
    device = target_logits.device
    target_ids = target_logits.argmax(dim=-1)  # [B, K+1], first index among ties
    positions = torch.arange(K, device=device)
    in_draft = positions[None, :] < num_draft[:, None].long()  # [B, K]
    matches = (draft_ids.long() == target_ids[:, :K]) & in_draft
    # Leading-match count: cumprod keeps 1 only up to the first mismatch.
    num_accepted = matches.long().cumprod(dim=1).sum(dim=1)  # [B]
    return _assemble(draft_ids, target_ids, num_accepted)


def _assemble(draft_ids: torch.Tensor, next_ids: torch.Tensor, num_accepted: torch.Tensor) -> VerifyResult:
    """out_ids = accepted draft ids, then next_ids at the first unaccepted position, then -1."""
    B, K1 = next_ids.shape
    positions = torch.arange(K1, device=next_ids.device)[None, :]  # [1, K+1]
    padded_draft = torch.cat([draft_ids.long(), draft_ids.new_zeros(B, 1).long()], dim=1)
    out_ids = torch.where(positions < num_accepted[:, None], padded_draft, torch.full_like(padded_draft, -1))
    last = next_ids.gather(1, num_accepted[:, None])  # [B, 1]
    out_ids.scatter_(1, num_accepted[:, None], last)
    return VerifyResult(out_ids, num_accepted)


@jit
def _argmax_update(values, cols, in_vocab, best_val, best_idx):
    """Fold one [R, BLOCK_V] tile into a running per-row argmax with torch.argmax's first-index ties.

    Lanes past V (``in_vocab`` false) must hold -inf; they also rank after every real index in the
    tie-break, so a tail lane can never be the winner and no id >= V is ever returned.
    """
    tile_max = tl.max(values, axis=1)  # [R]
    is_max = in_vocab[None, :] & (values == tile_max[:, None])
    tile_idx = tl.min(tl.where(is_max, cols[None, :], 2**31 - 1), axis=1).to(tl.int64)
    better = tile_max > best_val  # strict, so an earlier tile keeps a tie; all -inf keeps index 0
    return tl.where(better, tile_max, best_val), tl.where(better, tile_idx, best_idx)


@jit
def _argmax_kernel(
    logits_ptr,  # [B, K+1, V] fp32 / bf16 / fp16, unit stride over V
    num_draft_ptr,  # [B] int32 / int64
    target_ids_ptr,  # [B, K+1] int64 out: argmax per position; positions past num_draft[b] untouched
    num_rows,  # B * (K+1)
    K1,  # K + 1
    V,
    stride_b,  # logits strides, in elements
    stride_k,
    BLOCK_R: tl.constexpr,  # (row, position) pairs per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (b, k)
    in_batch = rows < num_rows
    b = rows // K1
    k = rows % K1
    n = tl.load(num_draft_ptr + b, mask=in_batch, other=-1)
    live = in_batch & (k <= n)
    row_ptr = logits_ptr + b.to(tl.int64) * stride_b + k.to(tl.int64) * stride_k  # [BLOCK_R]

    best_val = tl.full([BLOCK_R], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_R], tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < V
        mask = live[:, None] & in_vocab[None, :]
        x = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        best_val, best_idx = _argmax_update(x, cols, in_vocab, best_val, best_idx)
    tl.store(target_ids_ptr + rows, best_idx, mask=live)


@jit
def _first_rejection(accept, in_draft, positions, n):
    """Accepted length per row: the first draft position that is in the draft but not accepted, else n."""
    rejected_at = tl.where(in_draft & (accept == 0), positions[None, :], n[:, None])
    return tl.min(rejected_at, axis=1)


@jit
def _store_out_ids(out_ids_ptr, num_accepted_ptr, b, in_batch, positions, draft, num_accepted, next_id, K):
    """Row = accepted draft ids, the correction/bonus id at position num_accepted, then -1."""
    a = num_accepted[:, None]
    out = tl.where(positions[None, :] < a, draft, tl.where(positions[None, :] == a, next_id[:, None], -1))
    mask = in_batch[:, None] & (positions[None, :] <= K)
    tl.store(out_ids_ptr + b[:, None].to(tl.int64) * (K + 1) + positions[None, :], out, mask=mask)
    tl.store(num_accepted_ptr + b, num_accepted.to(tl.int64), mask=in_batch)


@jit
def _greedy_accept_kernel(
    target_ids_ptr,  # [B, K+1] int64, valid at positions 0..num_draft[b]
    draft_ids_ptr,  # [B, K] int32 / int64, contiguous
    num_draft_ptr,  # [B] int32 / int64
    out_ids_ptr,  # [B, K+1] int64 out
    num_accepted_ptr,  # [B] int64 out
    B,
    K,
    BLOCK_B: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # >= K + 1
):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = b < B
    positions = tl.arange(0, BLOCK_K)
    n = tl.load(num_draft_ptr + b, mask=in_batch, other=0).to(tl.int32)
    in_draft = in_batch[:, None] & (positions[None, :] < n[:, None])
    b64 = b[:, None].to(tl.int64)
    draft = tl.load(draft_ids_ptr + b64 * K + positions[None, :], mask=in_draft, other=-1).to(tl.int64)
    target = tl.load(target_ids_ptr + b64 * (K + 1) + positions[None, :], mask=in_draft, other=-1)
    num_accepted = _first_rejection((draft == target).to(tl.int32), in_draft, positions, n)
    next_id = tl.load(target_ids_ptr + b.to(tl.int64) * (K + 1) + num_accepted, mask=in_batch, other=-1)
    _store_out_ids(out_ids_ptr, num_accepted_ptr, b, in_batch, positions, draft, num_accepted, next_id, K)


def verify_greedy_triton(
    target_logits: torch.Tensor,  # [B, K+1, V]
    draft_ids: torch.Tensor,  # [B, K]
    num_draft: torch.Tensor,  # [B]
) -> VerifyResult:
    """Triton launcher with ``verify_greedy_ref``'s signature and results (bit-equal ids)."""
    B, K1, V = target_logits.shape
    K = K1 - 1
    device = target_logits.device
    if target_logits.stride(-1) != 1:
        target_logits = target_logits.contiguous()
    draft_ids, num_draft = draft_ids.contiguous(), num_draft.contiguous()
    target_ids = torch.empty(B, K1, dtype=torch.long, device=device)
    out_ids = torch.empty(B, K1, dtype=torch.long, device=device)
    num_accepted = torch.empty(B, dtype=torch.long, device=device)
    if B == 0:
        return VerifyResult(out_ids, num_accepted)

    BLOCK_R, BLOCK_V, num_warps = launch_shape(B * K1, V, device)
    _argmax_kernel[(triton.cdiv(B * K1, BLOCK_R),)](
        target_logits, num_draft, target_ids, B * K1, K1, V, target_logits.stride(0), target_logits.stride(1),
        BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    BLOCK_B = min(triton.next_power_of_2(B), 64)
    _greedy_accept_kernel[(triton.cdiv(B, BLOCK_B),)](
        target_ids, draft_ids, num_draft, out_ids, num_accepted, B, K,
        BLOCK_B=BLOCK_B, BLOCK_K=triton.next_power_of_2(K1),
    )
    return VerifyResult(out_ids, num_accepted)


def verify_greedy(
    target_logits: torch.Tensor,  # [B, K+1, V]
    draft_ids: torch.Tensor,  # [B, K]
    num_draft: torch.Tensor,  # [B]
    impl: str = "auto",
) -> VerifyResult:
    """Greedy verification of B ragged drafts against one target forward.

    Returns ``(out_ids [B, K+1] -1-padded, num_accepted [B])``; see ``dispatch`` for the terms.
    ``num_draft[b]`` must lie in [0, K]; draft ids past it are ignored.
    """
    check_verify_inputs(target_logits, draft_ids, num_draft)
    if use_triton(impl, target_logits.device):
        return verify_greedy_triton(target_logits, draft_ids, num_draft)
    return verify_greedy_ref(target_logits, draft_ids, num_draft)
