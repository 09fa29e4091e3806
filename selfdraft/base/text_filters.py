"""Filters for text a model wrote itself: degenerate repetition and near-duplicates (no torch).

Degenerate: a long token sequence whose distinct 4-grams are a small share of its 4-grams (a loop such as
"the cat the cat the cat ..."), or whose tail is one short period repeated. Near-duplicate: word 3-gram
shingles whose Jaccard similarity with an earlier text reaches ``threshold`` (found through an inverted index
over the shingles, so checking a text costs its candidates, not the whole corpus).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def degenerate(ids: Sequence[int], min_len: int = 24, min_distinct: float = 0.4, max_period: int = 8,
               tail: int = 24) -> bool:
    """Whether ``ids`` loops: few distinct 4-grams, or the last ``tail`` tokens repeat a period <= ``max_period``."""
    ids = list(ids)
    if len(ids) < min_len:
        return False
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    if len(set(grams)) < min_distinct * len(grams):
        return True
    end = ids[-tail:]
    return any(all(end[i] == end[i - p] for i in range(p, len(end))) for p in range(1, max_period + 1))


def shingles(text: str, n: int = 3) -> frozenset[str]:
    """Word ``n``-grams of the lower-cased text (the words themselves for a shorter text)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return frozenset(words)
    return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


class NearDuplicates:
    """Texts seen so far; ``check_add(text)`` says whether ``text`` nearly repeats one of them (and keeps it if not)."""

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self.sets: list[frozenset[str]] = []
        self.index: dict[str, list[int]] = {}

    def is_duplicate(self, text: str) -> bool:
        mine = shingles(text)
        if not mine:
            return True  # no words at all: nothing worth keeping
        shared = Counter(j for s in mine for j in self.index.get(s, ()))
        return any(count / (len(mine) + len(self.sets[j]) - count) >= self.threshold for j, count in shared.items())

    def add(self, text: str) -> None:
        mine = shingles(text)
        j = len(self.sets)
        self.sets.append(mine)
        for s in mine:
            self.index.setdefault(s, []).append(j)

    def check_add(self, text: str) -> bool:
        if self.is_duplicate(text):
            return True
        self.add(text)
        return False
