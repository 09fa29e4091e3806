"""Batched speculative decoding with continuous batching: several requests, each with its own draft (a chain or a
token tree), draft length, sampling settings and stop conditions, verified in one target forward per step.

    admit (FIFO, up to max_batch rows; each prefill runs alone into the row's slot of the batch cache)
    -> [ propose per row -> one target forward over every row's pending token + draft (ragged rows padded, each
         row masked to its own prefix and draft, ``BatchCache``) -> one verification per kind of row (per-row
         ``num_draft``) -> commit per row (crop, or keep a tree's path) ] -> rows that finished free their slots

Each row runs the single loop's own per-row steps (``decoding.start_row``, ``next_proposal``, ``commit``), so a
row's greedy output is the target's greedy output for its prompt, and a sampling row draws its noise from its own
seeded generator in the single loop's order (the same seed gives the same sample, up to the rounding of a batched
forward). ``BatchDecoder`` is pure and step-driven (no threads, no I/O): a server's scheduler calls ``add``,
``cancel`` and ``step``.

Draft lengths from the machine's costs: with cost curves (``step_curve(B)``: seconds of one step of B rows over
1.. positions in all, from the cost profile, ``Bundle.batch_decoder``), the chain rows' draft positions are the ones
that maximise the batch's expected tokens per second (``tree_budget.best_prefix`` over B rows, best estimated
acceptance first: a wider batch is more compute-bound, so each row drafts less); a row's estimate at d is its own
running share of steps that accepted d drafted tokens of those that proposed them. Tree rows size their trees with their own node budget.

An exit draft's early layers are run again by the batched forward (its proposal's layer-E states are not reused in
a batch): verification stays exact, the exit arm only saves less than in the single loop.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ctxdraft.triton_kernels import verify_greedy, verify_sampling, verify_tree_greedy, verify_tree_sampling
from ctxdraft.triton_kernels.verify_sampling import draw_noise

from ..base.errors import CtxdraftError
from ..runtime.batch_cache import BatchCache
from ..runtime.layers import LayerStack
from ..runtime.sampling import top_p_filter
from .decoding import GenerationConfig, GenerationStats, Prefill, Row, commit, prefill, row_done, start_row
from .draft import Draft, DraftOutput
from .tree_budget import best_prefix


@dataclass
class BatchRequest:
    prompt_ids: list[int]
    # The row's draft, or a function choosing it from the prefill (routing by the prompt's features).
    draft: Draft | Callable[[Prefill], Draft]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    eos_ids: set[int] = frozenset()
    stop_check: Callable[[list[int]], int | None] | None = None
    feature_layer: int | None = None  # pool this layer's states in the prefill (``Prefill.pooled_hidden``)
    capture: tuple[int, ...] = ()  # target layers the prefill keeps for the draft (a feature draft's)


@dataclass
class RowOutcome:
    """A finished row: its new tokens (EOS excluded), stats, draft, or the error that stopped it."""

    token_ids: list[int]
    stats: GenerationStats
    draft: Draft | None = None
    prefill: Prefill | None = None
    error: str | None = None
    cancelled: bool = False


@dataclass
class StepOutput:
    new_tokens: dict[int, list[int]] = field(default_factory=dict)  # row id -> tokens emitted this step
    finished: dict[int, RowOutcome] = field(default_factory=dict)  # row id -> outcome, for rows done this step


@dataclass
class _Active:
    row_id: int
    slot: int
    row: Row
    pre: Prefill
    t0: float
    reported: int = 0


class BatchDecoder:
    """Continuous batching over one target: ``add`` queues a request (admitted at the next step, FIFO), ``step``
    runs one forward for every active row, ``cancel`` drops a row. ``token_budget``: the most positions one decode
    forward verifies (drafts are shortened to fit; each row always gets its pending token). ``max_context``: a
    prompt plus its max_new_tokens beyond it fails that row. ``step_curve``: rows -> the cost curve chain rows' draft
    lengths are chosen with at that width (see the module docstring; None: every row drafts its arm's full length)."""

    def __init__(self, stack: LayerStack, max_batch: int = 8, token_budget: int | None = None,
                 max_context: int | None = None, step_curve: Callable[[int], list[float]] | None = None):
        if max_batch < 1:
            raise CtxdraftError(f"max_batch must be at least 1, got {max_batch}")
        if token_budget is not None and token_budget < max_batch:
            raise CtxdraftError(f"token_budget ({token_budget}) must allow one token for each of max_batch ({max_batch}) rows")
        self.stack, self.max_batch, self.token_budget, self.max_context = stack, max_batch, token_budget, max_context
        self.step_curve = step_curve
        self._curves: dict[int, list[float]] = {}  # rows -> step_curve(rows), checked once
        self.cache = BatchCache(stack.num_layers, max_batch)
        self.queue: deque[tuple[int, BatchRequest]] = deque()
        self.active: list[_Active] = []  # in slot order
        self._next_id = 0
        self._cancelled: dict[int, RowOutcome] = {}

    @property
    def idle(self) -> bool:
        return not self.queue and not self.active and not self._cancelled

    def add(self, request: BatchRequest) -> int:
        row_id = self._next_id
        self._next_id += 1
        self.queue.append((row_id, request))
        return row_id

    @torch.inference_mode()  # freeing an active row moves the last row's cache (inference tensors) into its slot
    def cancel(self, row_id: int) -> None:
        """Drop a queued or active row; it is reported finished (``cancelled``) by the next step."""
        for i, (queued_id, _) in enumerate(self.queue):
            if queued_id == row_id:
                del self.queue[i]
                self._cancelled[row_id] = RowOutcome([], GenerationStats(), cancelled=True)
                return
        for entry in self.active:
            if entry.row_id == row_id:
                self._cancelled[row_id] = self._outcome(entry, cancelled=True)
                self._free(entry)
                return

    @torch.inference_mode()
    def step(self) -> StepOutput:
        out = StepOutput(finished=self._cancelled)
        self._cancelled = {}
        self._admit(out)
        proposals: dict[int, DraftOutput] = {}
        share = None if self.token_budget is None else max(self.token_budget // max(len(self.active), 1) - 1, 0)
        for entry in [e for e in self.active if row_done(e.row)]:
            self._finish(entry, out)
        groups: dict[type, list[_Active]] = {}
        for entry in self.active:
            groups.setdefault(type(entry.row.draft), []).append(entry)
        draft_lens = self._draft_lens(share)
        for kind, entries in groups.items():
            max_lens = {e.row_id: draft_lens[e.row_id] for e in entries}
            proposals.update({e.row_id: DraftOutput([]) for e in entries if max_lens[e.row_id] == 0})
            entries = [e for e in entries if max_lens[e.row_id] > 0]  # as the single loop: no draft call at all
            try:
                drafted = kind.propose_batch([e.row.draft for e in entries], [e.row.state for e in entries],
                                             [max_lens[e.row_id] for e in entries])
            except CtxdraftError as e:
                for entry in entries:
                    self._finish(entry, out, error=str(e))
                continue
            proposals.update({e.row_id: p for e, p in zip(entries, drafted)})
        if self.active:
            self._forward_and_commit([(e, proposals[e.row_id]) for e in self.active])
        for entry in list(self.active):
            if row_done(entry.row):
                self._finish(entry, out)
            else:
                self._report(entry, out)
        return out

    def run(self) -> dict[int, RowOutcome]:
        """Step until every row added so far has finished; their outcomes by row id."""
        outcomes: dict[int, RowOutcome] = {}
        while not self.idle:
            outcomes.update(self.step().finished)
        return outcomes

    # -- one step ----------------------------------------------------------------------------------------------------
    def _max_len(self, row: Row, share: int | None) -> int:
        budget = row.config.max_new_tokens - len(row.new_ids) - 1  # as next_proposal: the verify step adds one
        return max(budget if share is None else min(budget, share), 0)

    def _draft_lens(self, share: int | None) -> dict[int, int]:
        """Each active row's draft length this step: its cap (``_max_len``), and for a chain row with a cost curve
        only the positions that maximise the batch's expected tokens per second (module docstring)."""
        lens = {e.row_id: min(self._max_len(e.row, share), e.row.draft.draft_len) for e in self.active}
        if self.step_curve is None:
            return lens
        candidates = []  # (-estimated acceptance, depth, row id): a row's depths in order, its estimates non-increasing
        for entry in self.active:
            if entry.row.draft.proposes_trees:
                continue
            for depth, estimate in enumerate(acceptance_estimates(entry.row.stats, lens[entry.row_id]), 1):
                candidates.append((-estimate, depth, entry.row_id))
            lens[entry.row_id] = 0
        if not candidates:  # no chain row drafts (or no row at all): nothing to choose
            return lens
        candidates.sort()
        rows = len(self.active)
        if rows not in self._curves:
            step_s = self.step_curve(rows)
            if len(step_s) <= rows or any(s <= 0 for s in step_s[1:]):
                raise CtxdraftError(f"a batch of {rows} rows needs positive step costs for 1..{rows} positions "
                                    "at least")
            self._curves[rows] = step_s
        step_s = self._curves[rows]
        for _, depth, row_id in candidates[: best_prefix(step_s, rows, rows, [-c[0] for c in candidates])]:
            lens[row_id] = depth
        return lens

    def _admit(self, out: StepOutput) -> None:
        while self.queue and len(self.active) < self.max_batch:
            row_id, request = self.queue.popleft()
            t0 = time.perf_counter()
            try:
                self._check(request)
                # A row's cache holds its prompt, its output and at most one forward's draft past it (a wider
                # forward only regrows the buffers once).
                self.cache.reserve(len(request.prompt_ids) + request.config.max_new_tokens + 32)
                slot = self.cache.add_row()
            except CtxdraftError as e:
                out.finished[row_id] = RowOutcome([], GenerationStats(), error=str(e))
                continue
            try:
                pre = prefill(self.stack, request.prompt_ids, request.feature_layer, request.capture, self.cache.row(slot))
                draft = request.draft if isinstance(request.draft, Draft) else request.draft(pre)
                row = start_row(self.stack, pre, draft, request.config, request.eos_ids, None, request.stop_check)
            except CtxdraftError as e:
                self.cache.remove_row(slot)
                out.finished[row_id] = RowOutcome([], GenerationStats(), error=str(e))
                continue
            self.active.append(_Active(row_id, slot, row, pre, t0))

    def _check(self, request: BatchRequest) -> None:
        if not request.prompt_ids:
            raise CtxdraftError("empty prompt: a request needs at least one token")
        total = len(request.prompt_ids) + request.config.max_new_tokens
        if self.max_context is not None and total > self.max_context:
            raise CtxdraftError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                                f"({request.config.max_new_tokens}) exceeds the model's context of {self.max_context} tokens")

    def _forward_and_commit(self, batch: list[tuple[_Active, DraftOutput]]) -> None:
        stack = self.stack
        T = max(1 + len(p.ids) for _, p in batch)
        B = len(batch)
        input_ids = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        ancestors = torch.ones(T, T, dtype=torch.bool).tril().repeat(B, 1, 1)  # [B, T, T]
        layers = sorted({layer for entry, _ in batch for layer in entry.row.draft.state_layers})
        for b, (entry, proposal) in enumerate(batch):
            state = entry.row.state
            pending = len(state.tokens) - 1
            n = 1 + len(proposal.ids)
            input_ids[b, :n] = torch.tensor([state.tokens[-1]] + proposal.ids)
            positions[b] = pending + torch.arange(T)
            if proposal.exit_hidden is not None:  # the batched forward runs every row from layer 0 again
                LayerStack.crop(state.cache, pending, 0, proposal.exit_layer)
            if proposal.parents is not None:
                tree = [-1] + [parent + 1 for parent in proposal.parents]
                positions[b, :n] = stack.tree_positions(tree, pending)
                ancestors[b, :n, :n] = tree_ancestors(tree)
        capture = dict.fromkeys(layers) if layers else None
        num_new = [1 + len(p.ids) for _, p in batch]
        hidden = stack.run(stack.embed(input_ids), 0, stack.num_layers, self.cache.view(), positions, capture, ancestors,
                           num_new)
        # The LM head only on the rows' real positions (it is a fifth of the model's weights; padding stays zero).
        real = torch.arange(T)[None, :] < torch.tensor(num_new)[:, None]  # [B, T]
        real_logits = stack.logits(hidden[real][None])[0]  # [N, V]
        logits = real_logits.new_zeros(B, T, real_logits.shape[-1]).index_put_((real,), real_logits)  # [B, T, V]
        results = verify_rows(logits, [p for _, p in batch], [e.row for e, _ in batch])
        for b, (entry, proposal) in enumerate(batch):
            n = 1 + len(proposal.ids)
            row_capture = {l: capture[l][b : b + 1, :n] for l in entry.row.draft.state_layers} if capture else None
            commit(entry.row, proposal, logits[b : b + 1, :n], results[b], row_capture or None)

    def _report(self, entry: _Active, out: StepOutput) -> None:
        new = entry.row.new_ids[entry.reported :]
        if new:
            out.new_tokens[entry.row_id] = new
        entry.reported = len(entry.row.new_ids)

    def _outcome(self, entry: _Active, error: str | None = None, cancelled: bool = False) -> RowOutcome:
        stats = entry.row.stats
        stats.new_tokens = len(entry.row.new_ids)
        stats.wall_s = time.perf_counter() - entry.t0
        return RowOutcome(entry.row.new_ids, stats, entry.row.draft, entry.pre, error, cancelled)

    def _finish(self, entry: _Active, out: StepOutput, error: str | None = None) -> None:
        self._report(entry, out)
        out.finished[entry.row_id] = self._outcome(entry, error)
        self._free(entry)

    def _free(self, entry: _Active) -> None:
        index = self.active.index(entry)
        moved = self.cache.remove_row(entry.slot)
        if moved is not None:  # the last row now lives in the freed slot
            last = self.active.pop()
            last.slot = entry.slot
            last.row.state.cache = self.cache.row(entry.slot)
            if last is not entry:
                self.active[index] = last
        else:
            self.active.pop(index)


def acceptance_estimates(stats: GenerationStats, depth: int) -> list[float]:
    """A row's estimated chance that its draft positions 1..depth are all accepted: the share of its steps that
    accepted d drafted tokens among those that proposed d, with one hit and one miss as prior (0.5 before any step),
    made non-increasing."""
    estimates, lowest = [], 1.0
    for d in range(depth):
        drafted = stats.drafted_per_position[d] if d < len(stats.drafted_per_position) else 0
        accepted = stats.accepted_per_position[d] if d < len(stats.accepted_per_position) else 0
        lowest = min(lowest, (accepted + 1) / (drafted + 2))
        estimates.append(lowest)
    return estimates


def tree_ancestors(parents: list[int]) -> torch.Tensor:  # [T, T] bool
    """``[t, s]``: position s is t or one of its ancestors (``parents[t]``: t's parent, -1 for none)."""
    T = len(parents)
    ancestors = torch.eye(T, dtype=torch.bool)
    for t, parent in enumerate(parents):
        if parent >= 0:
            ancestors[t] |= ancestors[parent]
    return ancestors


def verify_rows(logits: torch.Tensor, proposals: list[DraftOutput], rows: list[Row]) -> list:
    """Verify every row of one batched forward (logits [B, T, V]) through the shared verify API: one call per kind
    of row (chain or tree, greedy or sampling, with or without draft probabilities), ragged ``num_draft`` /
    ``num_nodes``. A sampling row's noise comes from its own generator, drawn as the single loop draws it. Returns
    each row's result as a one-row ``VerifyResult`` / ``TreeVerifyResult``."""
    groups: dict[tuple, list[int]] = {}
    for b, (proposal, row) in enumerate(zip(proposals, rows)):
        sampling = row.config.temperature > 0
        key = (proposal.parents is not None, sampling, sampling and proposal.probs is not None)
        groups.setdefault(key, []).append(b)
    results: list = [None] * len(rows)
    V = logits.shape[-1]
    for (is_tree, sampling, has_probs), index in groups.items():
        K = max(len(proposals[b].ids) for b in index)
        ids = torch.zeros(len(index), K, dtype=torch.long)
        parents = torch.full((len(index), K), -1, dtype=torch.long)
        for i, b in enumerate(index):
            k = len(proposals[b].ids)
            ids[i, :k] = torch.tensor(proposals[b].ids, dtype=torch.long)
            if is_tree:
                parents[i, :k] = torch.tensor(proposals[b].parents, dtype=torch.long)
        num_draft = torch.tensor([len(proposals[b].ids) for b in index])
        group_logits = logits[index, : K + 1]  # [G, K+1, V]
        if not sampling:
            result = verify_tree_greedy(group_logits, ids, parents, num_draft) if is_tree \
                else verify_greedy(group_logits, ids, num_draft)
        else:
            configs = [rows[b].config for b in index]
            group_logits = torch.stack([top_p_filter(group_logits[i], c.temperature, c.top_p) for i, c in enumerate(configs)])
            temperature = torch.tensor([c.temperature for c in configs])
            uniforms = torch.full((len(index), K), 0.5)
            exponentials = []
            for i, b in enumerate(index):
                noise = draw_noise(1, len(proposals[b].ids), V, logits.device, rows[b].state.generator)
                uniforms[i, : noise.uniforms.shape[1]] = noise.uniforms[0]
                exponentials.append(noise.exponentials)
            noise = type(noise)(uniforms, torch.cat(exponentials))
            if is_tree:
                result = verify_tree_sampling(group_logits, ids, parents, num_draft, temperature, noise=noise)
            else:
                probs = None
                if has_probs:
                    probs = torch.zeros(len(index), K, V)
                    for i, b in enumerate(index):
                        probs[i, : len(proposals[b].ids)] = proposals[b].probs
                result = verify_sampling(group_logits, ids, num_draft, probs, temperature, noise=noise)
        for i, b in enumerate(index):
            results[b] = type(result)(*(t[i : i + 1] for t in result))
    return results
