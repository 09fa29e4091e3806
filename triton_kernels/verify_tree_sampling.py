"""Tree verification, sampling: multi-candidate speculative sampling with fixed candidates (SpecInfer, Miao et al.
2024; as in EAGLE-2's, vLLM's and SGLang's tree verify).

The layout and the walk are verify_tree_greedy.py's. Every node is a deterministic candidate (q one-hot at its
token). At the current node, with p = softmax(target_logits[b, position] / T) and the residual r = p:
  try the children in node order: accept child c with probability r(c), i.e. while u_c < r(c);
  on rejection set r(c) = 0 and renormalise: r = p without the rejected tokens S, divided by 1 - p(S);
  a child whose token is already in S (a duplicate sibling) has r(c) = 0 and is rejected;
  on acceptance move to c and restart with the target's distribution there;
when no child is accepted, emit a sample of r: the correction token, or the bonus token at a leaf (r = p there).
Emitting c with probability r(c) and otherwise a sample of r without c, renormalised, is a sample of r itself
(Leviathan et al.'s argument with q one-hot), so every emitted token follows the target's distribution.

The accept test runs in log space, log u < log p(c) - log(1 - p(S)), with p(S) summed in node order. The first child
has S empty, so a chain runs exactly verify_sampling's test with one-hot q, and with the same noise it gives the
same ids. Noise is verify_sampling's ``SamplingNoise``: one uniform per node (a node is tested at most once) and
one row of exponentials per row (a row emits one sample: the exponential race over r, unnormalised).
Rows with T <= 0 walk greedily, as in verify_tree_greedy.

The Triton path runs two kernels. ``_common.position_stats_kernel`` reads each live position once: argmax, max and
log sum-exp. ``_tree_sampling_kernel`` gathers each node's log p at its
parent's position, walks the tree of a block of rows in registers, and then reads one logits row per row, at the
path's last node: ``_common.race_sample``, the exponential race over r (p without the rejected tokens) and over p.
"""
from __future__ import annotations

import torch

from ._common import column, empty_result, float32_inputs, launch_position_stats, log_prob, race_sample, unit_stride
from .dispatch import TreeVerifyResult, check_tree_inputs, jit, launch_shape, tl, triton, use_triton
from .verify_sampling import SamplingNoise, checked_noise, race_sample_ref, target_log_probs
from .verify_tree_greedy import TreeWalk, _load_tree, _store_walk, _walk_step, tree_walk_shape

# 1 - p(S) is clamped here, not at 0, so that its log stays finite when rounding makes p(S) reach 1.
_MIN_REMAINING = 1e-30


def verify_tree_sampling_ref(
    target_logits: torch.Tensor,  # [B, N+1, V]
    tree_ids: torch.Tensor,  # [B, N]
    parents: torch.Tensor,  # [B, N]
    num_nodes: torch.Tensor,  # [B]
    temperature: torch.Tensor,  # [B]
    noise: SamplingNoise,
) -> TreeVerifyResult:
    B, N1, V = target_logits.shape
    N = N1 - 1
    device = target_logits.device
    log_p, target_ids, greedy_row = target_log_probs(target_logits, temperature)  # [B, N+1, V], [B, N+1], [B]
    rows = torch.arange(B, device=device)
    node_ids = torch.arange(N, device=device)
    in_tree = node_ids[None, :] < num_nodes[:, None].long()  # [B, N]
    tree_ids = tree_ids.long()
    parents = torch.where(parents < node_ids, parents.long(), -2)  # a parent after its child: never reached
    in_vocab = (tree_ids >= 0) & (tree_ids < V)
    safe_ids = torch.where(in_vocab, tree_ids, 0)  # ids outside the vocabulary are rejected, never gathered

    walk = TreeWalk.start(B, N, device)
    rejected_mass = torch.zeros(B, device=device)  # p(S) at the current node
    for node in range(N):
        token = tree_ids[:, node]
        is_child = walk.is_child(node, parents, num_nodes)
        earlier_children = (parents[:, :node] == walk.current[:, None]) & in_tree[:, :node]
        duplicate = (earlier_children & (tree_ids[:, :node] == token[:, None])).any(dim=1)
        fresh = is_child & in_vocab[:, node] & ~duplicate
        log_p_token = log_p[rows, walk.current + 1, safe_ids[:, node]]
        accept = fresh & (noise.uniforms[:, node].log() < log_p_token - _log_remaining(rejected_mass))
        greedy_accept = is_child & (token == target_ids.gather(1, walk.position)[:, 0])
        take = torch.where(greedy_row, greedy_accept, accept)
        rejected = fresh & ~accept
        rejected_mass = torch.where(take, 0.0, rejected_mass + torch.where(rejected, log_p_token.exp(), 0.0))
        walk.accept(node, take, token)

    # The path ends at a node none of whose children was accepted: every child was tried and rejected, and the
    # in-vocabulary ones are S.
    last = walk.current
    p_last = log_p[rows, last + 1].exp()  # [B, V]
    rejected_children = (parents == last[:, None]) & in_tree & in_vocab
    excluded = torch.zeros(B, V, device=device).scatter_add_(1, safe_ids, rejected_children.float()) > 0
    residual = p_last.masked_fill(excluded, 0.0)
    sampled = race_sample_ref(p_last, residual, rejected_children.any(dim=1), noise.exponentials)
    return walk.finish(torch.where(greedy_row, target_ids[rows, last + 1], sampled))


