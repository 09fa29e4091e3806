"""Teacher-forced trajectories equal real speculative runs exactly (every draft kind, EOS, tiny budgets),
and the replay's bookkeeping on hand-built cases."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_llama

from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.draft import PredictionTeacherForced, TeacherForced
from ctxdraft.selfdraft.drafting.drafts import (
    LookupDraft,
    LookupSettings,
    LookupTeacherForced,
    ModelDraft,
    ModelDraftSettings,
    NoneDraft,
)
from ctxdraft.selfdraft.drafting.exit_draft import ExitDraft, ExitSettings
from ctxdraft.selfdraft.drafting.exit_head import ExitHead
from ctxdraft.selfdraft.learning.trajectories import replay, teacher_pass
from ctxdraft.selfdraft.runtime.layers import LayerStack

V = 61
REPEATING = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 10, 11, 12, 5, 6, 7]
PLAIN = [3, 17, 42, 8, 29, 33, 4, 51, 12]




def varied_llama(seed: int, layers: int = 4):
    """A tiny Llama whose greedy text varies: with tied, scaled-up embeddings a random model mostly repeats
    its last token, so give it its own random LM head."""
    model = tiny_llama(V, seed=seed, layers=layers)
    g = torch.Generator().manual_seed(100 + seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, model.config.hidden_size, generator=g), requires_grad=False)
    return model


def truncated(model, num_layers: int):
    """The target's first layers (and its LM head) as a draft model: it agrees with the target part of the time."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:num_layers]
    draft.config.num_hidden_layers = num_layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:num_layers]
    return draft


@pytest.fixture(scope="module")
def target():
    return varied_llama(seed=0)


@pytest.fixture(scope="module")
def other_model():
    return varied_llama(seed=1, layers=2)


def exit_drafts(target):
    # Untrained heads (the target's own norm + LM head on layer E): partial agreement, varied confidence.
    return [
        ExitDraft("exit@2", ExitHead(target, 2, "linear"), ExitSettings(2, draft_len=3)),
        ExitDraft("exit@3-thr", ExitHead(target, 3, "linear"), ExitSettings(3, draft_len=5, threshold=0.5)),
        ExitDraft("exit@1-layer", ExitHead(target, 1, "layer"), ExitSettings(1, draft_len=4, head="layer")),
    ]


def all_drafts(kind, target, other_model):
    if kind == "none":
        return [NoneDraft()]
    if kind == "lookup":
        return [LookupDraft("l1", LookupSettings(1)), LookupDraft("l3", LookupSettings(3)),
                LookupDraft("l7-unigram", LookupSettings(7, [1]))]
    if kind == "model":
        return [ModelDraft("self", target, ModelDraftSettings(draft_len=4)),  # accepts everything
                ModelDraft("truncated", truncated(target, 3), ModelDraftSettings(draft_len=3)),  # accepts some
                ModelDraft("other", other_model, ModelDraftSettings(draft_len=3))]  # rejects most
    return exit_drafts(target)


def greedy(stack, prompt, max_new, eos):
    return speculative_decode(stack, prefill(stack, prompt), NoneDraft(), GenerationConfig(max_new_tokens=max_new), eos)[0]


def late_eos(stack, prompt) -> set[int]:
    """A token the target first emits after a few steps: as EOS, generation ends on it mid-way."""
    ids = greedy(stack, prompt, 30, set())
    return {next(t for i, t in enumerate(ids) if i >= 6 and t not in ids[:i])}


def cases(target):
    """(prompt, max_new_tokens, eos ids): repeating and plain text, tiny budgets, and EOS mid-way."""
    stack = LayerStack(target)
    out = []
    for prompt in (REPEATING, PLAIN):
        out += [(prompt, 30, set()), (prompt, 2, set()), (prompt, 1, set()), (prompt, 30, late_eos(stack, prompt))]
    return out


