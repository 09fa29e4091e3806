"""End-to-end decoding on tiny random models: greedy equality with HF generate, exact sampling."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from tiny import ARCHS, tiny_llama, tiny_random

from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.drafts import LookupDraft, LookupSettings, ModelDraft, ModelDraftSettings, NoneDraft
from ctxdraft.selfdraft.runtime.layers import LayerStack

V = 61
REPEATING = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 10, 11, 12, 5, 6, 7]
PLAIN = [3, 17, 42, 8, 29, 33, 4, 51, 12]


@pytest.fixture(scope="module", params=ARCHS)
def target(request):
    """Each architecture's own layer code (Qwen2's q/k/v biases, Gemma 3's sliding window) must stay lossless."""
    return tiny_llama(V, seed=0) if request.param == "llama" else tiny_random(request.param, vocab_size=V)


@pytest.fixture(scope="module")
def other_model():
    return tiny_llama(V, seed=1, layers=2)


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def run(model, prompt, draft, n, capture=(), **kw):
    """Decode ``n`` tokens of ``prompt`` with ``draft``; ``capture``: target layers the prefill keeps (a feature
    draft's ``state_layers``)."""
    stack = LayerStack(model)
    pre = prefill(stack, prompt, capture=capture)
    return speculative_decode(stack, pre, draft, GenerationConfig(max_new_tokens=n, **kw))


def drafts(target, other_model):
    yield NoneDraft()
    for k in (1, 3, 7):
        yield LookupDraft("lookup", LookupSettings(draft_len=k))
    yield LookupDraft("lookup", LookupSettings(draft_len=4, ngram_sizes=[1]))
    for k in (1, 4):
        # The target as its own draft accepts everything; an unrelated model rejects most tokens.
        yield ModelDraft("self", target, ModelDraftSettings(draft_len=k))
        yield ModelDraft("other", other_model, ModelDraftSettings(draft_len=k))


@pytest.mark.parametrize("prompt", [REPEATING, PLAIN], ids=["repeating", "plain"])
def test_greedy_equals_hf_generate(target, other_model, prompt):
    n = 40
    expected = hf_greedy(target, prompt, n)
    for draft in drafts(target, other_model):
        got, stats = run(target, prompt, draft, n)
        assert got == expected, f"{draft.name} ({type(draft).__name__}) diverged from HF greedy"
        assert stats.new_tokens == n
        # The prefill emits one token; every later forward emits its accepted tokens plus one.
        assert stats.new_tokens == 1 + stats.accepted_tokens + (stats.target_forwards - 1)
        assert sum(stats.accepted_per_position) == stats.accepted_tokens


def test_self_draft_accepts_everything_and_saves_forwards(target):
    n = 30
    got, stats = run(target, PLAIN, ModelDraft("self", target, ModelDraftSettings(draft_len=4)), n)
    assert stats.accepted_tokens == stats.drafted_tokens > 0
    # Each verify step emits K accepted + 1 bonus token, so far fewer target forwards than tokens.
    assert stats.target_forwards <= 1 + math.ceil((n - 1) / 5)
    assert stats.accepted_per_position[0] == stats.drafted_per_position[0]


def test_none_draft_is_one_forward_per_token(target):
    got, stats = run(target, PLAIN, NoneDraft(), 12)
    assert stats.target_forwards == 12 and stats.drafted_tokens == 0


def test_eos_stops_and_is_not_returned(target):
    expected = hf_greedy(target, PLAIN, 30)
    eos = expected[5]
    stack = LayerStack(target)
    got, _ = speculative_decode(stack, prefill(stack, PLAIN), LookupDraft(), GenerationConfig(max_new_tokens=30), eos_ids={eos})
    assert got == expected[: expected.index(eos)]


# -- sampling keeps the target distribution ---------------------------------------------------------

SMALL_V = 4


@pytest.fixture(scope="module")
def small_target():
    return tiny_llama(SMALL_V, seed=3, layers=2, hidden=16)


def exact_joint(model, prompt, steps, temperature):
    """P(first `steps` tokens) under target-only sampling, by enumeration."""
    probs = {}
    for seq in itertools.product(range(SMALL_V), repeat=steps):
        p = 1.0
        for i in range(steps):
            logits = model(torch.tensor([prompt + list(seq[:i])])).logits[0, -1].float()
            p *= torch.softmax(logits / temperature, -1)[seq[i]].item()
        probs[seq] = p
    return probs


@pytest.mark.parametrize("kind", ["lookup", "model"])
def test_speculative_sampling_matches_target_distribution(small_target, kind):
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    steps, temperature, samples = 3, 1.3, 1500
    expected = exact_joint(small_target, prompt, steps, temperature)
    stack = LayerStack(small_target)
    other = tiny_llama(SMALL_V, seed=11, layers=1, hidden=16)
    counts = dict.fromkeys(expected, 0)
    drafted = 0
    for seed in range(samples):
        draft = LookupDraft("lookup", LookupSettings(draft_len=2)) if kind == "lookup" else ModelDraft("m", other, ModelDraftSettings(draft_len=2))
        got, stats = speculative_decode(stack, prefill(stack, prompt), draft,
                                        GenerationConfig(max_new_tokens=steps, temperature=temperature, seed=seed))
        counts[tuple(got)] += 1
        drafted += stats.drafted_tokens
    assert drafted > samples // 2  # the draft really took part
    chi2 = sum((counts[s] - samples * p) ** 2 / (samples * p) for s, p in expected.items() if samples * p > 0)
    df = len(expected) - 1
    # Pearson chi-square with 63 degrees of freedom: the 0.999 quantile is ~103.4.
    assert chi2 < 103.4, f"chi2={chi2:.1f} (df={df}): sampled tokens do not follow the target distribution"


def test_sampling_is_reproducible_with_seed(target):
    a, _ = run(target, PLAIN, LookupDraft(), 20, temperature=0.8, top_p=0.9, seed=7)
    b, _ = run(target, PLAIN, LookupDraft(), 20, temperature=0.8, top_p=0.9, seed=7)
    c, _ = run(target, PLAIN, LookupDraft(), 20, temperature=0.8, top_p=0.9, seed=8)
    assert a == b and a != c
