"""runtime/checkpoint.py: the one safetensors + JSON container, and training checkpoints written in it (a resumed
run continues bit for bit; a damaged or foreign file is one CtxdraftError)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.runtime import checkpoint
from ctxdraft.selfdraft.runtime.checkpoint import (
    load_container,
    load_training_state,
    save_container,
    save_training_state,
)


def fresh(dim: int = 6, with_scheduler: bool = True):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(dim, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5) if with_scheduler else None
    return module, optimizer, scheduler, torch.Generator().manual_seed(123)


def train(module, optimizer, scheduler, generator, steps: int) -> None:
    """Steps whose batches come from ``generator``: a resumed run must restore it to draw the same batches."""
    for _ in range(steps):
        x = torch.randn(16, module[0].in_features, generator=generator)
        loss = (module(x) - x[:, :3]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("with_scheduler", [True, False])
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, with_scheduler):
    whole = fresh(with_scheduler=with_scheduler)
    train(*whole, steps=6)

    first = fresh(with_scheduler=with_scheduler)
    train(*first, steps=3)
    path = tmp_path / "work" / "state.safetensors"
    save_training_state(path, *first, meta={"step": 3, "config": {"lr": 0.05}})

    resumed = fresh(with_scheduler=with_scheduler)  # a new process: fresh weights, optimizer and generator
    assert load_training_state(path, *resumed) == {"step": 3, "config": {"lr": 0.05}}
    train(*resumed, steps=3)
    for a, b in zip(whole[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)  # weights, Adam moments, step count, lr schedule and batches all restored
    assert resumed[1].param_groups[0]["lr"] == whole[1].param_groups[0]["lr"]
    assert torch.equal(resumed[3].get_state(), whole[3].get_state())


def test_saving_leaves_only_the_checkpoint(tmp_path):
    state = fresh()
    train(*state, steps=1)
    save_training_state(tmp_path / "state.safetensors", *state, meta={})
    save_training_state(tmp_path / "state.safetensors", *state, meta={"again": True})  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def damaged(path):
    path.write_bytes(path.read_bytes()[:-100])


def garbage(path):
    path.write_bytes(b"\x00not a safetensors file at all" * 10)


def foreign(path):  # a valid safetensors file that ctxdraft did not write
    save_file({"weight": torch.zeros(2)}, str(path))


def missing(path):
    path.unlink()


@pytest.mark.parametrize("spoil", [damaged, garbage, foreign, missing])
def test_a_bad_file_is_one_clear_error(tmp_path, spoil):
    state = fresh()
    train(*state, steps=2)
    path = tmp_path / "state.safetensors"
    save_training_state(path, *state, meta={"step": 2})
    spoil(path)
    # damaged, unreadable or missing: the message names the file and says how to start over
    with pytest.raises(CtxdraftError, match=r"(state\.safetensors is damaged|not found: .*state\.safetensors).*without --resume"):
        load_training_state(path, *fresh())


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    state = fresh(dim=6)
    train(*state, steps=2)
    path = tmp_path / "state.safetensors"
    save_training_state(path, *state, meta={})
    with pytest.raises(CtxdraftError, match="damaged or from other settings"):
        load_training_state(path, *fresh(dim=7))  # the module's shapes differ


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
