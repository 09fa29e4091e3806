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

The Triton path never materialises softmax(target_logits): ``_sampling_stats_kernel`` reads each live
(row, position) once, tiled over V, keeping a running max and sum-exp (merged into log p = x/T - max - log sum)
and the raw argmax for greedy rows, then runs the accept test for that position's draft token.
``_sampling_emit_kernel`` finds each row's first rejection and reads one more logits row, at that
position: the exponential race over the residual (or over p for the bonus token), tile by tile.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import (
    empty_ids,
    empty_result,
    first_rejection,
    float32_inputs,
    live_positions,
    log_prob,
    position_stats,
    race_sample,
    store_out_ids,
    unit_stride,
)
from .dispatch import VerifyResult, check_verify_inputs, jit, launch_shape, tl, triton, use_triton
from .verify_greedy import _assemble

# Uniforms are kept strictly inside (0, 1): log(0) would accept nothing, u = 1 could reject p = q.
_TINY = 1e-7


class SamplingNoise(NamedTuple):
    uniforms: torch.Tensor  # [B, K] fp32 in (0, 1), one accept test per draft position (per node of a tree)
    exponentials: torch.Tensor  # [B, V] fp32 Exp(1), one race per row (the row emits one sampled token)


def draw_noise(B: int, K: int, V: int, device: torch.device, generator: torch.Generator | None = None) -> SamplingNoise:
    uniforms = torch.rand(B, K, generator=generator, device=device).clamp_(_TINY, 1.0 - _TINY)
    exponentials = torch.empty(B, V, device=device).exponential_(generator=generator).clamp_(min=_TINY)
    return SamplingNoise(uniforms, exponentials)


def checked_noise(
    target_logits: torch.Tensor,  # [B, K+1, V]
    temperature: torch.Tensor,  # [B]
    noise: SamplingNoise | None,
    generator: torch.Generator | None,
    length: str = "K",
) -> SamplingNoise:
    """The sampling inputs' checks shared by the chain and the tree (a tree's ``length`` is N): ``noise`` drawn
    from ``generator`` when not given, and its shapes checked when given."""
    B, K1, V = target_logits.shape
    if temperature.shape != (B,):
        raise ValueError(f"temperature must be [B] = {(B,)}, got {tuple(temperature.shape)}")
    if noise is None:
        return draw_noise(B, K1 - 1, V, target_logits.device, generator)
    if noise.uniforms.shape != (B, K1 - 1) or noise.exponentials.shape != (B, V):
        raise ValueError(
            f"noise must hold uniforms [B, {length}] = {(B, K1 - 1)} and exponentials [B, V] = {(B, V)}"
        )
    return noise


