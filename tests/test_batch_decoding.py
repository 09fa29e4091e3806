"""Batched decoding: every row equals its own single-request output (greedy, and sampling with its seed), sampling
rows keep the target distribution, bad rows fail alone."""
from __future__ import annotations

import pytest
import torch
from test_decoding import SMALL_V, exact_joint
from tiny import ARCHS, assert_follows, tiny_llama, tiny_random

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.drafting.batch_decoding import BatchDecoder, BatchRequest
from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.drafts import LookupDraft, LookupSettings, ModelDraft, ModelDraftSettings, NoneDraft
from ctxdraft.selfdraft.drafting.exit_draft import ExitDraft, ExitSettings
from ctxdraft.selfdraft.drafting.exit_head import ExitHead
from ctxdraft.selfdraft.drafting.tree_drafts import (
    LookupTreeDraft,
    LookupTreeSettings,
    SuccessorDraft,
    SuccessorSettings,
)
from ctxdraft.selfdraft.runtime.layers import LayerStack

V = 61
PROMPTS = [
    [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 10, 11, 12, 5, 6, 7],
    [3, 17, 42],
    [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2],
    [40],
    [9, 8, 7, 6, 9, 8, 7, 6, 9, 8, 7, 6, 9, 8, 7, 6, 9, 8, 7, 6, 9, 8, 7, 6, 9],
    [30, 31, 32, 30, 31],
]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_random(request.param, vocab_size=V)


def arms(model):
    """A fresh draft per row, for every kind the batch mixes: none, chains, trees, an exit draft, a draft model."""
    def exit_arm(kind, layer):
        head = ExitHead(model, layer, kind).eval().requires_grad_(False)
        return ExitDraft(f"exit@{layer}", head, ExitSettings(layer, draft_len=3))
    return [
        NoneDraft,
        lambda: LookupDraft("lookup", LookupSettings(draft_len=4)),
        lambda: LookupTreeDraft("lookup-tree", LookupTreeSettings(draft_len=4, max_nodes=8)),
        lambda: exit_arm("linear", 2),
        lambda: SuccessorDraft("successor", SuccessorSettings(draft_len=3, max_nodes=6, top_k=3)),
        lambda: exit_arm("layer", 1),  # its head keeps its own cache over the target's layer-1 states
        lambda: ModelDraft("self", model, ModelDraftSettings(draft_len=3)),
    ]


def single(model, prompt, draft, config):
    stack = LayerStack(model)
    return speculative_decode(stack, prefill(stack, prompt), draft, config)[0]


@pytest.mark.parametrize("max_batch", [3, 8])
def test_each_greedy_row_equals_its_single_request(model, max_batch):
    """Mixed arms, prompt lengths and lengths to generate (rows finish at different steps); with max_batch 3 rows
    wait in the queue and join a running batch; a row added after two steps joins mid-run. Catches a row reading
    another row's cache, a wrong per-row offset, position or mask, a crop or a tree's keep applied to the wrong row."""
    stack = LayerStack(model)
    makers = arms(model)
    decoder = BatchDecoder(stack, max_batch=max_batch)
    requests = {}
    for i, prompt in enumerate(PROMPTS):
        config = GenerationConfig(max_new_tokens=8 + 5 * i)
        requests[decoder.add(BatchRequest(prompt, makers[i % len(makers)](), config))] = (prompt, i, config)
    outcomes, streamed = {}, {}
    for step in range(2):
        out = decoder.step()
        outcomes.update(out.finished)
        for row_id, ids in out.new_tokens.items():
            streamed.setdefault(row_id, []).extend(ids)
    late = (PROMPTS[0][:7], len(makers) - 1, GenerationConfig(max_new_tokens=12))
    requests[decoder.add(BatchRequest(late[0], makers[late[1]](), late[2]))] = late
    while not decoder.idle:
        out = decoder.step()
        outcomes.update(out.finished)
        for row_id, ids in out.new_tokens.items():
            streamed.setdefault(row_id, []).extend(ids)
    assert set(outcomes) == set(requests)
    for row_id, (prompt, arm, config) in requests.items():
        expected = single(model, prompt, makers[arm](), config)
        got = outcomes[row_id]
        assert got.error is None
        assert got.token_ids == expected, f"row {row_id} ({got.draft.name}) differs from its single request"
        assert streamed[row_id] == expected
        assert got.stats.new_tokens == len(expected) == 1 + got.stats.accepted_tokens + got.stats.target_forwards - 1
    assert decoder.cache.num_rows == 0  # every finished row freed its slot


