"""The suffix draft's global datastore: earlier outputs of the target, as two fixed-named files of a bundle.

- ``datastore.safetensors`` (the sealed part; written whole, atomically, by ``write_datastore``): tensors
  ``tokens`` int32 [n] (documents joined by -1, oldest first) and ``suffix_array`` int32 [n'] (their suffixes sorted
  by the first ``depth`` tokens, ``suffix_index.build_suffix_array``); string metadata ``format``
  ("ctxdraft-datastore"), ``version``, ``target`` (the target's content hash: token ids mean nothing under another
  tokenizer), ``vocab_size``, ``depth``, ``max_tokens`` and ``log_id``.
- ``datastore.log.jsonl`` (the tail; appended to after each logged request, ``append_document``): a header line
  ``{"format": "ctxdraft-datastore-log", "log_id": ...}``, then one ``{"tokens": [...]}`` line per output. Each line
  is one ``os.write`` under an exclusive ``flock``, so processes appending at once all succeed. A log whose
  ``log_id`` is not the sealed file's was merged already (a merge that stopped between its two renames) and is
  ignored; a torn line is skipped with a warning.

``merge_datastore`` (``update-policy``) folds the log into the sealed file under the log's lock and starts a new log.
Size bound: at most ``max_tokens`` tokens; past it the oldest documents go first (on merge, and in memory on load).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CtxdraftError
from .fileio import atomic_path, display_path, regular_file
from .suffix_index import SEP, Match, SuffixArray, continuations, join_documents, scan_matches

log = logging.getLogger(__name__)

FORMAT = "ctxdraft-datastore"
LOG_FORMAT = "ctxdraft-datastore-log"
VERSION = 1
DEFAULT_MAX_TOKENS = 1_000_000
DEFAULT_DEPTH = 32  # the longest match the sealed index resolves
TAIL_INDEX_TOKENS = 1 << 16  # an unindexed tail longer than this is indexed in memory (scans stay well under 1 ms)
MAX_SEGMENTS = 8  # indexed segments before they are merged into one (each lookup searches every segment)


@dataclass
class SuffixStore:
    """The datastore in memory: indexed segments (the sealed file's, then in-memory ones of ``TAIL_INDEX_TOKENS``
    each, so that an update never re-sorts the whole store: amortised O(tail log tail)), plus a tail scanned directly."""

    target: str | None
    vocab_size: int
    depth: int = DEFAULT_DEPTH
    max_tokens: int = DEFAULT_MAX_TOKENS
    log_id: str = ""
    segments: list[SuffixArray] = field(default_factory=list)
    tail: list[np.ndarray] = field(default_factory=list)
    tail_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))

    @property
    def num_tokens(self) -> int:
        return sum(seg.num_tokens for seg in self.segments) + len(self.tail_tokens)

    def documents(self) -> list[np.ndarray]:
        """Every document, oldest first."""
        docs = []
        for seg in self.segments:
            sealed = seg.tokens[: seg.num_tokens]
            parts = np.split(sealed, np.flatnonzero(sealed == SEP) + 1)
            docs += [d[d != SEP] for d in parts if len(d) > 1 or (len(d) == 1 and d[0] != SEP)]
        return docs + list(self.tail)

    def add(self, tokens) -> None:
        """Append one document in memory (the next generation sees it); re-index when the tail grows long."""
        doc = np.asarray(tokens, dtype=np.int32)
        if len(doc) == 0:
            return
        self.tail.append(doc)
        self.tail_tokens = np.concatenate([self.tail_tokens, doc, np.array([SEP], dtype=np.int32)])
        if self.num_tokens > self.max_tokens + TAIL_INDEX_TOKENS or len(self.segments) >= MAX_SEGMENTS:
            self.reindex()
        elif len(self.tail_tokens) > TAIL_INDEX_TOKENS:
            self.segments.append(SuffixArray(self.tail_tokens, self.depth))
            self.tail, self.tail_tokens = [], np.zeros(0, dtype=np.int32)

    def reindex(self) -> None:
        """Index every document, keeping the newest ``max_tokens`` tokens (the eviction rule)."""
        docs = evict(self.documents(), self.max_tokens)
        self.segments = [SuffixArray(join_documents(docs), self.depth)]
        self.tail, self.tail_tokens = [], np.zeros(0, dtype=np.int32)

    def lookup(self, context: list[int], max_match: int, depth: int) -> tuple[int, np.ndarray]:
        """The longest match of the end of ``context`` and the continuations after its occurrences [R, depth]."""
        found: list[tuple[Match, np.ndarray]] = []
        for seg in self.segments:
            if len(seg.order):
                found.append((seg.longest_match(context, max_match), seg.tokens))
        if len(self.tail_tokens):
            found.append((scan_matches(self.tail_tokens, context, max_match), self.tail_tokens))
        return best_rows(found, depth)


def best_rows(found: list[tuple[Match, np.ndarray]], depth: int) -> tuple[int, np.ndarray]:
    """Of several sources' matches the longest; the continuations of every source that matched that long."""
    length = max((m.length for m, _ in found), default=0)
    if length == 0:
        return 0, np.zeros((0, depth), dtype=np.int32)
    rows = [continuations(tokens, m.starts, depth) for m, tokens in found if m.length == length]
    return length, np.concatenate(rows)


