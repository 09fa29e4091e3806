"""A token tree's node budget from the machine's costs (issue 21 item 4; Sequoia / EAGLE-2's total-token autotune).

A tree's expected accepted length is the sum over its nodes of the probability that the node is on the accepted path
(its parent accepted, and then its own token right). Verifying N nodes costs one step over N + 1 positions,
``step_s[N + 1]`` from the cost profile. With S the tree's expected accepted length so far, one more node of
acceptance a lowers the time per token, ``step_s[N + 1] / (1 + S)``, exactly when

    a > (1 + S) * (step_s[N + 2] - step_s[N + 1]) / step_s[N + 1]

which is the rule ``NodeBudget.allows`` applies (``worth_adding``). A batch of B rows chooses its chain rows' draft
positions by the same sum with B certain tokens instead of one, over the whole curve at once (``best_prefix``: the
number of positions, best estimated acceptance first, that maximises expected tokens per second), so that a bump in a
measured curve (timing noise between neighbouring sizes) does not stop it. The draft's main chain (its first-ranked
path, what a chain draft of the same source would propose) is always kept, so a steep cost curve shrinks the tree to
that chain and a flat one grows it to the cap. A node's acceptance is the product along its path of the source's
measured hit rate for each (depth, sibling rank): P(accepted | parent accepted), counted online over the current
generation and shrunk towards the rate of its sibling rank and of the whole source (``HitRates``). Everything it
reads is known the same way in a teacher-forced replay (the accepted paths are the target's own tokens), so replay and
real run build the same trees.
"""
from __future__ import annotations

from ..base import checks
from ..base.errors import CtxdraftError

AUTO_MAX_NODES = 64  # the cap of max_nodes="auto" (65 verified positions, the largest tree the profile measures)
MAX_RANK = 3  # sibling ranks at or past this share one hit rate
PRIOR_TRIES = 2  # the weight, in tries, of the rate a slot's hit rate is shrunk towards


def worth_adding(step_s: list[float], positions: int, expected: float, acceptance: float, rows: int = 1) -> bool:
    """Whether one more verified position of estimated ``acceptance`` lowers the time per token of a step that
    verifies ``positions`` positions (``step_s[m]``: seconds of a step over m) for ``rows`` rows expecting
    ``expected`` accepted draft tokens in all: ``(rows + expected + acceptance) / step_s[positions + 1]`` beats
    ``(rows + expected) / step_s[positions]``. False past the curve."""
    if positions + 1 >= len(step_s):
        return False
    now, more = step_s[positions], step_s[positions + 1]
    return acceptance > (rows + expected) * (more - now) / now


def best_prefix(step_s: list[float], positions: int, tokens: float, acceptances: list[float]) -> int:
    """How many of the candidate positions ``acceptances`` (estimated chances of being accepted, best first) to verify
    on top of ``positions`` positions that yield ``tokens`` tokens for sure: the k that maximises
    ``(tokens + sum(acceptances[:k])) / step_s[positions + k]`` (``step_s[m]``: seconds of a step over m positions;
    candidates past the curve are not considered)."""
    best_k, best_rate, expected = 0, tokens / step_s[positions], tokens
    for k, acceptance in enumerate(acceptances[: max(len(step_s) - 1 - positions, 0)], 1):
        expected += acceptance
        if expected / step_s[positions + k] > best_rate:
            best_k, best_rate = k, expected / step_s[positions + k]
    return best_k


def check_max_nodes(kind: str, max_nodes) -> tuple[int, bool]:
    """``max_nodes`` (an integer cap, or "auto": the budget rule under ``AUTO_MAX_NODES``) -> (cap, auto)."""
    if max_nodes == "auto":
        return AUTO_MAX_NODES, True
    if isinstance(max_nodes, str):
        raise CtxdraftError(f"{kind} max_nodes must be an integer in 1..1024 or \"auto\", got {max_nodes!r}")
    return checks.integer(f"{kind} max_nodes", max_nodes, minimum=1, maximum=1024), False


def checked_costs(name: str, step_s: list[float], node_cap: int) -> list[float]:
    """``step_s`` for a tree draft of up to ``node_cap`` nodes: positive, and long enough to size its widest tree."""
    if len(step_s) < node_cap + 2:  # a tree wider than the costs say anything about
        raise CtxdraftError(f"{name}: costs for up to {len(step_s) - 1} positions cannot size trees of up to "
                            f"{node_cap} nodes; measure the profile again (collect --reprofile, or ctxdraft calibrate)")
    NodeBudget(True).set_costs(step_s)  # validates
    return list(step_s)


