"""The ``feature-tree`` arm: the feature head's dynamic token tree (EAGLE-2, Li et al. 2024, arXiv 2406.16858).

From the pending token, every depth expands the ``top_k`` best candidates so far (by cumulative draft probability,
the product of the head's probabilities along the path) into their ``top_k`` most likely children; the head evaluates
a whole depth's frontier in one call (``FeatureHead.expand``, each node attending to the committed context, its
ancestors and itself). Then every candidate is reranked by cumulative probability and the best ``max_nodes`` are
proposed (a child never scores above its parent, so the kept nodes form a tree). Verification treats the nodes as
fixed candidates, so the tree is lossless whatever the head says.

The head's cache holds only committed positions between steps: the tree's own entries are dropped after proposing,
and ``FeatureDraft.accept`` feeds the accepted path from the target's states (the loop keeps the accepted path's rows
of the captured states, as it does for the target's cache).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..base import checks
from ..base.errors import CtxdraftError
from .draft import DecodeState, DraftOutput, TeacherForced, TeacherPass
from .feature_draft import FeatureDraft, FeatureSettings
from .feature_head import FeatureCache, FeatureHead
from .live_replay import LiveReplay


@dataclass
class FeatureTreeSettings(FeatureSettings):
    draft_len: int = 5  # the deepest node
    threshold: float = 0.0  # drop candidates whose cumulative draft probability is below this
    top_k: int = 4  # children per expanded node, and nodes expanded per depth
    max_nodes: int = 16

    def __post_init__(self):
        super().__post_init__()
        self.top_k = checks.integer("feature-tree top_k", self.top_k, minimum=1, maximum=64)
        self.max_nodes = checks.integer("feature-tree max_nodes", self.max_nodes, minimum=1, maximum=1024)
        checks.integer("feature-tree draft_len (the tree's depth)", self.draft_len, minimum=1, maximum=64)
        check_width("feature-tree", self.top_k, self.max_nodes)


def check_width(kind: str, top_k: int, max_nodes) -> None:
    """A tree's first depth alone holds ``top_k`` nodes: wider than its node budget, the budget would cut its own
    branching (an integer ``max_nodes`` only: "auto" sizes itself)."""
    if isinstance(max_nodes, int) and top_k > max_nodes:
        raise CtxdraftError(f"{kind} top_k {top_k} makes a tree wider than its budget of max_nodes {max_nodes} nodes; "
                            f"give top_k <= max_nodes")


def feature_tree_arm(settings: FeatureTreeSettings) -> dict:
    """The arm spec of a feature head's tree: ``feature-tree`` for the head named general, else ``feature-tree:<name>``."""
    name = "feature-tree" if settings.name == "general" else f"feature-tree:{settings.name}"
    return {"name": name, "kind": "feature-tree", "settings": asdict(settings)}


@dataclass
class HeadTree:
    """Candidates of a head's tree, parents before children: token, parent (-1: the root), log of the cumulative draft
    probability; ``expanded`` are the candidates the head evaluated, in the order their entries entered its cache."""

    ids: list[int]
    parents: list[int]
    log_probs: list[float]
    expanded: list[int]
    evaluations: int = 0  # head calls (one per depth)


