"""The one safetensors + JSON container, and training checkpoints in it (never pickle: a work directory or a
bundle is a file a user can hand us).

``save_container`` / ``load_container`` write and read named tensors with a JSON header, atomically, and turn a
missing, damaged or foreign file into one ``CtxdraftError`` naming the file. Head weights (``exit_head.py``,
``feature_head.py``), training work files (``head_data.py``) and checkpoints all use them.

A checkpoint holds everything an interrupted training run needs to continue exactly as if it had never
stopped: the module's weights, the optimizer's state, the scheduler's state and the random generator.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..base.errors import CtxdraftError
from ..base.fileio import atomic_path, display_path

HEADER_KEY = "ctxdraft"  # the safetensors metadata entry that holds the JSON header


def save_container(path: Path, tensors: dict[str, torch.Tensor], header: dict | None = None,
                   file_format: str | None = None) -> None:
    """Write ``tensors`` (contiguous) with ``header`` (JSON) and a ``format`` tag to ``path`` atomically: a failure
    leaves the previous file (or none), never a partial one."""
    metadata = {}
    if file_format is not None:
        metadata["format"] = file_format
    if header is not None:
        metadata[HEADER_KEY] = json.dumps(header)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def damaged(path: Path, what: str, remedy: str, error: BaseException) -> CtxdraftError:
    """The one error for a container that cannot be used: names the file and what to do."""
    reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    verb = "are" if what.endswith("s") else "is"  # "self-draft weights are", "checkpoint is"
    return CtxdraftError(f"{what} {display_path(path)} {verb} damaged ({reason}); {remedy}")


def load_container(path: Path, what: str, remedy: str, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of ``path`` whose names start with ``prefix`` (prefix removed) and its JSON header (None when it
    has none). ``what`` names the file in errors ("checkpoint", "work file", ...), ``remedy`` says what to do."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        header = json.loads(metadata[HEADER_KEY]) if HEADER_KEY in metadata else None
    except FileNotFoundError:
        raise CtxdraftError(f"{what} not found: {display_path(path)}; {remedy}") from None
    except (SafetensorError, OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise damaged(path, what, remedy, e) from None
    return tensors, header


def save_training_state(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                        generator: torch.Generator, meta: dict) -> None:
    """Write module + optimizer + scheduler + generator state and ``meta`` (JSON) atomically to ``path``."""
    tensors = {f"module.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().contiguous()
    tensors["generator"] = generator.get_state()
    header = {"meta": meta, "param_groups": opt["param_groups"],
              "scheduler": scheduler.state_dict() if scheduler is not None else None}
    save_container(path, tensors, header)


def load_training_state(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                        generator: torch.Generator) -> dict:
    """Restore what ``save_training_state`` wrote; returns its ``meta``. A damaged or foreign file is one clear error."""
    remedy = "run again without --resume to start over"
    tensors, header = load_container(path, "checkpoint", remedy)
    try:
        module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
        if scheduler is not None:
            scheduler.load_state_dict(header["scheduler"])
        generator.set_state(tensors["generator"])
        return header["meta"]
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CtxdraftError(f"checkpoint {display_path(path)} is damaged or from other settings ({type(e).__name__}); "
                            f"{remedy}") from None
