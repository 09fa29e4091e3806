"""Atomic file writes, JSON/JSONL reading with errors a user can act on, and paths as users should see them."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CtxdraftError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a normal open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike, what: str = "file"):
    path = Path(path)
    if not path.is_file():
        raise CtxdraftError(f"{what} not found: {display_path(path)}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CtxdraftError(f"{what} {display_path(path)} is not valid JSON ({e}); delete it or rebuild it") from None


def read_jsonl(path: str | os.PathLike, what: str = "data file") -> list[dict]:
    """Read a JSONL file: one JSON object per line, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise CtxdraftError(f"{what} not found: {display_path(path)}")
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
        if not isinstance(row, dict):
            raise CtxdraftError(f"{what} {display_path(path)}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise CtxdraftError(f"{what} {display_path(path)} is empty")
    return rows


def display_path(path: str | os.PathLike | None) -> str | None:
    """``path`` as a user should read it in a report: relative to the working directory when it lies below
    it, else as given (reports must not carry one machine's absolute paths)."""
    if path is None:
        return None
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)
