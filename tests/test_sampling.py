"""Logits to the sampling distribution: the top-p nucleus on hand-computed cases, temperature, soft-capping."""
from __future__ import annotations

import math

import pytest
import torch

from ctxdraft.selfdraft.runtime.sampling import probs_from_logits, softcap, top_p_filter

# Probabilities that are exact in binary, so the nucleus boundaries below are not at the mercy of rounding.
PROBS = torch.tensor([0.125, 0.5, 0.125, 0.25])  # sorted: 0.5 (id 1), 0.25 (id 3), 0.125, 0.125


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


@pytest.mark.parametrize("top_p, expected", [
    (0.3, [1]),  # the mass before id 1 is 0 < p: the most likely token is always kept
    (0.5, [1]),  # the mass before id 3 is 0.5, not < 0.5: a nucleus that already holds p stops
    (0.7, [1, 3]),
    (0.8, [1, 3, 0, 2]),  # 0.75 < 0.8: a third token is needed, and the two 0.125s tie for it (see below)
    (1.0, [0, 1, 2, 3]),
])
def test_the_nucleus_is_the_smallest_top_set_holding_p(top_p, expected):
    logits = PROBS.log()
    out = top_p_filter(logits, 1.0, top_p)
    assert out.shape == logits.shape
    got = kept(out)
    if top_p == 0.8:  # ids 0 and 2 tie at the boundary: exactly one of them is kept, whichever sorts first
        assert len(got) == 3 and {1, 3} < set(got) and len(set(got) & {0, 2}) == 1
    else:
        assert got == sorted(expected)
    torch.testing.assert_close(out[got], logits[got], rtol=0, atol=0)  # kept logits are untouched


def test_ties_inside_the_nucleus_are_all_kept():
    logits = torch.tensor([0.3, 0.3, 0.4]).log()
    assert kept(top_p_filter(logits, 1.0, 0.75)) == [0, 1, 2]  # mass before the second 0.3 is 0.7 < 0.75
    assert len(kept(top_p_filter(logits, 1.0, 0.65))) == 2  # 0.7 >= 0.65: one 0.3 goes


def test_p_of_one_or_more_and_zero_temperature_keep_everything():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for top_p, temperature in ((1.0, 1.0), (1.5, 0.7), (0.5, 0.0)):
        assert torch.equal(top_p_filter(logits, temperature, top_p), logits)


def test_a_tiny_p_keeps_only_the_argmax():
    logits = torch.randn(4, 7, 33, generator=torch.Generator().manual_seed(1))  # [B, T, V]
    out = top_p_filter(logits, 0.9, 1e-6)
    assert torch.isfinite(out).sum(-1).eq(1).all()
    assert torch.equal(out.argmax(-1), logits.argmax(-1))


def test_the_nucleus_is_taken_after_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0])
    # T = 1: softmax is (0.665, 0.245, 0.090), 0.7 needs two tokens; T = 0.25: (0.982, 0.018, 0.000), one token.
    assert kept(top_p_filter(logits, 1.0, 0.7)) == [0, 1]
    assert kept(top_p_filter(logits, 0.25, 0.7)) == [0]
    # T = 4: (0.419, 0.327, 0.254): 0.75 needs all three (0.746 before the third); at T = 1 two (0.910).
    assert kept(top_p_filter(logits, 4.0, 0.75)) == [0, 1, 2]
    assert kept(top_p_filter(logits, 1.0, 0.75)) == [0, 1]


def test_batch_rows_are_filtered_independently():
    peaked = torch.tensor([10.0, 0.0, 0.0, 0.0])  # the nucleus of 0.9 is one token
    flat = torch.zeros(4)  # ... here all four (mass before the 4th is 0.75)
    rows = torch.stack([peaked, flat, peaked.flip(0)])
    out = top_p_filter(rows, 1.0, 0.9)
    for row, got in zip(rows, out):
        assert torch.equal(got, top_p_filter(row, 1.0, 0.9))
    assert [len(kept(r)) for r in out] == [1, 4, 1] and kept(out[2]) == [3]


def test_half_precision_logits_keep_their_dtype():
    logits = PROBS.log().to(torch.bfloat16)
    out = top_p_filter(logits, 1.0, 0.7)
    assert out.dtype == torch.bfloat16 and kept(out) == [1, 3]


def test_probs_are_the_nucleus_renormalised():
    probs = probs_from_logits(PROBS.log(), 1.0, 0.7)
    torch.testing.assert_close(probs, torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]))
    assert probs.dtype == torch.float32


def test_probs_follow_the_temperature_and_sum_to_one():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]], dtype=torch.bfloat16)
    probs = probs_from_logits(logits, 2.0, 1.0)
    assert probs.dtype == torch.float32
    e = torch.exp(torch.tensor([0.5, 1.0, 1.5]))
    torch.testing.assert_close(probs[0], e / e.sum())
    torch.testing.assert_close(probs[1], torch.tensor([2.0, 2.0, 2 * math.sqrt(2.0)]) / (4 + 2 * math.sqrt(2.0)),
                               rtol=1e-2, atol=1e-3)  # bf16 rounds log 2
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_softcap_is_cap_tanh_and_off_without_a_cap():
    logits = torch.tensor([-1000.0, -3.0, 0.0, 3.0, 1000.0])
    assert softcap(logits, None) is logits and softcap(logits, 0.0) is logits
    capped = softcap(logits, 30.0)
    torch.testing.assert_close(capped, 30.0 * torch.tanh(logits / 30.0))
    assert capped[0] == -30.0 and capped[-1] == 30.0  # bounded by the cap
    torch.testing.assert_close(softcap(torch.tensor([30.0 * math.atanh(0.5)]), 30.0), torch.tensor([15.0]))
    assert torch.equal(capped.argsort(), logits.argsort())  # monotone: greedy choices are unchanged
