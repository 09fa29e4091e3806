"""Model-free drafts that propose token trees (``DraftOutput.parents``), verified in one target forward.

- ``lookup-tree``: prompt lookup with several earlier matches as branches. The continuations of the longest n-gram
  matches (longer n first, then more recent first) are merged into a trie of at most ``max_nodes`` nodes.
- ``successor``: a successor table (Token Recycling, Luo et al. 2024, arXiv 2408.08076): for each token id the
  target's top-k next tokens, overwritten from the logits of every verify forward (``Draft.observe``, no extra
  target work). The tree grows from the pending token best-first by the sum of the successor ranks along the path
  (ties: shallower first), so a budget of 16 nodes reaches past depth 2 along the top-ranked successors. The table
  is a tensor [V, k] (-1: not seen yet) so that it can be saved with safetensors. It starts every generation from its
  seed (``SuccessorDraft.seed``: empty, or a table it was given) and learns only from committed positions (the root
  and the accepted path: the target's own continuation), so its teacher-forced replay, which reads the same rows from
  the teacher pass's top-k (``TeacherPass.topk_ids``), is exact.

``max_nodes="auto"``: the node budget from the machine's costs (``tree_budget.py``).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from ..base import checks
from ..base.errors import CtxdraftError
from .draft import DecodeState, Draft, DraftOutput, DraftRun, TeacherForced, TeacherPass
from .tree_budget import NodeBudget, check_max_nodes, checked_costs


@dataclass
class TokenTree:
    """A trie of draft tokens under the root (the pending token): node i has token ``ids[i]`` and parent
    ``parents[i]`` (-1: the root); parents come before their children."""

    ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    children: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent, token) -> node
    budget: NodeBudget | None = None  # None: every node is allowed
    num_children: dict[int, int] = field(default_factory=dict)
    depths: list[int] = field(default_factory=list)
    acceptance: list[float] = field(default_factory=list)  # estimated P(on the accepted path), by the budget's rates
    main: list[bool] = field(default_factory=list)  # on the first-ranked path (always kept)
    expected: float = 0.0  # the estimated accepted length: the sum of ``acceptance``

    def add(self, parent: int, token: int) -> int | None:
        """The node for ``token`` under ``parent``, made if it is not there yet and the budget allows it (else None)."""
        node = self.children.get((parent, token))
        if node is None:
            rank = self.num_children.get(parent, 0)
            depth = self.depths[parent] + 1 if parent >= 0 else 1
            main = rank == 0 and (parent < 0 or self.main[parent])
            acceptance = (self.acceptance[parent] if parent >= 0 else 1.0) * (self.budget.rate(depth, rank) if self.budget else 1.0)
            if not main and self.budget is not None and not self.budget.allows(len(self.ids), self.expected, acceptance):
                return None
            node = len(self.ids)
            self.ids.append(token)
            self.parents.append(parent)
            self.children[(parent, token)] = node
            self.num_children[parent] = rank + 1
            self.depths.append(depth)
            self.acceptance.append(acceptance)
            self.main.append(main)
            self.expected += acceptance
        return node

    def insert(self, tokens: list[int], max_nodes: int) -> None:
        """Merge the path ``tokens`` under the root, stopping where the tree would pass ``max_nodes`` or the budget."""
        node = -1
        for token in tokens:
            if (node, token) not in self.children and len(self.ids) >= max_nodes:
                return
            node = self.add(node, token)
            if node is None:
                return

    def output(self) -> DraftOutput:
        """The tree as a proposal (no nodes: the empty chain)."""
        parents = list(self.parents) if self.ids else None
        return DraftOutput(list(self.ids), parents=parents, evaluations=1, stopped=False)

    def run(self) -> DraftRun:
        """The tree as a replayed proposal (``trajectories.replay`` walks it as greedy verification does)."""
        return DraftRun(list(self.ids), 1, False, list(self.parents) if self.ids else None)


class TreeLearner:
    """The node budget of one tree draft (real or replayed) and what it learns from the accepted paths: before each
    proposal, the last tree's hits against the tokens committed since (``NodeBudget.learn``)."""

    def __init__(self, auto: bool, step_s: list[float] | None):
        self.budget = NodeBudget(auto)
        if step_s is not None:
            self.budget.set_costs(step_s)
        self.last: tuple[TokenTree, int] | None = None  # the last tree and the length of the sequence it continued

    def new_tree(self, tokens: list[int]) -> TokenTree:
        """A tree to fill for the committed ``tokens``, after learning from the last one."""
        if self.last is not None:
            tree, length = self.last
            self.budget.learn(tree.ids, tree.parents, tokens[length:])
        tree = TokenTree(budget=self.budget)
        self.last = (tree, len(tokens))
        return tree