def target_log_probs(
    target_logits: torch.Tensor,  # [B, K+1, V]
    temperature: torch.Tensor,  # [B]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p = log_softmax(x / T) [B, K+1, V], the raw argmax [B, K+1], greedy rows T <= 0 [B]) for the references;
    greedy rows' log p is taken at T = 1 and never used."""
    logits = target_logits.float()
    greedy_row = temperature <= 0
    safe_t = torch.where(greedy_row, torch.ones_like(temperature), temperature).float()
    log_p = torch.log_softmax(logits / safe_t[:, None, None], dim=-1)
    return log_p, logits.argmax(dim=-1), greedy_row


def race_sample_ref(
    p: torch.Tensor,  # [B, V] the target distribution at the row's sampled position
    residual: torch.Tensor,  # [B, V] unnormalised
    has_residual: torch.Tensor,  # [B] bool: the row samples the residual (a rejection), else p
    exponentials: torch.Tensor,  # [B, V] Exp(1)
) -> torch.Tensor:
    """[B] one sample per row by the exponential race (the references' ``_common.race_sample``).

    An empty residual (p == q, or p(S) = 1, up to rounding) falls back to p: such a rejection has probability ~0.
    """
    use_residual = has_residual & (residual.amax(dim=1) > 0)
    weights = torch.where(use_residual[:, None], residual, p)
    return (weights / exponentials).argmax(dim=1)


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
    log_p, target_ids, greedy_row = target_log_probs(target_logits, temperature)
    positions = torch.arange(K, device=device)
    in_draft = positions[None, :] < num_draft[:, None].long()  # [B, K]
    # Ids past num_draft[b] are padding (often -1) whose gathers are masked out: pin them to a valid id.
    draft_ids = torch.where(in_draft, draft_ids.long(), 0)

    # Accept test in log space.
    log_p_draft = log_p[:, :K].gather(2, draft_ids[:, :, None]).squeeze(2)  # [B, K]
    if draft_probs is None:
        log_q_draft = torch.zeros_like(log_p_draft)
    else:
        q_draft = draft_probs[:, :K].float().gather(2, draft_ids[:, :, None]).squeeze(2)
        log_q_draft = torch.where(q_draft > 0, q_draft.log(), torch.full_like(q_draft, float("inf")))
    accept = (noise.uniforms.log() < log_p_draft - log_q_draft) & in_draft
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
    sampled = race_sample_ref(p_a, torch.clamp(p_a - q_a, min=0.0), rejected, noise.exponentials)
    greedy_next = target_ids[rows, num_accepted]
    next_token = torch.where(greedy_row, greedy_next, sampled)

    next_ids = torch.zeros(B, K1, dtype=torch.long, device=device)
    next_ids[rows, num_accepted] = next_token
    return _assemble(draft_ids, next_ids, num_accepted)


@jit
def _sampling_stats_kernel(
    logits_ptr,  # [B, K+1, V] fp32 / bf16 / fp16, unit stride over V
    draft_ids_ptr,  # [B, K] int32 / int64, contiguous
    num_draft_ptr,  # [B] int32 / int64
    draft_probs_ptr,  # [B, K, V] fp32 / bf16 / fp16, unit stride over V (unused without HAS_DRAFT_PROBS)
    temperature_ptr,  # [B] fp32
    uniforms_ptr,  # [B, K] fp32 in (0, 1)
    accept_ptr,  # [B, K+1] int8 out: draft token at this position passed its accept test
    target_ids_ptr,  # [B, K+1] int64 out: argmax of the raw logits (used by greedy rows)
    row_max_ptr,  # [B, K+1] fp32 out: max_v x/T
    log_sum_ptr,  # [B, K+1] fp32 out: log sum_v exp(x/T - max), so log p = x/T - max - log_sum
    num_rows,  # B * (K+1)
    K,
    V,
    stride_b,  # logits strides, in elements
    stride_k,
    probs_stride_b,  # draft_probs strides, in elements
    probs_stride_k,
    HAS_DRAFT_PROBS: tl.constexpr,  # False: lookup drafts, q is one-hot at the draft token
    BLOCK_R: tl.constexpr,  # (row, position) pairs per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
):
    rows, b, k, n, in_batch, live = live_positions(num_draft_ptr, num_rows, K + 1, BLOCK_R)
    temperature = tl.load(temperature_ptr + b, mask=in_batch, other=1.0)
    greedy = temperature <= 0
    safe_t = tl.where(greedy, 1.0, temperature)
    row_ptr = logits_ptr + b.to(tl.int64) * stride_b + k.to(tl.int64) * stride_k  # [BLOCK_R]
    best_idx, row_max, log_sum = position_stats(row_ptr, live, safe_t, V, True, BLOCK_R, BLOCK_V)

    # Accept test for this position's draft token (positions k < n only).
    has_draft = live & (k < n)
    draft_id = tl.load(draft_ids_ptr + b.to(tl.int64) * K + k, mask=has_draft, other=0).to(tl.int64)
    in_range = has_draft & (draft_id >= 0) & (draft_id < V)  # an id outside the vocabulary is rejected
    x_draft = tl.load(row_ptr + draft_id, mask=in_range, other=float("-inf")).to(tl.float32)
    log_p_draft = log_prob(x_draft, safe_t, row_max, log_sum)
    if HAS_DRAFT_PROBS:
        q_ptr = draft_probs_ptr + b.to(tl.int64) * probs_stride_b + k.to(tl.int64) * probs_stride_k
        q_draft = tl.load(q_ptr + draft_id, mask=in_range, other=0.0).to(tl.float32)
        has_q = q_draft > 0
        log_q_draft = tl.where(has_q, tl.log(tl.where(has_q, q_draft, 1.0)), float("inf"))  # q = 0 rejects
    else:
        log_q_draft = tl.zeros([BLOCK_R], tl.float32)  # one-hot q: log q = 0 at the draft token
    u = tl.load(uniforms_ptr + b.to(tl.int64) * K + k, mask=has_draft, other=0.5)
    accept_sampled = tl.log(u) < log_p_draft - log_q_draft
    accept = in_range & tl.where(greedy, best_idx == draft_id, accept_sampled)

    tl.store(accept_ptr + rows, accept.to(tl.int8), mask=live)
    tl.store(target_ids_ptr + rows, best_idx, mask=live)
    tl.store(row_max_ptr + rows, row_max, mask=live)
    tl.store(log_sum_ptr + rows, log_sum, mask=live)


@jit
def _sampling_emit_kernel(
    logits_ptr,  # [B, K+1, V] fp32 / bf16 / fp16, unit stride over V
    draft_ids_ptr,  # [B, K] int32 / int64, contiguous
    num_draft_ptr,  # [B] int32 / int64
    draft_probs_ptr,  # [B, K, V], unit stride over V (unused without HAS_DRAFT_PROBS)
    temperature_ptr,  # [B] fp32
    exponentials_ptr,  # [B, V] fp32 Exp(1), contiguous
    accept_ptr,  # [B, K+1] int8, from the stats kernel
    target_ids_ptr,  # [B, K+1] int64, from the stats kernel
    row_max_ptr,  # [B, K+1] fp32, from the stats kernel
    log_sum_ptr,  # [B, K+1] fp32, from the stats kernel
    out_ids_ptr,  # [B, K+1] int64 out
    num_accepted_ptr,  # [B] int64 out
    B,
    K,
    V,
    stride_b,
    stride_k,
    probs_stride_b,
    probs_stride_k,
    HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK_B: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # >= K + 1
    BLOCK_V: tl.constexpr,  # vocabulary tile
):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = b < B
    b64 = b.to(tl.int64)
    positions = tl.arange(0, BLOCK_K)
    n = tl.load(num_draft_ptr + b, mask=in_batch, other=0).to(tl.int32)
    in_draft = in_batch[:, None] & (positions[None, :] < n[:, None])
    draft = tl.load(draft_ids_ptr + b64[:, None] * K + positions[None, :], mask=in_draft, other=-1).to(tl.int64)
    accept = tl.load(accept_ptr + b64[:, None] * (K + 1) + positions[None, :], mask=in_draft, other=0)
    num_accepted = first_rejection(accept, in_draft, positions, n)  # a: where the row's one sample goes
    rejected = in_batch & (num_accepted < n)

    temperature = tl.load(temperature_ptr + b, mask=in_batch, other=1.0)
    greedy = temperature <= 0
    safe_t = tl.where(greedy, 1.0, temperature)
    stat_at = b64 * (K + 1) + num_accepted
    target_id = tl.load(target_ids_ptr + stat_at, mask=in_batch, other=0)
    row_max = tl.load(row_max_ptr + stat_at, mask=in_batch, other=0.0)
    log_sum = tl.load(log_sum_ptr + stat_at, mask=in_batch, other=0.0)
    rejected_id = tl.load(draft_ids_ptr + b64 * K + num_accepted, mask=rejected, other=-1).to(tl.int64)

    # The row's one sample, at position a: the residual max(p - q, 0) after a rejection, else p (the bonus
    # token). Without draft probabilities q is one-hot, so the residual is p without the rejected token.
    sampling = in_batch & (temperature > 0)  # greedy rows read nothing here
    row_ptr = logits_ptr + b64 * stride_b + num_accepted.to(tl.int64) * stride_k
    q_row_ptr = draft_probs_ptr + b64 * probs_stride_b + num_accepted.to(tl.int64) * probs_stride_k
    excluded_ids = tl.where(positions[None, :] == 0, rejected_id[:, None], -1)  # S = {the rejected token}
    sampled_id = race_sample(row_ptr, q_row_ptr, exponentials_ptr, b64, sampling, rejected, safe_t, row_max,
                             log_sum, excluded_ids, rejected.to(tl.int32), positions, V, HAS_DRAFT_PROBS,
                             BLOCK_B, BLOCK_V)
    next_id = tl.where(greedy, target_id, sampled_id)
    store_out_ids(out_ids_ptr, num_accepted_ptr, b, in_batch, positions, draft, num_accepted, next_id, K)


def verify_sampling_triton(
    target_logits: torch.Tensor,  # [B, K+1, V]
    draft_ids: torch.Tensor,  # [B, K]
    num_draft: torch.Tensor,  # [B]
    draft_probs: torch.Tensor | None,  # [B, K, V] or None (one-hot q)
    temperature: torch.Tensor,  # [B]
    noise: SamplingNoise,
) -> VerifyResult:
    """Triton launcher with ``verify_sampling_ref``'s signature; equal ids for equal noise."""
    B, K1, V = target_logits.shape
    K = K1 - 1
    device = target_logits.device
    target_logits, draft_ids, num_draft = unit_stride(target_logits), draft_ids.contiguous(), num_draft.contiguous()
    has_draft_probs = draft_probs is not None
    probs = unit_stride(draft_probs) if has_draft_probs else target_logits  # a placeholder pointer, never read
    temperature, uniforms, exponentials = float32_inputs(temperature, *noise, device=device)

    accept = torch.empty(B, K1, dtype=torch.int8, device=device)
    target_ids = empty_ids(B, K1, device=device)
    row_max = torch.empty(B, K1, dtype=torch.float32, device=device)
    log_sum = torch.empty(B, K1, dtype=torch.float32, device=device)
    result = empty_result(B, K1, device)
    if B == 0:
        return result
    strides = (target_logits.stride(0), target_logits.stride(1), probs.stride(0), probs.stride(1))

    BLOCK_R, BLOCK_V, num_warps = launch_shape(B * K1, V, device)
    _sampling_stats_kernel[(triton.cdiv(B * K1, BLOCK_R),)](
        target_logits, draft_ids, num_draft, probs, temperature, uniforms,
        accept, target_ids, row_max, log_sum, B * K1, K, V, *strides,
        HAS_DRAFT_PROBS=has_draft_probs, BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    BLOCK_B, BLOCK_V, num_warps = launch_shape(B, V, device)
    _sampling_emit_kernel[(triton.cdiv(B, BLOCK_B),)](
        target_logits, draft_ids, num_draft, probs, temperature, exponentials,
        accept, target_ids, row_max, log_sum, *result, B, K, V, *strides,
        HAS_DRAFT_PROBS=has_draft_probs, BLOCK_B=BLOCK_B, BLOCK_K=triton.next_power_of_2(K1), BLOCK_V=BLOCK_V,
        num_warps=num_warps,
    )
    return result


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
    Returns ``(out_ids [B, K+1] -1-padded, num_accepted [B])``. ``num_draft[b]`` must lie in [0, K];
    draft ids past it are ignored. Rows with ``temperature[b] <= 0`` are verified greedily.
    """
    check_verify_inputs(target_logits, draft_ids, num_draft)
    B, K1, V = target_logits.shape
    if draft_probs is not None and draft_probs.shape != (B, K1 - 1, V):
        raise ValueError(f"draft_probs must be [B, K, V] = {(B, K1 - 1, V)}, got {tuple(draft_probs.shape)}")
    noise = checked_noise(target_logits, temperature, noise, generator)
    if use_triton(impl, target_logits.device):
        return verify_sampling_triton(target_logits, draft_ids, num_draft, draft_probs, temperature, noise)
    return verify_sampling_ref(target_logits, draft_ids, num_draft, draft_probs, temperature, noise)
