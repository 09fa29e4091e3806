"""Stochastic verification: standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

Per row b with n = num_draft[b] draft tokens and temperature T = temperature[b]:
  p_k = softmax(target_logits[b, k] / T)           target distribution at position k (k = 0..n)
  q_k = draft_probs[b, k] (or one-hot at draft_ids[b, k] when the draft has no probabilities)
  accept draft token d_k while  log u_k < log p_k[d_k] - log q_k[d_k]   (q_k[d_k] = 0 rejects)
  first rejection at a: emit a sample of the residual max(p_a - q_a, 0)  (unnormalised)
  all n accepted:       emit a sample of p_n  (the bonus token)
Rows with T = 0 are verified greedily, so greedy and stochastic rows can share one batch.

Samples are drawn by the exponential race: argmax_v w_v / E_v with E_v ~ Exp(1) i.i.d. is distributed
as w / sum(w), so no normalisation is needed and a kernel can reduce it tile by tile.
All randomness is drawn up front (``SamplingNoise``) so the Triton kernel and this reference consume
identical noise and their integer outputs can be compared exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import VerifyResult, check_verify_inputs, use_triton
from .verify_greedy import _assemble

# Uniforms are kept strictly inside (0, 1): log(0) would accept nothing, u = 1 could reject p = q.
_TINY = 1e-7


class SamplingNoise(NamedTuple):
    uniforms: torch.Tensor  # [B, K] fp32 in (0, 1), one accept test per draft position
    exponentials: torch.Tensor  # [B, V] fp32 Exp(1), one race per row (the row emits one sampled token)


def draw_noise(B: int, K: int, V: int, device: torch.device, generator: torch.Generator | None = None) -> SamplingNoise:
    uniforms = torch.rand(B, K, generator=generator, device=device).clamp_(_TINY, 1.0 - _TINY)
    exponentials = torch.empty(B, V, device=device).exponential_(generator=generator).clamp_(min=_TINY)
    return SamplingNoise(uniforms, exponentials)


def verify_sampling_ref(
    target_logits: torch.Tensor,  # [B, K+1, V]
    draft_ids: torch.Tensor,  # [B, K]
    num_draft: torch.Tensor,  # [B]
    draft_probs: torch.Tensor | None,  # [B, K, V] or None (one-hot q)
    temperature: torch.Tensor,  # [B]
    noise: SamplingNoise,
) -> VerifyResult:
    B, K1, V = target_logits.shape
    K = K1 - 1
    device = target_logits.device
    logits = target_logits.float()
    greedy_row = temperature <= 0  # [B]
    safe_t = torch.where(greedy_row, torch.ones_like(temperature), temperature).float()
    log_p = torch.log_softmax(logits / safe_t[:, None, None], dim=-1)  # [B, K+1, V]
    draft_ids = draft_ids.long()
    positions = torch.arange(K, device=device)
    in_draft = positions[None, :] < num_draft[:, None].long()  # [B, K]

    # Accept test in log space.
    log_p_draft = log_p[:, :K].gather(2, draft_ids[:, :, None]).squeeze(2)  # [B, K]
    if draft_probs is None:
        log_q_draft = torch.zeros_like(log_p_draft)
    else:
        q_draft = draft_probs[:, :K].float().gather(2, draft_ids[:, :, None]).squeeze(2)
        log_q_draft = torch.where(q_draft > 0, q_draft.log(), torch.full_like(q_draft, float("inf")))
    accept = (noise.uniforms.log() < log_p_draft - log_q_draft) & in_draft
    target_ids = logits.argmax(dim=-1)  # [B, K+1]
    greedy_accept = (draft_ids == target_ids[:, :K]) & in_draft
    accept = torch.where(greedy_row[:, None], greedy_accept, accept)
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [B]

    # One sampled token per row, at position a = num_accepted (residual if a < n, bonus if a == n).
    rows = torch.arange(B, device=device)
    p_a = log_p[rows, num_accepted].exp()  # [B, V]
    rejected = num_accepted < num_draft.long()  # [B]
    if draft_probs is None:
        d_a = draft_ids.gather(1, num_accepted.clamp(max=max(K - 1, 0))[:, None]) if K > 0 else None
        q_a = torch.zeros_like(p_a)
        if d_a is not None:
            q_a.scatter_(1, d_a, 1.0)
    else:
        q_a = draft_probs[rows, num_accepted.clamp(max=max(K - 1, 0))].float() if K > 0 else torch.zeros_like(p_a)
    residual = torch.clamp(p_a - q_a, min=0.0)
    # p == q up to rounding leaves an empty residual: fall back to p (such a rejection has probability ~0).
    use_residual = rejected & (residual.amax(dim=1) > 0)
    weights = torch.where(use_residual[:, None], residual, p_a)
    sampled = (weights / noise.exponentials).argmax(dim=1)  # [B]
    greedy_next = target_ids[rows, num_accepted]
    next_token = torch.where(greedy_row, greedy_next, sampled)

    next_ids = torch.zeros(B, K1, dtype=torch.long, device=device)
    next_ids[rows, num_accepted] = next_token
    return _assemble(draft_ids, next_ids, num_accepted)


def verify_sampling(
    target_logits: torch.Tensor,  # [B, K+1, V]
    draft_ids: torch.Tensor,  # [B, K]
    num_draft: torch.Tensor,  # [B]
    draft_probs: torch.Tensor | None,  # [B, K, V] or None
    temperature: torch.Tensor,  # [B]
    generator: torch.Generator | None = None,
    impl: str = "auto",
    noise: SamplingNoise | None = None,
) -> VerifyResult:
    """Speculative-sampling verification of B ragged drafts against one target forward.

    The emitted tokens are distributed exactly as the target's (temperature-scaled) distribution,
    whatever the draft distribution q. Noise comes from ``generator`` (or is passed in as ``noise``).
    Returns ``(out_ids [B, K+1] -1-padded, num_accepted [B])``.
    """
    check_verify_inputs(target_logits, draft_ids, num_draft)
    B, K1, V = target_logits.shape
    if temperature.shape != (B,):
        raise ValueError(f"temperature must be [B] = {(B,)}, got {tuple(temperature.shape)}")
    if draft_probs is not None and draft_probs.shape != (B, K1 - 1, V):
        raise ValueError(f"draft_probs must be [B, K, V] = {(B, K1 - 1, V)}, got {tuple(draft_probs.shape)}")
    if noise is None:
        noise = draw_noise(B, K1 - 1, V, target_logits.device, generator)
    if use_triton(impl, target_logits.device):
        from .verify_sampling_triton import verify_sampling_triton

        return verify_sampling_triton(target_logits, draft_ids, num_draft, draft_probs, temperature, noise)
    return verify_sampling_ref(target_logits, draft_ids, num_draft, draft_probs, temperature, noise)
