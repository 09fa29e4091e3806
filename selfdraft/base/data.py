"""Prompt rows: reading prompt files, and the one way each of these is done: the stratified train/held-out
split, picking prompts per domain, and rotating the order of methods timed side by side."""
from __future__ import annotations

import os
import random
from typing import Sequence, TypeVar

from .errors import CtxdraftError
from .fileio import display_path, read_jsonl

T = TypeVar("T")


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompt rows ``{"id", "domain", "prompt"}``: each line needs a non-empty ``prompt`` (or ``text``) string;
    ``id`` (default: the row number) and ``domain`` (default ``all``) are optional; a row with both ``prompt`` and
    ``text`` (``make-data``'s rows) keeps ``text`` as its ``answer``. Ids must be unique
    strings or integers, because results and splits are keyed by them."""
    rows = read_jsonl(path)
    out, seen = [], {}
    for i, row in enumerate(rows):
        where = f"data file {display_path(path)}, row {i + 1}"
        prompt = row.get("prompt", row.get("text"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise CtxdraftError(f"{where}: needs a non-empty 'prompt' (or 'text') string field")
        row_id = row.get("id", i)
        if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
            raise CtxdraftError(f"{where}: 'id' must be a string or an integer, got {row_id!r}")
        if row_id in seen:
            raise CtxdraftError(f"{where}: duplicate id {row_id!r} (first in row {seen[row_id] + 1}); ids must be unique")
        seen[row_id] = i
        domain = row.get("domain", "all")
        entry = {"id": row_id, "domain": str(domain) if domain is not None else "all", "prompt": prompt}
        if isinstance(row.get("prompt"), str) and isinstance(row.get("text"), str):
            entry["answer"] = row["text"]  # make-data rows: the target's own answer to the prompt
            entry["answer_ended"] = row.get("ended") is True  # ... and whether the target ended it (EOS)
        out.append(entry)
    return out


def stratified_split(domains: Sequence[str], eval_frac: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) indices, stratified by domain: each domain, in sorted order, is shuffled
    by one ``random.Random(seed)`` and gives round(eval_frac * n) held-out rows, at least one when it has two or
    more rows and never all of them. ``scripts/split_data.py``, ``add-exits`` and ``train-policy`` all split here."""
    if not 0.0 < eval_frac < 1.0:
        raise CtxdraftError(f"the held-out fraction must be between 0 and 1 (exclusive), got {eval_frac}")
    rng = random.Random(seed)
    train_idx, eval_idx = [], []
    for domain in sorted(set(domains)):
        members = [i for i, d in enumerate(domains) if d == domain]
        rng.shuffle(members)
        num_eval = min(max(round(eval_frac * len(members)), 1), len(members) - 1)
        eval_idx += members[:num_eval]
        train_idx += members[num_eval:]
    if not eval_idx or not train_idx:
        raise CtxdraftError(f"{len(domains)} prompt(s) cannot be split into training and held-out prompts with "
                            f"fraction {eval_frac}; use more prompts (at least two in some domain)")
    return sorted(train_idx), sorted(eval_idx)


def subsample(num_rows: int, size: int | None, seed: int = 0) -> list[int]:
    """A deterministic sample of ``size`` row indices in data order (all rows when ``size`` is None)."""
    if size is None or size >= num_rows:
        return list(range(num_rows))
    return sorted(random.Random(seed).sample(range(num_rows), size))


def first_per_domain(rows: list[dict], per_domain: int) -> list[dict]:
    """The first ``per_domain`` rows of each domain, in data order."""
    if per_domain < 1:
        raise CtxdraftError(f"--per-domain must be >= 1, got {per_domain}")
    seen: dict[str, int] = {}
    picked = []
    for row in rows:
        domain = str(row.get("domain", "all"))
        if seen.get(domain, 0) < per_domain:
            seen[domain] = seen.get(domain, 0) + 1
            picked.append(row)
    return picked


def round_robin(rows: list[dict], n: int) -> list[dict]:
    """``n`` rows taken round-robin over the domains (each domain in data order): a small sample that still
    covers every domain."""
    queues: dict[str, list[dict]] = {}
    for row in rows:
        queues.setdefault(str(row.get("domain", "all")), []).append(row)
    out: list[dict] = []
    while len(out) < n and any(queues.values()):
        for queue in queues.values():
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


def rotated(items: Sequence[T], shift: int) -> list[T]:
    """``items`` rotated left by ``shift``: methods timed side by side run in a new order for every prompt, so
    drift on a shared machine (other jobs, heat, caches) hits all of them alike."""
    if not items:
        return []
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])