@torch.inference_mode()
def expand_tree(head: FeatureHead, cache: FeatureCache, root_state: torch.Tensor, root_position: int, max_depth: int,
                top_k: int, min_log_prob: float = -math.inf) -> HeadTree:
    """Grow the EAGLE-2 tree below the root: ``root_state`` [1, D] is the head's state that drafts the first token,
    ``root_position`` the pending token's position; the cache holds the committed context and gains one entry per
    expanded candidate (the caller crops it). Only candidates whose log cumulative probability is at least
    ``min_log_prob`` are expanded (their children cannot score higher), so the head stops as soon as no candidate of
    a depth reaches it: a threshold the caller then applies loses no node it would have kept."""
    tree = HeadTree([], [], [], [])
    context = cache.length
    frontier, states = [-1], root_state  # candidates whose children the next logits give, and their states [F, D]
    for depth in range(1, max_depth + 1):
        tree.evaluations += 1
        log_probs = torch.log_softmax(head.logits(states).float(), dim=-1)  # [F, N]
        top_log_probs, top_local = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
        top_ids = head.to_full_ids(top_local).tolist()
        new = []
        for f, parent in enumerate(frontier):
            base = tree.log_probs[parent] if parent >= 0 else 0.0
            for token, log_prob in zip(top_ids[f], top_log_probs[f].tolist()):
                new.append(len(tree.ids))
                tree.ids.append(token)
                tree.parents.append(parent)
                tree.log_probs.append(base + log_prob)
        if depth == max_depth:
            break
        best = sorted(new, key=lambda c: (-tree.log_probs[c], c))[:top_k]
        chosen = [c for c in best if tree.log_probs[c] >= min_log_prob]
        if not chosen:
            break
        row = {c: context + i for i, c in enumerate(tree.expanded)}  # the cache entry of each expanded candidate
        visible = torch.zeros(len(chosen), context + len(tree.expanded) + len(chosen), dtype=torch.bool)
        visible[:, :context] = True
        for i, c in enumerate(chosen):
            visible[i, context + len(tree.expanded) + i] = True
            ancestor = tree.parents[c]
            while ancestor >= 0:
                visible[i, row[ancestor]] = True
                ancestor = tree.parents[ancestor]
        parent_rows = torch.tensor([frontier.index(tree.parents[c]) for c in chosen])
        states = head.expand(cache, states[parent_rows], torch.tensor([tree.ids[c] for c in chosen]),
                             torch.full((len(chosen),), root_position + depth), visible)
        tree.expanded += chosen
        frontier = chosen
    return tree


def best_subtree(ids: list[int], parents: list[int], scores: list[float], max_nodes: int,
                 min_score: float = -math.inf) -> DraftOutput:
    """The best ``max_nodes`` nodes of a tree by score (ties: the earlier node), in their original order, with their
    scores as ``node_probs``. Scores must not rise from a parent to its child, so every kept node's parent is kept."""
    ranked = sorted((i for i in range(len(ids)) if scores[i] >= min_score), key=lambda i: (-scores[i], i))
    kept = sorted(ranked[:max_nodes])
    if not kept:
        return DraftOutput([])
    new_index = {old: new for new, old in enumerate(kept)}
    return DraftOutput([ids[i] for i in kept], parents=[new_index[parents[i]] if parents[i] >= 0 else -1 for i in kept],
                       node_probs=[scores[i] for i in kept])


class FeatureTreeDraft(FeatureDraft):
    """The feature head's EAGLE-2 tree (see the module docstring)."""

    kind = "feature-tree"
    proposes_trees = True
    min_node_prob = 0.0  # a floor over settings.threshold, set per step by a merged arm from its costs

    def max_verified(self) -> int:
        return self.settings.max_nodes

    @torch.inference_mode()
    def propose(self, state: DecodeState, max_len: int) -> DraftOutput:
        base = self._catch_up(state)
        max_depth = min(max_len, self.settings.draft_len)
        if max_depth < 1:
            return DraftOutput([], evaluations=0, stopped=False)
        threshold = max(self.settings.threshold, self.min_node_prob)
        tree = expand_tree(self.head, self.cache, self.last, base + 1, max_depth, self.settings.top_k,
                           math.log(threshold) if threshold > 0 else -math.inf)
        self.cache.crop(self.fed)  # the tree's own entries were for this proposal only
        out = best_subtree(tree.ids, tree.parents, [math.exp(x) for x in tree.log_probs], self.settings.max_nodes,
                           threshold if threshold > 0 else -math.inf)
        out.evaluations, out.stopped = tree.evaluations, False
        return out

    def teacher_forced(self, tp: TeacherPass, vocab_size: int) -> TeacherForced:
        """The head's trees along the target's sequence, grown by this draft itself (exact: ``live_replay.py``)."""
        return LiveReplay(self, tp, vocab_size)