def _check_tree_size(kind: str, draft_len, max_nodes) -> tuple[int, int | str]:
    draft_len = checks.integer(f"{kind} draft_len (the tree's depth)", draft_len, minimum=1, maximum=64)
    cap, auto = check_max_nodes(kind, max_nodes)
    return draft_len, "auto" if auto else cap


class TreeDraft(Draft):
    """What the tree drafts share: the node cap and budget (``max_nodes``, ``set_costs``)."""

    proposes_trees = True

    def __init__(self, name: str, settings):
        super().__init__(name)
        self.settings = settings
        self.draft_len = settings.draft_len
        self.node_cap, self.auto = check_max_nodes(self.kind, settings.max_nodes)
        self.step_s: list[float] | None = None
        self.learner = TreeLearner(self.auto, None)

    def max_verified(self) -> int:
        return self.node_cap

    def set_costs(self, step_s: list[float]) -> None:
        self.step_s = checked_costs(self.name, step_s, self.node_cap)

    def start(self, state) -> None:
        self.learner = TreeLearner(self.auto, self.step_s)


@dataclass
class LookupTreeSettings:
    draft_len: int = 5  # the deepest node
    max_nodes: int | str = 16  # or "auto": the budget from the machine's costs
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

    def tree(self, tokens: list[int], max_depth: int, max_nodes: int, tree: TokenTree | None = None) -> TokenTree:
        """The trie of continuations after matches of the last n tokens: longer n first, then the most recent
        (filled into ``tree`` when given: one with a node budget)."""
        tree = tree if tree is not None else TokenTree()
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


class LookupTreeDraft(TreeDraft):
    """Prompt lookup whose earlier matches become the branches of one token tree."""

    kind = "lookup-tree"
    batches_natively = True  # no model work to batch

    def __init__(self, name: str = "lookup-tree", settings: LookupTreeSettings | None = None):
        super().__init__(name, settings or LookupTreeSettings())
        self.index = NgramOccurrences(self.settings.ngram_sizes)

    def start(self, state):
        super().start(state)
        self.index = NgramOccurrences(self.settings.ngram_sizes)

    def propose(self, state, max_len):
        self.index.update(state.tokens)
        depth = min(max_len, self.settings.draft_len)
        return self.index.tree(state.tokens, depth, self.node_cap, self.learner.new_tree(state.tokens)).output()

    def teacher_forced(self, tp, vocab_size):
        return LookupTreeTeacherForced(self.settings, self.node_cap, TreeLearner(self.auto, self.step_s))


class LookupTreeTeacherForced(TeacherForced):
    """``LookupTreeDraft`` replayed over the true prefix: the same trees (exact nodes and accepted tokens)."""

    def __init__(self, settings: LookupTreeSettings, node_cap: int, learner: TreeLearner):
        self.settings, self.node_cap, self.learner = settings, node_cap, learner
        self.index = NgramOccurrences(settings.ngram_sizes)

    def propose(self, seq, pending, max_len):
        tokens = seq[: pending + 1]
        self.index.update(tokens)
        depth = min(max_len, self.settings.draft_len)
        return self.index.tree(tokens, depth, self.node_cap, self.learner.new_tree(tokens)).run()


@dataclass
class SuccessorSettings:
    draft_len: int = 6  # the deepest node
    max_nodes: int | str = 16  # or "auto": the budget from the machine's costs
    top_k: int = 4  # successors kept per token
    table: str | None = None  # the bundle file of the seeded table it starts from (successor_table.py); None: empty

    def __post_init__(self):
        self.draft_len, self.max_nodes = _check_tree_size("successor", self.draft_len, self.max_nodes)
        self.top_k = checks.integer("successor top_k", self.top_k, minimum=1, maximum=64)
        if isinstance(self.max_nodes, int) and self.top_k > self.max_nodes:
            raise CtxdraftError(f"successor top_k {self.top_k} makes a tree wider than its budget of max_nodes "
                                f"{self.max_nodes} nodes; give top_k <= max_nodes")


