"""The ``merged`` arm: one token tree per step from several drafts at once, verified in one target forward.

Each source proposes its own tree (or chain) under the pending token: ``lookup`` (the lookup-tree trie), ``successor``
(the successor table), ``feature`` (the feature head's EAGLE-2 tree) and ``model`` (a draft model's chain). Their
nodes are merged into one trie (a path two sources share is one node) and scored by the chance that the whole path
is accepted: the source's cumulative draft probability when it gives one (``DraftOutput.node_probs``), else the
product along the path of the source's measured hit rate for a node at that depth and sibling rank. A node scores
the best of its sources; the best ``max_nodes`` are proposed (a child never scores above its parent). With
``max_nodes="auto"`` the number kept comes from the machine's costs: the best k nodes, for the k that maximises the
expected tokens per second of the step, (1 + the sum of their scores) / the profiled seconds of a tree step over k + 1
positions (``tree_budget.best_prefix``), so a steep cost curve keeps only the likeliest nodes. Such an arm also tells
its feature source not to expand a candidate the budget would not keep (``feature_floor``): the head then calls
fewer depths per step, and its call is what the feature source costs.

Hit rates are counted from what the target emitted after each step (the accepted tokens and the bonus token): a
source's node was *tried* when its parent path was emitted (or it hangs from the root) and the target emitted a token
at its depth, and *hit* when that token is the node's, whether or not the node made it into the merged tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..base import checks
from ..base.errors import CtxdraftError
from .draft import DecodeState, Draft, DraftOutput, TeacherForced, TeacherPass
from .feature_tree import FeatureTreeDraft, best_subtree
from .live_replay import LiveReplay
from .tree_budget import HitRates, best_prefix, check_max_nodes, checked_costs

SOURCES = ("lookup", "successor", "feature", "model")  # the order sources are merged in (ties: the earlier one)
PRICE_POSITIONS = 17  # the price of a node: the step curve's mean slope over 1..this many positions (a 16-node tree)


@dataclass
class MergedSettings:
    draft_len: int = 6  # the deepest node
    max_nodes: int | str = 24  # or "auto": as many of the best nodes as the machine's costs say pay (at most 64)
    # The sources and their own arm settings (lookup: lookup-tree's, successor: successor's, feature: feature-tree's,
    # model: model's); a source left out is not used.
    sources: dict = field(default_factory=lambda: {"lookup": {}, "successor": {}})

    def __post_init__(self):
        self.draft_len = checks.integer("merged draft_len (the tree's depth)", self.draft_len, minimum=1, maximum=64)
        cap, auto = check_max_nodes("merged", self.max_nodes)
        self.max_nodes = "auto" if auto else cap
        if not isinstance(self.sources, dict) or not self.sources:
            raise CtxdraftError(f"merged sources must name at least one of {', '.join(SOURCES)}, got {self.sources!r}")
        for source, settings in self.sources.items():
            if source not in SOURCES:
                raise CtxdraftError(f"merged source {source!r} is unknown (known: {', '.join(SOURCES)})")
            if not isinstance(settings, dict):
                raise CtxdraftError(f"merged source {source!r} needs its settings as a mapping, got {settings!r}")


def _tree_of(out: DraftOutput) -> tuple[list[int], list[int]]:
    """A proposal's nodes and parents (a chain's parents are -1, 0, 1, ...)."""
    parents = out.parents if out.parents is not None else list(range(-1, len(out.ids) - 1))
    return list(out.ids), list(parents)


class MergedDraft(Draft):
    """Several drafts' trees merged into one per step (see the module docstring)."""

    kind = "merged"
    proposes_trees = True

    def __init__(self, name: str, sources: dict[str, Draft], settings: MergedSettings):
        super().__init__(name)
        if not sources:
            raise CtxdraftError(f"arm {name!r}: a merged arm needs at least one source")
        self.sources = sources
        self.settings = settings
        self.draft_len = settings.draft_len
        self.state_layers = tuple(sorted({layer for draft in sources.values() for layer in draft.state_layers}))
        self.observe_top_k = max(draft.observe_top_k for draft in sources.values())
        self.node_cap, self.auto = check_max_nodes("merged", settings.max_nodes)
        self.step_s: list[float] | None = None  # the profile's tree step costs (set_costs): what "auto" sizes with
        self.rates = {source: HitRates() for source in sources}
        self.last_trees: dict[str, tuple[list[int], list[int]]] = {}
        self.last_root = 0  # len(state.tokens) when the last trees were proposed
        self.steps, self.accepted = 0, 0  # this generation's steps and accepted draft tokens (feature_floor reads them)

    def max_verified(self) -> int:
        return self.node_cap

    def set_costs(self, step_s: list[float]) -> None:
        self.step_s = checked_costs(self.name, step_s, self.node_cap)

    def feature_floor(self) -> float:
        """The least cumulative probability worth a feature candidate's expansion in an auto-sized arm: a node pays
        when its acceptance exceeds (1 + S) * (step_s[m + 1] - step_s[m]) / step_s[m] (``tree_budget.worth_adding``),
        so with S this generation's mean accepted draft tokens per step and the curve's mean slope over the first
        ``PRICE_POSITIONS`` positions for the price of a position, a candidate below it adds no node the budget
        keeps (its children score no higher) and costs a head call. 0 (expand all) for a fixed cap or no costs."""
        if not self.auto or self.step_s is None:
            return 0.0
        m = min(PRICE_POSITIONS, len(self.step_s) - 1)
        slope = max(self.step_s[m] - self.step_s[1], 0.0) / ((m - 1) * self.step_s[1])
        return (1 + self.accepted / max(self.steps, 1)) * slope

    def start(self, state: DecodeState) -> None:
        """A new generation: the sources start, and the hit rates start again from their prior (a generation's trees
        depend on nothing before it, so that its replay, which starts the draft the same way, builds the same trees)."""
        for draft in self.sources.values():
            draft.start(state)
        self.rates = {source: HitRates() for source in self.sources}
        self.last_trees = {}
        self.steps, self.accepted = 0, 0

    def observe(self, state, token_ids, topk_ids) -> None:
        for draft in self.sources.values():
            if draft.observe_top_k:
                draft.observe(state, token_ids, topk_ids[:, : draft.observe_top_k])

    def accept(self, state: DecodeState, committed_len: int) -> None:
        for draft in self.sources.values():
            draft.accept(state, committed_len)

    def propose(self, state: DecodeState, max_len: int) -> DraftOutput:
        emitted = state.tokens[self.last_root :]
        for source, (ids, parents) in self.last_trees.items():
            self.rates[source].count(ids, parents, emitted)
        if self.last_trees:  # a step since the last proposal: its draft tokens accepted (emitted less the target's)
            self.steps, self.accepted = self.steps + 1, self.accepted + len(emitted) - 1
        self.last_root, self.last_trees = len(state.tokens), {}
        if isinstance(self.sources.get("feature"), FeatureTreeDraft):
            self.sources["feature"].min_node_prob = self.feature_floor()
        max_depth = min(max_len, self.settings.draft_len)
        ids: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        children: dict[tuple[int, int], int] = {}
        evaluations = 0
        for source, draft in self.sources.items():
            out = draft.propose(state, max_depth)  # every source runs every step: it keeps its own state in step
            evaluations += out.evaluations or 0
            tree = self.last_trees[source] = _tree_of(out)
            source_scores = out.node_probs or self.rates[source].scores(tree[1])
            merged: list[int] = []  # the merged node of each of the source's nodes
            for token, parent, score in zip(tree[0], tree[1], source_scores):
                under = merged[parent] if parent >= 0 else -1
                node = children.get((under, token))
                if node is None:
                    node = children[under, token] = len(ids)
                    ids.append(token)
                    parents.append(under)
                    scores.append(score)
                scores[node] = max(scores[node], score)
                merged.append(node)
        keep = self.node_cap
        if self.auto and self.step_s is not None:
            keep = best_prefix(self.step_s, 1, 1.0, sorted(scores, reverse=True)[:keep])
        out = best_subtree(ids, parents, scores, keep)
        out.evaluations, out.stopped = evaluations, False
        return out

    def teacher_forced(self, tp: TeacherPass, vocab_size: int) -> TeacherForced:
        """The merged trees along the target's sequence, from this draft and its sources themselves (their hit rates and
        successor table follow the committed steps as in decoding; exact: ``live_replay.py``)."""
        return LiveReplay(self, tp, vocab_size)
