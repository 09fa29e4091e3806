"""Tree verification, greedy: accept the longest path from the root along which every node is the target's argmax.

A draft may propose a *token tree* per row b instead of a chain (SpecInfer, Miao et al. 2024; EAGLE-2):
  tree_ids[b, i]   the token of node i
  parents[b, i]    the index of node i's parent, -1 for the root (the last verified token)
  num_nodes[b]     nodes i >= num_nodes[b] are padding and never read
Nodes are in topological order (parents[b, i] < i), as a BFS or DFS of the draft gives them.
target_logits[b, 0] is the target's distribution after the root and target_logits[b, 1 + i] after node i: the
tree forward computes them all at once under a tree attention mask.

The *path* is walked from the root: at the current node take the target's argmax there and accept the first child
(in node order) with that token; stop when no child matches. The path's nodes are the accepted draft tokens; the
target's argmax at its last node is the correction token (that node had children) or the bonus token (a leaf).
A chain (parents -1, 0, 1, ...) gives exactly ``verify_greedy``'s result. The decoding loop keeps the KV rows of
the root and of ``path_nodes`` (row 1 + i for node i, when the tree forward puts the root at row 0).

Because a parent comes before its children, the walk is one scan over the nodes in order: node i is accepted iff
its parent is the current node when the scan reaches it and its test passes, since the children of an accepted node
all come after it and the current node's earlier children were all rejected. The Triton path runs two kernels:
``_common.position_stats_kernel`` reduces each live position (0..num_nodes[b]) to its argmax, and
``_tree_greedy_walk_kernel`` runs the scan for a block of rows at once, reading ids only. Node i is always tested
at its parent's position, whichever node is current, so the kernel gathers every node's test before the scan and
the scan itself reads no memory.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._common import column, empty_result, launch_position_stats, store_out_ids, unit_stride
from .dispatch import TreeVerifyResult, check_tree_inputs, jit, launch_shape, target_argmax, tl, triton, use_triton


@dataclass
class TreeWalk:
    """The state of the scan over B rows: the current node of each row (-1: the root) and the path so far."""

    current: torch.Tensor  # [B] int64, the last accepted node, -1 for the root
    path_nodes: torch.Tensor  # [B, N] int64, -1 padded
    out_ids: torch.Tensor  # [B, N+1] int64, -1 padded
    num_accepted: torch.Tensor  # [B] int64

    @classmethod
    def start(cls, B: int, N: int, device: torch.device) -> TreeWalk:
        def unset(*shape: int) -> torch.Tensor:
            return torch.full(shape, -1, dtype=torch.long, device=device)

        return cls(unset(B), unset(B, N), unset(B, N + 1), torch.zeros(B, dtype=torch.long, device=device))

    @property
    def position(self) -> torch.Tensor:
        """[B, 1] the logits position of the current node (0 for the root), ready for ``gather``."""
        return self.current[:, None] + 1

    def is_child(self, node: int, parents: torch.Tensor, num_nodes: torch.Tensor) -> torch.Tensor:
        """[B] bool: ``node`` is a real node whose parent is the current node."""
        return (node < num_nodes.long()) & (parents[:, node].long() == self.current)

    def accept(self, node: int, take: torch.Tensor, token: torch.Tensor) -> None:
        """Append ``node`` (its token ``token`` [B]) to the path of the rows where ``take`` (no host sync)."""
        depth = self.num_accepted[:, None]  # < N: at most one node per scanned node is accepted
        self.path_nodes.scatter_(1, depth, torch.where(take[:, None], node, self.path_nodes.gather(1, depth)))
        self.out_ids.scatter_(1, depth, torch.where(take[:, None], token[:, None], self.out_ids.gather(1, depth)))
        self.current = torch.where(take, node, self.current)
        self.num_accepted += take.long()

    def finish(self, next_ids: torch.Tensor) -> TreeVerifyResult:
        """The result, with ``next_ids`` [B] (correction or bonus) after each row's path."""
        self.out_ids.scatter_(1, self.num_accepted[:, None], next_ids[:, None])
        return TreeVerifyResult(self.out_ids, self.path_nodes, self.num_accepted)


