"""Tree arms in the learning loop: the exact greedy replay of lookup-tree and successor (accepted tokens and nodes per
step), and the node budget from the machine's costs (``max_nodes="auto"``)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_decoding import PLAIN, REPEATING, hf_greedy
from tiny import tiny_llama

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.merged_draft import MergedDraft, MergedSettings
from ctxdraft.selfdraft.drafting.pool import build_draft, lookup_tree_arm, merged_arm, successor_arm
from ctxdraft.selfdraft.drafting.tree_budget import AUTO_MAX_NODES, NodeBudget, best_prefix
from ctxdraft.selfdraft.drafting.tree_drafts import (
    LookupTreeDraft,
    LookupTreeSettings,
    SuccessorDraft,
    SuccessorSettings,
)
from ctxdraft.selfdraft.learning.trajectories import replay, teacher_pass
from ctxdraft.selfdraft.runtime.layers import LayerStack
from ctxdraft.selfdraft.serving.traffic import StepRecorder

V = 13  # a small vocabulary: the successor table fills quickly and its trees accept often


@pytest.fixture(scope="module")
def model():
    return tiny_llama(V, seed=1)


def moderate(cap: int) -> list[float]:  # a step over m positions: a little more than one over m - 1
    return [0.0] + [1.0 + 0.04 * m for m in range(1, cap + 2)]


def tree_drafts():
    yield LookupTreeDraft("lookup-tree", LookupTreeSettings(draft_len=4, max_nodes=8))
    yield SuccessorDraft("successor", SuccessorSettings(draft_len=4, max_nodes=12, top_k=3))
    auto_lookup = LookupTreeDraft("lookup-tree-auto", LookupTreeSettings(draft_len=4, max_nodes="auto"))
    auto_lookup.set_costs(moderate(AUTO_MAX_NODES))
    yield auto_lookup
    auto_successor = SuccessorDraft("successor-auto", SuccessorSettings(draft_len=5, max_nodes="auto", top_k=3))
    auto_successor.set_costs(moderate(AUTO_MAX_NODES))
    yield auto_successor
    auto_merged = MergedDraft("merged-auto", {"lookup": LookupTreeDraft(), "successor": SuccessorDraft(
        "s", SuccessorSettings(draft_len=4, max_nodes=12, top_k=3))}, MergedSettings(draft_len=4, max_nodes="auto"))
    auto_merged.set_costs(moderate(AUTO_MAX_NODES))
    yield auto_merged


@pytest.mark.parametrize("prompt", [[p % V for p in REPEATING], [p % V for p in PLAIN]], ids=["repeating", "plain"])
def test_tree_replay_equals_the_real_run_step_by_step(model, prompt):
    """Per step: the nodes the target verified and the tokens it accepted. Catches a successor table that learns from
    rejected nodes (the replay cannot see them), a budget whose hit rates are counted differently in the replay, and
    a replay that counts a tree's accepted path as what it drafted."""
    n = 40
    stack = LayerStack(model)
    seq = prompt + hf_greedy(model, prompt, n + 8)
    tp = teacher_pass(stack, prompt, seq[len(prompt):], set(), ended_on_eos=False, topk=3)
    for draft in tree_drafts():
        recorder = StepRecorder(draft)
        got, stats = speculative_decode(stack, prefill(stack, prompt), recorder, GenerationConfig(max_new_tokens=n))
        assert got == seq[len(prompt) : len(prompt) + n]
        traj = replay(draft.teacher_forced(tp, V), tp.token_ids, len(prompt), n, eos_ids=set())
        real = [(s.evaluations, s.nodes, s.accepted) for s in recorder.steps]
        assert [(s.evaluations, s.nodes, s.accepted) for s in traj.steps] == real, draft.name
        assert traj.nodes_verified == stats.nodes_verified and traj.accepted_tokens == stats.accepted_tokens > 0
        assert traj.new_tokens == stats.new_tokens and traj.target_forwards == stats.target_forwards
        if prompt[0] == REPEATING[0] % V:
            assert max(s.nodes for s in traj.steps) > max(s.accepted for s in traj.steps) + 1, draft.name  # trees


def successor_with_full_table(max_nodes, draft_len=6) -> tuple[SuccessorDraft, SimpleNamespace]:
    draft = SuccessorDraft("s", SuccessorSettings(draft_len=draft_len, max_nodes=max_nodes, top_k=2))
    draft.seed = torch.tensor([[(t + 1) % V, (t + 2) % V] for t in range(V)])  # every token has two successors
    state = SimpleNamespace(tokens=[0, 1], vocab_size=V)
    return draft, state


def is_chain(parents) -> bool:
    return parents == list(range(-1, len(parents) - 1))


