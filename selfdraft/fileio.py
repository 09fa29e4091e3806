"""Atomic file writes and JSONL reading with errors a user can act on."""
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


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CtxdraftError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CtxdraftError(f"{what} {path} is not valid JSON ({e}); delete it or rebuild it") from None


def read_jsonl(path: str | os.PathLike, what: str = "data file") -> list[dict]:
    """Read a JSONL file: one JSON object per line, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise CtxdraftError(f"{what} not found: {path}")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CtxdraftError(f"{what} {path} is not UTF-8 text") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CtxdraftError(f"{what} {path}, line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CtxdraftError(f"{what} {path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise CtxdraftError(f"{what} {path} is empty")
    return rows


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Read prompt rows: each needs a non-empty ``prompt`` (or ``text``) string; ``id``/``domain`` optional."""
    rows = read_jsonl(path)
    out = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt", row.get("text"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise CtxdraftError(f"data file {path}, row {i + 1}: needs a non-empty 'prompt' (or 'text') string field")
        out.append({"id": row.get("id", i), "domain": row.get("domain", "all"), "prompt": prompt})
    return out
