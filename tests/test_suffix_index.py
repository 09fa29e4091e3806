"""The array-backed suffix matching against brute force, and the continuation tree on hand-built cases."""
from __future__ import annotations

import numpy as np
import pytest

from ctxdraft.selfdraft.base.suffix_index import (
    SEP,
    SuffixArray,
    build_suffix_array,
    continuation_tree,
    continuations,
    join_documents,
    scan_matches,
)


def brute_longest(buffer: list[int], context: list[int], max_len: int) -> tuple[int, list[int]]:
    """The longest suffix of ``context`` occurring in ``buffer`` followed by a token of the same document."""
    for m in range(min(max_len, len(context)), 0, -1):
        pattern = context[-m:]
        starts = [i + m for i in range(len(buffer) - m) if buffer[i : i + m] == pattern and buffer[i + m] != SEP]
        starts += [i + m for i in range(len(buffer) - m) if buffer[i : i + m] == pattern and buffer[i + m] == SEP]
        if starts:
            return m, sorted(starts)
    return 0, []


@pytest.mark.parametrize("seed", range(6))
def test_suffix_array_and_scan_find_the_brute_force_longest_match(seed):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 4, size=rng.integers(1, 40)).tolist() for _ in range(8)]
    buffer = join_documents(docs)
    index = SuffixArray(buffer, depth=16)
    for _ in range(30):
        context = rng.integers(0, 4, size=rng.integers(1, 12)).tolist()
        m, starts = brute_longest(buffer.tolist(), context, 10)
        got = index.longest_match(context, 10)
        assert got.length == m and sorted(got.starts.tolist()) == starts
        scanned = scan_matches(buffer, context, 10)
        assert scanned.length == m and sorted(scanned.starts.tolist()) == starts


def test_suffix_array_is_sorted_by_the_first_depth_tokens():
    rng = np.random.default_rng(0)
    tokens = join_documents([rng.integers(0, 3, 50).tolist(), rng.integers(0, 3, 30).tolist()])
    order = build_suffix_array(tokens, depth=8)
    padded = np.concatenate([tokens, np.full(8, SEP)])
    keys = [padded[s : s + 8].tolist() for s in order]
    assert keys == sorted(keys) and len(order) == int((tokens != SEP).sum())


def test_continuations_stop_at_the_document_end():
    buffer = join_documents([[1, 2, 3], [1, 2]])
    rows = continuations(buffer, np.array([1, 5]), 3)
    assert rows.tolist() == [[2, 3, SEP], [2, SEP, SEP]]


def test_continuation_tree_takes_the_most_frequent_and_prunes_below_min_prob():
    # after the match: 3x "7 8", 1x "7 9", 1x "5"
    rows = np.array([[7, 8], [7, 8], [5, SEP], [7, 9], [7, 8]], dtype=np.int32)
    nodes = continuation_tree(rows, max_nodes=10, min_prob=0.25)
    got = [(n.token, n.parent, round(n.prob, 2)) for n in nodes]
    assert got == [(7, -1, 0.8), (8, 0, 0.6)]  # 5 (0.2) and 7->9 (0.2) are below 0.25
    nodes = continuation_tree(rows, max_nodes=3, min_prob=0.0)
    assert [(n.token, n.parent) for n in nodes] == [(7, -1), (8, 0), (5, -1)]
