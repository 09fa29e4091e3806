"""Query features for routing, computed from the prefill the target runs anyway, and their one schema.

``hidden``: the residual stream after decoder layer ``layer``, mean-pooled over the prompt, then
log(prompt length) (float32 [B, F], F = D + 1). ``tokens``: the prompt's token ids themselves (int64 [B, T],
right-padded with -1), so a runtime with only a tokenizer can route. The spec dicts below are what
bundle.json ``features`` and the ONNX file's ``ctxdraft.features`` hold. numpy only: the onnxruntime router
imports this module without torch.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CtxdraftError

FEATURE_KINDS = ("hidden", "tokens")
INPUT_NAMES = {"hidden": "features", "tokens": "token_ids"}  # the ONNX graph's input name per kind
PADDING_ID = -1  # right-padding of token id rows


def hidden_spec(layer: int, dim: int) -> dict:
    return {
        "kind": "hidden",
        "layer": int(layer),
        "pooling": "mean",
        "dim": int(dim),
        "input": {
            "name": INPUT_NAMES["hidden"], "dtype": "float32", "shape": ["batch", int(dim)],
            "description": f"the target's hidden state after decoder layer {layer} during prefill, mean over all "
                           f"prompt positions ({dim - 1} values), then log(prompt_len); raw values: the "
                           "normalisation is inside the graph",
        },
    }


def tokens_spec(num_buckets: int) -> dict:
    return {
        "kind": "tokens",
        "layer": None,
        "pooling": "mean",
        "dim": None,
        "num_buckets": int(num_buckets),
        "padding_id": PADDING_ID,
        "input": {
            "name": INPUT_NAMES["tokens"], "dtype": "int64", "shape": ["batch", "time"],
            "description": "the prompt's token ids from the target's tokenizer (chat template applied, as fed to "
                           f"the target), right-padded with {PADDING_ID}; hashed inside the graph",
        },
    }


def default_feature_layer(num_layers: int) -> int:
    """Where hidden features are pooled unless a bundle says otherwise: a third of the way up."""
    return max(1, min(num_layers, round(num_layers / 3)))


def hidden_features(pooled, prompt_len: int) -> np.ndarray:
    """[D] pooled hidden state (a torch tensor or an array) + log length -> float32 [D+1]."""
    if hasattr(pooled, "detach"):
        pooled = pooled.detach().float().cpu().numpy()
    vec = np.asarray(pooled, dtype=np.float32)
    return np.concatenate([vec, np.array([math.log(max(prompt_len, 1))], dtype=np.float32)])


def features_from_prefill(spec: dict, prompt_ids: list[int], pooled_hidden) -> np.ndarray | list[int]:
    """The routing input for one query, from what the prefill computed."""
    if spec["kind"] == "tokens":
        return list(prompt_ids)
    if pooled_hidden is None:
        raise CtxdraftError(f"hidden features need the prefill's pooled layer-{spec.get('layer')} state")
    return hidden_features(pooled_hidden, len(prompt_ids))
