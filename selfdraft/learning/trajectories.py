"""Exact greedy trajectories of every arm from one target pass (hardware-independent).

Under greedy decoding every accepted draft token equals a target token, so once the target's own greedy
continuation of a prompt is known, each draft's whole speculative trajectory follows from what it predicts
along that sequence (``Draft.teacher_forced``): prompt lookup reads the true prefix; an exit head reads the
layer-E states of ONE target pass (``teacher_pass``); a draft model runs once over the sequence.

``replay`` then runs ``decoding.speculative_decode``'s own bookkeeping over those predictions: the budget
``max_new_tokens - len(new) - 1``, the arm's draft length and confidence stop (``draft.draft_loop``), EOS.
Target forwards, accepted tokens and new tokens are exact; see ``draft.PredictionTeacherForced`` for the one
estimate (rejected tokens drafted after a confidence-stopping draft's first rejection). A ``Trajectory`` is
hardware-independent; ``costs.py`` turns it into seconds and speed-ups for one machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.errors import CtxdraftError
from ..drafting.decoding import GenerationConfig, GenerationStats, prefill, speculative_decode
from ..drafting.draft import DraftRun, TeacherForced, TeacherPass
from ..drafting.drafts import LookupDraft
from ..runtime.layers import LayerStack


@torch.inference_mode()
def teacher_pass(stack: LayerStack, prompt_ids: list[int], new_ids: list[int], eos_ids, *, ended_on_eos: bool,
                 layers=(), extend: int = 0, topk: int = 0, lm_input: bool = False, chunk: int = 512) -> TeacherPass:
    """One target pass over prompt + continuation, keeping the residual states after ``layers`` (each in
    1..L; L is the final residual, before the norm), and optionally the LM head's input and the target's
    top-``topk`` log-probabilities everywhere.

    When the continuation ended on EOS, a draft may still propose tokens past it and the target verifies them
    like any others, so the sequence is extended by the EOS the target chose and then ``extend`` more greedy
    target tokens (one single-token forward each).
    """
    seq = list(prompt_ids) + list(new_ids)
    layers = sorted(set(layers))
    L = stack.num_layers
    if any(not 0 < E <= L for E in layers):
        raise CtxdraftError(f"teacher pass layers {layers} must be in 1..{L}")
    if not (layers or ended_on_eos or topk or lm_input):  # nothing to compute: the sequence is all there is
        return TeacherPass(seq, len(prompt_ids), len(new_ids), {})
    cache = stack.new_cache()
    states: dict[int, list[torch.Tensor]] = {E: [] for E in layers}
    normed: list[torch.Tensor] = []
    top_ids: list[torch.Tensor] = []
    top_logp: list[torch.Tensor] = []

    def forward(ids: list[int], start: int) -> int:  # -> the target's greedy token after the last of ids
        positions = torch.arange(start, start + len(ids))
        hidden = stack.embed(torch.tensor([ids]))
        captured = dict.fromkeys(layers)
        hidden = stack.run(hidden, 0, L, cache, positions, captured)
        for E in layers:
            states[E].append(captured[E][0])
        if lm_input:
            normed.append(stack.backbone.norm(hidden)[0])
        if topk:
            logits = stack.logits(hidden)[0].float()  # [T, V]
            ids_, logp = _teacher_topk(logits, topk)
            top_ids.append(ids_)
            top_logp.append(logp)
            return int(logits[-1].argmax())
        return int(stack.logits(hidden[:, -1:])[0, -1].argmax())

    next_token = None
    for start in range(0, len(seq), chunk):
        next_token = forward(seq[start : start + chunk], start)
    num_new = len(new_ids)
    if ended_on_eos:
        eos = next_token if next_token in eos_ids else min(eos_ids)  # a near tie the one-pass numerics broke otherwise
        pending = eos
        num_new += 1
        for _ in range(extend + 1):
            seq.append(pending)
            pending = forward([pending], len(seq) - 1)
    cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
    return TeacherPass(seq, len(prompt_ids), num_new, {E: cat(s) for E, s in states.items()}, cat(normed),
                       cat(top_ids), cat(top_logp))


def _teacher_topk(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-``topk`` next-token ids (int32) and log-probabilities at every position of ``logits`` [T, V]."""
    logp, ids = logits.log_softmax(-1).topk(min(topk, logits.shape[-1]), dim=-1)
    return ids.int(), logp


