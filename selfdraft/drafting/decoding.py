"""The speculative decoding loop (lossless).

    prefill -> [ draft K tokens -> one target forward over K+1 positions -> verify
                 -> keep the accepted prefix + one target token -> crop caches ] -> repeat

Greedy: the output is token-for-token the target's own greedy output. Sampling (temperature > 0,
top-p): standard speculative sampling, so the output is distributed as the target's samples.

A draft may propose a token tree (``DraftOutput.parents``): the same step runs one tree forward over the root and
its N nodes, verifies it with ``verify_tree_greedy`` / ``verify_tree_sampling`` (nodes are fixed candidates; top-p
filters the target's logits first, as for a chain) and keeps the accepted path's K/V rows (``LayerStack.keep_rows``).
A chain always takes the chain path, so chain drafts behave exactly as before.
The ``none`` draft proposes nothing, which makes the same loop plain autoregressive decoding.
Verification always goes through ``ctxdraft.triton_kernels`` (Triton on CUDA, torch reference elsewhere).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from ctxdraft.triton_kernels import verify_greedy, verify_sampling, verify_tree_greedy, verify_tree_sampling

from ..base import checks
from ..base.errors import CtxdraftError
from ..runtime.batch_cache import BatchView
from ..runtime.layers import LayerStack
from ..runtime.sampling import top_p_filter
from .draft import DecodeState, Draft, DraftOutput


@dataclass
class GenerationConfig:
    """How to generate; checked (and ``stop`` normalised to a list) when made, so that a bad value from the API or
    the CLI fails with one message naming it, before any model work."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (the text is cut before them); one string is one stop

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.max_new_tokens = checks.integer("max_new_tokens", self.max_new_tokens, minimum=1)
        self.temperature = checks.number("temperature", self.temperature, minimum=0.0)
        self.top_p = checks.number("top_p", self.top_p, above=0.0, maximum=1.0)
        self.seed = checks.seed("seed", self.seed)
        self.stop = checks.strings("stop", self.stop)


@dataclass
class GenerationStats:
    target_forwards: int = 0  # including the prefill
    drafted_tokens: int = 0  # proposed tokens, or tree nodes
    nodes_verified: int = 0  # draft positions the target verified after the prefill (K per chain, N per tree)
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: times draft position k was accepted
    drafted_per_position: list[int] = field(default_factory=list)  # [k]: times draft position k was proposed
    prefill_s: float = 0.0
    route_s: float = 0.0
    wall_s: float = 0.0
    new_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def nodes_per_step(self) -> float:
        """Mean draft positions verified per target forward after the prefill (a chain's K, a tree's N)."""
        steps = self.target_forwards - 1
        return self.nodes_verified / steps if steps > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens emitted per target forward after the prefill (Spec-Bench's mean accepted tokens)."""
        steps = self.target_forwards - 1
        return self.new_tokens / steps if steps > 0 else float(self.new_tokens)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tokens_per_s=self.tokens_per_s, acceptance_rate=self.acceptance_rate, tokens_per_forward=self.tokens_per_forward,
                 nodes_per_step=self.nodes_per_step)
        return d


@dataclass
class Prefill:
    """The target after consuming the prompt: its cache, the first next-token logits and (optionally) features."""

    prompt_ids: list[int]
    cache: DynamicCache | BatchView
    last_logits: torch.Tensor  # [1, 1, V]
    pooled_hidden: torch.Tensor | None  # [D] mean over the prompt of the residual stream after layer `feature_layer`
    seconds: float
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # l -> [1, P, D] captured residual states


@torch.inference_mode()
def prefill(stack: LayerStack, prompt_ids: list[int], feature_layer: int | None = None, capture=(),
            cache: BatchView | None = None) -> Prefill:
    """Run the prompt through the target; pool the layer-``feature_layer`` states on the way if asked, and keep
    the residual states entering the layers in ``capture`` (what a feature draft reads). ``cache``: an empty row of a
    batch cache to fill (None: a new cache)."""
    t0 = time.perf_counter()
    cache = stack.new_cache() if cache is None else cache
    positions = torch.arange(len(prompt_ids))
    hidden = stack.embed(torch.tensor([prompt_ids]))
    states = dict.fromkeys(capture)
    pooled = None
    if feature_layer is not None and 0 < feature_layer <= stack.num_layers:
        hidden = stack.run(hidden, 0, feature_layer, cache, positions, states)
        pooled = hidden[0].float().mean(dim=0)
        hidden = stack.run(hidden, feature_layer, stack.num_layers, cache, positions, states)
    else:
        hidden = stack.run(hidden, 0, stack.num_layers, cache, positions, states)
    last_logits = stack.logits(hidden[:, -1:])
    return Prefill(prompt_ids, cache, last_logits, pooled, time.perf_counter() - t0, states)