def test_token_budget_shortens_drafts_not_outputs(model):
    stack = LayerStack(model)
    decoder = BatchDecoder(stack, max_batch=4, token_budget=6)
    config = GenerationConfig(max_new_tokens=20)
    ids = [decoder.add(BatchRequest(p, LookupDraft("lookup", LookupSettings(draft_len=5)), config)) for p in PROMPTS[:4]]
    outcomes = decoder.run()
    for row_id, prompt in zip(ids, PROMPTS):
        assert outcomes[row_id].token_ids == single(model, prompt, LookupDraft("lookup", LookupSettings(draft_len=5)), config)
        assert max(len(outcomes[row_id].stats.drafted_per_position), 0) <= 6 // 4 - 1 + 1


def test_the_cost_curve_sizes_chain_drafts_by_batch_width(model):
    """A steep cost curve (each extra position costs a whole step) leaves every chain row undrafted, a flat one lets
    each draft its full length, a curve in between lets a wide batch draft less per row than a narrow one; outputs
    never change. Catches the curve ignored, applied per row instead of per batch, or a row's draft cut into its
    output."""
    stack = LayerStack(model)
    config = GenerationConfig(max_new_tokens=16)
    lookup = lambda: LookupDraft("lookup", LookupSettings(draft_len=4))  # noqa: E731
    expected = single(model, PROMPTS[0], lookup(), config)

    def drafted_per_step(step_s, rows):  # every row the same prompt, so widths compare
        decoder = BatchDecoder(stack, max_batch=rows, step_curve=None if step_s is None else lambda _: step_s)
        for _ in range(rows):
            decoder.add(BatchRequest(PROMPTS[0], lookup(), config))
        outcomes = decoder.run().values()
        assert all(o.token_ids == expected for o in outcomes)
        return sum(o.stats.nodes_verified for o in outcomes) / sum(o.stats.target_forwards for o in outcomes)

    assert drafted_per_step([0.0] + [float(m) for m in range(1, 40)], 4) == 0  # a position costs a whole step
    assert drafted_per_step([0.0] + [1.0] * 40, 4) == drafted_per_step(None, 4) > 0  # free positions: as alone
    # One more position costs 0.3 of a plain step: alone a fresh row's prior (0.5) is worth it (threshold 0.23), in a
    # batch of four not (0.55), so four rows draft less each than one.
    middle = [0.0] + [1.0 + 0.3 * m for m in range(1, 40)]
    assert drafted_per_step(middle, 4) < drafted_per_step(middle, 1)


def test_a_costed_decoder_steps_with_no_drafting_row_left(model):
    """Catches the cost rule run over an empty batch (a division by the cost of zero positions) after the last
    drafting row was cancelled, and over a batch of rows that do not draft."""
    curve = [0.0] + [1.0 + 0.1 * m for m in range(1, 20)]
    decoder = BatchDecoder(LayerStack(model), max_batch=2, step_curve=lambda rows: curve)
    lookup = LookupDraft("lookup", LookupSettings(draft_len=4))
    row = decoder.add(BatchRequest(PROMPTS[0], lookup, GenerationConfig(max_new_tokens=8)))
    plain = decoder.add(BatchRequest(PROMPTS[1], NoneDraft(), GenerationConfig(max_new_tokens=3)))
    decoder.step()
    decoder.cancel(row)
    outcomes = decoder.run()
    assert outcomes[row].cancelled and len(outcomes[plain].token_ids) == 3
    assert decoder.step().finished == {} and decoder.idle


def test_seeded_sampling_row_reproduces_its_single_request(model):
    """The row draws its noise (and a draft model its tokens) from its own generator, in the single loop's order."""
    stack = LayerStack(model)
    decoder = BatchDecoder(stack)
    rows = []
    for i, prompt in enumerate(PROMPTS[:4]):
        config = GenerationConfig(max_new_tokens=15, temperature=0.8, top_p=0.9, seed=100 + i)
        make = [lambda: LookupDraft(), NoneDraft, lambda: ModelDraft("self", model, ModelDraftSettings(draft_len=2)),
                lambda: LookupTreeDraft()][i]
        rows.append((decoder.add(BatchRequest(prompt, make(), config)), prompt, make, config))
    rows.append((decoder.add(BatchRequest(PROMPTS[4], LookupDraft(), GenerationConfig(max_new_tokens=15))), PROMPTS[4],
                 LookupDraft, GenerationConfig(max_new_tokens=15)))  # a greedy row among the sampling ones
    outcomes = decoder.run()
    for row_id, prompt, make, config in rows:
        assert outcomes[row_id].token_ids == single(model, prompt, make(), config)


