"""runtime/checkpoint.py: the one safetensors + JSON container and the training checkpoints written in it."""
from __future__ import annotations

import pytest
import torch

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.runtime import checkpoint
from ctxdraft.selfdraft.runtime.checkpoint import (
    load_container,
    load_training_state,
    save_container,
    save_training_state,
)


def test_container_round_trip_with_prefix_and_header(tmp_path):
    path = tmp_path / "c.safetensors"
    tensors = {"a.w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.ids": torch.tensor([3, 1]),
               "b.w": torch.ones(2, dtype=torch.bfloat16)}
    save_container(path, tensors, {"step": 3, "losses": [0.5]}, file_format="test")
    got, header = load_container(path, "test file", "remake it")
    assert header == {"step": 3, "losses": [0.5]}
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], v) and got[k].dtype == v.dtype
                                                  for k, v in tensors.items())
    only_a, _ = load_container(path, "test file", "remake it", prefix="a.")
    assert set(only_a) == {"w", "ids"}  # the prefix is taken off
    save_container(path, {"x": torch.zeros(1)})
    assert load_container(path, "test file", "remake it")[1] is None  # no header written, none read


@pytest.mark.parametrize("content", [b"", b"\x07" * 40, b"\xff" * 8 + b"{not json"])
def test_a_damaged_container_is_one_error_naming_the_file(tmp_path, content):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(content)
    with pytest.raises(CtxdraftError, match=r"work file .*damaged\.safetensors is damaged .*; remake it"):
        load_container(path, "work file", "remake it")
    with pytest.raises(CtxdraftError, match=r"work file not found: .*missing\.safetensors; remake it"):
        load_container(tmp_path / "missing.safetensors", "work file", "remake it")


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_container(path, {"x": torch.ones(3)}, {"v": 1})
    before = path.read_bytes()

    def torn_write(tensors, filename, metadata=None):  # a write that dies half-way (disk full, killed)
        with open(filename, "wb") as f:
            f.write(before[: len(before) // 2])
        raise OSError("no space left on device")

    monkeypatch.setattr(checkpoint, "save_file", torn_write)
    with pytest.raises(OSError):
        save_container(path, {"x": torch.zeros(3)}, {"v": 2})
    assert path.read_bytes() == before  # the previous file, whole
    with pytest.raises(OSError):
        save_container(tmp_path / "new.safetensors", {"x": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]  # no partial or temporary file left


def _training(seed: int):
    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return module, opt, sched, torch.Generator().manual_seed(seed)


def test_training_state_resumes_exactly(tmp_path):
    module, opt, sched, gen = _training(0)
    module(torch.randn(4, 3, generator=gen)).sum().backward()
    opt.step()
    sched.step()
    path = tmp_path / "ckpt.safetensors"
    save_training_state(path, module, opt, sched, gen, {"step": 1, "losses": [0.25]})
    expected = torch.randn(2, generator=gen)

    module2, opt2, sched2, gen2 = _training(1)
    assert load_training_state(path, module2, opt2, sched2, gen2) == {"step": 1, "losses": [0.25]}
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), module2.state_dict().values()))
    assert sched2.state_dict()["last_epoch"] == 1 and torch.equal(torch.randn(2, generator=gen2), expected)

    other = torch.nn.Linear(5, 2)  # another shape: from other settings
    with pytest.raises(CtxdraftError, match="checkpoint .* is damaged or from other settings"):
        load_training_state(path, other, torch.optim.AdamW(other.parameters()), None, torch.Generator())
