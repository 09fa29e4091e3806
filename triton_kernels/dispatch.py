"""Shared types and the one place that picks an implementation (Triton or the torch reference).

Terms used by every verify function:
- a draft token is *accepted* when the target agrees with it (greedy: it is the target's argmax; sampling:
  the accept test u < p/q passes). Acceptance stops at the first rejection.
- the *correction* token replaces the first rejected draft token (greedy: the target's argmax there;
  sampling: a sample from the residual max(p - q, 0)).
- the *bonus* token follows when every draft token of the row was accepted: the target's own next token
  at position num_draft, which the same forward computed for free.
Each row of ``out_ids`` is ``accepted draft tokens + one correction or bonus token``, padded with -1.
A draft may also be a token tree (``verify_tree_greedy.py``): there the accepted draft tokens form a path from
the root, and the correction token follows the path's last node when none of its children is accepted.
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


class TreeVerifyResult(NamedTuple):
    """Verification of a token tree of N nodes per row; D = N, the depth of the deepest possible path (a chain)."""

    out_ids: torch.Tensor  # [B, N+1] int64, tokens of the accepted path + one correction/bonus id, then -1
    path_nodes: torch.Tensor  # [B, N] int64, node index accepted at each depth, then -1
    num_accepted: torch.Tensor  # [B] int64, accepted nodes per row (the length of the accepted path)

    @property
    def num_emitted(self) -> torch.Tensor:
        """[B] tokens each row emits this step: the accepted path plus the correction/bonus token."""
        return self.num_accepted + 1


def check_verify_inputs(
    target_logits: torch.Tensor,
    draft_ids: torch.Tensor,
    num_draft: torch.Tensor,
    names: tuple[str, str, str] = ("draft_ids", "num_draft", "K"),
) -> None:
    """Shape/dtype/device checks shared by every public verify entry point.

    ``names`` are the names the caller knows the ids, their count and their length by (a tree passes
    ``("tree_ids", "num_nodes", "N")``), so that an error names the argument that is wrong.
    """
    ids_name, count_name, length = names
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be [B, {length}+1, V], got shape {tuple(target_logits.shape)}")
    B, K1, V = target_logits.shape
    if V < 1:
        raise ValueError("target_logits must have a vocabulary of at least one token")
    if not target_logits.is_floating_point():
        raise TypeError(f"target_logits must be floating point, got {target_logits.dtype}")
    if draft_ids.shape != (B, K1 - 1):
        raise ValueError(f"{ids_name} must be [B, {length}] = {(B, K1 - 1)}, got {tuple(draft_ids.shape)}")
    if num_draft.shape != (B,):
        raise ValueError(f"{count_name} must be [B] = {(B,)}, got {tuple(num_draft.shape)}")
    if draft_ids.dtype not in (torch.int32, torch.int64) or num_draft.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{ids_name} and {count_name} must be integer tensors")
    devices = {target_logits.device, draft_ids.device, num_draft.device}
    if len(devices) != 1:
        raise ValueError(f"all verify inputs must be on one device, got {sorted(map(str, devices))}")


def check_tree_inputs(
    target_logits: torch.Tensor,  # [B, N+1, V]
    tree_ids: torch.Tensor,  # [B, N]
    parents: torch.Tensor,  # [B, N]
    num_nodes: torch.Tensor,  # [B]
) -> None:
    """``check_verify_inputs`` for a tree, plus the parent indices. That parents[b, i] < i is not checked (it
    would sync with the host); a node whose parent is not an earlier node is simply never accepted."""
    check_verify_inputs(target_logits, tree_ids, num_nodes, names=("tree_ids", "num_nodes", "N"))
    if parents.shape != tree_ids.shape:
        raise ValueError(f"parents must be [B, N] = {tuple(tree_ids.shape)}, got {tuple(parents.shape)}")
    if parents.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"parents must be an integer tensor, got {parents.dtype}")
    if parents.device != tree_ids.device:
        raise ValueError(f"all verify inputs must be on one device, got {parents.device} and {tree_ids.device}")


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


def target_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The argmax over the last dimension (the vocabulary), first index among ties: the torch references' greedy
    test. On a CPU a half-precision tensor is widened to float32 first, which is exact (every bf16 and fp16 value is
    a float32) and faster: torch's CPU argmax over bf16 took 1.2 ms for 13 positions x 49,152 logits, widening plus
    a float32 argmax 0.43 ms (AMD EPYC, 2 threads), about 3% of a bf16 tree step there."""
    if logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return logits.argmax(dim=-1)


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
