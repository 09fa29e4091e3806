"""Shared types and the one place that picks an implementation (Triton or the torch reference).

Terms used by every verify function:
- a draft token is *accepted* when the target agrees with it (greedy: it is the target's argmax; sampling:
  the accept test u < p/q passes). Acceptance stops at the first rejection.
- the *correction* token replaces the first rejected draft token (greedy: the target's argmax there;
  sampling: a sample from the residual max(p - q, 0)).
- the *bonus* token follows when every draft token of the row was accepted: the target's own next token
  at position num_draft, which the same forward computed for free.
Each row of ``out_ids`` is ``accepted draft tokens + one correction or bonus token``, padded with -1.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch references work without triton; only impl="triton" needs it
    triton = tl = None

IMPLS = ("auto", "torch", "triton")

# Vocabulary tile of every kernel. Large tiles keep grids small, which the interpreter pays for per program.
MAX_BLOCK_V = 4096


class VerifyResult(NamedTuple):
    out_ids: torch.Tensor  # [B, K+1] int64, accepted draft ids + one correction/bonus id, then -1
    num_accepted: torch.Tensor  # [B] int64, accepted draft tokens per row (0..num_draft[b])

    @property
    def accepted_mask(self) -> torch.Tensor:
        """[B, K] bool: draft position k of row b was accepted (acceptance per draft position)."""
        K = self.out_ids.shape[1] - 1
        positions = torch.arange(K, device=self.out_ids.device)
        return positions[None, :] < self.num_accepted[:, None]

    @property
    def num_emitted(self) -> torch.Tensor:
        """[B] tokens each row emits this step: the accepted ones plus the correction/bonus token."""
        return self.num_accepted + 1


def check_verify_inputs(target_logits: torch.Tensor, draft_ids: torch.Tensor, num_draft: torch.Tensor) -> None:
    """Shape/dtype/device checks shared by every public verify entry point."""
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be [B, K+1, V], got shape {tuple(target_logits.shape)}")
    B, K1, V = target_logits.shape
    if V < 1:
        raise ValueError("target_logits must have a vocabulary of at least one token")
    if not target_logits.is_floating_point():
        raise TypeError(f"target_logits must be floating point, got {target_logits.dtype}")
    if draft_ids.shape != (B, K1 - 1):
        raise ValueError(f"draft_ids must be [B, K] = {(B, K1 - 1)}, got {tuple(draft_ids.shape)}")
    if num_draft.shape != (B,):
        raise ValueError(f"num_draft must be [B] = {(B,)}, got {tuple(num_draft.shape)}")
    if draft_ids.dtype not in (torch.int32, torch.int64) or num_draft.dtype not in (torch.int32, torch.int64):
        raise TypeError("draft_ids and num_draft must be integer tensors")
    devices = {target_logits.device, draft_ids.device, num_draft.device}
    if len(devices) != 1:
        raise ValueError(f"all verify inputs must be on one device, got {sorted(map(str, devices))}")


def use_triton(impl: str, device: torch.device) -> bool:
    """Triton on CUDA tensors, the torch reference elsewhere; ``impl`` forces one path.

    ``impl="triton"`` on CPU tensors runs the kernels in Triton's interpreter (``TRITON_INTERPRET=1``),
    which is how the CPU tests compare kernel and reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return device.type == "cuda" and triton is not None
    if impl == "torch":
        return False
    if triton is None:
        raise RuntimeError('impl="triton" needs the triton package (pip install triton); use impl="torch" or "auto"')
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f'impl="triton" on {device.type} tensors needs TRITON_INTERPRET=1 set before triton is imported'
        )
    return True


def jit(fn):
    """``triton.jit`` when triton is installed; otherwise the plain function, which is never launched."""
    return fn if triton is None else triton.jit(fn)


def launch_shape(num_rows: int, V: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps) for kernels that reduce ``num_rows`` rows of ``V`` values.

    On a GPU a program holds one row tile of 4096 values (several rows when V is small); in the
    interpreter (CPU tensors) a program holds up to 2**18 values, since every op costs ~0.3 ms there
    whatever its size, so fewer, larger programs finish far sooner.
    """
    BLOCK_V = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    tile_budget = 4096 if device.type == "cuda" else 2**18
    BLOCK_R = max(1, min(tile_budget // BLOCK_V, triton.next_power_of_2(max(num_rows, 1))))
    num_warps = 8 if BLOCK_R * BLOCK_V >= 4096 else 4
    return BLOCK_R, BLOCK_V, num_warps
