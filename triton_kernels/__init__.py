"""Fused verification for speculative decoding: one API, a Triton path on CUDA and a torch reference elsewhere."""
from .dispatch import TreeVerifyResult, VerifyResult
from .verify_greedy import verify_greedy, verify_greedy_ref
from .verify_sampling import SamplingNoise, draw_noise, verify_sampling, verify_sampling_ref
from .verify_tree_greedy import verify_tree_greedy, verify_tree_greedy_ref
from .verify_tree_sampling import verify_tree_sampling, verify_tree_sampling_ref

__all__ = [
    "VerifyResult",
    "TreeVerifyResult",
    "SamplingNoise",
    "draw_noise",
    "verify_greedy",
    "verify_greedy_ref",
    "verify_sampling",
    "verify_sampling_ref",
    "verify_tree_greedy",
    "verify_tree_greedy_ref",
    "verify_tree_sampling",
    "verify_tree_sampling_ref",
]