@torch.inference_mode()
def teacher_passes(stack: LayerStack, items: list[tuple[list[int], list[int], bool]], eos_ids, *, layers=(),
                   topk: int = 0, lm_input: bool = False, max_batch_tokens: int = 8192) -> list[TeacherPass]:
    """``teacher_pass`` (``extend`` 0) of several (prompt ids, new ids, ended on EOS) sequences, in batches: the
    sequences sorted by length are right-padded into batches of at most ``max_batch_tokens`` positions and run in
    one causal forward each. A real position never sees the padding after it, so each row's states and teacher are
    its own pass's (up to the rounding of a wider matrix product). An ended sequence gets the EOS ``teacher_pass``
    would give it (the target's choice among ``eos_ids``); the rare one whose choice is not the first EOS id is
    passed again alone."""
    layers = sorted(set(layers))
    L = stack.num_layers
    eos = min(eos_ids) if eos_ids else None
    seqs = [list(p) + list(n) + ([eos] if ended else []) for p, n, ended in items]
    if any(ended for _, _, ended in items) and eos is None:
        raise CtxdraftError("a sequence ended on EOS but the target has no EOS id")
    order = sorted(range(len(items)), key=lambda i: len(seqs[i]))
    batches, current = [], []
    for i in order:  # lengths grow along ``order``: a batch's width is its last row's
        if current and (len(current) + 1) * len(seqs[i]) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    out: list[TeacherPass | None] = [None] * len(items)
    for batch in batches:
        width = len(seqs[batch[-1]])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
        captured = dict.fromkeys(layers)
        hidden = stack.run(stack.embed(ids), 0, L, stack.new_cache(), torch.arange(width), captured)
        for r, i in enumerate(batch):
            prompt_ids, new_ids, ended = items[i]
            n = len(seqs[i])
            logits = stack.logits(hidden[r : r + 1, :n])[0].float() if topk or ended else None  # [n, V]
            choice = int(logits[n - 2].argmax()) if ended else None  # the target's token after the last new one
            if choice in eos_ids and choice != eos:  # it ends on another EOS id: its own pass picks that one
                out[i] = teacher_pass(stack, prompt_ids, new_ids, eos_ids, ended_on_eos=True, layers=layers, topk=topk,
                                      lm_input=lm_input)
                continue
            top_ids, top_logp = _teacher_topk(logits, topk) if topk else (None, None)
            out[i] = TeacherPass(seqs[i], len(prompt_ids), len(new_ids) + int(ended),
                                 {E: captured[E][r, :n].clone() for E in layers},
                                 stack.backbone.norm(hidden[r, :n]).clone() if lm_input else None, top_ids, top_logp)
    return out


@dataclass
class Step:
    """One loop step of a speculative run: draft evaluations, drafted tokens, accepted tokens, whether the
    draft stopped on confidence (then it already ran its early layers for one more position), and the draft
    positions the target verified (a chain's drafted tokens, a tree's nodes; None: ``drafted``)."""

    evaluations: int
    drafted: int
    accepted: int
    stopped: bool = False
    nodes: int | None = None

    def __post_init__(self):
        if self.nodes is None:
            self.nodes = self.drafted

    def to_list(self) -> list[int]:
        row = [self.evaluations, self.drafted, self.accepted, int(self.stopped)]
        return row + [self.nodes] if self.nodes != self.drafted else row  # a chain's row as before


@dataclass
class Trajectory:
    """What ``speculative_decode`` does with one arm on one prompt (greedy): hardware-independent."""

    steps: list[Step]
    new_tokens: int  # returned tokens (EOS excluded), as GenerationStats.new_tokens

    @property
    def target_forwards(self) -> int:  # including the prefill, as GenerationStats
        return 1 + len(self.steps)

    @property
    def drafted_tokens(self) -> int:
        return sum(s.drafted for s in self.steps)

    @property
    def accepted_tokens(self) -> int:
        return sum(s.accepted for s in self.steps)

    @property
    def evaluations(self) -> int:
        return sum(s.evaluations for s in self.steps)

    @property
    def nodes_verified(self) -> int:  # as GenerationStats.nodes_verified
        return sum(s.nodes for s in self.steps)

    @property
    def nodes_per_step(self) -> float:  # as GenerationStats.nodes_per_step
        return self.nodes_verified / len(self.steps) if self.steps else 0.0

    @property
    def tokens_per_forward(self) -> float:  # as GenerationStats.tokens_per_forward
        return self.new_tokens / len(self.steps) if self.steps else float(self.new_tokens)

    def to_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "steps": [s.to_list() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict, where: str = "trajectory") -> "Trajectory":
        try:
            steps = [Step(int(e), int(k), int(a), bool(s), int(n[0]) if n else None) for e, k, a, s, *n in d["steps"]]
            new_tokens = int(d["new_tokens"])
            if any(len(row) > 5 for row in d["steps"]):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CtxdraftError(f"{where}: a trajectory needs 'new_tokens' and 'steps' as "
                                "[[evaluations, drafted, accepted, stopped(, nodes)], ...]") from None
        if any(min(s.evaluations, s.drafted, s.accepted) < 0 or s.accepted > s.drafted or s.nodes < s.accepted
               for s in steps):
            raise CtxdraftError(f"{where}: steps must have 0 <= accepted <= drafted, accepted <= nodes and evaluations >= 0")
        return cls(steps, new_tokens)


