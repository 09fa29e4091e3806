"""Greedy equality in low precision: identical, a tie among the target's best candidates, or a real mismatch; and bf16
speculative decoding, which may only ever diverge at a tie."""
from __future__ import annotations

import pytest
import torch
from tiny import tiny_random

from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.drafts import LookupDraft, LookupSettings, ModelDraft, ModelDraftSettings, NoneDraft
from ctxdraft.selfdraft.drafting.exit_draft import ExitDraft, ExitSettings
from ctxdraft.selfdraft.drafting.exit_head import ExitHead
from ctxdraft.selfdraft.drafting.ties import compare_greedy, first_difference
from ctxdraft.selfdraft.runtime.layers import LayerStack

PROMPT = [5, 9, 2, 33, 7, 7, 18, 40, 3, 11, 5, 9, 2]


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_identical_tie_and_mismatch_are_told_apart():
    model = tiny_random(seed=4)
    stack = LayerStack(model)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0, -1]
    top = logits.topk(3)
    first, second, third = top.indices.tolist()
    gap = float(top.values[0] - top.values[1])
    assert compare_greedy(stack, PROMPT, [first, 4], [first, 4], set()).kind == "identical"
    # The second-best token, within a tolerance above the true gap: a tie; below it: a mismatch.
    tie = compare_greedy(stack, PROMPT, [first], [second], set(), tolerance=gap + 1e-3)
    assert (tie.kind, tie.position, tie.expected_token, tie.got_token) == ("tie", 0, first, second)
    assert tie.gap == pytest.approx(gap, abs=1e-4)
    assert compare_greedy(stack, PROMPT, [first], [second], set(), tolerance=gap / 2).kind == "mismatch"
    # The third-best token: a tie only within the tolerance of the best logit (three candidates a rounding step
    # apart), and the gap is the third's distance from the best.
    gap3 = float(top.values[0] - top.values[2])
    third_tie = compare_greedy(stack, PROMPT, [first], [third], set(), tolerance=gap3 + 1e-3)
    assert third_tie.kind == "tie" and third_tie.gap == pytest.approx(gap3, abs=1e-4)
    assert compare_greedy(stack, PROMPT, [first], [third], set(), tolerance=gap3 - 1e-3).kind == "mismatch"
    assert compare_greedy(stack, PROMPT, [second], [third], set(), tolerance=gap3 - 1e-3).kind == "mismatch"
    # One output stopping early is a divergence between EOS and a token.
    eos_vs_token = compare_greedy(stack, PROMPT, [first], [first, 4], {first}, tolerance=1e9)
    assert eos_vs_token.position == 1 and eos_vs_token.expected_token == first


def drafts(model):
    yield NoneDraft()
    yield LookupDraft("lookup", LookupSettings(draft_len=4))
    yield ModelDraft("self", model, ModelDraftSettings(draft_len=3))
    for kind in ("linear", "layer"):
        head = ExitHead(model, 2, kind).eval().requires_grad_(False)
        yield ExitDraft("exit", head, ExitSettings(2, draft_len=3, head=kind))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bfloat16_speculative_decoding_only_diverges_at_ties(arch):
    model = tiny_random(arch, seed=2).to(torch.bfloat16)
    stack = LayerStack(model)
    ids = torch.tensor([PROMPT])
    expected = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, len(PROMPT):].tolist()
    kinds = []
    for draft in drafts(model):
        got, stats = speculative_decode(stack, prefill(stack, PROMPT), draft, GenerationConfig(max_new_tokens=30))
        assert len(got) == 30
        kinds.append(compare_greedy(stack, PROMPT, expected, got, set()).kind)
    assert "mismatch" not in kinds, kinds
    assert kinds.count("identical") >= 1