def test_batched_sampling_row_keeps_the_target_distribution():
    """Chi-square of a batched row's first 3 tokens against the exact target distribution (V=4), rows mixing a
    chain draft, a tree draft and no draft: catches noise or logits taken from another row, top-p on the wrong row."""
    steps, temperature = 3, 1.3
    model = tiny_llama(SMALL_V, seed=3, layers=2, hidden=16)
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    with torch.inference_mode():
        exact = exact_joint(model, prompt, steps, temperature)
    stack = LayerStack(model)
    makers = [lambda: LookupDraft("lookup", LookupSettings(draft_len=2)), NoneDraft,
              lambda: LookupTreeDraft("lookup-tree", LookupTreeSettings(draft_len=2, max_nodes=4))]
    counts = dict.fromkeys(exact, 0)
    samples = 1200
    for batch in range(samples // 12):
        decoder = BatchDecoder(stack, max_batch=12)
        for j in range(12):
            config = GenerationConfig(max_new_tokens=steps, temperature=temperature, seed=batch * 12 + j)
            decoder.add(BatchRequest(prompt[: 6 + j % 5], makers[j % 3](), config) if j % 2 else
                        BatchRequest(prompt, makers[j % 3](), config))
        for row_id, outcome in decoder.run().items():
            if row_id % 2 == 0:  # the rows with the full prompt
                counts[tuple(outcome.token_ids)] += 1
    num = samples // 2
    keys = sorted(exact)
    assert_follows(torch.tensor([float(counts[k]) for k in keys]), torch.tensor([exact[k] for k in keys]), num)


def test_a_cancelled_row_frees_its_cache_row_and_the_moved_row_decodes_on(model):
    """Catches a cancel that leaves the row in the batch cache (a long-running server's cache would keep every
    cancelled row) and a row moved into the freed slot that then reads another row's keys."""
    stack = LayerStack(model)
    decoder = BatchDecoder(stack, max_batch=3)
    config = GenerationConfig(max_new_tokens=10)
    row_ids = [decoder.add(BatchRequest(prompt, LookupDraft(), config)) for prompt in PROMPTS[:3]]
    first = decoder.step()
    assert decoder.cache.num_rows == 3
    decoder.cancel(row_ids[0])  # the first slot: the last row moves into it
    assert decoder.cache.num_rows == len(decoder.active) == 2
    outcomes = {**first.finished, **decoder.run()}
    assert outcomes[row_ids[0]].cancelled
    for row_id, prompt in zip(row_ids[1:], PROMPTS[1:3]):
        assert outcomes[row_id].token_ids == single(model, prompt, LookupDraft(), config)
    assert decoder.cache.num_rows == 0


def test_bad_rows_fail_alone(model):
    """An empty prompt, a prompt too long for the model, a draft that cannot be made (an unknown arm): each row gets
    its error; the others decode as if alone. A cancelled row is reported as such."""
    stack = LayerStack(model)
    decoder = BatchDecoder(stack, max_batch=4, max_context=40)
    config = GenerationConfig(max_new_tokens=10)

    def unknown(pre):
        raise CtxdraftError("unknown arm 'nope'")

    good = decoder.add(BatchRequest(PROMPTS[0], LookupDraft(), config))
    empty = decoder.add(BatchRequest([], LookupDraft(), config))
    too_long = decoder.add(BatchRequest(list(range(1, 40)), LookupDraft(), config))
    bad_arm = decoder.add(BatchRequest(PROMPTS[1], unknown, config))
    other = decoder.add(BatchRequest(PROMPTS[2], NoneDraft(), config))
    cancelled = decoder.add(BatchRequest(PROMPTS[3], NoneDraft(), config))
    first = decoder.step()
    decoder.cancel(cancelled)
    outcomes = {**first.finished, **decoder.run()}
    assert "empty prompt" in outcomes[empty].error
    assert "exceeds the model's context of 40" in outcomes[too_long].error
    assert "unknown arm" in outcomes[bad_arm].error
    assert outcomes[cancelled].cancelled and len(outcomes[cancelled].token_ids) == 2
    assert outcomes[good].token_ids == single(model, PROMPTS[0], LookupDraft(), config)
    assert outcomes[other].token_ids == single(model, PROMPTS[2], NoneDraft(), config)
    assert BatchDecoder(stack).run() == {}  # an empty batch: nothing to do
