"""Greedy verification: accept the longest prefix of the draft that matches the target's argmax."""
from __future__ import annotations

import torch

from .dispatch import VerifyResult, check_verify_inputs, use_triton


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


def verify_greedy(
    target_logits: torch.Tensor,  # [B, K+1, V]
    draft_ids: torch.Tensor,  # [B, K]
    num_draft: torch.Tensor,  # [B]
    impl: str = "auto",
) -> VerifyResult:
    """Greedy verification of B ragged drafts against one target forward.

    Returns ``(out_ids [B, K+1] -1-padded, num_accepted [B])``; see ``dispatch`` for the terms.
    """
    check_verify_inputs(target_logits, draft_ids, num_draft)
    if use_triton(impl, target_logits.device):
        from .verify_greedy_triton import verify_greedy_triton

        return verify_greedy_triton(target_logits, draft_ids, num_draft)
    return verify_greedy_ref(target_logits, draft_ids, num_draft)
