"""Array-backed suffix matching over token buffers: what the ``suffix`` draft looks continuations up in (SuffixDecoding,
Oliaro et al. 2024, arXiv 2411.04975, as in Snowflake's Arctic Inference; written here because arctic-inference ships
its suffix tree only as a CUDA/vLLM-built extension).

A *buffer* is documents of token ids joined by ``SEP`` (-1), so that no match or continuation crosses two documents.

- ``SuffixArray``: the buffer's suffixes sorted by their first ``depth`` tokens (prefix doubling with ``np.lexsort``,
  O(n log depth)); the suffixes that start with a pattern of up to ``depth`` tokens are one contiguous range, found by
  binary search. That range is the node of the (implicit) suffix tree, its size the node's count.
- ``scan_matches``: the same question answered by a vectorised scan, for short buffers (one request's own tokens, the
  datastore's not yet indexed tail).

``continuation_tree`` turns the continuations after all matches into a tree of the most frequent ones: a child's
probability is its count over its parent's, a node's score the product along its path; nodes are taken best score
first while the score is at least ``min_prob``.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

SEP = -1  # between documents; also pads the buffer's end
MAX_ROWS = 1024  # continuations read per match (evenly spaced when a match is more frequent): bounded work per step


def join_documents(documents) -> np.ndarray:
    """Documents (lists of token ids) as one int32 buffer, each followed by ``SEP``."""
    parts = []
    for doc in documents:
        parts.append(np.asarray(doc, dtype=np.int32))
        parts.append(np.array([SEP], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def build_suffix_array(tokens: np.ndarray, depth: int) -> np.ndarray:
    """The start positions of ``tokens``' suffixes sorted by their first ``depth`` tokens (ties in any order).
    Suffixes that start at ``SEP`` are left out (no match starts there). int32 [n']."""
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    rank = tokens.astype(np.int64) + 1  # SEP -> 0, sorts first
    k = 1
    while k < depth:
        # rank by the first 2k tokens: the pair (rank of the first k, rank of the next k) as one int64 key
        shifted = np.zeros(n, dtype=np.int64)
        if k < n:
            shifted[: n - k] = rank[k:]
        key = rank * (n + 2) + shifted
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        new_group = np.ones(n, dtype=np.int64)
        new_group[1:] = sorted_key[1:] != sorted_key[:-1]
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.cumsum(new_group)
        k *= 2
        if rank.max() == n:  # every suffix is told apart already
            break
    order = np.argsort(rank, kind="stable")
    return order[tokens[order] != SEP].astype(np.int32)


def _padded(tokens: np.ndarray, pad: int) -> np.ndarray:
    return np.concatenate([tokens.astype(np.int32), np.full(pad, SEP, dtype=np.int32)])


@dataclass
class Match:
    """Where a pattern (the context's last ``length`` tokens) occurs: the positions right after each occurrence."""

    length: int
    starts: np.ndarray  # int64 [R] where each continuation starts


NO_MATCH = Match(0, np.zeros(0, dtype=np.int64))


class SuffixArray:
    """A sorted suffix array over a fixed buffer (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, depth: int, order: np.ndarray | None = None):
        self.depth = depth
        self.tokens = _padded(tokens, depth + 65)  # every read of up to depth + 64 tokens stays inside
        self.num_tokens = len(tokens)
        self.order = build_suffix_array(tokens, depth) if order is None else order.astype(np.int32)

    def _range(self, pattern: list[int]) -> tuple[int, int]:
        """The range of ``order`` whose suffixes start with ``pattern``."""
        m = len(pattern)
        tokens, order = self.tokens, self.order
        lo, hi = 0, len(order)
        while lo < hi:  # first suffix >= pattern
            mid = (lo + hi) // 2
            s = int(order[mid])
            if tokens[s : s + m].tolist() < pattern:
                lo = mid + 1
            else:
                hi = mid
        first, hi = lo, len(order)
        while lo < hi:  # first suffix whose first m tokens > pattern
            mid = (lo + hi) // 2
            s = int(order[mid])
            if tokens[s : s + m].tolist() <= pattern:
                lo = mid + 1
            else:
                hi = mid
        return first, lo

    def longest_match(self, context: list[int], max_len: int) -> Match:
        """The longest suffix of ``context`` (at most ``max_len`` <= depth tokens) that occurs in the buffer.
        Occurrence is monotone in the length (a longer suffix occurs only where a shorter one does), so the length
        is found by binary search."""
        best = NO_MATCH
        lo, hi = 1, min(max_len, self.depth, len(context))
        while lo <= hi:
            m = (lo + hi) // 2
            first, last = self._range(list(context[-m:]))
            if last > first:
                best = Match(m, (self.order[first:last].astype(np.int64) + m))
                lo = m + 1
            else:
                hi = m - 1
        return best


def scan_matches(tokens: np.ndarray, context: list[int], max_len: int, end: int | None = None) -> Match:
    """The longest suffix of ``context`` (at most ``max_len`` tokens) occurring in ``tokens[:end]`` so that at least
    one token follows it there, by a vectorised scan (O(len(tokens)) per step: for short buffers)."""
    end = len(tokens) if end is None else end
    if end < 2 or not context:
        return NO_MATCH
    starts = np.flatnonzero(tokens[: end - 1] == context[-1]) + 1  # continuation positions
    length = 1
    if len(starts) == 0:
        return NO_MATCH
    while length < min(max_len, len(context)):
        prev = starts - length - 1
        keep = prev >= 0
        cand = starts[keep]
        cand = cand[tokens[prev[keep]] == context[-length - 1]]
        if len(cand) == 0:
            break
        starts, length = cand, length + 1
    return Match(length, starts.astype(np.int64))


def continuations(tokens: np.ndarray, starts: np.ndarray, depth: int, end: int | None = None) -> np.ndarray:
    """[R, depth] the tokens after each start (``SEP`` past a document's end or past ``end``), at most ``MAX_ROWS``
    rows (evenly spaced over the starts, which keeps the frequencies)."""
    if len(starts) > MAX_ROWS:
        starts = starts[np.linspace(0, len(starts) - 1, MAX_ROWS).astype(np.int64)]
    limit = len(tokens) if end is None else end
    idx = starts[:, None] + np.arange(depth)[None, :]
    rows = np.where(idx < limit, tokens[np.minimum(idx, len(tokens) - 1)], SEP).astype(np.int32)
    # a SEP ends the row: everything after it is SEP too
    rows[np.cumsum(rows == SEP, axis=1) > 0] = SEP
    return rows


@dataclass
class TreeNode:
    token: int
    parent: int  # index into the node list, -1: the root
    prob: float  # the product of count ratios along its path


def continuation_tree(rows: np.ndarray, max_nodes: int, min_prob: float) -> list[TreeNode]:
    """The most frequent continuations in ``rows`` [R, depth] as a tree (see the module docstring); parents come
    before their children, siblings in falling count order."""
    if rows.size == 0 or max_nodes < 1:
        return []
    R, depth = rows.shape
    rows = rows[np.lexsort(rows.T[::-1])]  # sorted rows: each tree node is a contiguous range of them
    nodes: list[TreeNode] = []
    # (-score, tie, parent node, depth of the token, lo, hi): the candidate child whose rows are rows[lo:hi]
    heap: list[tuple] = []
    tie = 0

    def push_children(parent: int, col: int, lo: int, hi: int, parent_prob: float) -> None:
        nonlocal tie
        if col >= depth:
            return
        column = rows[lo:hi, col]
        cuts = np.flatnonzero(column[1:] != column[:-1]) + 1
        bounds = np.concatenate([[0], cuts, [hi - lo]])
        total = hi - lo
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            if column[a] == SEP:
                continue
            prob = parent_prob * (b - a) / total
            if prob >= min_prob:
                heapq.heappush(heap, (-prob, tie, parent, col, lo + a, lo + b))
                tie += 1

    push_children(-1, 0, 0, R, 1.0)
    while heap and len(nodes) < max_nodes:
        neg_prob, _, parent, col, lo, hi = heapq.heappop(heap)
        nodes.append(TreeNode(int(rows[lo, col]), parent, -neg_prob))
        push_children(len(nodes) - 1, col + 1, lo, hi, -neg_prob)
    return nodes