def evict(docs: list[np.ndarray], max_tokens: int) -> list[np.ndarray]:
    """The newest documents that fit in ``max_tokens`` tokens (separators counted): the oldest go first."""
    kept, total = [], 0
    for doc in reversed(docs):
        if total + len(doc) + 1 > max_tokens:
            break
        kept.append(doc)
        total += len(doc) + 1
    return kept[::-1]


def _bad(path, why: str) -> CtxdraftError:
    return CtxdraftError(f"datastore {display_path(path)} {why}; rebuild it with `ctxdraft add-arm BUNDLE --kind "
                         "suffix --data PROMPTS` (or delete it)")


def read_datastore(path, target: str | None, vocab_size: int) -> SuffixStore:
    """Read the sealed file ``path`` (and its log beside it, ``log_path(path)``, if any). A corrupt file, or one made
    for another target or vocabulary, is one ``CtxdraftError``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file, safe_open

    path = Path(path)
    store = SuffixStore(target, vocab_size)
    if path.exists():
        regular_file(path, "datastore")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise _bad(path, f"is not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT:
            raise _bad(path, f"is not a ctxdraft datastore (format {meta.get('format')!r})")
        try:
            version, vocab, depth, max_tokens = (int(meta[k]) for k in ("version", "vocab_size", "depth", "max_tokens"))
        except (KeyError, ValueError):
            raise _bad(path, "has incomplete metadata") from None
        if version > VERSION:
            raise _bad(path, f"has version {version}, newer than this ctxdraft reads ({VERSION})")
        if target and meta.get("target") and meta["target"] != target:
            raise _bad(path, f"was built for another target (hash {meta['target']}, this one is {target}): its token "
                             "ids mean other text")
        if vocab != vocab_size:
            raise _bad(path, f"was built for a vocabulary of {vocab} tokens, the target has {vocab_size}")
        tokens, order = arrays.get("tokens"), arrays.get("suffix_array")
        if tokens is None or order is None or tokens.dtype != np.int32 or order.dtype != np.int32 or tokens.ndim != 1:
            raise _bad(path, "does not hold int32 'tokens' and 'suffix_array'")
        if len(tokens) and (tokens.min() < SEP or tokens.max() >= vocab_size) or \
                len(order) and (order.min() < 0 or order.max() >= len(tokens)):
            raise _bad(path, "holds token ids or positions out of range")
        if not 1 <= depth <= 256 or max_tokens < 1:
            raise _bad(path, f"has a bad depth ({depth}) or max_tokens ({max_tokens})")
        store.depth, store.max_tokens, store.log_id = depth, max_tokens, meta.get("log_id", "")
        store.segments = [SuffixArray(tokens, depth, order)]
    for doc in read_log(log_path(path), store.log_id if path.exists() else None, vocab_size):
        store.add(doc)
    if store.num_tokens > store.max_tokens:
        store.reindex()
    return store


def log_path(path) -> Path:
    """The log beside the sealed file ``path`` (datastore.safetensors -> datastore.log.jsonl)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".log.jsonl")