def replay(tf: TeacherForced, token_ids: list[int], prompt_len: int, max_new_tokens: int, eos_ids) -> Trajectory:
    """Run ``speculative_decode``'s bookkeeping with the teacher-forced draft ``tf`` (greedy).

    ``token_ids``: prompt + the target's greedy tokens, including EOS and the target's tokens past it when
    generation ended on EOS (drafts may propose past it; see ``teacher_pass``).
    """
    eos_at = next((i for i in range(prompt_len, len(token_ids)) if token_ids[i] in eos_ids), len(token_ids))
    pending = prompt_len  # the first new token comes from the prefill; it is not in the target cache yet
    steps: list[Step] = []
    while pending < eos_at and pending + 1 - prompt_len < max_new_tokens:
        budget = max_new_tokens - (pending + 1 - prompt_len) - 1  # the verify step always adds one more token
        run = tf.propose(token_ids, pending, budget) if budget > 0 else DraftRun([], 0, False)
        accepted = _accepted(run, token_ids[pending + 1 :])
        if pending + 1 + accepted >= len(token_ids):
            raise CtxdraftError("internal: the trajectory ran past the known target tokens; extend the teacher pass")
        steps.append(Step(run.evaluations, len(run.ids), accepted, run.stopped, len(run.ids)))
        pending += accepted + 1
    new_tokens = min(eos_at - prompt_len, max_new_tokens, pending + 1 - prompt_len)
    return Trajectory(steps, new_tokens)


def _accepted(run: DraftRun, continuation: list[int]) -> int:
    """The tokens greedy verification accepts of ``run`` (a chain, or a token tree: the deepest path whose every
    node is the target's token) when the target continues with ``continuation``."""
    if run.parents is None:
        accepted = 0
        for token in run.ids:
            if accepted >= len(continuation) or token != continuation[accepted]:
                break
            accepted += 1
        return accepted
    node, accepted = -1, 0
    for child, (token, parent) in enumerate(zip(run.ids, run.parents)):  # parents come before their children
        if parent == node and accepted < len(continuation) and token == continuation[accepted]:
            node, accepted = child, accepted + 1
    return accepted


def trajectories(drafts: dict, tp: TeacherPass, max_new_tokens: int, eos_ids, vocab_size: int) -> dict[str, Trajectory]:
    """Every arm's trajectory on one prompt: ``drafts`` maps arm names to ``Draft`` objects."""
    return {name: replay(draft.teacher_forced(tp, vocab_size), tp.token_ids, tp.prompt_len, max_new_tokens, eos_ids)
            for name, draft in drafts.items()}


@dataclass
class Continuation:
    """The target's own greedy continuation of a prompt, decoded for real (exact: the speculative loop)."""

    new_ids: list[int]  # EOS excluded
    ended_on_eos: bool
    stats: GenerationStats
    pooled_hidden: torch.Tensor | None  # [D] the prefill's pooled routing features, when asked for


def greedy_continuation(stack: LayerStack, prompt_ids: list[int], max_new_tokens: int, eos_ids, draft=None,
                        feature_layer: int | None = None) -> Continuation:
    """Decode ``prompt_ids`` greedily (with ``draft``, default prompt lookup: any draft gives the same tokens)."""
    pre = prefill(stack, prompt_ids, feature_layer)
    new_ids, stats = speculative_decode(stack, pre, draft if draft is not None else LookupDraft("lookup"),
                                        GenerationConfig(max_new_tokens=max_new_tokens), eos_ids)
    return Continuation(new_ids, len(new_ids) < max_new_tokens, stats, pre.pooled_hidden)
