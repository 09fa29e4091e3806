"""What every draft shares: the ``Draft`` interface, what it proposes (``DraftOutput``), what it may look at
(``DecodeState``), the one draft loop with a confidence stop, and the teacher-forced replay of a draft.

A ``Draft`` proposes up to ``max_len`` tokens that continue ``state.tokens`` (the committed sequence; its
last token is the one the target has not consumed yet). It may return its distribution q for each proposed
token (needed for exact speculative sampling; without it q is one-hot). After the target has verified,
``accept(state, committed_len)`` tells the draft how many tokens of the sequence are final so that it can
roll back whatever state it keeps.

Terms: a draft *evaluation* is one run of the draft (one lookup, one draft-model forward, one exit-head
step); a draft *stops on confidence* when its top probability falls below the arm's threshold: that
evaluation ran, but its token is not proposed.

Teacher forcing: under greedy decoding every accepted draft token equals a target token, so what a draft
proposes at any point of a speculative run is what it predicts *along the target's own greedy sequence*.
``Draft.teacher_forced`` gives that replay (a ``TeacherForced``) from one ``TeacherPass`` of the target;
``trajectories.replay`` runs the decoding loop's bookkeeping over it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from ..runtime.layers import LayerStack


@dataclass
class DraftOutput:
    ids: list[int]  # the K proposed tokens (K may be 0), or the N nodes of a tree
    probs: torch.Tensor | None = None  # [K, V] q for each proposed token; None: one-hot (greedy or model-free)
    # A token tree: the parent of each node (-1: the root, the pending token), parents before children. None: a
    # chain. A tree's nodes are fixed candidates (no ``probs``; verify_tree_sampling's rule).
    parents: list[int] | None = None
    # A tree: each node's estimated chance that its whole path is accepted (the product of the draft's probabilities
    # along the path, or of a source's measured hit rates); None: the draft does not say.
    node_probs: list[float] | None = None
    # Exit drafts: layer-E residual states of the first K input positions (pending token, d1..d_{K-1}),
    # so verification only runs layers [E, L) for them; K+1 positions (d_K too) when the draft stopped on
    # confidence after running [0, E) for d_K as well.
    exit_hidden: torch.Tensor | None = None  # [1, K, D] or [1, K+1, D]
    exit_layer: int = 0
    evaluations: int | None = None  # draft evaluations this proposal took (None: the draft does not say)
    stopped: bool | None = None  # it stopped on confidence (the last evaluation's token was not proposed)


@dataclass
class DecodeState:
    """What a draft may look at while proposing."""

    stack: LayerStack
    cache: DynamicCache
    tokens: list[int]  # prompt + committed new tokens; the last one is not yet in the target's cache
    vocab_size: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    # The target's residual states entering the layers ``draft.state_layers`` asked for, from its last forward (the
    # prefill, then each verification), for positions states_start.. (those positions' tokens may be rejected).
    target_states: dict[int, torch.Tensor] = field(default_factory=dict)  # l -> [1, T, D]
    states_start: int = 0


@dataclass
class DraftRun:
    """What one call of ``draft_loop`` did."""

    ids: list[int]  # proposed tokens, or the nodes of a token tree
    evaluations: int  # draft evaluations run (one more than len(ids) after a confidence stop)
    stopped: bool  # stopped on confidence: the last evaluation covered one more position
    parents: list[int] | None = None  # a token tree (as ``DraftOutput.parents``); None: a chain


def draft_loop(max_len: int, threshold: float, evaluate: Callable[[int], float], take: Callable[[], int]) -> DraftRun:
    """The draft loop shared by the real drafts and their teacher-forced replay.

    ``evaluate(j)`` runs the draft at draft position j (feeding proposed token j-1 first when j > 0) and
    returns its top probability (only read when ``threshold`` > 0); ``take()`` picks that evaluation's token.
    Drafting stops after ``max_len`` tokens, or as soon as the top probability is below ``threshold``.
    """
    ids: list[int] = []
    evaluations = 0
    while len(ids) < max_len:
        confidence = evaluate(len(ids))
        evaluations += 1
        if threshold > 0 and confidence < threshold:
            return DraftRun(ids, evaluations, stopped=True)
        ids.append(take())
    return DraftRun(ids, evaluations, stopped=False)


@dataclass
class TeacherPass:
    """The target's own greedy sequence for one prompt, and its residual states at some layers."""

    token_ids: list[int]  # prompt + greedy continuation (+ EOS and the target's greedy tokens past it)
    prompt_len: int
    num_new: int  # tokens generated after the prompt, EOS included when generation ended on it
    states: dict[int, torch.Tensor]  # E -> [T, D] the residual stream after layer E-1 (not normed)
    lm_input: torch.Tensor | None = None  # [T, D] the LM head's input (after the final norm)
    topk_ids: torch.Tensor | None = None  # [T, k] the target's top-k next-token ids at every position
    topk_logp: torch.Tensor | None = None  # [T, k] their log-probabilities


class TeacherForced:
    """A draft replayed along a ``TeacherPass``: ``propose(seq, pending, max_len)`` is what the real draft
    proposes when ``seq[: pending + 1]`` is committed (``seq[pending]`` not yet in the target's cache).
    This base class proposes nothing (the ``none`` arm)."""

    def propose(self, seq: list[int], pending: int, max_len: int) -> DraftRun:
        return DraftRun([], 0, False)


