"""Token-tree drafts in the decoding loop: greedy equality with HF generate (Llama and Gemma 3), the cache after an
accepted branch, sampling that keeps the target distribution (temperature and top-p), and bad settings."""
from __future__ import annotations

import itertools

import pytest
import torch
from test_decoding import PLAIN, REPEATING, hf_greedy, run
from tiny import assert_follows, tiny_llama, tiny_random

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.drafting.decoding import GenerationConfig, prefill, speculative_decode
from ctxdraft.selfdraft.drafting.draft import Draft, DraftOutput, TeacherPass
from ctxdraft.selfdraft.drafting.pool import build_draft, lookup_tree_arm, successor_arm
from ctxdraft.selfdraft.drafting.tree_drafts import (
    LookupTreeDraft,
    LookupTreeSettings,
    NgramOccurrences,
    SuccessorDraft,
    SuccessorSettings,
)
from ctxdraft.selfdraft.learning.trajectories import replay
from ctxdraft.selfdraft.runtime.layers import LayerStack
from ctxdraft.selfdraft.runtime.sampling import probs_from_logits


def tree_drafts():
    yield LookupTreeDraft("lookup-tree", LookupTreeSettings(draft_len=5, max_nodes=16))
    yield LookupTreeDraft("lookup-tree-1", LookupTreeSettings(draft_len=3, max_nodes=1, ngram_sizes=[1]))
    yield LookupTreeDraft("lookup-tree-wide", LookupTreeSettings(draft_len=2, max_nodes=64, ngram_sizes=[2, 1]))
    yield SuccessorDraft("successor", SuccessorSettings(draft_len=6, max_nodes=16, top_k=4))
    yield SuccessorDraft("successor-chain", SuccessorSettings(draft_len=4, max_nodes=4, top_k=1))
    yield SuccessorDraft("successor-wide", SuccessorSettings(draft_len=2, max_nodes=40, top_k=8))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny_random(request.param)


@pytest.mark.parametrize("prompt", [REPEATING, PLAIN], ids=["repeating", "plain"])
def test_greedy_tree_arms_equal_hf_generate(model, prompt):
    n = 40
    expected = hf_greedy(model, prompt, n)
    wide = 0
    for draft in tree_drafts():
        got, stats = run(model, prompt, draft, n)
        assert got == expected, f"{draft.name} diverged from HF greedy"
        assert stats.new_tokens == n == 1 + stats.accepted_tokens + (stats.target_forwards - 1)
        assert stats.nodes_verified == stats.drafted_tokens
        assert sum(stats.accepted_per_position) == stats.accepted_tokens
        wide += stats.nodes_verified > sum(stats.drafted_per_position)  # some step verified more than one branch
    assert wide > 0


class ScriptedTree(Draft):
    """Proposes, at every step, a wrong branch first and the target's own next tokens second."""

    kind = "scripted"

    def __init__(self, greedy: list[int], vocab_size: int, prompt_len: int):
        super().__init__("scripted")
        self.greedy, self.V, self.prompt_len = greedy, vocab_size, prompt_len
        self.draft_len = 3

    def propose(self, state, max_len):
        done = len(state.tokens) - self.prompt_len  # the pending token is greedy[done - 1]
        right = self.greedy[done : done + min(max_len, 2)]
        if not right:
            return DraftOutput([])
        wrong = [(t + 1) % self.V for t in right]
        # wrong[0] -> wrong[1] under the root first, then the right branch, then a wrong leaf under the right one
        ids = wrong + right + [wrong[0]]
        parents = [-1, 0][: len(wrong)] + [-1, len(wrong)][: len(right)] + [len(wrong)]
        return DraftOutput(ids, parents=parents)


def test_cache_after_an_accepted_second_branch_equals_plain_decoding(model):
    n = 9
    expected = hf_greedy(model, PLAIN, n)
    stack = LayerStack(model)
    pre = prefill(stack, PLAIN)
    got, stats = speculative_decode(stack, pre, ScriptedTree(expected, model.config.vocab_size, len(PLAIN)),
                                    GenerationConfig(max_new_tokens=n))
    assert got == expected and stats.accepted_tokens > stats.target_forwards - 1  # two per step from the 2nd branch
    plain = prefill(stack, PLAIN + expected[:-1])  # the last token is pending, not in the cache
    for i in range(stack.num_layers):
        mine, theirs = pre.cache.layers[i], plain.cache.layers[i]
        assert mine.get_seq_length() == theirs.get_seq_length() == len(PLAIN) + n - 1
        rows = min(mine.keys.shape[-2], theirs.keys.shape[-2])  # a sliding layer keeps its window only
        torch.testing.assert_close(mine.keys[..., -rows:, :], theirs.keys[..., -rows:, :], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.values[..., -rows:, :], theirs.values[..., -rows:, :], rtol=1e-4, atol=1e-4)


# -- sampling keeps the target distribution ---------------------------------------------------------

SMALL_V = 4


class FixedTree(Draft):
    """Every token under the root but one; below the first two, two and one children (cut to ``max_len``)."""

    kind = "fixed"
    draft_len = 2

    def propose(self, state, max_len):
        ids, parents = [0, 2, 1, 3, 0, 1], [-1, -1, -1, 0, 0, 1]
        if max_len < 2:
            ids, parents = ids[:3], parents[:3]
        return DraftOutput(ids, parents=parents)


