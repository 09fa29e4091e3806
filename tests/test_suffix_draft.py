"""The suffix draft: lossless greedy decoding on tiny models, exact replay, and its datastore files."""
from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest
from test_decoding import PLAIN, REPEATING, hf_greedy, run
from tiny import tiny_random

from ctxdraft.selfdraft.base.datastore import (
    SuffixStore,
    append_document,
    log_path,
    merge_datastore,
    read_datastore,
    write_datastore,
)
from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.drafting.draft import TeacherPass
from ctxdraft.selfdraft.drafting.suffix_draft import SuffixDraft, SuffixSettings
from ctxdraft.selfdraft.learning.trajectories import replay


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny_random(request.param)


def store_with(model, docs) -> SuffixStore:
    store = SuffixStore("t", model.config.vocab_size)
    for doc in docs:
        store.add(doc)
    return store


@pytest.mark.parametrize("prompt", [REPEATING, PLAIN], ids=["repeating", "plain"])
def test_greedy_suffix_equals_hf_generate_and_replay_is_exact(model, prompt):
    n = 32
    expected = hf_greedy(model, prompt, n + 8)
    # the datastore holds this very continuation (as if served before) and some noise: long matches, big trees
    store = store_with(model, [expected[:20], [1, 2, 3, 4], (prompt + expected)[5:30]])
    store.reindex()
    store.add(expected[10:])  # half indexed, half in the scanned tail
    for settings in [SuffixSettings(), SuffixSettings(draft_len=3, max_nodes=2, min_prob=0.0),
                     SuffixSettings(factor=3.0, offset=0.0, max_nodes=24)]:
        draft = SuffixDraft("suffix", settings, store)
        got, stats = run(model, prompt, draft, n)
        assert got == expected[:n]
        assert stats.new_tokens == n == 1 + stats.accepted_tokens + (stats.target_forwards - 1)
        tp = TeacherPass(prompt + expected, len(prompt), n + 8, {})
        trajectory = replay(draft.teacher_forced(tp, model.config.vocab_size), prompt + expected, len(prompt), n, set())
        assert sum(step.accepted for step in trajectory.steps) == stats.accepted_tokens
        assert len(trajectory.steps) == stats.target_forwards - 1
    assert stats.accepted_tokens >= n // 2  # the datastore's copy of the output was used


def test_the_request_alone_drafts_and_the_datastore_adds_to_it(model):
    n = 24
    expected = hf_greedy(model, PLAIN, n)
    alone = run(model, PLAIN, SuffixDraft("s", SuffixSettings(use_datastore=False)), n)[1].accepted_tokens
    with_store = run(model, PLAIN, SuffixDraft("s", SuffixSettings(), store_with(model, [expected])), n)[1].accepted_tokens
    assert with_store > alone


def test_datastore_round_trip_and_eviction(tmp_path):
    path = tmp_path / "datastore.safetensors"
    store = SuffixStore("hash-a", 100, max_tokens=12)
    for doc in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        store.add(doc)
    write_datastore(path, store)
    back = read_datastore(path, "hash-a", 100)
    assert [d.tolist() for d in back.documents()] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert append_document(path, [10, 11, 12], back.log_id)
    back = read_datastore(path, "hash-a", 100)  # the log's document is read, and the oldest evicted (12 tokens)
    assert [d.tolist() for d in back.documents()] == [[4, 5, 6], [7, 8, 9], [10, 11, 12]]
    merged = merge_datastore(path, "hash-a", 100, documents=[[13, 14]])
    assert [d.tolist() for d in merged.documents()] == [[7, 8, 9], [10, 11, 12], [13, 14]]
    assert len(log_path(path).read_text().splitlines()) == 1  # a fresh log: only its header
    assert [d.tolist() for d in read_datastore(path, "hash-a", 100).documents()] == [[7, 8, 9], [10, 11, 12], [13, 14]]
    length, rows = read_datastore(path, "hash-a", 100).lookup([0, 10, 11], 8, 2)
    assert length == 2 and rows.tolist() == [[12, -1]]


def test_a_log_left_from_an_interrupted_merge_is_not_read_twice(tmp_path):
    path = tmp_path / "datastore.safetensors"
    store = SuffixStore("h", 50)
    write_datastore(path, store)
    append_document(path, [1, 2], store.log_id)
    stale = log_path(path).read_bytes()
    merge_datastore(path, "h", 50)
    log_path(path).write_bytes(stale)  # as if the merge stopped after writing the sealed file
    assert [d.tolist() for d in read_datastore(path, "h", 50).documents()] == [[1, 2]]


@pytest.mark.parametrize("damage", ["garbage", "foreign", "vocab", "range", "log"])
def test_corrupt_or_foreign_datastore_is_one_clear_error(tmp_path, damage):
    path = tmp_path / "datastore.safetensors"
    store = SuffixStore("hash-a", 100)
    store.add([1, 2, 3])
    write_datastore(path, store)
    target, vocab = "hash-a", 100
    if damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    elif damage == "foreign":
        target = "hash-b"
    elif damage == "vocab":
        vocab = 200
    elif damage == "range":
        from safetensors.numpy import save_file
        save_file({"tokens": np.array([1, 500, -1], dtype=np.int32), "suffix_array": np.array([0, 1], dtype=np.int32)},
                  str(path), metadata={"format": "ctxdraft-datastore", "version": "1", "target": "hash-a",
                                       "vocab_size": "100", "depth": "8", "max_tokens": "100", "log_id": "x"})
    else:
        log_path(path).write_text("not a log\n")
    why = {"garbage": "not a readable safetensors", "foreign": "another target", "vocab": "vocabulary of 100",
           "range": "out of range", "log": "not a ctxdraft datastore log"}[damage]
    with pytest.raises(CtxdraftError, match=why):
        read_datastore(path, target, vocab)


def test_a_full_disk_skips_the_update_with_a_warning(tmp_path, monkeypatch, warnings):
    import errno
    import os

    from ctxdraft.selfdraft.base import datastore

    path = tmp_path / "datastore.safetensors"
    assert append_document(path, [1, 2], "id")
    before = log_path(path).read_bytes()

    def full(fd, data):
        os_write(fd, bytes(data)[:3])  # a partial line, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    os_write = os.write
    monkeypatch.setattr(datastore.os, "write", full)
    assert not append_document(path, [3, 4], "id")
    monkeypatch.undo()
    assert log_path(path).read_bytes() == before and "not kept" in warnings.text
    assert [d.tolist() for d in read_datastore(path, None, 10).documents()] == [[1, 2]]


def _append_many(path, worker: int, count: int) -> None:
    for i in range(count):
        assert append_document(path, [worker, i, worker], "id")


def test_two_processes_appending_both_succeed(tmp_path):
    path = tmp_path / "datastore.safetensors"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w, 200)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = log_path(path).read_text().splitlines()
    assert json.loads(lines[0])["format"] == "ctxdraft-datastore-log" and len(lines) == 401
    docs = read_datastore(path, None, 10_000).documents()
    assert sorted(tuple(d.tolist()) for d in docs) == sorted((w, i, w) for w in (1, 2) for i in range(200))


def test_append_during_a_merge_is_kept(tmp_path):
    path = tmp_path / "datastore.safetensors"
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_append_many, args=(path, 3, 300))
    proc.start()
    for _ in range(5):
        merge_datastore(path, None, 10_000)
    proc.join()
    assert proc.exitcode == 0
    docs = read_datastore(path, None, 10_000).documents()
    assert sorted(tuple(d.tolist()) for d in docs) == [(3, i, 3) for i in range(300)]