class PredictionTeacherForced(TeacherForced):
    """A model or exit draft: its greedy token and top probability after every prefix of the sequence,
    replayed with the same ``draft_loop`` as the real draft (draft length, confidence stop).

    ``predictions[i]`` is the draft's greedy token after ``seq[: i + 1]``, ``confidence[i]`` its top
    probability. Drafted tokens are exact up to the first rejected one; after it the real draft continues
    from its own (wrong) token, which teacher forcing does not see, so for an arm with a confidence stop the
    number of rejected tokens drafted after it is estimated from the teacher-forced confidences. Accepted
    tokens, target forwards and new tokens are always exact.
    """

    def __init__(self, predictions: list[int], draft_len: int, confidence: list[float] | None = None,
                 threshold: float = 0.0):
        if threshold > 0 and confidence is None:
            raise ValueError("a confidence threshold needs the draft's confidences")
        self.predictions = predictions
        self.confidence = confidence
        self.draft_len = draft_len
        self.threshold = threshold

    def with_settings(self, draft_len: int, threshold: float) -> "PredictionTeacherForced":
        """The same predictions replayed with another draft length and threshold."""
        return PredictionTeacherForced(self.predictions, draft_len, self.confidence, threshold)

    def propose(self, seq, pending, max_len):
        at = {}

        def evaluate(j: int) -> float:
            at["i"] = pending + j
            return self.confidence[pending + j] if self.confidence is not None else 1.0

        return draft_loop(min(max_len, self.draft_len), self.threshold, evaluate, lambda: self.predictions[at["i"]])


class ChainTeacherForced(TeacherForced):
    """A draft whose later tokens depend on its own earlier ones (a feature head): ``chains[t, j]`` and
    ``confidence[t, j]`` are its greedy token and top probability at draft position j + 1 when drafting from base
    t (the committed prefix is ``seq[: t + 2]``), computed along the target's own tokens. The same caveat as
    ``PredictionTeacherForced``: exact up to the first rejected token."""

    def __init__(self, chains: torch.Tensor, draft_len: int, confidence: torch.Tensor | None = None, threshold: float = 0.0):
        if threshold > 0 and confidence is None:
            raise ValueError("a confidence threshold needs the draft's confidences")
        self.chains = chains.tolist() if isinstance(chains, torch.Tensor) else chains  # [T, K]
        self.confidence = confidence.tolist() if isinstance(confidence, torch.Tensor) else confidence
        self.draft_len = min(draft_len, len(self.chains[0]) if self.chains else draft_len)
        self.threshold = threshold

    def with_settings(self, draft_len: int, threshold: float) -> "ChainTeacherForced":
        """The same chains replayed with another (no longer) draft length and threshold."""
        return ChainTeacherForced(self.chains, draft_len, self.confidence, threshold)

    def propose(self, seq, pending, max_len):
        base = pending - 1
        at = {}

        def evaluate(j: int) -> float:
            at["j"] = j
            return self.confidence[base][j] if self.confidence is not None else 1.0

        return draft_loop(min(max_len, self.draft_len), self.threshold, evaluate, lambda: self.chains[base][at["j"]])


class Draft:
    """Base class: proposes nothing (the ``none`` arm)."""

    kind = "none"
    draft_len = 0  # the most tokens one step proposes
    # Target layers whose states the draft reads: in its teacher-forced replay (from the teacher pass) and, for a
    # feature draft, while decoding (captured from every target forward, ``DecodeState.target_states``).
    state_layers: tuple[int, ...] = ()
    # The batch loop asks every row's draft through ``propose_batch`` of the draft's class, once per class and step:
    # a class that batches natively overrides it (one draft forward for its rows); the default proposes row by row.
    batches_natively = False
    # Its steps verify token trees (``DraftOutput.parents``): the cost model times them as tree steps.
    proposes_trees = False

    def __init__(self, name: str = "none"):
        self.name = name
        # What the cost profile measures this draft under. ``pool.build_draft`` sets it from the arm spec so
        # that arms differing only in settings that leave one evaluation's cost alone (draft length, threshold)
        # share one measurement.
        self.cost_key = name

    def start(self, state: DecodeState) -> None:
        """Called once per generation, after the target's prefill."""

    def propose(self, state: DecodeState, max_len: int) -> DraftOutput:
        return DraftOutput([], evaluations=0, stopped=False)

    @classmethod
    def propose_batch(cls, drafts: list["Draft"], states: list[DecodeState], max_lens: list[int]) -> list[DraftOutput]:
        """One proposal per row (rows whose drafts are all of this class), in order."""
        return [draft.propose(state, max_len) for draft, state, max_len in zip(drafts, states, max_lens)]

    def accept(self, state: DecodeState, committed_len: int) -> None:
        """The first ``committed_len`` tokens of ``state.tokens`` are final; drop state beyond them."""

    # > 0: the loop hands ``observe`` the target's top-k next tokens after each committed position (no extra forward).
    observe_top_k = 0

    def observe(self, state: DecodeState, token_ids: list[int], topk_ids: torch.Tensor) -> None:
        """``topk_ids[t]`` [T, k]: the target's top-k next tokens after ``token_ids[t]``, for the committed positions
        of its last forward only (the root and the accepted path: the target's own continuation, which a teacher
        pass has too, so that the draft's replay is exact)."""

    def max_verified(self) -> int:
        """The most draft positions one step verifies: a chain's draft length, a tree's node cap."""
        return self.draft_len

    def set_costs(self, step_s: list[float]) -> None:
        """``step_s[m]``: the profiled seconds of one loop step whose target forward covers m positions (m = 1..
        ``max_verified() + 1``; index 0 unused). A draft that sizes its proposals by cost (a tree's node budget)
        keeps them; the bundle calls this when it builds drafts with a cost profile."""

    def teacher_forced(self, tp: TeacherPass, vocab_size: int) -> TeacherForced:
        """This draft replayed along the target's sequence (see the module docstring)."""
        return TeacherForced()