def read_log(path: Path, log_id: str | None, vocab_size: int) -> list[list[int]]:
    """The documents of a datastore log; ``log_id`` None: any log id is accepted (no sealed file yet)."""
    if not path.exists():
        return []
    regular_file(path, "datastore log")
    docs = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            row = None
        if lineno == 1:
            if not isinstance(row, dict) or row.get("format") != LOG_FORMAT:
                raise CtxdraftError(f"datastore log {display_path(path)} is not a ctxdraft datastore log; delete it")
            if log_id is not None and row.get("log_id") != log_id:
                log.warning("ignoring datastore log %s: it was merged into the datastore already", display_path(path))
                return []
            continue
        tokens = row.get("tokens") if isinstance(row, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in tokens):
            log.warning("skipping %s line %d: not a document of token ids", display_path(path), lineno)
            continue
        docs.append(tokens)
    return docs


def write_datastore(path, store: SuffixStore) -> None:
    """Write the sealed file (every document of ``store``, newest ``max_tokens``), atomically; a new ``log_id``, so
    that an old log beside it is no longer read."""
    from safetensors.numpy import save_file

    store.reindex()
    store.log_id = secrets.token_hex(8)
    meta = {"format": FORMAT, "version": str(VERSION), "target": store.target or "", "vocab_size": str(store.vocab_size),
            "depth": str(store.depth), "max_tokens": str(store.max_tokens), "log_id": store.log_id}
    (index,) = store.segments
    arrays = {"tokens": np.ascontiguousarray(index.tokens[: index.num_tokens]),
              "suffix_array": np.ascontiguousarray(index.order)}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)


def _locked_log(path: Path) -> int:
    """An fd on the current log file, holding its exclusive lock (reopened when a merge replaced the file)."""
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    start = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:  # a full disk: take back the partial line
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, start)
        raise


def _header(log_id: str) -> bytes:
    return (json.dumps({"format": LOG_FORMAT, "version": VERSION, "log_id": log_id}) + "\n").encode()


def append_document(path, tokens: list[int], log_id: str) -> bool:
    """Append one output to the log of the datastore ``path`` (see the module docstring). A failed append (a full
    disk) is a warning and False: the datastore stays as it was."""
    log_file = log_path(path)
    try:
        fd = _locked_log(log_file)
        try:
            if os.fstat(fd).st_size == 0:
                _write_all(fd, _header(log_id))
            _write_all(fd, (json.dumps({"tokens": [int(t) for t in tokens]}, separators=(",", ":")) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("could not append to the datastore log %s (%s); this output is not kept", display_path(log_file),
                    e.strerror or e)
        return False
    return True


@contextmanager
def datastore_lock(path):
    """Hold the lock of the datastore's log: appends wait (a whole-bundle swap under it keeps every append)."""
    fd = _locked_log(log_path(path))
    try:
        yield
    finally:
        os.close(fd)


def merge_datastore(path, target: str | None, vocab_size: int, documents=(), max_tokens: int | None = None) -> SuffixStore:
    """Fold the log (and ``documents``, newer than everything) into the sealed file, then start an empty log; all
    under the log's lock, so no append is lost. ``max_tokens``: a new size bound (None: the file's, or the default)."""
    path = Path(path)
    log_file = log_path(path)
    with datastore_lock(path):
        store = read_datastore(path, target, vocab_size)
        if max_tokens is not None:
            store.max_tokens = max_tokens
        for doc in documents:
            store.add(doc)
        write_datastore(path, store)
        with atomic_path(log_file) as tmp:
            tmp.write_bytes(_header(store.log_id))
    return store