def test_steep_costs_shrink_the_tree_to_its_chain_and_flat_costs_grow_it_to_the_cap():
    draft, state = successor_with_full_table("auto")
    draft.set_costs([0.0] + [2.0**m for m in range(1, AUTO_MAX_NODES + 2)])  # each position doubles the step
    draft.start(state)
    out = draft.propose(state, 100)
    assert out.ids == [2, 3, 4, 5, 6, 7] and is_chain(out.parents)  # the top-ranked path, draft_len deep

    draft.set_costs([0.0] + [1.0] * (AUTO_MAX_NODES + 1))  # width is free
    draft.start(state)
    assert len(draft.propose(state, 100).ids) == AUTO_MAX_NODES

    draft.set_costs(moderate(AUTO_MAX_NODES))  # in between: a tree, wider than the chain, below the cap
    draft.start(state)
    out = draft.propose(state, 100)
    assert 6 < len(out.ids) < AUTO_MAX_NODES and not is_chain(out.parents)


def test_an_auto_merged_tree_keeps_the_best_nodes_the_costs_pay_for():
    """merged max_nodes="auto": the best k nodes by score for the k that maximises (1 + their scores) / step seconds
    over k + 1 positions: none under steep costs, every candidate when width is free, the argmax in between."""
    def merged():
        draft, state = successor_with_full_table(16)
        return MergedDraft("m", {"successor": draft}, MergedSettings(draft_len=6, max_nodes="auto")), state

    full, state = merged()
    full.start(state)
    candidates = full.propose(state, 100)  # no costs: every candidate up to the cap
    assert len(candidates.ids) == 16
    ranked = sorted(candidates.node_probs, reverse=True)
    for curve, expected in (([0.0] + [2.0**m for m in range(1, AUTO_MAX_NODES + 2)], 0),
                            ([0.0] + [1.0] * (AUTO_MAX_NODES + 1), 16),
                            (moderate(AUTO_MAX_NODES), best_prefix(moderate(AUTO_MAX_NODES), 1, 1.0, ranked))):
        draft, state = merged()
        draft.set_costs(curve)
        draft.start(state)
        out = draft.propose(state, 100)
        assert len(out.ids) == expected
        assert sorted(out.node_probs or [], reverse=True) == ranked[:expected]  # the best ones, parents kept
    assert 0 < best_prefix(moderate(AUTO_MAX_NODES), 1, 1.0, ranked) < 16


def test_the_budget_follows_the_measured_hit_rates():
    """Branches that never hit stop being worth their cost; without costs the cap holds."""
    budget = NodeBudget(auto=True)
    budget.set_costs(moderate(8))
    assert budget.allows(2, 1.0, 0.5)
    for _ in range(20):  # the rank-1 child at depth 1 is tried and never accepted
        budget.learn([4, 5], [-1, -1], [4])
    assert budget.rate(1, 0) > 0.9 and budget.rate(1, 1) < 0.05
    assert not budget.allows(2, 1.0, budget.rate(1, 1))
    assert not budget.allows(8, 0.0, 1.0)  # past the costed sizes
    assert NodeBudget(auto=True).allows(1000, 0.0, 0.0)  # no costs: every node (up to the cap) is allowed
    assert NodeBudget(auto=False).allows(3, 1.0, 0.0)


@pytest.mark.parametrize("arm", [lookup_tree_arm, successor_arm, merged_arm])
@pytest.mark.parametrize("settings", [dict(max_nodes="all"), dict(max_nodes="AUTO"), dict(max_nodes=[4]),
                                      dict(max_nodes=1025), dict(draft_len=65)])
def test_bad_budget_settings_are_one_error(arm, settings):
    spec = arm()
    spec["settings"].update(settings)
    with pytest.raises(CtxdraftError):
        build_draft(spec, target=None)


@pytest.mark.parametrize("curve", [[0.0], [0.0, 1.0, -1.0] * 30, [0.0, 0.0, 1.0] * 30, moderate(AUTO_MAX_NODES)[:-1]])
def test_bad_costs_are_one_error(curve):
    """Negative or zero step costs, or costs that stop short of the node cap (a tree wider than the budget covers)."""
    with pytest.raises(CtxdraftError):
        SuccessorDraft("s", SuccessorSettings(max_nodes="auto")).set_costs(curve)


def test_auto_arm_builds_and_a_seed_of_another_vocabulary_is_one_error():
    draft = build_draft(successor_arm(max_nodes="auto"), target=None)
    assert draft.max_verified() == AUTO_MAX_NODES and draft.draft_len == 6
    draft.seed = torch.zeros(V + 1, draft.settings.top_k, dtype=torch.long)
    with pytest.raises(CtxdraftError, match="does not fit vocabulary"):
        draft.start(SimpleNamespace(tokens=[0], vocab_size=V))


def test_best_prefix_looks_past_a_bump_in_the_measured_curve():
    """Catches a batch's draft positions chosen by the first local step (one noisy size would stop all drafting)."""
    curve = [0.0, 1.0, 1.02, 1.04, 1.30, 1.08, 1.10, 1.12, 1.14]  # a bump at 4 positions, else 2% per position
    assert best_prefix(curve, 3, 3, [0.5, 0.5, 0.5, 0.5]) == 4  # 3 rows: every candidate past the bump pays
    assert best_prefix(curve, 3, 3, [0.01] * 4) == 0  # hopeless candidates: plain steps are faster
    assert best_prefix(curve, 3, 3, [0.9] * 20) == 5  # never past the curve's end
    assert best_prefix([0.0, 1.0, 2.0], 1, 1, [0.99]) == 0  # a position that doubles the step never pays