def exact_joint(model, prompt, steps, temperature, top_p) -> torch.Tensor:
    probs = []
    for seq in itertools.product(range(SMALL_V), repeat=steps):
        p = 1.0
        for i in range(steps):
            logits = model(torch.tensor([prompt + list(seq[:i])])).logits[0, -1]
            p *= probs_from_logits(logits, temperature, top_p)[seq[i]].item()
        probs.append(p)
    return torch.tensor(probs)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_tree_sampling_keeps_the_target_distribution(top_p):
    model = tiny_llama(SMALL_V, seed=3, layers=2, hidden=16)
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]  # a spread first token: top-p 0.8 keeps several
    steps, temperature, num = 3, 1.3, 1500
    stack = LayerStack(model)
    counts = torch.zeros(SMALL_V**steps)
    nodes = 0
    for seed in range(num):
        got, stats = speculative_decode(stack, prefill(stack, prompt), FixedTree("fixed"),
                                        GenerationConfig(max_new_tokens=steps, temperature=temperature, top_p=top_p, seed=seed))
        counts[sum(t * SMALL_V ** (steps - 1 - i) for i, t in enumerate(got))] += 1
        nodes += stats.nodes_verified
    assert nodes >= 3 * num  # the trees were verified
    exact = exact_joint(model, prompt, steps, temperature, top_p)
    assert int((exact * num >= 5).sum()) >= 8  # enough cells for the test to mean something
    assert_follows(counts, exact, num)


# -- the builders --------------------------------------------------------------------------------------

def test_lookup_tree_merges_matches_longest_and_most_recent_first():
    index = NgramOccurrences([2, 1])
    tokens = [7, 1, 2, 7, 1, 3, 4, 1, 5, 7, 1]
    index.update(tokens)
    tree = index.tree(tokens, max_depth=2, max_nodes=5)
    # "7 1" matched twice: after it 3 4 (recent) then 2 7; then "1" alone adds 5 7 (one node left: 5).
    assert tree.ids == [3, 4, 2, 7, 5] and tree.parents == [-1, 0, -1, 2, -1]


def test_successor_tree_follows_observed_top_k():
    draft = SuccessorDraft("s", SuccessorSettings(draft_len=3, max_nodes=5, top_k=2))
    draft.table = torch.full((10, 2), -1, dtype=torch.long)
    draft.observe(None, [1, 2, 3], torch.tensor([[2, 3], [4, 5], [6, 7]]))
    assert draft.table[1].tolist() == [2, 3] and draft.table[9].tolist() == [-1, -1]

    class State:
        tokens = [0, 1]

    out = draft.propose(State(), 8)
    # best-first by rank sum, then depth: 2 (0), 4 (0, under 2, a leaf), 3 (1), 5 (1, under 2), 6 (1, under 3)
    assert out.ids == [2, 4, 3, 5, 6] and out.parents == [-1, 0, -1, 0, 2]
    assert draft.propose(State(), 1).ids == [2, 3]  # the depth follows max_len
    State.tokens = [0, 9]
    assert draft.propose(State(), 8).parents is None  # nothing known: the empty chain


@pytest.mark.parametrize("arm", [lookup_tree_arm, successor_arm])
@pytest.mark.parametrize("settings", [
    dict(max_nodes=0), dict(max_nodes=True), dict(max_nodes=2000), dict(draft_len=-1), dict(draft_len=0),
    dict(draft_len=2.0), dict(size=3),
])
def test_bad_tree_settings_are_one_error(arm, settings):
    spec = arm()
    spec["settings"].update(settings)
    with pytest.raises(CtxdraftError):
        build_draft(spec, target=None)


@pytest.mark.parametrize("spec", [
    {"name": "l", "kind": "lookup-tree", "settings": {"ngram_sizes": []}},
    {"name": "l", "kind": "lookup-tree", "settings": {"ngram_sizes": [0]}},
    {"name": "s", "kind": "successor", "settings": {"top_k": 0}},
    {"name": "s", "kind": "successor", "settings": {"top_k": False}},
])
def test_bad_builder_settings_are_one_error(spec):
    with pytest.raises(CtxdraftError):
        build_draft(spec, target=None)


@pytest.mark.parametrize("prompt", [REPEATING, PLAIN], ids=["repeating", "plain"])
def test_lookup_tree_replay_accepts_what_decoding_accepts(model, prompt):
    """The teacher-forced replay of lookup-tree accepts, step by step, exactly what the real greedy run accepted."""
    n = 30
    draft = LookupTreeDraft("lookup-tree", LookupTreeSettings(draft_len=4, max_nodes=8))
    got, stats = run(model, prompt, draft, n)
    seq = prompt + hf_greedy(model, prompt, n + 8)
    trajectory = replay(draft.teacher_forced(TeacherPass(seq, len(prompt), n + 8, {}), model.config.vocab_size),
                        seq, len(prompt), n, eos_ids=set())
    assert stats.accepted_tokens > 0 and sum(step.accepted for step in trajectory.steps) == stats.accepted_tokens
    assert len(trajectory.steps) == stats.target_forwards - 1
