"""Greedy verification: accept the longest prefix of the draft that matches the target's argmax.

The Triton path runs two kernels: ``_common.position_stats_kernel`` reduces each live (row, position) of the
logits to its argmax, tiled over V; ``_greedy_accept_kernel`` counts the leading matches per row and writes
``out_ids``. Positions past ``num_draft[b]`` (the bonus position) are never read.
"""
from __future__ import annotations

import torch

from ._common import empty_result, first_rejection, launch_position_stats, store_out_ids, unit_stride
from .dispatch import VerifyResult, check_verify_inputs, jit, target_argmax, tl, triton, use_triton


def verify_greedy_ref(
    target_logits: torch.Tensor,  # [B, K+1, V]
    draft_ids: torch.Tensor,  # [B, K]
    num_draft: torch.Tensor,  # [B]
) -> VerifyResult:
    B, K1, V = target_logits.shape
    K = K1 - 1
    device = target_logits.device
    target_ids = target_argmax(target_logits)  # [B, K+1], first index among ties
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
    num_accepted = first_rejection((draft == target).to(tl.int32), in_draft, positions, n)
    next_id = tl.load(target_ids_ptr + b.to(tl.int64) * (K + 1) + num_accepted, mask=in_batch, other=-1)
    store_out_ids(out_ids_ptr, num_accepted_ptr, b, in_batch, positions, draft, num_accepted, next_id, K)


def verify_greedy_triton(
    target_logits: torch.Tensor,  # [B, K+1, V]
    draft_ids: torch.Tensor,  # [B, K]
    num_draft: torch.Tensor,  # [B]
) -> VerifyResult:
    """Triton launcher with ``verify_greedy_ref``'s signature and results (bit-equal ids)."""
    B, K1, V = target_logits.shape
    device = target_logits.device
    target_logits, draft_ids, num_draft = unit_stride(target_logits), draft_ids.contiguous(), num_draft.contiguous()
    result = empty_result(B, K1, device)
    if B == 0:
        return result
    target_ids = launch_position_stats(target_logits, num_draft).target_ids
    BLOCK_B = min(triton.next_power_of_2(B), 64)
    _greedy_accept_kernel[(triton.cdiv(B, BLOCK_B),)](
        target_ids, draft_ids, num_draft, *result, B, K1 - 1, BLOCK_B=BLOCK_B, BLOCK_K=triton.next_power_of_2(K1),
    )
    return result


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