@pytest.mark.parametrize("kind", ["none", "lookup", "model", "exit"])
def test_simulated_trajectories_equal_real_runs(kind, target, other_model):
    drafts = all_drafts(kind, target, other_model)
    stack = LayerStack(target)
    exit_layers = sorted({E for d in drafts for E in d.state_layers})
    for prompt, max_new, eos in cases(target):
        new_ids = greedy(stack, prompt, max_new, eos)
        tp = teacher_pass(stack, prompt, new_ids, eos, ended_on_eos=len(new_ids) < max_new, layers=exit_layers, extend=8)
        for draft in drafts:
            got, stats = speculative_decode(stack, prefill(stack, prompt), draft, GenerationConfig(max_new_tokens=max_new), eos)
            assert got == new_ids
            traj = replay(draft.teacher_forced(tp, V), tp.token_ids, len(prompt), max_new, eos)
            where = f"{draft.name} on prompt {prompt[:3]}..., max_new {max_new}, eos {eos}"
            assert traj.target_forwards == stats.target_forwards, where
            assert traj.accepted_tokens == stats.accepted_tokens, where
            assert traj.new_tokens == stats.new_tokens, where
            # A confidence-stopped exit draft's rejected tail is estimated (draft.PredictionTeacherForced); all else is exact.
            if getattr(getattr(draft, "settings", None), "threshold", 0) == 0:
                assert traj.drafted_tokens == stats.drafted_tokens, where
            assert traj.tokens_per_forward == pytest.approx(stats.tokens_per_forward), where


def test_real_runs_do_draft_past_eos(target):
    """The EOS cases above are not vacuous: a draft proposes, and the target accepts, tokens past EOS
    (tokens emitted > returned tokens + the EOS), which the simulation must reproduce."""
    stack = LayerStack(target)
    past = 0
    for prompt in (REPEATING, PLAIN):
        eos = late_eos(stack, prompt)
        for k in (3, 4, 5):
            draft = ModelDraft("self", target, ModelDraftSettings(draft_len=k))
            _, stats = speculative_decode(stack, prefill(stack, prompt), draft, GenerationConfig(max_new_tokens=30), eos)
            assert stats.new_tokens >= 6
            past += stats.accepted_tokens + stats.target_forwards - 1 > stats.new_tokens + 1
    assert past > 0


def test_replay_hand_built():
    prompt = [1, 2, 3]
    seq = prompt + [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    perfect = PredictionTeacherForced(seq[1:] + [0], draft_len=3)
    # new = [10]; budget 8 -> 3 accepted + bonus (5 new); budget 4 -> 3 + bonus (9); budget 0 -> no draft (10).
    traj = replay(perfect, seq, len(prompt), 10, set())
    assert [(s.drafted, s.accepted) for s in traj.steps] == [(3, 3), (3, 3), (0, 0)]
    assert (traj.target_forwards, traj.new_tokens) == (4, 10)
    # EOS = 14 is the first step's bonus token: generation ends, the tokens before it are returned.
    traj = replay(perfect, seq, len(prompt), 10, {14})
    assert [(s.drafted, s.accepted) for s in traj.steps] == [(3, 3)] and traj.new_tokens == 4
    # A draft that is always wrong: one token per forward, like none.
    wrong = PredictionTeacherForced([0] * len(seq), draft_len=2)
    traj = replay(wrong, seq, len(prompt), 10, set())
    assert traj.target_forwards == replay(TeacherForced(), seq, len(prompt), 10, set()).target_forwards == 10
    assert traj.accepted_tokens == 0 and traj.drafted_tokens == 2 * 7 + 1  # budgets 8..2, then 1, then 0
    # Confidence stop: below the threshold the draft stops and its last evaluation covers one more position.
    shy = PredictionTeacherForced(seq[1:] + [0], draft_len=3, confidence=[0.9, 0.9, 0.9, 0.9, 0.2] + [0.9] * 8,
                                  threshold=0.5)
    step = replay(shy, seq, len(prompt), 10, set()).steps[0]
    assert (step.drafted, step.accepted, step.evaluations, step.stopped) == (1, 1, 2, True)


def test_lookup_teacher_forced_reads_only_the_true_prefix():
    seq = [7, 8, 9, 7, 8, 4, 7, 8]
    tf = LookupTeacherForced(LookupSettings(draft_len=3))
    assert tf.propose(seq, 4, 10).ids == [9, 7, 8]  # "7 8" was followed by 9 ... in the prefix [7 8 9 7 8]
    assert tf.propose(seq, 7, 10).ids == [4, 7, 8]  # latest occurrence wins once "7 8 4" is in the prefix
    assert tf.propose(seq, 7, 1).ids == [4]  # the budget caps the draft