class NodeBudget:
    """The budget rule above for one tree draft. Without costs (``set_costs`` not called) every node is allowed."""

    def __init__(self, auto: bool):
        self.auto = auto
        self.step_s: list[float] | None = None  # [m] seconds of a step over m positions
        self.rates = HitRates()

    def set_costs(self, step_s: list[float]) -> None:
        if len(step_s) < 2 or any(s <= 0 for s in step_s[1:]):
            raise CtxdraftError("a node budget needs positive step costs for 1.. positions")
        self.step_s = list(step_s)

    def start(self) -> None:
        """A new generation: forget the hit rates (a replay starts from nothing too)."""
        self.rates = HitRates()

    def rate(self, depth: int, rank: int) -> float:
        return self.rates.rate((depth, min(rank, MAX_RANK)))

    def allows(self, num_nodes: int, expected: float, acceptance: float) -> bool:
        """Whether a tree of ``num_nodes`` nodes and expected accepted length ``expected`` gains from one more node
        of estimated ``acceptance``."""
        if not self.auto or self.step_s is None:
            return True
        return worth_adding(self.step_s, num_nodes + 1, expected, acceptance)

    def learn(self, ids: list[int], parents: list[int], continuation: list[int]) -> None:
        """Count the hits of the last tree (node tokens, parents) against the target's continuation: every node whose
        parent was accepted was tried; the ones on the accepted path hit."""
        self.rates.count(ids, parents, continuation)


class HitRates:
    """Per (depth, sibling rank): how often a tree source's node was tried (its parent was accepted) and hit (it was
    accepted too), over the current generation; what a node budget and a merged arm's scores read. A slot's rate is
    shrunk towards its rank's rate over all depths, and that towards the source's over all its slots
    (``PRIOR_TRIES`` pseudo-tries each; the source's own rate starts at one hit in two): a slot seldom tried (a deep
    node, a fourth sibling) reads as what its source does there, not as a coin toss. With one prior of one hit in two
    for every slot, the successor table's seldom-tried slots scored 0.5 and hit 18% of the time (held-out prompts
    here), so its nodes' scores summed to 1.55x their hits and filled the trees with nodes that did not pay."""

    def __init__(self):
        self.tried: dict[tuple[int, int], int] = {}
        self.hit: dict[tuple[int, int], int] = {}
        self._rank_rates: list[float] | None = None  # rank_rates until the next count

    def rank_rates(self) -> list[float]:
        """[rank] -> the rate a slot of that sibling rank is shrunk towards."""
        if self._rank_rates is not None:
            return self._rank_rates
        source = (sum(self.hit.values()) + 1) / (sum(self.tried.values()) + 2)
        rates = []
        for rank in range(MAX_RANK + 1):
            tried = sum(n for slot, n in self.tried.items() if slot[1] == rank)
            hit = sum(n for slot, n in self.hit.items() if slot[1] == rank)
            rates.append((hit + PRIOR_TRIES * source) / (tried + PRIOR_TRIES))
        self._rank_rates = rates
        return rates

    def rate(self, slot: tuple[int, int]) -> float:
        prior = self.rank_rates()[slot[1]]
        return (self.hit.get(slot, 0) + PRIOR_TRIES * prior) / (self.tried.get(slot, 0) + PRIOR_TRIES)

    def scores(self, parents: list[int]) -> list[float]:
        """The product of the rates along each node's path."""
        scores: list[float] = []
        for node, slot in enumerate(slots(parents)):
            scores.append(self.rate(slot) * (scores[parents[node]] if parents[node] >= 0 else 1.0))
        return scores

    def count(self, ids: list[int], parents: list[int], emitted: list[int]) -> None:
        """Count a source's tree against what the target emitted after its root."""
        self._rank_rates = None
        on_path: list[bool] = []
        for node, (depth, rank) in enumerate(slots(parents)):
            reached = parents[node] < 0 or on_path[parents[node]]
            tried = reached and depth <= len(emitted)
            on_path.append(tried and emitted[depth - 1] == ids[node])
            if tried:
                self.tried[depth, rank] = self.tried.get((depth, rank), 0) + 1
                self.hit[depth, rank] = self.hit.get((depth, rank), 0) + on_path[-1]


def slots(parents: list[int]) -> list[tuple[int, int]]:
    """(depth, sibling rank capped at MAX_RANK) of every node, parents before children."""
    depths: list[int] = []
    siblings: dict[int, int] = {}
    out = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
        rank = siblings.get(parent, 0)
        siblings[parent] = rank + 1
        out.append((depths[-1], min(rank, MAX_RANK)))
    return out
