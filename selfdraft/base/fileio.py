"""The one atomic writer (a temporary name that carries the writer's pid, then one rename), file hashing, JSON/JSONL
reading with errors a user can act on, and paths as users should see them.

Every temporary is ``.<final name>.<pid>-<random hex>.tmp`` beside its final name. A process that dies leaves its
temporaries behind; ``remove_stale_temps`` removes those whose pid is no longer alive (on the next run)."""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CtxdraftError

_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:update-)?(?P<pid>\d+)-[0-9a-f]+\.tmp$")  # (update-: older stagings)
SAMPLED_BLOCKS = 32  # blocks hashed by file_fingerprint (first, last and evenly spaced between)
SAMPLED_BLOCK = 64 << 10


def temp_name(final: str | os.PathLike) -> Path:
    """A hidden name beside ``final`` that no other process will pick: it carries our pid and a random suffix."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process (or a pid we cannot ask about): leave it alone
    return True


def remove_path(path: Path) -> None:
    """Remove a file, a link or a directory tree (never following a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None) -> int:
    """Remove the temporaries in ``directory`` (of the final name ``name``, or of any) whose writer is dead.
    Returns how many were removed."""
    directory = Path(directory)
    removed = 0
    try:
        entries = list(directory.iterdir())
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and (name is None or m["name"] == name) and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            remove_path(entry)
            removed += 1
    return removed


@contextmanager
def staged(final: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path (a file name, or an empty directory) beside ``final``; if the block succeeds, rename
    it to ``final`` (a directory that exists is swapped out in one step, then removed), otherwise remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory and final.is_dir() and not final.is_symlink():
            exchange(tmp, final)  # tmp now holds the old directory, removed below
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists() or tmp.is_symlink():
            remove_path(tmp)


def exchange(a: Path, b: Path) -> None:
    """Swap two directory entries in one step (Linux renameat2 RENAME_EXCHANGE); where the system has no such
    call, two renames (``b`` is missing for an instant, never half-written)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot; fall back
            raise OSError(err, os.strerror(err), str(b))
    aside = temp_name(b)
    os.replace(b, aside)
    os.replace(a, b)
    os.replace(aside, a)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    with staged(path) as tmp:
        yield tmp
        if tmp.exists():
            # give the result the permissions a normal open() would have
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)


def hash_file_into(h, path: str | os.PathLike) -> None:
    """Feed a file's bytes into the hash ``h``, in blocks."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    """The sha256 of a file's bytes (hex, the first ``length`` characters)."""
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()[:length]


def file_fingerprint(path: str | os.PathLike, full: bool = False) -> dict:
    """A cheap check of a large file: its size and the sha256 of sampled blocks (first, last, evenly spaced);
    ``full``: of every byte."""
    size = os.path.getsize(path)
    if full:
        return {"size": size, "sha256": file_sha256(path, 64)}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        span = max(size - SAMPLED_BLOCK, 0)
        for i in range(SAMPLED_BLOCKS):
            f.seek(span * i // (SAMPLED_BLOCKS - 1))
            h.update(f.read(SAMPLED_BLOCK))
    return {"size": size, "sampled_sha256": h.hexdigest()[:32]}


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` checked to be an existing regular file (a device, FIFO or directory is refused by name)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CtxdraftError(f"{what} not found: {display_path(path)}") from None
    except OSError as e:
        raise CtxdraftError(f"{what} {display_path(path)}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise CtxdraftError(f"{what} {display_path(path)} is {kind}; give a regular file")
    return path


def check_sealed(root: str | os.PathLike, what: str = "bundle") -> None:
    """Refuse a directory holding a symlink or anything but regular files and directories (walked without
    following links): a crafted entry could make a read or a copy reach outside it."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            mode = os.lstat(entry).st_mode
            if stat.S_ISLNK(mode):
                raise CtxdraftError(f"{what} {display_path(root)}: {display_path(entry)} is a symbolic link; a {what} "
                                    "holds only its own regular files (copy the file in instead)")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise CtxdraftError(f"{what} {display_path(root)}: {display_path(entry)} is not a regular file; "
                                    f"remove it from the {what}")


def inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path``, resolved, lies inside (or is) ``root``, resolved."""
    root, path = Path(root).resolve(), Path(path).resolve()
    return path == root or root in path.parents


def copy_files(src_root: Path, dst_root: Path, names) -> None:
    """Copy the named regular files (relative paths) from ``src_root`` to ``dst_root``, never following a link:
    a name that is missing is skipped; one that is a link or not a regular file is refused."""
    for name in names:
        src = Path(src_root) / name
        if not os.path.lexists(src):
            continue
        if not stat.S_ISREG(os.lstat(src).st_mode) or not inside(src_root, src):
            raise CtxdraftError(f"{display_path(src)} is not a regular file inside {display_path(src_root)}; refusing "
                                "to copy it")
        dst = Path(dst_root) / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike, what: str = "file"):
    path = regular_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CtxdraftError(f"{what} {display_path(path)} is not valid JSON ({e}); delete it or rebuild it") from None
    except RecursionError:
        raise CtxdraftError(f"{what} {display_path(path)} is nested too deeply to be a {what}") from None


def read_jsonl(path: str | os.PathLike, what: str = "data file") -> list[dict]:
    """Read a JSONL file: one JSON object per line, blank lines skipped."""
    path = regular_file(path, what)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CtxdraftError(f"{what} {display_path(path)} is not UTF-8 text") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CtxdraftError(f"{what} {display_path(path)}, line {lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise CtxdraftError(f"{what} {display_path(path)}, line {lineno}: nested too deeply") from None
        if not isinstance(row, dict):
            raise CtxdraftError(f"{what} {display_path(path)}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise CtxdraftError(f"{what} {display_path(path)} is empty")
    return rows


def display_path(path: str | os.PathLike | None) -> str | None:
    """``path`` as a user should read it in a report: relative to the working directory when it lies below
    it, ``~/...`` below the home directory (a cache's calibrations), else as given (reports must not carry one
    machine's absolute paths)."""
    if path is None:
        return None
    path = Path(path)
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~")):
        try:
            relative = str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
        return os.path.join(prefix, relative) if prefix else relative or "."
    return str(path)


def append_lines(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append ``rows`` as JSON lines in one ``os.write`` on an ``O_APPEND`` descriptor under an exclusive ``flock``:
    a reader (or a resumed run) sees all of them or none; a short or failed write is taken back under the lock."""
    if not rows:
        return
    data = "".join(json.dumps(row, separators=(",", ":"), allow_nan=False, ensure_ascii=False) + "\n"
                   for row in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, start)
            raise
        os.fsync(fd)
    finally:
        os.close(fd)
