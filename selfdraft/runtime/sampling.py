"""Pure functions that turn logits into the distribution a token is drawn from."""
from __future__ import annotations

import torch


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-style logit soft-capping, cap * tanh(logits / cap); identity when the model has no cap."""
    return torch.tanh(logits / cap) * cap if cap else logits


def top_p_filter(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Set logits outside the top-p nucleus (of softmax(logits / T)) to -inf; shape is kept. [..., V]"""
    if top_p >= 1.0 or temperature <= 0:
        return logits
    sorted_logits, order = torch.sort(logits.float() / temperature, dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Keep a token if the mass before it is < top_p (so the most likely token is always kept).
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def probs_from_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution for ``logits`` [..., V] (temperature > 0), in fp32."""
    return torch.softmax(top_p_filter(logits, temperature, top_p).float() / temperature, dim=-1)
