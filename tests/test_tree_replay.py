"""The exact greedy replay of the feature-tree and merged arms (``live_replay.py``): per step, the nodes the target
verified, the draft evaluations and the tokens it accepted equal a real decode's."""
from __future__ import annotations

import pytest
from test_decoding import PLAIN, REPEATING, hf_greedy
from test_tree_builders import LAYERS, noisy_head
from tiny import tiny_random

from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.feature_tree import FeatureTreeDraft, FeatureTreeSettings
from ctxdraft.selfdraft.drafting.merged_draft import PRICE_POSITIONS, MergedDraft, MergedSettings
from ctxdraft.selfdraft.drafting.tree_budget import AUTO_MAX_NODES
from ctxdraft.selfdraft.drafting.tree_drafts import (
    LookupTreeDraft,
    LookupTreeSettings,
    SuccessorDraft,
    SuccessorSettings,
)
from ctxdraft.selfdraft.learning.trajectories import replay, teacher_pass
from ctxdraft.selfdraft.runtime.layers import LayerStack
from ctxdraft.selfdraft.serving.traffic import StepRecorder


@pytest.fixture(scope="module")
def model():
    return tiny_random("llama")


STEEPISH = [0.0] + [1.0 + 0.1 * m for m in range(1, AUTO_MAX_NODES + 2)]  # a position costs a tenth of a step


def fresh_drafts(head):
    """Each arm as a new draft (a merged arm's hit rates persist across generations: the real run and the replay
    must start from the same ones)."""
    tree = FeatureTreeSettings("general", LAYERS, draft_len=3, top_k=2, max_nodes=6)
    yield FeatureTreeDraft("feature-tree", head, tree)
    sources = {"lookup": LookupTreeDraft("m/lookup", LookupTreeSettings(draft_len=4, max_nodes=8)),
               "successor": SuccessorDraft("m/successor", SuccessorSettings(draft_len=4, max_nodes=8, top_k=2)),
               "feature": FeatureTreeDraft("m/feature", head, tree)}
    yield MergedDraft("merged", sources, MergedSettings(draft_len=4, max_nodes=10, sources={s: {} for s in sources}))
    sources = {"lookup": LookupTreeDraft("a/lookup", LookupTreeSettings(draft_len=4, max_nodes=8)),
               "feature": FeatureTreeDraft("a/feature", head, FeatureTreeSettings("general", LAYERS, draft_len=4))}
    auto = MergedDraft("merged-auto", sources,
                       MergedSettings(draft_len=4, max_nodes="auto", sources={s: {} for s in sources}))
    auto.set_costs(STEEPISH)  # its feature source's floor follows the generation's acceptance
    yield auto


@pytest.mark.parametrize("prompt", [REPEATING, PLAIN], ids=["repeating", "plain"])
def test_feature_tree_and_merged_replay_equal_the_real_run(model, prompt):
    """Catches a replay that proposes as ``none`` (no steps accept anything), a head cache fed other states or
    positions than decoding feeds it, a successor table or hit rates that learn from other positions than the
    committed ones, and a step count off by the prefill's token."""
    n = 32
    head = noisy_head(model)
    stack = LayerStack(model)
    seq = prompt + hf_greedy(model, prompt, n + 8)
    tp = teacher_pass(stack, prompt, seq[len(prompt):], set(), ended_on_eos=False, layers=LAYERS, topk=2)
    V = model.config.vocab_size
    for real_draft, replayed in zip(fresh_drafts(head), fresh_drafts(head)):
        recorder = StepRecorder(real_draft)
        pre = prefill(stack, prompt, capture=real_draft.state_layers)
        got, stats = speculative_decode(stack, pre, recorder, GenerationConfig(max_new_tokens=n))
        assert got == seq[len(prompt) : len(prompt) + n]
        traj = replay(replayed.teacher_forced(tp, V), tp.token_ids, len(prompt), n, eos_ids=set())
        real = [(s.evaluations, s.nodes, s.accepted) for s in recorder.steps]
        assert [(s.evaluations, s.nodes, s.accepted) for s in traj.steps] == real, real_draft.name
        assert traj.accepted_tokens == stats.accepted_tokens > 0 and traj.nodes_verified == stats.nodes_verified
        assert traj.target_forwards == stats.target_forwards


def test_an_auto_merged_arm_stops_its_feature_source_below_what_the_costs_pay_for(model):
    """The feature source of an auto-sized merged arm expands no candidate under ``feature_floor``: fewer head calls
    a step when a position costs more, all of them without costs, the same output (lossless). Catches a floor that is
    never handed to the source, one that ignores the costs, and one that drops accepted-token counts between steps."""
    head = noisy_head(model, noise=0.5)
    stack = LayerStack(model)

    def decode(curve):
        tree = FeatureTreeSettings("general", LAYERS, draft_len=5, top_k=3, max_nodes=20)
        draft = MergedDraft("m", {"feature": FeatureTreeDraft("m/feature", head, tree)},
                            MergedSettings(draft_len=5, max_nodes="auto", sources={"feature": {}}))
        if curve is not None:
            draft.set_costs(curve)
        recorder = StepRecorder(draft)
        pre = prefill(stack, PLAIN, capture=draft.state_layers)
        ids, _ = speculative_decode(stack, pre, recorder, GenerationConfig(max_new_tokens=24))
        return ids, sum(step.evaluations for step in recorder.steps) / len(recorder.steps), draft  # head calls a step

    free, calls_free, _ = decode(None)
    flat, calls_flat, flat_draft = decode([0.0] + [1.0] * (AUTO_MAX_NODES + 1))
    steep, calls_steep, steep_draft = decode(STEEPISH)
    assert free == flat == steep == hf_greedy(model, PLAIN, 24)
    assert flat_draft.feature_floor() == 0.0 and calls_flat == calls_free
    assert calls_steep < calls_free
    slope = 0.1 * (PRICE_POSITIONS - 1) / ((PRICE_POSITIONS - 1) * 1.1)
    assert steep_draft.feature_floor() == pytest.approx((1 + steep_draft.accepted / steep_draft.steps) * slope)
    assert steep_draft.steps > 0