class SuccessorDraft(TreeDraft):
    """Token Recycling: a tree from the target's own top-k successors of each token (see the module docstring)."""

    kind = "successor"
    batches_natively = True  # a table look-up per row, no model work to batch

    def __init__(self, name: str = "successor", settings: SuccessorSettings | None = None):
        super().__init__(name, settings or SuccessorSettings())
        self.observe_top_k = self.settings.top_k
        self.seed: torch.Tensor | None = None  # [V, k] the table every generation starts from (None: empty)
        self.table: torch.Tensor | None = None  # [V, k] int64, -1: unknown

    def start(self, state: DecodeState):
        super().start(state)
        self.table = start_table(self.seed, state.vocab_size, self.settings.top_k)

    def observe(self, state, token_ids, topk_ids):  # topk_ids: [T, k]
        update_table(self.table, token_ids, topk_ids)

    def propose(self, state, max_len):
        max_depth = min(max_len, self.settings.draft_len)
        tree = self.learner.new_tree(state.tokens)
        if max_depth < 1 or self.table is None:
            return tree.output()
        return successor_tree(self.table, state.tokens[-1], max_depth, self.node_cap, tree).output()

    def successors(self, token: int) -> list[int]:
        return successors(self.table, token)

    def teacher_forced(self, tp, vocab_size):
        return SuccessorTeacherForced(self, tp, vocab_size)


class SuccessorTeacherForced(TeacherForced):
    """``SuccessorDraft`` replayed along the target's sequence: before proposing at ``pending``, the table learns
    the teacher pass's top-k at every position the real run committed since its last proposal (the prompt's last
    token, then each step's root and accepted path: positions prompt_len - 1 .. pending - 1), in order."""

    def __init__(self, draft: SuccessorDraft, tp: TeacherPass, vocab_size: int):
        k = draft.settings.top_k
        if tp.topk_ids is None or tp.topk_ids.shape[1] < min(k, vocab_size):
            raise CtxdraftError(f"internal: replaying {draft.name!r} needs the teacher pass's top-{k} ids (teacher_pass topk)")
        self.settings, self.node_cap = draft.settings, draft.node_cap
        self.learner = TreeLearner(draft.auto, draft.step_s)
        self.table = start_table(draft.seed, vocab_size, k)
        self.topk_ids = tp.topk_ids[:, :k]
        self.observed = tp.prompt_len - 1

    def propose(self, seq, pending, max_len):
        update_table(self.table, seq[self.observed : pending], self.topk_ids[self.observed : pending])
        self.observed = pending
        tree = self.learner.new_tree(seq[: pending + 1])
        max_depth = min(max_len, self.settings.draft_len)
        if max_depth >= 1:
            successor_tree(self.table, seq[pending], max_depth, self.node_cap, tree)
        return tree.run()


def start_table(seed: torch.Tensor | None, vocab_size: int, top_k: int) -> torch.Tensor:
    """A generation's first table: a copy of ``seed``, or empty (-1 everywhere). [V, top_k] int64."""
    if seed is None:
        return torch.full((vocab_size, top_k), -1, dtype=torch.long)
    if tuple(seed.shape) != (vocab_size, top_k):
        raise CtxdraftError(f"a successor table of shape {tuple(seed.shape)} does not fit vocabulary {vocab_size} and top_k {top_k}")
    return seed.to(torch.long).clone()


def update_table(table: torch.Tensor, token_ids: list[int], topk_ids: torch.Tensor) -> None:
    """Overwrite the rows of ``token_ids`` with ``topk_ids`` [T, k'] (the last occurrence of a repeated token wins)."""
    k = min(topk_ids.shape[1], table.shape[1])
    last = {token: t for t, token in enumerate(token_ids) if 0 <= token < table.shape[0]}
    if last:
        rows = torch.tensor(list(last), dtype=torch.long)
        table[rows, :k] = topk_ids[list(last.values()), :k].to(table.dtype).cpu()


def successors(table: torch.Tensor, token: int) -> list[int]:
    """The known successors of ``token``, best first, without repeats."""
    if not 0 <= token < table.shape[0]:
        return []
    return list(dict.fromkeys(t for t in table[token].tolist() if t >= 0))


def successor_tree(table: torch.Tensor, root: int, max_depth: int, max_nodes: int, tree: TokenTree) -> TokenTree:
    """Fill ``tree`` from the pending token ``root`` best-first by rank sum along the path (ties: shallower first)."""
    # (rank sum, depth, order, parent, token): popped in an order where parents come before their children.
    heap = [(rank, 1, rank, -1, token) for rank, token in enumerate(successors(table, root))]
    heapq.heapify(heap)
    order = len(heap)
    while heap and len(tree.ids) < max_nodes:
        rank_sum, depth, _, parent, token = heapq.heappop(heap)
        node = tree.add(parent, token)
        if node is not None and depth < max_depth:
            for rank, child in enumerate(successors(table, token)):
                heapq.heappush(heap, (rank_sum + rank, depth + 1, order, node, child))
                order += 1
    return tree
