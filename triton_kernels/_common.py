"""What the chain and tree verifiers share: the per-position pass over the logits, the exponential race that
draws a row's one sampled token, the output rows, and the launchers' common steps.

Every pass over the vocabulary reads a row of logits tile by tile (``logits_tile``). The per-position pass
(``position_stats_kernel``) reduces each live (row, position) to its argmax and, for sampling, to the max and
log sum-exp of x/T, from which ``log_prob`` gives log p without materialising softmax(target_logits).
``race_sample`` then reads one position per row: an exponential race over the residual and one over p itself.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import TreeVerifyResult, VerifyResult, jit, launch_shape, tl, triton


class PositionStats(NamedTuple):
    target_ids: torch.Tensor  # [B, K+1] int64, argmax of the raw logits per position
    row_max: torch.Tensor | None  # [B, K+1] fp32, max_v x/T (sampling only)
    log_sum: torch.Tensor | None  # [B, K+1] fp32, log sum_v exp(x/T - max) (sampling only)


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride over its last dim (V), as the kernels index it; its other strides are passed in."""
    return t if t.stride(-1) == 1 else t.contiguous()


def empty_ids(*shape: int, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.long, device=device)


def empty_result(B: int, K1: int, device: torch.device, tree: bool = False) -> VerifyResult | TreeVerifyResult:
    """Unset outputs for a launcher's kernels to fill: out_ids [B, K+1], a tree's path_nodes [B, N], num_accepted."""
    out_ids, num_accepted = empty_ids(B, K1, device=device), empty_ids(B, device=device)
    if tree:
        return TreeVerifyResult(out_ids, empty_ids(B, K1 - 1, device=device), num_accepted)
    return VerifyResult(out_ids, num_accepted)


