"""Data-parallel work under ``torchrun`` (torch.distributed: gloo on CPU, nccl on CUDA), and nothing without it.

``torchrun --nproc-per-node N --no-python ctxdraft collect ...`` starts N copies of a command; each copy reads
its rank from the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...). ``Group`` is the one place
that knows about it: prompts are sharded deterministically (``shard``: rank r takes items r, r + N, ...), the
ranks exchange small Python objects (``broadcast``, ``gather``), and ``run`` turns a failure on any rank into
the same error on every rank, so a run never ends with a silent partial result. Without torchrun the group
has one rank and every call is a no-op, so the commands behave exactly as before. ``wrap`` puts a module being
trained under DistributedDataParallel (gradients averaged over the ranks).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

import torch

from ..base.errors import CtxdraftError

T = TypeVar("T")


class Group:
    """The ranks of this run (one, without torchrun)."""

    def __init__(self, size: int | None = None, rank: int | None = None):
        """``Group()``: the group torchrun started (from its environment), joined now. ``Group(size, rank)``
        describes a group without joining one (``Group(1, 0)``, the library's default, is a run of one whatever
        the environment, so that a Python user never joins a group by accident)."""
        from_env = size is None and rank is None
        self.size = int(os.environ.get("WORLD_SIZE", "1")) if size is None else size
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self._owns = False
        if from_env and self.size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            try:
                torch.distributed.init_process_group(backend=backend)
            except (RuntimeError, ValueError) as e:
                raise CtxdraftError(f"cannot join the torchrun group (rank {self.rank} of {self.size}): {e}") from None
            self._owns = True

    @classmethod
    def single(cls) -> "Group":
        return cls(1, 0)

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``size``-th one, starting at ``rank`` (deterministic)."""
        return list(items[self.rank :: self.size])

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj=None):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks (a loss for the log)."""
        if not self.active:
            return value
        return sum(self.gather(value)) / self.size

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def run(self, work: Callable[[], T]) -> T:
        """Run ``work`` on this rank; if it fails on any rank, raise that rank's error on every rank."""
        try:
            result, error = work(), None
        except CtxdraftError as e:
            result, error = None, str(e)
        except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, or they wait forever
            if not self.active:
                raise
            result, error = None, f"{type(e).__name__}: {e}"
        errors = [(rank, err) for rank, err in enumerate(self.gather(error)) if err is not None]
        if errors:
            rank, message = errors[0]
            raise CtxdraftError(message if not self.active else f"rank {rank} of {self.size} failed: {message}")
        return result

    def close(self) -> None:
        if self._owns and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self._owns = False


def wrap(module: torch.nn.Module, group: Group) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when the run has several ranks (its weights are broadcast from
    rank 0 and its gradients averaged over the ranks), else ``module`` itself."""
    if not group.active:
        return module
    # Buffers (an exit head's gathered LM-head rows) are equal on every rank and never trained: no broadcasts.
    return torch.nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)
