"""Fused verification for speculative decoding: one API, a Triton path on CUDA and a torch reference elsewhere."""
from .dispatch import VerifyResult
from .verify_greedy import verify_greedy, verify_greedy_ref
from .verify_sampling import SamplingNoise, draw_noise, verify_sampling, verify_sampling_ref

__all__ = [
    "VerifyResult",
    "SamplingNoise",
    "draw_noise",
    "verify_greedy",
    "verify_greedy_ref",
    "verify_sampling",
    "verify_sampling_ref",
]
