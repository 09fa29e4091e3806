"""Model-free drafts that propose token trees (``DraftOutput.parents``), verified in one target forward.

- ``lookup-tree``: prompt lookup with several earlier matches as branches. The continuations of the longest n-gram
  matches (longer n first, then more recent first) are merged into a trie of at most ``max_nodes`` nodes.
- ``successor``: a successor table (Token Recycling, Luo et al. 2024, arXiv 2408.08076): for each token id the
  target's top-k next tokens, overwritten from the logits of every verify forward (``Draft.observe``, no extra
  target work). The tree grows from the pending token best-first by the sum of the successor ranks along the path
  (ties: shallower first), so a budget of 16 nodes reaches past depth 2 along the top-ranked successors. The table
  is a tensor [V, k] (-1: not seen yet) so that it can be saved with safetensors; it lives as long as the draft.
  It has no teacher-forced replay yet (the table depends on every verified node's logits): it replays as ``none``.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from ..base import checks
from ..base.errors import CtxdraftError
from .draft import DecodeState, Draft, DraftOutput, DraftRun, TeacherForced


@dataclass
class TokenTree:
    """A trie of draft tokens under the root (the pending token): node i has token ``ids[i]`` and parent
    ``parents[i]`` (-1: the root); parents come before their children."""

    ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    children: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent, token) -> node

    def add(self, parent: int, token: int) -> int:
        """The node for ``token`` under ``parent``, made if it is not there yet."""
        node = self.children.get((parent, token))
        if node is None:
            node = len(self.ids)
            self.ids.append(token)
            self.parents.append(parent)
            self.children[(parent, token)] = node
        return node

    def insert(self, tokens: list[int], max_nodes: int) -> None:
        """Merge the path ``tokens`` under the root, stopping where the tree would pass ``max_nodes``."""
        node = -1
        for token in tokens:
            if (node, token) not in self.children and len(self.ids) >= max_nodes:
                return
            node = self.add(node, token)

    def greedy_path(self, continuation: list[int]) -> list[int]:
        """The tokens greedy verification accepts when the target continues with ``continuation``, then the first
        rejected child of the last accepted node (if it has children): a chain with the tree's accepted length."""
        path: list[int] = []
        node = -1
        for token in continuation:
            child = self.children.get((node, token))
            if child is None:
                break
            path.append(token)
            node = child
        rejected = next((t for (parent, t) in self.children if parent == node), None)
        return path + ([rejected] if rejected is not None else [])

    def output(self) -> DraftOutput:
        """The tree as a proposal (no nodes: the empty chain)."""
        parents = list(self.parents) if self.ids else None
        return DraftOutput(list(self.ids), parents=parents, evaluations=1, stopped=False)


def _check_tree_size(kind: str, draft_len, max_nodes) -> tuple[int, int]:
    return (checks.integer(f"{kind} draft_len (the tree's depth)", draft_len, minimum=1),
            checks.integer(f"{kind} max_nodes", max_nodes, minimum=1, maximum=1024))


@dataclass
class LookupTreeSettings:
    draft_len: int = 5  # the deepest node
    max_nodes: int = 16
    ngram_sizes: list[int] = field(default_factory=lambda: [3, 2, 1])  # tried longest first

    def __post_init__(self):
        self.draft_len, self.max_nodes = _check_tree_size("lookup-tree", self.draft_len, self.max_nodes)
        if not isinstance(self.ngram_sizes, (list, tuple)) or not self.ngram_sizes:
            raise CtxdraftError(f"lookup-tree ngram_sizes must be a list of positive integers, got {self.ngram_sizes!r}")
        self.ngram_sizes = sorted({checks.integer("lookup-tree ngram size", n, minimum=1) for n in self.ngram_sizes},
                                  reverse=True)