def verify_tree_greedy_ref(
    target_logits: torch.Tensor,  # [B, N+1, V]
    tree_ids: torch.Tensor,  # [B, N]
    parents: torch.Tensor,  # [B, N]
    num_nodes: torch.Tensor,  # [B]
) -> TreeVerifyResult:
    B, N1, V = target_logits.shape
    target_ids = target_argmax(target_logits)  # [B, N+1], first index among ties
    # The scan runs on the host: one argmax per position on the device, then N steps of list work per row (a tensor
    # op per node, as ``TreeWalk`` does for the sampling walk, costs more than the walk itself on a CPU).
    targets, tokens, parent_of, counts = target_ids.tolist(), tree_ids.tolist(), parents.tolist(), num_nodes.tolist()
    out_ids, path_nodes, num_accepted = [[-1] * N1 for _ in range(B)], [[-1] * (N1 - 1) for _ in range(B)], [0] * B
    for b in range(B):
        current, depth = -1, 0
        for node in range(int(counts[b])):
            if parent_of[b][node] == current and tokens[b][node] == targets[b][current + 1]:
                out_ids[b][depth], path_nodes[b][depth] = tokens[b][node], node
                current, depth = node, depth + 1
        out_ids[b][depth], num_accepted[b] = targets[b][current + 1], depth
    as_long = functools.partial(torch.tensor, dtype=torch.long, device=target_logits.device)
    return TreeVerifyResult(as_long(out_ids).reshape(B, N1), as_long(path_nodes).reshape(B, N1 - 1), as_long(num_accepted))


@jit
def _load_tree(tree_ids_ptr, parents_ptr, num_nodes_ptr, target_ids_ptr, b, in_batch, nodes, N):
    """[R, BLOCK_N] tiles of the rows' node tokens (int64) and parents (int32), whether each parent is an
    earlier node or the root, so that its position 1 + parent can be read, and each node's greedy test (its token
    is the target's argmax at its parent). Padding nodes get parent -2, which is never the current node, so the
    walk needs no other mask.

    Each node is tested at its parent's position, whichever node is current: gathering every test up front
    leaves the scan over the nodes only moving registers."""
    n = tl.load(num_nodes_ptr + b, mask=in_batch, other=0)
    in_tree = in_batch[:, None] & (nodes[None, :] < n[:, None])
    at = b[:, None].to(tl.int64) * N + nodes[None, :]
    tokens = tl.load(tree_ids_ptr + at, mask=in_tree, other=-1).to(tl.int64)
    parents = tl.load(parents_ptr + at, mask=in_tree, other=-2).to(tl.int32)
    has_parent = in_tree & (parents >= -1) & (parents < nodes[None, :])
    parents = tl.where(has_parent, parents, -2)
    target_at_parent = tl.load(target_ids_ptr + b[:, None].to(tl.int64) * (N + 1) + parents + 1, mask=has_parent,
                               other=-1)
    return tokens, parents, has_parent, (tokens == target_at_parent).to(tl.int32)


@jit
def _walk_step(take, node, token, current, num_accepted, path, out, depths):
    """Accept ``node`` (tokens ``token`` [R]) in the rows where ``take``: it goes to the register tiles ``path``
    and ``out`` [R, BLOCK_N] at depth num_accepted and becomes the current node."""
    at = take[:, None] & (depths[None, :] == num_accepted[:, None])
    path = tl.where(at, node, path)
    out = tl.where(at, token[:, None], out)
    return tl.where(take, node, current), num_accepted + take.to(tl.int32), path, out


@jit
def _store_walk(out_ids_ptr, path_nodes_ptr, num_accepted_ptr, b, in_batch, nodes, path, out, num_accepted, next_id,
                N):
    """The walk's results: out_ids (the path's tokens, then ``next_id``), path_nodes and num_accepted."""
    store_out_ids(out_ids_ptr, num_accepted_ptr, b, in_batch, nodes, out, num_accepted, next_id, N)
    at = b[:, None].to(tl.int64) * N + nodes[None, :]
    tl.store(path_nodes_ptr + at, path, mask=in_batch[:, None] & (nodes < N)[None, :])