def _log_remaining(rejected_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - p(S)): dividing r(c) = p(c) / (1 - p(S)) renormalises the residual (0 when S is empty)."""
    return torch.clamp(1.0 - rejected_mass, min=_MIN_REMAINING).log()


@jit
def _tree_sampling_kernel(
    logits_ptr,  # [B, N+1, V] fp32 / bf16 / fp16, unit stride over V
    tree_ids_ptr,  # [B, N] int32 / int64, contiguous
    parents_ptr,  # [B, N] int32 / int64, contiguous
    num_nodes_ptr,  # [B] int32 / int64
    temperature_ptr,  # [B] fp32
    uniforms_ptr,  # [B, N] fp32 in (0, 1), contiguous
    exponentials_ptr,  # [B, V] fp32 Exp(1), contiguous
    target_ids_ptr,  # [B, N+1] int64, from the stats kernel
    row_max_ptr,  # [B, N+1] fp32, from the stats kernel
    log_sum_ptr,  # [B, N+1] fp32, from the stats kernel
    out_ids_ptr,  # [B, N+1] int64 out
    path_nodes_ptr,  # [B, N] int64 out
    num_accepted_ptr,  # [B] int64 out
    B,
    N,
    V,
    stride_b,
    stride_k,
    MIN_REMAINING: tl.constexpr,
    BLOCK_B: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # >= N + 1, nodes and depths per row
    BLOCK_V: tl.constexpr,  # vocabulary tile
):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = b < B
    b64 = b.to(tl.int64)
    nodes = tl.arange(0, BLOCK_N)  # node indices, and depths along the path
    temperature = tl.load(temperature_ptr + b, mask=in_batch, other=1.0)
    greedy = temperature <= 0
    safe_t = tl.where(greedy, 1.0, temperature)
    sampling = in_batch & ~greedy

    # Every node is tested at its parent's position, whichever node is current: gather the tests up front.
    tokens, parents, has_parent, matches = _load_tree(tree_ids_ptr, parents_ptr, num_nodes_ptr, target_ids_ptr, b,
                                                      in_batch, nodes, N)
    parent_at = b64[:, None] * (N + 1) + parents + 1  # flat (b, position) of each node's parent
    in_vocab = has_parent & sampling[:, None] & (tokens >= 0) & (tokens < V)
    x = tl.load(logits_ptr + b64[:, None] * stride_b + (parents + 1).to(tl.int64) * stride_k + tokens,
                mask=in_vocab, other=float("-inf")).to(tl.float32)
    row_max = tl.load(row_max_ptr + parent_at, mask=in_vocab, other=0.0)
    log_sum = tl.load(log_sum_ptr + parent_at, mask=in_vocab, other=0.0)
    log_p = log_prob(x, safe_t[:, None], row_max, log_sum)  # [BLOCK_B, BLOCK_N] log p(token) at the parent
    u = tl.load(uniforms_ptr + b64[:, None] * N + nodes[None, :], mask=in_vocab, other=0.5)
    log_u = tl.log(u)
    in_vocab = in_vocab.to(tl.int32)

    current = tl.full([BLOCK_B], -1, tl.int32)
    num_accepted = tl.zeros([BLOCK_B], tl.int32)
    path = tl.full([BLOCK_B, BLOCK_N], -1, tl.int32)
    out = tl.full([BLOCK_B, BLOCK_N], -1, tl.int64)
    rejected_mass = tl.zeros([BLOCK_B], tl.float32)  # p(S) at the current node
    num_rejected = tl.zeros([BLOCK_B], tl.int32)  # |S| ...
    rejected_ids = tl.full([BLOCK_B, BLOCK_N], -1, tl.int64)  # ... and S, in its first num_rejected slots
    for node in range(0, N):
        token = column(tokens, nodes, node)
        is_child = column(parents, nodes, node) == current
        earlier_child = (nodes[None, :] < node) & (parents == current[:, None])
        duplicate = tl.max((earlier_child & (tokens == token[:, None])).to(tl.int32), axis=1) > 0
        fresh = is_child & (column(in_vocab, nodes, node) != 0) & ~duplicate
        log_p_token = column(log_p, nodes, node)
        log_remaining = tl.log(tl.maximum(1.0 - rejected_mass, MIN_REMAINING))
        accept = fresh & (column(log_u, nodes, node) < log_p_token - log_remaining)
        take = tl.where(greedy, is_child & (column(matches, nodes, node) != 0), accept)
        rejected = fresh & ~accept
        rejected_mass = tl.where(take, 0.0, rejected_mass + tl.where(rejected, tl.exp(log_p_token), 0.0))
        slot = rejected[:, None] & (nodes[None, :] == num_rejected[:, None])
        rejected_ids = tl.where(slot, token[:, None], rejected_ids)
        num_rejected = tl.where(take, 0, num_rejected + rejected.to(tl.int32))
        current, num_accepted, path, out = _walk_step(take, node, token, current, num_accepted, path, out, nodes)

    # One sample per row at the path's last node: r = p without S (the rejected children), or p at a leaf.
    last_at = b64 * (N + 1) + current + 1
    target_id = tl.load(target_ids_ptr + last_at, mask=in_batch, other=0)
    last_max = tl.load(row_max_ptr + last_at, mask=sampling, other=0.0)
    last_log_sum = tl.load(log_sum_ptr + last_at, mask=sampling, other=0.0)
    row_ptr = logits_ptr + b64 * stride_b + (current + 1).to(tl.int64) * stride_k
    sampled_id = race_sample(row_ptr, row_ptr, exponentials_ptr, b64, sampling, num_rejected > 0, safe_t, last_max,
                             last_log_sum, rejected_ids, num_rejected, nodes, V, False, BLOCK_B, BLOCK_V)
    next_id = tl.where(greedy, target_id, sampled_id)
    _store_walk(out_ids_ptr, path_nodes_ptr, num_accepted_ptr, b, in_batch, nodes, path, out, num_accepted, next_id, N)


def verify_tree_sampling_triton(
    target_logits: torch.Tensor,  # [B, N+1, V]
    tree_ids: torch.Tensor,  # [B, N]
    parents: torch.Tensor,  # [B, N]
    num_nodes: torch.Tensor,  # [B]
    temperature: torch.Tensor,  # [B]
    noise: SamplingNoise,
) -> TreeVerifyResult:
    """Triton launcher with ``verify_tree_sampling_ref``'s signature; equal ids for equal noise."""
    B, N1, V = target_logits.shape
    N = N1 - 1
    device = target_logits.device
    target_logits = unit_stride(target_logits)
    tree_ids, parents, num_nodes = tree_ids.contiguous(), parents.contiguous(), num_nodes.contiguous()
    temperature, uniforms, exponentials = float32_inputs(temperature, *noise, device=device)
    result = empty_result(B, N1, device, tree=True)
    if B == 0:
        return result
    stats = launch_position_stats(target_logits, num_nodes, temperature)
    BLOCK_B, BLOCK_V, num_warps = launch_shape(B, V, device)
    BLOCK_B = min(BLOCK_B, tree_walk_shape(B, N, device)[0])  # the walk's tiles hold BLOCK_N values per row
    _tree_sampling_kernel[(triton.cdiv(B, BLOCK_B),)](
        target_logits, tree_ids, parents, num_nodes, temperature, uniforms, exponentials,
        *stats, *result, B, N, V, target_logits.stride(0), target_logits.stride(1),
        MIN_REMAINING=_MIN_REMAINING, BLOCK_B=BLOCK_B, BLOCK_N=triton.next_power_of_2(N1), BLOCK_V=BLOCK_V,
        num_warps=num_warps,
    )
    return result


