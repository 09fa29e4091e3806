"""Training checkpoints in safetensors + JSON (never pickle: a work directory is a file a user can hand us).

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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ctxdraft": json.dumps(header)})


def load_training_state(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                        generator: torch.Generator) -> dict:
    """Restore what ``save_training_state`` wrote; returns its ``meta``. A damaged or foreign file is one clear error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(f.metadata()["ctxdraft"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
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
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as e:
        raise CtxdraftError(f"checkpoint {display_path(path)} is damaged or from other settings ({type(e).__name__}); "
                            "run again without --resume to start over") from None