@jit
def _tree_greedy_walk_kernel(
    target_ids_ptr,  # [B, N+1] int64, argmax per position, valid at positions 0..num_nodes[b]
    tree_ids_ptr,  # [B, N] int32 / int64, contiguous
    parents_ptr,  # [B, N] int32 / int64, contiguous
    num_nodes_ptr,  # [B] int32 / int64
    out_ids_ptr,  # [B, N+1] int64 out
    path_nodes_ptr,  # [B, N] int64 out
    num_accepted_ptr,  # [B] int64 out
    B,
    N,
    BLOCK_B: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # >= N + 1, nodes and depths per row
):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = b < B
    b64 = b.to(tl.int64)
    nodes = tl.arange(0, BLOCK_N)  # node indices, and depths along the path
    tokens, parents, _, matches = _load_tree(tree_ids_ptr, parents_ptr, num_nodes_ptr, target_ids_ptr, b, in_batch,
                                             nodes, N)

    current = tl.full([BLOCK_B], -1, tl.int32)
    num_accepted = tl.zeros([BLOCK_B], tl.int32)
    path = tl.full([BLOCK_B, BLOCK_N], -1, tl.int32)
    out = tl.full([BLOCK_B, BLOCK_N], -1, tl.int64)
    for node in range(0, N):
        take = (column(parents, nodes, node) == current) & (column(matches, nodes, node) != 0)
        token = column(tokens, nodes, node)
        current, num_accepted, path, out = _walk_step(take, node, token, current, num_accepted, path, out, nodes)
    next_id = tl.load(target_ids_ptr + b64 * (N + 1) + current + 1, mask=in_batch, other=-1)
    _store_walk(out_ids_ptr, path_nodes_ptr, num_accepted_ptr, b, in_batch, nodes, path, out, num_accepted, next_id, N)


def tree_walk_shape(B: int, N: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_N, num_warps) for a walk over B rows of N nodes: its tiles hold N+1 depths per row."""
    return launch_shape(B, N + 1, device)


def verify_tree_greedy_triton(
    target_logits: torch.Tensor,  # [B, N+1, V]
    tree_ids: torch.Tensor,  # [B, N]
    parents: torch.Tensor,  # [B, N]
    num_nodes: torch.Tensor,  # [B]
) -> TreeVerifyResult:
    """Triton launcher with ``verify_tree_greedy_ref``'s signature and results (bit-equal ids)."""
    B, N1, V = target_logits.shape
    N = N1 - 1
    device = target_logits.device
    target_logits = unit_stride(target_logits)
    tree_ids, parents, num_nodes = tree_ids.contiguous(), parents.contiguous(), num_nodes.contiguous()
    result = empty_result(B, N1, device, tree=True)
    if B == 0:
        return result
    target_ids = launch_position_stats(target_logits, num_nodes).target_ids
    BLOCK_B, BLOCK_N, num_warps = tree_walk_shape(B, N, device)
    _tree_greedy_walk_kernel[(triton.cdiv(B, BLOCK_B),)](
        target_ids, tree_ids, parents, num_nodes, *result, B, N, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, num_warps=num_warps,
    )
    return result


def verify_tree_greedy(
    target_logits: torch.Tensor,  # [B, N+1, V]
    tree_ids: torch.Tensor,  # [B, N]
    parents: torch.Tensor,  # [B, N]
    num_nodes: torch.Tensor,  # [B]
    impl: str = "auto",
) -> TreeVerifyResult:
    """Greedy verification of B ragged token trees against one tree forward of the target.

    Returns ``(out_ids [B, N+1], path_nodes [B, N], num_accepted [B])``, -1 padded: the accepted path's tokens
    then the correction/bonus token, the accepted path's node indices, and its length. ``num_nodes[b]`` must lie
    in [0, N]; nodes past it are ignored.
    """
    check_tree_inputs(target_logits, tree_ids, parents, num_nodes)
    if use_triton(impl, target_logits.device):
        return verify_tree_greedy_triton(target_logits, tree_ids, parents, num_nodes)
    return verify_tree_greedy_ref(target_logits, tree_ids, parents, num_nodes)
