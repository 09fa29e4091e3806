"""``suffix``: SuffixDecoding (Oliaro et al. 2024, arXiv 2411.04975) as a tree draft.

Two sources are matched against the end of the committed sequence: the request itself (prompt + generated tokens,
scanned directly) and the global datastore of earlier outputs (``base/datastore.py``: the bundle's training
continuations, then served outputs). In each, the continuations after the longest match become a tree of the most
frequent ones (``suffix_index.continuation_tree``: probability = count ratio, product along the path, pruned below
``min_prob``), of at most ``ceil(factor * match length + offset)`` nodes (a long match earns a big tree),
``max_nodes`` and ``draft_len`` deep; the tree with the higher score (sum of its probabilities) is proposed.

Exact replay: a proposal reads only the committed tokens and the datastore, which changes only between generations
(``record`` after a request), so the teacher-forced replay over the target's own sequence builds the same trees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..base import checks
from ..base.datastore import SuffixStore, best_rows
from ..base.errors import CtxdraftError
from ..base.suffix_index import continuation_tree, scan_matches
from .draft import TeacherForced
from .tree_drafts import TokenTree, TreeDraft, TreeLearner, _check_tree_size


@dataclass
class SuffixSettings:
    draft_len: int = 8  # the deepest node
    max_nodes: int | str = 16  # or "auto": the budget from the machine's costs
    # Tree size: ceil(factor x match length + offset) nodes. 4 / 4 / 0.05 from benchmarks/suffix_replay.py (held-out
    # Spec-Bench stream: 1.17x lookup's tokens per forward against 1.08x with 1 / 1 / 0.1; template stream 2.02x).
    factor: float = 4.0  # nodes per matched token
    offset: float = 4.0  # nodes on top
    min_prob: float = 0.05  # prune continuations whose estimated probability is lower
    max_match: int = 24  # the longest suffix matched
    use_datastore: bool = True  # False: the request alone

    def __post_init__(self):
        self.draft_len, self.max_nodes = _check_tree_size("suffix", self.draft_len, self.max_nodes)
        self.factor = checks.number("suffix factor", self.factor, minimum=0.0, maximum=64.0)
        self.offset = checks.number("suffix offset", self.offset, minimum=-64.0, maximum=64.0)
        self.min_prob = checks.number("suffix min_prob", self.min_prob, minimum=0.0, maximum=1.0)
        self.max_match = checks.integer("suffix max_match", self.max_match, minimum=1, maximum=256)
        self.use_datastore = checks.flag("suffix use_datastore", self.use_datastore)


class RequestTokens:
    """One request's committed tokens as a growing int32 array (amortised appends)."""

    def __init__(self):
        self.buf = np.zeros(256, dtype=np.int32)
        self.size = 0

    def sync(self, tokens: list[int]) -> None:
        n = len(tokens)
        if n < self.size:  # a new sequence
            self.size = 0
        if n > len(self.buf):
            self.buf = np.concatenate([self.buf, np.zeros(max(n, 2 * len(self.buf)) - len(self.buf), dtype=np.int32)])
        if n > self.size:
            self.buf[self.size : n] = tokens[self.size : n]
            self.size = n


def suffix_tree(settings: SuffixSettings, node_cap: int, tokens: list[int], request: RequestTokens,
                store: SuffixStore | None, max_depth: int, tree: TokenTree, hits: dict | None = None) -> TokenTree:
    """Fill ``tree`` for the committed ``tokens`` (see the module docstring); ``hits`` counts which source the
    proposal came from ("request", "datastore" or "none")."""
    if max_depth < 1:
        return tree
    request.sync(tokens)
    context = tokens[-settings.max_match :]
    # the request's own earlier tokens: a match must end before the last token, so that something follows it
    found = [(scan_matches(request.buf, context, settings.max_match, end=request.size), request.buf[: request.size])]
    candidates = {"request": best_rows(found, max_depth)}
    if store is not None and settings.use_datastore:
        candidates["datastore"] = store.lookup(context, settings.max_match, max_depth)
    # each source's tree, sized by its own match; the higher score (the sum of node probabilities: the expected
    # accepted length) wins, the request on ties (SuffixDecoding's rule)
    best, source = [], "none"
    for name, (length, rows) in candidates.items():
        if length == 0:
            continue
        size = min(node_cap, max(1, math.ceil(settings.factor * length + settings.offset)))
        nodes = continuation_tree(rows, size, settings.min_prob)
        if nodes and sum(n.prob for n in nodes) > sum(n.prob for n in best):
            best, source = nodes, name
    if hits is not None:
        hits[source] = hits.get(source, 0) + 1
    index: list[int | None] = []  # continuation_tree's nodes -> the tree's (None: the budget refused it)
    for node in best:
        parent = -1 if node.parent < 0 else index[node.parent]
        index.append(tree.add(parent, node.token) if parent is not None else None)
    return tree


class SuffixDraft(TreeDraft):
    """Suffix decoding over the request and the global datastore (see the module docstring)."""

    kind = "suffix"

    def __init__(self, name: str = "suffix", settings: SuffixSettings | None = None, store: SuffixStore | None = None):
        super().__init__(name, settings or SuffixSettings())
        self.store = store
        self.request = RequestTokens()
        self.hits: dict[str, int] = {}  # this generation's proposals by source (the traffic log records them)

    def start(self, state):
        super().start(state)
        self.request = RequestTokens()
        self.hits = {}

    def propose(self, state, max_len):
        tree = self.learner.new_tree(state.tokens)
        depth = min(max_len, self.settings.draft_len)
        return suffix_tree(self.settings, self.node_cap, state.tokens, self.request, self.store, depth, tree,
                           self.hits).output()

    def record(self, tokens: list[int]) -> None:
        """Remember one finished output in the in-memory datastore (the next generation matches it)."""
        if self.store is None:
            raise CtxdraftError(f"arm {self.name!r} has no datastore to record into")
        self.store.add(tokens)

    def teacher_forced(self, tp, vocab_size):
        return SuffixTeacherForced(self)


class SuffixTeacherForced(TeacherForced):
    """``SuffixDraft`` replayed over the true prefix: the same trees (exact nodes and accepted tokens)."""

    def __init__(self, draft: SuffixDraft):
        self.settings, self.node_cap, self.store = draft.settings, draft.node_cap, draft.store
        self.learner = TreeLearner(draft.auto, draft.step_s)
        self.request = RequestTokens()

    def propose(self, seq, pending, max_len):
        tokens = seq[: pending + 1]
        tree = self.learner.new_tree(tokens)
        depth = min(max_len, self.settings.draft_len)
        return suffix_tree(self.settings, self.node_cap, tokens, self.request, self.store, depth, tree).run()