def target_forward(stack: LayerStack, cache: DynamicCache, input_ids: list[int], start_pos: int, draft_out: DraftOutput,
                   capture: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Target logits [1, T, V] for ``input_ids`` at positions start_pos.., reusing an exit draft's early states.

    An exit draft already ran layers [0, E) for the first positions (``draft_out.exit_hidden``): only the
    positions it did not cover go through [0, E); all T positions then go through [E, L). A draft that
    stopped on low confidence has already covered all T positions. ``capture``: see ``LayerStack.run`` (a full
    forward only).
    """
    L = stack.num_layers
    early = draft_out.exit_hidden
    if draft_out.parents is not None:  # a tree: the root (pending token) is position 0 of the forward
        if early is not None:
            raise CtxdraftError("a draft proposed a token tree with exit states; tree drafts must not reuse exit states")
        tree = [-1] + [parent + 1 for parent in draft_out.parents]
        positions = stack.tree_positions(tree, start_pos)
        return stack.logits(stack.run(stack.embed(torch.tensor([input_ids])), 0, L, cache, positions, capture, tree))
    positions = torch.arange(start_pos, start_pos + len(input_ids))
    if early is None:
        hidden = stack.run(stack.embed(torch.tensor([input_ids])), 0, L, cache, positions, capture)
    else:
        E, done = draft_out.exit_layer, early.shape[1]
        if done < len(input_ids):
            rest = stack.run(stack.embed(torch.tensor([input_ids[done:]])), 0, E, cache, positions[done:])
            early = torch.cat([early, rest], dim=1)
        hidden = stack.run(early, E, L, cache, positions)
    return stack.logits(hidden)


def _verify(logits: torch.Tensor, draft_out: DraftOutput, temperature: float, top_p: float, generator):
    """Verify one row through the shared verify API. logits: [1, K+1, V] (a tree: [1, N+1, V])."""
    K = len(draft_out.ids)
    if draft_out.parents is not None:
        tree_ids = torch.tensor([draft_out.ids], dtype=torch.long).reshape(1, K)
        parents = torch.tensor([draft_out.parents], dtype=torch.long).reshape(1, K)
        if temperature <= 0:
            return verify_tree_greedy(logits, tree_ids, parents, torch.tensor([K]))
        logits = top_p_filter(logits, temperature, top_p)
        return verify_tree_sampling(logits, tree_ids, parents, torch.tensor([K]), torch.tensor([temperature]),
                                    generator=generator)
    draft_ids = torch.tensor([draft_out.ids], dtype=torch.long).reshape(1, K)
    num_draft = torch.tensor([K])
    if temperature <= 0:
        return verify_greedy(logits, draft_ids, num_draft)
    logits = top_p_filter(logits, temperature, top_p)
    probs = draft_out.probs[None] if draft_out.probs is not None else None
    return verify_sampling(logits, draft_ids, num_draft, probs, torch.tensor([temperature]), generator=generator)


@torch.inference_mode()
def speculative_decode(
    stack: LayerStack,
    pre: Prefill,
    draft: Draft,
    config: GenerationConfig,
    eos_ids: set[int] = frozenset(),
    on_tokens: Callable[[list[int]], None] | None = None,
    stop_check: Callable[[list[int]], int | None] | None = None,
) -> tuple[list[int], GenerationStats]:
    """Generate after ``pre`` with ``draft``; returns the new token ids (EOS excluded) and stats.

    ``stop_check(new_ids)`` may return a token count at which to cut (stop strings). One row of the loop; the batch
    loop (``batch_decoding.py``) runs the same per-row steps (``start_row``, ``next_proposal``, ``commit``) with
    one target forward and one verification for all its rows.
    """
    t0 = time.perf_counter()
    row = start_row(stack, pre, draft, config, eos_ids, on_tokens, stop_check)
    while (proposal := next_proposal(row)) is not None:
        capture = dict.fromkeys(draft.state_layers) if draft.state_layers else None
        input_ids = [row.state.tokens[-1]] + proposal.ids
        logits = target_forward(stack, pre.cache, input_ids, len(row.state.tokens) - 1, proposal, capture)  # [1, K+1, V]
        result = _verify(logits, proposal, config.temperature, config.top_p, row.state.generator)
        commit(row, proposal, logits, result, capture)
    row.stats.wall_s = pre.seconds + (time.perf_counter() - t0)
    return row.new_ids, row.stats


@dataclass
class Row:
    """One request between steps of the loop: its draft, what the draft sees, its settings, output and stats."""

    draft: Draft
    state: DecodeState  # state.cache: the row's target cache (a DynamicCache, or its row of a batch cache)
    config: GenerationConfig
    eos_ids: set[int]
    on_tokens: Callable[[list[int]], None] | None
    stop_check: Callable[[list[int]], int | None] | None
    stats: GenerationStats
    new_ids: list[int]
    done: bool = False


def start_row(stack: LayerStack, pre: Prefill, draft: Draft, config: GenerationConfig, eos_ids: set[int] = frozenset(),
              on_tokens=None, stop_check=None) -> Row:
    """The first token (drawn from the prefill's logits) and the draft started on the row (``pre.cache``: the row's
    target cache)."""
    stats = GenerationStats(target_forwards=1, prefill_s=pre.seconds)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    V = pre.last_logits.shape[-1]
    first = _verify(pre.last_logits, DraftOutput([]), config.temperature, config.top_p, generator).out_ids[0, 0].item()
    state = DecodeState(stack, pre.cache, list(pre.prompt_ids) + [first], V, config.temperature,
                        config.top_p, generator, target_states=pre.states, states_start=0)
    row = Row(draft, state, config, eos_ids, on_tokens, stop_check, stats, [first])
    if on_tokens is not None:
        on_tokens([first])
    draft.start(state)
    if draft.observe_top_k:
        draft.observe(state, pre.prompt_ids[-1:], _top_k(pre.last_logits, draft.observe_top_k))
    return row


def next_proposal(row: Row, max_len: int | None = None) -> DraftOutput | None:
    """The row's next draft (at most ``max_len`` tokens), or None when it is finished (its output then cut)."""
    if row_done(row):
        return None
    budget = row.config.max_new_tokens - len(row.new_ids) - 1  # the verify step always adds one more token
    if max_len is not None:
        budget = min(budget, max_len)
    return row.draft.propose(row.state, budget) if budget > 0 else DraftOutput([])


def row_done(row: Row) -> bool:
    """Whether the row has finished (EOS, max tokens, a stop string); its output is then cut to what is returned."""
    cut = _finished(row.new_ids, row.config.max_new_tokens, row.eos_ids, row.stop_check)
    if cut is not None and not row.done:
        row.new_ids = row.new_ids[:cut]
        row.stats.new_tokens = len(row.new_ids)
        row.done = True
    return row.done


def commit(row: Row, proposal: DraftOutput, logits: torch.Tensor, result, capture: dict | None) -> None:
    """Keep what the target accepted: crop (a chain) or move (a tree's path) the row's cache, tell the draft, emit.
    ``logits`` [1, T, V]: the row's verified positions; ``result``: its verification (one row)."""
    state, draft, stats = row.state, row.draft, row.stats
    stack, cache = state.stack, state.cache
    input_ids = [state.tokens[-1]] + proposal.ids
    pending_pos = len(state.tokens) - 1
    K = len(proposal.ids)
    num_accepted = int(result.num_accepted[0])
    emitted = result.out_ids[0, : num_accepted + 1].tolist()
    committed_len = len(state.tokens) + num_accepted  # everything in the caches up to here is final
    if proposal.parents is None:
        stack.crop(cache, committed_len)
        depth = K
    else:  # keep the root's row and the accepted path's, in place after the prefix
        rows = [0] + [1 + node for node in result.path_nodes[0, :num_accepted].tolist()]
        stack.keep_rows(cache, pending_pos, rows)
        capture = {layer: states[:, rows] for layer, states in (capture or {}).items()}
        depth = max(stack.tree_positions(proposal.parents, 1).tolist(), default=0)
    if draft.observe_top_k:  # the committed positions only: the root and the accepted path
        committed = rows if proposal.parents is not None else list(range(num_accepted + 1))
        draft.observe(state, [input_ids[r] for r in committed], _top_k(logits[:, committed], draft.observe_top_k))
    state.target_states, state.states_start = capture or {}, pending_pos
    draft.accept(state, committed_len)
    state.tokens.extend(emitted)
    row.new_ids.extend(emitted)

    stats.target_forwards += 1
    stats.drafted_tokens += K
    stats.nodes_verified += K
    stats.accepted_tokens += num_accepted
    _grow(stats.drafted_per_position, depth)  # a tree proposes every depth up to its deepest node
    _grow(stats.accepted_per_position, num_accepted)
    if row.on_tokens is not None:
        room = row.config.max_new_tokens - (len(row.new_ids) - len(emitted))
        row.on_tokens(emitted[: min(num_before_eos(emitted, row.eos_ids), max(room, 0))])


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:  # [1, T, V] -> [T, k]
    return logits[0].topk(min(k, logits.shape[-1]), dim=-1).indices


def num_before_eos(tokens: list[int], eos_ids) -> int:
    """How many of ``tokens`` come before the first EOS (all of them when there is none): what is returned."""
    return next((i for i, token in enumerate(tokens) if token in eos_ids), len(tokens))


def _grow(per_position: list[int], count: int) -> None:
    if len(per_position) < count:
        per_position.extend([0] * (count - len(per_position)))
    for k in range(count):
        per_position[k] += 1


def _finished(new_ids: list[int], max_new_tokens: int, eos_ids, stop_check) -> int | None:
    """Token count to keep if generation is over (EOS, max tokens, stop string), else None."""
    before_eos = num_before_eos(new_ids, eos_ids)
    if before_eos < len(new_ids):
        return before_eos
    if stop_check is not None:
        cut = stop_check(new_ids)
        if cut is not None:
            return cut
    if len(new_ids) >= max_new_tokens:
        return max_new_tokens
    return None