class NgramOccurrences:
    """Every earlier end position of every n-gram in a growing token list (``NgramIndex`` keeps only the latest)."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.ends: dict[tuple[int, ...], list[int]] = {}
        self.indexed = 0

    def update(self, tokens: list[int]) -> None:
        # An n-gram ending at position e-1 is indexed once its continuation tokens[e] exists.
        for end in range(max(self.indexed, 1), len(tokens)):
            for n in self.sizes:
                if end >= n:
                    self.ends.setdefault(tuple(tokens[end - n : end]), []).append(end)
        self.indexed = max(self.indexed, len(tokens))

    def tree(self, tokens: list[int], max_depth: int, max_nodes: int) -> TokenTree:
        """The trie of continuations after matches of the last n tokens: longer n first, then the most recent."""
        tree = TokenTree()
        seen: set[int] = set()
        for n in self.sizes:
            if len(tokens) <= n:
                continue
            for end in reversed(self.ends.get(tuple(tokens[-n:]), [])):
                if len(tree.ids) >= max_nodes or len(seen) >= 4 * max_nodes:  # bounded work on repetitive text
                    return tree
                if end not in seen:  # a shorter n-gram matches again where a longer one did
                    seen.add(end)
                    tree.insert(tokens[end : end + max_depth], max_nodes)
        return tree


class LookupTreeDraft(Draft):
    """Prompt lookup whose earlier matches become the branches of one token tree."""

    kind = "lookup-tree"
    batches_natively = True  # no model work to batch

    def __init__(self, name: str = "lookup-tree", settings: LookupTreeSettings | None = None):
        super().__init__(name)
        self.settings = settings or LookupTreeSettings()
        self.draft_len = self.settings.draft_len
        self.index = NgramOccurrences(self.settings.ngram_sizes)

    def start(self, state):
        self.index = NgramOccurrences(self.settings.ngram_sizes)

    def propose(self, state, max_len):
        self.index.update(state.tokens)
        depth = min(max_len, self.settings.draft_len)
        return self.index.tree(state.tokens, depth, self.settings.max_nodes).output()

    def teacher_forced(self, tp, vocab_size):
        return LookupTreeTeacherForced(self.settings)


class LookupTreeTeacherForced(TeacherForced):
    """``LookupTreeDraft`` replayed over the true prefix: its tree reduced to the path greedy verification accepts
    (exact accepted tokens; the replay counts that path's tokens as drafted, not the tree's nodes)."""

    def __init__(self, settings: LookupTreeSettings):
        self.settings = settings
        self.index = NgramOccurrences(settings.ngram_sizes)

    def propose(self, seq, pending, max_len):
        tokens = seq[: pending + 1]
        self.index.update(tokens)
        depth = min(max_len, self.settings.draft_len)
        tree = self.index.tree(tokens, depth, self.settings.max_nodes)
        return DraftRun(tree.greedy_path(seq[pending + 1 : pending + 1 + depth]), 1, False)


@dataclass
class SuccessorSettings:
    draft_len: int = 6  # the deepest node
    max_nodes: int = 16
    top_k: int = 4  # successors kept per token

    def __post_init__(self):
        self.draft_len, self.max_nodes = _check_tree_size("successor", self.draft_len, self.max_nodes)
        self.top_k = checks.integer("successor top_k", self.top_k, minimum=1, maximum=64)


class SuccessorDraft(Draft):
    """Token Recycling: a tree from the target's own top-k successors of each token (see the module docstring)."""

    kind = "successor"
    batches_natively = True  # a table look-up per row, no model work to batch

    def __init__(self, name: str = "successor", settings: SuccessorSettings | None = None):
        super().__init__(name)
        self.settings = settings or SuccessorSettings()
        self.draft_len = self.settings.draft_len
        self.observe_top_k = self.settings.top_k
        self.table: torch.Tensor | None = None  # [V, k] int64, -1: unknown

    def start(self, state: DecodeState):
        # The table outlives one generation (what the target predicts after a token changes little between prompts).
        if self.table is None or self.table.shape[0] != state.vocab_size:
            self.table = torch.full((state.vocab_size, self.settings.top_k), -1, dtype=torch.long)

    def observe(self, state, token_ids, topk_ids):  # topk_ids: [T, k]
        k = min(topk_ids.shape[1], self.settings.top_k)
        rows = torch.tensor(token_ids, dtype=torch.long)
        keep = rows < self.table.shape[0]
        self.table[rows[keep], :k] = topk_ids[keep, :k].to(self.table.dtype).cpu()

    def propose(self, state, max_len):
        max_depth = min(max_len, self.settings.draft_len)
        tree = TokenTree()
        if max_depth < 1 or self.table is None:
            return tree.output()
        # (rank sum, depth, order, parent, token): popped in an order where parents come before their children.
        heap = [(rank, 1, rank, -1, token) for rank, token in enumerate(self.successors(state.tokens[-1]))]
        heapq.heapify(heap)
        order = len(heap)
        while heap and len(tree.ids) < self.settings.max_nodes:
            rank_sum, depth, _, parent, token = heapq.heappop(heap)
            node = tree.add(parent, token)
            if depth < max_depth:
                for rank, child in enumerate(self.successors(token)):
                    heapq.heappush(heap, (rank_sum + rank, depth + 1, order, node, child))
                    order += 1
        return tree.output()

    def successors(self, token: int) -> list[int]:
        """The known successors of ``token``, best first, without repeats."""
        if not 0 <= token < self.table.shape[0]:
            return []
        return list(dict.fromkeys(t for t in self.table[token].tolist() if t >= 0))
