"""The exact greedy replay of the feature-tree and merged arms (``live_replay.py``): per step, the nodes the target
verified, the draft evaluations and the tokens it accepted equal a real decode's."""
from __future__ import annotations

import pytest
from test_decoding import PLAIN, REPEATING, hf_greedy
from test_tree_builders import LAYERS, noisy_head
from tiny import tiny_random

from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.feature_tree import FeatureTreeDraft, FeatureTreeSettings
from ctxdraft.selfdraft.drafting.merged_draft import MergedDraft, MergedSettings
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


def fresh_drafts(head):
    """Each arm as a new draft (a merged arm's hit rates persist across generations: the real run and the replay
    must start from the same ones)."""
    tree = FeatureTreeSettings("general", LAYERS, draft_len=3, top_k=2, max_nodes=6)
    yield FeatureTreeDraft("feature-tree", head, tree)
    sources = {"lookup": LookupTreeDraft("m/lookup", LookupTreeSettings(draft_len=4, max_nodes=8)),
               "successor": SuccessorDraft("m/successor", SuccessorSettings(draft_len=4, max_nodes=8, top_k=2)),
               "feature": FeatureTreeDraft("m/feature", head, tree)}
    yield MergedDraft("merged", sources, MergedSettings(draft_len=4, max_nodes=10, sources={s: {} for s in sources}))


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
