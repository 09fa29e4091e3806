"""Exit drafts: token-for-token greedy equality with HF generate (Llama, Gemma 3 and Qwen2, linear and layer heads,
full and reduced vocabularies), the confidence stop, and distribution-exact sampling."""
from __future__ import annotations

import math

import pytest
import torch
from tiny import ARCHS, assert_follows, tiny_random

from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.draft import DecodeState
from ctxdraft.selfdraft.drafting.exit_draft import ExitDraft, ExitSettings
from ctxdraft.selfdraft.drafting.exit_head import ExitHead
from ctxdraft.selfdraft.runtime.layers import LayerStack


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def exit_draft(model, exit_layer, kind, draft_len, threshold=0.0, vocab_ids=None) -> ExitDraft:
    head = ExitHead(model, exit_layer, kind, vocab_ids).eval().requires_grad_(False)
    return ExitDraft(f"exit@{exit_layer}", head, ExitSettings(exit_layer, draft_len, threshold, kind))


def run_draft(model, draft, prompt, n, **gen):
    stack = LayerStack(model)
    pre = prefill(stack, prompt)
    return speculative_decode(stack, pre, draft, GenerationConfig(max_new_tokens=n, **gen))


# --------------------------------------------------------------------------------------------------
# Greedy: token-for-token the target's own output
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["linear", "layer"])
@pytest.mark.parametrize("draft_len", [1, 3, 6])
def test_greedy_exit_draft_matches_generate(arch, kind, draft_len):
    model = tiny_random(arch)
    prompt = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    n = 28
    ref = greedy_reference(model, prompt, n)
    for exit_layer, vocab_ids in [(2, None), (1, torch.arange(0, 61, 2))]:
        out, stats = run_draft(model, exit_draft(model, exit_layer, kind, draft_len, vocab_ids=vocab_ids), prompt, n)
        assert out == ref, (exit_layer, vocab_ids is not None)
        assert stats.drafted_tokens > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_perfect_layer_head_accepts_everything(arch):
    # A layer head at E = L-1 initialised from the last layer IS the rest of the target: every draft token is
    # accepted, so every step ends with a bonus token and the head must catch up on d_K (cache reuse path).
    model = tiny_random(arch)
    prompt = list(range(3, 14))
    ref = greedy_reference(model, prompt, 30)
    out, stats = run_draft(model, exit_draft(model, 3, "layer", 4), prompt, 30)
    assert out == ref
    assert stats.accepted_tokens == stats.drafted_tokens > 20
    assert stats.target_forwards <= 1 + math.ceil(29 / 5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["linear", "layer"])
def test_confidence_stop(arch, kind):
    model = tiny_random(arch)
    prompt = list(range(5, 16))
    ref = greedy_reference(model, prompt, 24)
    # Threshold at the median confidence of this head: some drafts stop early, some run to K.
    draft = exit_draft(model, 2, kind, 5)
    stack = LayerStack(model)
    with torch.no_grad():
        hidden = stack.run(stack.embed(torch.tensor([prompt + ref])), 0, 2, stack.new_cache(), torch.arange(len(prompt) + 24))
        conf = torch.softmax(draft.head(hidden)[0], -1).max(-1).values
    threshold = float(conf.median())
    out, stats = run_draft(model, exit_draft(model, 2, kind, 5, threshold), prompt, 24)
    _, plain = run_draft(model, exit_draft(model, 2, kind, 5), prompt, 24)
    assert out == ref
    assert 0 < stats.drafted_tokens < plain.drafted_tokens


def test_exit_hidden_covers_last_token_after_confidence_stop():
    model = tiny_random()
    prompt = list(range(2, 12))
    stack = LayerStack(model)
    pre = prefill(stack, prompt[:-1])
    draft = exit_draft(model, 2, "linear", 8, threshold=0.999)  # stops at once: nothing drafted
    state = DecodeState(stack, pre.cache, prompt, 61, 0.0, 1.0, None)
    draft.start(state)
    proposal = draft.propose(state, 8)
    assert proposal.ids == [] and proposal.exit_hidden.shape == (1, 1, 32)
    assert LayerStack.seq_len(pre.cache, 0) == len(prompt) and LayerStack.seq_len(pre.cache, 2) == len(prompt) - 1


def _target_pair_probs(model, prompt, temperature):
    """Exact P(t1, t2) of the target's first two sampled tokens. [V, V]"""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        seqs = torch.tensor([prompt + [t] for t in range(V)])
        p2 = torch.softmax(model(seqs).logits[:, -1] / temperature, -1)
    return p1[:, None] * p2


@pytest.mark.parametrize("vocab_ids", [None, torch.tensor([0, 2, 3, 5])])
def test_sampling_keeps_target_distribution(vocab_ids):
    V = 6
    model = tiny_random(vocab_size=V, seed=3)
    prompt = [1, 4, 2, 0, 5]
    temperature = 1.3
    exact = _target_pair_probs(model, prompt, temperature)
    draft = exit_draft(model, 1, "linear", 2, vocab_ids=vocab_ids)  # its q differs from the target's p
    num = 1500
    counts = torch.zeros(V, V)
    drafted = 0
    stack = LayerStack(model)
    for seed in range(num):
        pre = prefill(stack, prompt)
        out, stats = speculative_decode(stack, pre, draft, GenerationConfig(max_new_tokens=3, temperature=temperature, seed=seed))
        counts[out[0], out[1]] += 1
        drafted += stats.drafted_tokens
    assert drafted == num  # budget 1 per generation: the second token always went through draft + verify
    assert_follows(counts, exact, num)
    keep = exact * num >= 5
    assert counts[~keep].sum() <= 5 * max(1, int((~keep).sum()))