def verify_tree_sampling(
    target_logits: torch.Tensor,  # [B, N+1, V]
    tree_ids: torch.Tensor,  # [B, N]
    parents: torch.Tensor,  # [B, N]
    num_nodes: torch.Tensor,  # [B]
    temperature: torch.Tensor,  # [B]
    generator: torch.Generator | None = None,
    impl: str = "auto",
    noise: SamplingNoise | None = None,
) -> TreeVerifyResult:
    """Speculative-sampling verification of B ragged token trees against one tree forward of the target.

    The emitted tokens are distributed exactly as the target's (temperature-scaled) distribution. Noise comes
    from ``generator`` (or is passed in as ``noise``: uniforms [B, N], exponentials [B, V]). Returns
    ``(out_ids [B, N+1], path_nodes [B, N], num_accepted [B])`` as ``verify_tree_greedy`` does. ``num_nodes[b]``
    must lie in [0, N]; nodes past it are ignored. Rows with ``temperature[b] <= 0`` are verified greedily.
    """
    check_tree_inputs(target_logits, tree_ids, parents, num_nodes)
    noise = checked_noise(target_logits, temperature, noise, generator, length="N")
    if use_triton(impl, target_logits.device):
        return verify_tree_sampling_triton(target_logits, tree_ids, parents, num_nodes, temperature, noise)
    return verify_tree_sampling_ref(target_logits, tree_ids, parents, num_nodes, temperature, noise)
