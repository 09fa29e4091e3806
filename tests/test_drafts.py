"""The draft loop, prompt lookup (real and teacher-forced), the draft model's vocabulary check."""
from __future__ import annotations

import pytest

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.drafting.draft import PredictionTeacherForced, draft_loop
from ctxdraft.selfdraft.drafting.drafts import (
    LookupDraft,
    LookupSettings,
    LookupTeacherForced,
    ModelDraftSettings,
    NgramIndex,
)


def scripted(tokens, confidences):
    """evaluate/take callables that read a script, and a log of the draft positions evaluated."""
    log = []

    def evaluate(j):
        log.append(j)
        return confidences[j]

    return evaluate, lambda: tokens[log[-1]], log


def test_draft_loop_runs_to_max_len_without_threshold():
    evaluate, take, log = scripted([7, 8, 9, 10], [0.1] * 4)
    run = draft_loop(3, 0.0, evaluate, take)
    assert (run.ids, run.evaluations, run.stopped, log) == ([7, 8, 9], 3, False, [0, 1, 2])


def test_draft_loop_stops_on_confidence_after_evaluating():
    evaluate, take, log = scripted([7, 8, 9, 10], [0.9, 0.8, 0.4, 0.9])
    run = draft_loop(4, 0.5, evaluate, take)
    assert (run.ids, run.evaluations, run.stopped) == ([7, 8], 3, True)  # position 2 ran but was not proposed
    evaluate, take, _ = scripted([7], [0.1])
    run = draft_loop(4, 0.5, evaluate, take)
    assert (run.ids, run.evaluations, run.stopped) == ([], 1, True)


def test_draft_loop_with_no_room_evaluates_nothing():
    evaluate, take, log = scripted([7], [0.9])
    run = draft_loop(0, 0.5, evaluate, take)
    assert (run.ids, run.evaluations, run.stopped, log) == ([], 0, False, [])


def test_prediction_teacher_forced_replays_the_same_loop():
    seq = [1, 2, 3, 4, 5, 6]
    tf = PredictionTeacherForced(predictions=[2, 3, 4, 9, 6, 0], draft_len=3, confidence=[0.9, 0.9, 0.2, 0.9, 0.9, 0.9],
                                 threshold=0.5)
    run = tf.propose(seq, pending=0, max_len=10)
    assert (run.ids, run.evaluations, run.stopped) == ([2, 3], 3, True)
    run = tf.propose(seq, pending=3, max_len=10)  # predictions 3.. are 9, 6, 0 with confidence 0.9
    assert (run.ids, run.evaluations, run.stopped) == ([9, 6, 0], 3, False)
    assert tf.propose(seq, pending=3, max_len=1).ids == [9]
    with pytest.raises(ValueError, match="confidences"):
        PredictionTeacherForced([1], 2, None, threshold=0.5)


def test_ngram_index_uses_latest_match_and_longest_ngram():
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 7, 2, 3]
    index = NgramIndex([3, 2, 1])
    index.update(tokens)
    assert index.lookup(tokens, 3) == [8, 7, 2]  # "2 3" last continued by 8 (latest occurrence)
    assert index.lookup([5, 6], 3) == []
    index.update(tokens + [4])
    assert index.lookup(tokens + [4], 2) == []


class _State:
    def __init__(self, tokens):
        self.tokens = tokens


def test_lookup_teacher_forced_proposes_what_the_real_draft_proposes():
    seq = [7, 8, 9, 7, 8, 4, 7, 8, 9, 1, 7, 8]
    settings = LookupSettings(draft_len=3, ngram_sizes=[2, 1])
    real, tf = LookupDraft("l", settings), LookupTeacherForced(settings)
    real.start(None)
    for pending in range(1, len(seq)):
        for budget in (1, 5):
            expected = real.propose(_State(seq[: pending + 1]), budget).ids
            assert tf.propose(seq, pending, budget).ids == expected, (pending, budget)
    # Hand-checked: after [7 8 9 7 8] the 2-gram "7 8" was last followed by 9.
    assert LookupTeacherForced(settings).propose(seq, 4, 10).ids == [9, 7, 8]


@pytest.mark.parametrize("settings", [dict(draft_len=0), dict(draft_len=2, ngram_sizes=[]), dict(draft_len=2, ngram_sizes=[0])])
def test_bad_lookup_settings_are_refused(settings):
    with pytest.raises(CtxdraftError, match="lookup"):
        LookupSettings(**settings)


@pytest.mark.parametrize("draft_len, message", [(True, "must be an integer, got True"), (-1, "must be >= 1"),
                                                (2.0, "must be an integer")])
def test_draft_lengths_refuse_bools_negatives_and_floats(draft_len, message):
    """``True == 1`` in Python: a bool slipped through the old isinstance(int) check as a draft length of 1."""
    with pytest.raises(CtxdraftError, match=f"lookup draft_len {message}"):
        LookupSettings(draft_len=draft_len)
    with pytest.raises(CtxdraftError, match=f"model draft_len {message}"):
        ModelDraftSettings(draft_len=draft_len)
    with pytest.raises(CtxdraftError, match="lookup ngram_sizes .*must be an integer, got True"):
        LookupSettings(ngram_sizes=[True])