def float32_inputs(*tensors: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Temperatures and noise as the kernels read them: contiguous fp32 on ``device``."""
    return tuple(t.to(device=device, dtype=torch.float32).contiguous() for t in tensors)


def launch_position_stats(
    target_logits: torch.Tensor,  # [B, K+1, V], unit stride over V
    count: torch.Tensor,  # [B] contiguous: positions 0..count[b] are live (num_draft or num_nodes)
    temperature: torch.Tensor | None = None,  # [B] fp32 contiguous; None: the argmax alone (greedy)
) -> PositionStats:
    """One read of each live position of ``target_logits`` (B > 0); positions past ``count[b]`` stay unset."""
    B, K1, V = target_logits.shape
    device = target_logits.device
    with_softmax = temperature is not None
    target_ids = empty_ids(B, K1, device=device)
    row_max = torch.empty(B, K1, dtype=torch.float32, device=device) if with_softmax else None
    log_sum = torch.empty_like(row_max) if with_softmax else None
    BLOCK_R, BLOCK_V, num_warps = launch_shape(B * K1, V, device)
    unused = target_ids  # a placeholder pointer for the greedy pass, never read or written
    position_stats_kernel[(triton.cdiv(B * K1, BLOCK_R),)](
        target_logits, count, temperature if with_softmax else unused, target_ids,
        row_max if with_softmax else unused, log_sum if with_softmax else unused,
        B * K1, K1, V, target_logits.stride(0), target_logits.stride(1),
        WITH_SOFTMAX=with_softmax, BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    return PositionStats(target_ids, row_max, log_sum)


@jit
def argmax_update(values, cols, in_vocab, best_val, best_idx):
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
def logits_tile(row_ptr, live, start, V, BLOCK_V: tl.constexpr):
    """Columns start..start+BLOCK_V of the rows at ``row_ptr`` [R] (unit stride over V) as fp32, -inf where masked.

    Returns (cols [BLOCK_V], in_vocab [BLOCK_V], mask [R, BLOCK_V], x [R, BLOCK_V]).
    """
    cols = start + tl.arange(0, BLOCK_V)
    in_vocab = cols < V
    mask = live[:, None] & in_vocab[None, :]
    x = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    return cols, in_vocab, mask, x


@jit
def live_positions(count_ptr, num_rows, K1, BLOCK_R: tl.constexpr):
    """This program's BLOCK_R flat (b, k) positions of a [B, K+1] grid: (rows, b, k, count[b], in_batch, live).

    A position is live when k <= count[b]: the positions of the draft and the bonus position after it.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_batch = rows < num_rows
    b = rows // K1
    k = rows % K1
    n = tl.load(count_ptr + b, mask=in_batch, other=-1)
    return rows, b, k, n, in_batch, in_batch & (k <= n)


@jit
def position_stats(row_ptr, live, safe_t, V, WITH_SOFTMAX: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    """One pass over the V logits of BLOCK_R rows (``row_ptr`` [BLOCK_R], unit stride over V), tiled.

    Returns the raw argmax (greedy rows), and with WITH_SOFTMAX max_v x/T and log sum_v exp(x/T - max), from
    which ``log_prob`` gives log p. Dead rows (and every row without WITH_SOFTMAX) get neutral stats (0, 0),
    which keep -inf - -inf and log(0) out of what follows.
    """
    best_val = tl.full([BLOCK_R], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_R], tl.int64)
    row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols, in_vocab, mask, x = logits_tile(row_ptr, live, start, V, BLOCK_V)
        best_val, best_idx = argmax_update(x, cols, in_vocab, best_val, best_idx)
        if WITH_SOFTMAX:
            scaled = tl.math.div_rn(x, safe_t[:, None])  # IEEE division, as the reference's logits / T
            new_max = tl.maximum(row_max, tl.max(scaled, axis=1))
            # A row that has seen only -inf so far keeps sum 0 instead of exp(-inf - -inf) = nan.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            sum_exp = sum_exp * tl.exp(row_max - shift) + tl.sum(tl.exp(scaled - shift[:, None]), axis=1)
            row_max = new_max
    if WITH_SOFTMAX:
        row_max = tl.where(live, row_max, 0.0)
        sum_exp = tl.where(live, sum_exp, 1.0)
    else:
        row_max = tl.zeros([BLOCK_R], tl.float32)
        sum_exp = tl.full([BLOCK_R], 1.0, tl.float32)
    return best_idx, row_max, tl.log(sum_exp)


@jit
def position_stats_kernel(
    logits_ptr,  # [B, K+1, V] fp32 / bf16 / fp16, unit stride over V
    count_ptr,  # [B] int32 / int64: positions 0..count[b] are live
    temperature_ptr,  # [B] fp32 (unused without WITH_SOFTMAX)
    target_ids_ptr,  # [B, K+1] int64 out: argmax of the raw logits
    row_max_ptr,  # [B, K+1] fp32 out: max_v x/T (unused without WITH_SOFTMAX)
    log_sum_ptr,  # [B, K+1] fp32 out: log sum_v exp(x/T - max) (unused without WITH_SOFTMAX)
    num_rows,  # B * (K+1)
    K1,  # K + 1
    V,
    stride_b,  # logits strides, in elements
    stride_k,
    WITH_SOFTMAX: tl.constexpr,  # False: the argmax alone (greedy verification)
    BLOCK_R: tl.constexpr,  # (row, position) pairs per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
):
    rows, b, k, n, in_batch, live = live_positions(count_ptr, num_rows, K1, BLOCK_R)
    if WITH_SOFTMAX:
        temperature = tl.load(temperature_ptr + b, mask=in_batch, other=1.0)
        safe_t = tl.where(temperature <= 0, 1.0, temperature)
    else:
        safe_t = tl.full([BLOCK_R], 1.0, tl.float32)
    row_ptr = logits_ptr + b.to(tl.int64) * stride_b + k.to(tl.int64) * stride_k  # [BLOCK_R]
    best_idx, row_max, log_sum = position_stats(row_ptr, live, safe_t, V, WITH_SOFTMAX, BLOCK_R, BLOCK_V)
    tl.store(target_ids_ptr + rows, best_idx, mask=live)
    if WITH_SOFTMAX:
        tl.store(row_max_ptr + rows, row_max, mask=live)
        tl.store(log_sum_ptr + rows, log_sum, mask=live)


@jit
def log_prob(x, safe_t, row_max, log_sum):
    """log p of logits ``x`` from ``position_stats`` (all arguments broadcast against each other)."""
    return (tl.math.div_rn(x, safe_t) - row_max) - log_sum


@jit
def column(tile, slots, slot):
    """Column ``slot`` of a [R, BLOCK_N] register tile (``slots`` = tl.arange(0, BLOCK_N)), as [R]."""
    return tl.sum(tl.where(slots[None, :] == slot, tile, 0), axis=1)


@jit
def race_sample(
    row_ptr,  # [R] pointers to the logits row of each row's position (unit stride over V)
    q_row_ptr,  # [R] pointers to the draft's probabilities at that position (read only with HAS_Q)
    exponentials_ptr,  # [B, V] fp32 Exp(1), contiguous
    b64,  # [R] int64 row indices
    sampling,  # [R] rows that sample (others read nothing)
    has_residual,  # [R] rows that sample the residual (a rejection); the others sample p itself
    safe_t,  # [R] temperature, and the position's stats from ``position_stats``
    row_max,
    log_sum,
    excluded_ids,  # [R, BLOCK_N] without HAS_Q: the tokens S taken out of p, in the first num_excluded slots
    num_excluded,  # [R] int32
    slots,  # tl.arange(0, BLOCK_N)
    V,
    HAS_Q: tl.constexpr,  # True: residual = max(p - q, 0); False: residual = p without S (q one-hot on S)
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The token each row emits: a sample of the residual where ``has_residual``, else of p, by the exponential
    race argmax_v w_v / E_v. Both races run in the one pass over V. An empty residual (p == q up to rounding)
    falls back to p, as the references do."""
    max_excluded = tl.max(num_excluded, axis=0)
    best_residual = tl.full([BLOCK_R], float("-inf"), tl.float32)
    residual_id = tl.zeros([BLOCK_R], tl.int64)
    best_p = tl.full([BLOCK_R], float("-inf"), tl.float32)
    p_id = tl.zeros([BLOCK_R], tl.int64)
    residual_max = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols, in_vocab, mask, x = logits_tile(row_ptr, sampling, start, V, BLOCK_V)
        p = tl.exp(log_prob(x, safe_t[:, None], row_max[:, None], log_sum[:, None]))
        if HAS_Q:
            q_mask = mask & has_residual[:, None]
            q = tl.load(q_row_ptr[:, None] + cols[None, :], mask=q_mask, other=0.0).to(tl.float32)
            residual = tl.maximum(p - q, 0.0)
        else:
            excluded = tl.zeros([BLOCK_R, BLOCK_V], tl.int32)
            for slot in range(0, max_excluded):  # |S| is small: the rejected draft token, or a few children
                excluded_id = column(excluded_ids, slots, slot)
                hit = (cols[None, :].to(tl.int64) == excluded_id[:, None]) & (slot < num_excluded)[:, None]
                excluded = excluded | hit.to(tl.int32)
            residual = tl.where(excluded != 0, 0.0, p)
        exponentials = tl.load(exponentials_ptr + b64[:, None] * V + cols[None, :], mask=mask, other=1.0)
        residual_max = tl.maximum(residual_max, tl.max(tl.where(mask, residual, 0.0), axis=1))
        residual_race = tl.where(mask, residual / exponentials, float("-inf"))
        best_residual, residual_id = argmax_update(residual_race, cols, in_vocab, best_residual, residual_id)
        p_race = tl.where(mask, p / exponentials, float("-inf"))
        best_p, p_id = argmax_update(p_race, cols, in_vocab, best_p, p_id)
    return tl.where(has_residual & (residual_max > 0), residual_id, p_id)


@jit
def first_rejection(accept, in_draft, positions, n):
    """Accepted length per row: the first draft position that is in the draft but not accepted, else n."""
    rejected_at = tl.where(in_draft & (accept == 0), positions[None, :], n[:, None])
    return tl.min(rejected_at, axis=1)


@jit
def store_out_ids(out_ids_ptr, num_accepted_ptr, b, in_batch, positions, draft, num_accepted, next_id, K):
    """Row = accepted draft ids, the correction/bonus id at position num_accepted, then -1."""
    a = num_accepted[:, None]
    out = tl.where(positions[None, :] < a, draft, tl.where(positions[None, :] == a, next_id[:, None], -1))
    mask = in_batch[:, None] & (positions[None, :] <= K)
    tl.store(out_ids_ptr + b[:, None].to(tl.int64) * (K + 1) + positions[None, :], out, mask=mask)
    tl.store(num_accepted_ptr + b, num_accepted.to(tl.int64), mask=in_batch)
