"""Greedy equality in low precision: identical, a tie, or a real mismatch.

In bfloat16 (and float16) one target forward over K + 1 positions and K + 1 single-position forwards round
differently, so a speculative greedy output can legitimately leave the plain one, but only where the target
itself hesitates: where its best candidates are within rounding noise of each other. ``compare_greedy`` finds the
first position where two greedy outputs of the same prompt differ, recomputes the target's logits there (one
plain forward over the common prefix, in the target's dtype) and calls the divergence a *tie* when both tokens'
logits are within the dtype's tolerance of the target's best logit there, else a *mismatch* (a bug). Both, not
just the top two: where three candidates are within a rounding step, the plain forward over the prefix may rank
third the token that incremental decoding picked (seen in bf16: logits 12.75, 12.625, 12.5625, HF generate's
token the third).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.layers import LayerStack

# Logit gaps (absolute) within which two candidates count as tied. A bf16 logit of magnitude 16-32 has a
# rounding step of 0.125-0.25 and the error of 30 layers accumulates, so 0.5 is a few steps; float32 output is
# expected to be identical, so its tolerance only absorbs summation-order noise.
TIE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.1}


@dataclass
class Divergence:
    kind: str  # "identical", "tie" or "mismatch"
    position: int | None = None  # first differing new-token position
    gap: float | None = None  # how far below the target's best logit there the lower of the two tokens is
    expected_token: int | None = None  # -1: the output ended there (EOS)
    got_token: int | None = None


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where ``a`` and ``b`` differ (the shorter length when one is a prefix), or None."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def compare_greedy(stack: LayerStack, prompt_ids: list[int], expected: list[int], got: list[int], eos_ids,
                   tolerance: float | None = None) -> Divergence:
    """Classify how ``got`` differs from ``expected`` (both greedy outputs for ``prompt_ids``, EOS excluded)."""
    position = first_difference(expected, got)
    if position is None:
        return Divergence("identical")
    eos = min(eos_ids) if eos_ids else -1
    want = expected[position] if position < len(expected) else eos  # an output that stops there ended on EOS
    have = got[position] if position < len(got) else eos
    ids = list(prompt_ids) + list(expected[:position])
    hidden = stack.run(stack.embed(torch.tensor([ids])), 0, stack.num_layers, stack.new_cache(), torch.arange(len(ids)))
    logits = stack.logits(hidden[:, -1:])[0, -1].float()
    best = float(logits.max())
    tolerance = TIE_TOLERANCE.get(stack.model.dtype, 1e-3) if tolerance is None else tolerance
    if not all(0 <= token < logits.numel() for token in (want, have)):  # EOS against a token with no EOS id
        return Divergence("mismatch", position, None, want, have)
    gap = best - min(float(logits[want]), float(logits[have]))
    return Divergence("tie" if gap <= tolerance else "mismatch", position, gap, want, have)
