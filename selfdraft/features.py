"""Query features for routing, computed from the prefill the target runs anyway.

``hidden``: the residual stream after layer ``layer``, mean-pooled over the prompt, then log(prompt length).
``tokens``: the prompt token ids themselves (a runtime with only a tokenizer can route on them).
"""
from __future__ import annotations

import math

import numpy as np


def hidden_spec(layer: int, hidden_size: int) -> dict:
    return {
        "kind": "hidden",
        "layer": layer,
        "pooling": "mean",
        "dim": hidden_size + 1,
        "input": f"float32 [B, {hidden_size + 1}]: mean over prompt positions of the residual stream after "
        f"decoder layer {layer} (before the final norm), followed by log(prompt length in tokens)",
    }


def tokens_spec() -> dict:
    return {
        "kind": "tokens",
        "layer": None,
        "pooling": "mean",
        "dim": None,
        "input": "int64 [B, T]: prompt token ids as the target sees them (chat template applied), padded with -1",
    }


def hidden_features(pooled, prompt_len: int) -> np.ndarray:
    """[D] pooled hidden state + log length -> float32 [D+1]."""
    vec = np.asarray(pooled.detach().float().cpu().numpy() if hasattr(pooled, "detach") else pooled, dtype=np.float32)
    return np.concatenate([vec, np.array([math.log(max(prompt_len, 1))], dtype=np.float32)])


def features_from_prefill(spec: dict, pre) -> np.ndarray | list[int]:
    """The routing input for one query, from a ``decoding.Prefill``."""
    if spec["kind"] == "tokens":
        return list(pre.prompt_ids)
    return hidden_features(pre.pooled_hidden, len(pre.prompt_ids))
