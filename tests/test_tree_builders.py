"""Tree builders: the feature head's EAGLE-2 tree (greedy equality on Llama / Gemma 3 / Qwen2, sampling keeps the
target distribution, one frontier call equals each path on its own), the merged arm (greedy equality, hit rates),
and the successor table (built from the target, stored, loaded, refused for another vocabulary)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_decoding import PLAIN, REPEATING, hf_greedy
from test_decoding import run as decode
from tiny import ARCHS, assert_follows, tiny_random

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.layout import SUCCESSORS_FILE
from ctxdraft.selfdraft.drafting.drafts import ModelDraft, ModelDraftSettings
from ctxdraft.selfdraft.drafting.feature_head import FeatureCache, FeatureHead, save_feature_head
from ctxdraft.selfdraft.drafting.feature_tree import FeatureTreeDraft, FeatureTreeSettings, best_subtree, expand_tree
from ctxdraft.selfdraft.drafting.merged_draft import MergedDraft, MergedSettings
from ctxdraft.selfdraft.drafting.pool import build_draft, merged_arm, merged_arm_for, successor_arm
from ctxdraft.selfdraft.drafting.successor_table import (
    build_successor_table,
    load_successor_table,
    save_successor_table,
)
from ctxdraft.selfdraft.drafting.tree_budget import HitRates
from ctxdraft.selfdraft.drafting.tree_drafts import LookupTreeDraft, SuccessorDraft
from ctxdraft.selfdraft.runtime.layers import LayerStack
from ctxdraft.selfdraft.runtime.sampling import probs_from_logits

LAYERS = [1, 2, 4]


def noisy_head(model, vocab_ids=None, seed=0, noise=0.01):
    torch.manual_seed(seed)
    head = FeatureHead(model, LAYERS, vocab_ids).eval().requires_grad_(False)
    with torch.no_grad():  # an untrained head that still agrees with the target now and then
        head.fc.weight.add_(noise * torch.randn_like(head.fc.weight))
    return head


def feature_tree(model, vocab_ids=None, **settings):
    settings = FeatureTreeSettings("general", LAYERS, **settings)
    return FeatureTreeDraft("feature-tree", noisy_head(model, vocab_ids), settings)


def run(model, prompt, draft, n, capture=True, **gen):
    """``test_decoding.run`` with the prefill keeping the draft's state layers (unless ``capture`` is False)."""
    return decode(model, prompt, draft, n, capture=draft.state_layers if capture else (), **gen)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_random(request.param)


@pytest.mark.parametrize("prompt", [REPEATING, PLAIN], ids=["repeating", "plain"])
def test_greedy_feature_tree_equals_hf_generate(model, prompt):
    n = 30
    expected = hf_greedy(model, prompt, n)
    for vocab_ids, settings in [(None, dict(draft_len=4, top_k=3, max_nodes=10)),
                                (torch.arange(0, 61, 2), dict(draft_len=3, top_k=2, max_nodes=5)),
                                (None, dict(draft_len=1, top_k=1, max_nodes=1))]:
        got, stats = run(model, prompt, feature_tree(model, vocab_ids, **settings), n)
        assert got == expected, settings
        assert stats.new_tokens == n == 1 + stats.accepted_tokens + (stats.target_forwards - 1)
        assert stats.nodes_verified > 0
    got, stats = run(model, prompt, feature_tree(model, top_k=3, max_nodes=8), n, capture=False)
    assert got == expected and stats.nodes_verified > sum(stats.drafted_per_position)  # trees, not chains


def test_a_trained_like_head_gets_accepted():
    """A head that equals the target's last layer (its fc copies the deepest captured state) is right often: the
    tree must turn that into accepted tokens (catches a tree whose nodes sit at the wrong positions or parents)."""
    model = tiny_random("llama", layers=2)
    head = FeatureHead(model, [2]).eval().requires_grad_(False)
    draft = FeatureTreeDraft("t", head, FeatureTreeSettings("general", [2], draft_len=3, top_k=3, max_nodes=12))
    got, stats = run(model, REPEATING, draft, 30)
    assert got == hf_greedy(model, REPEATING, 30)
    assert stats.accepted_tokens > 0


@torch.no_grad()
def head_after_context():
    """A noisy head whose cache holds a short context: (head, cache, root state, positions fed); the pending token is
    at position ``fed``."""
    model = tiny_random("qwen2")
    head = noisy_head(model, noise=0.3)
    stack = LayerStack(model)
    tokens = PLAIN + hf_greedy(model, PLAIN, 4)
    captured = dict.fromkeys(LAYERS)
    stack.run(stack.embed(torch.tensor([tokens])), 0, 4, stack.new_cache(), torch.arange(len(tokens)), captured)
    states = torch.cat([captured[layer][0] for layer in LAYERS], dim=-1)
    fed = len(tokens) - 1  # positions 0..fed-1 in the head's cache; tokens[fed] is pending
    cache = FeatureCache()
    root = head.feed(cache, states[:fed], torch.tensor(tokens[1 : fed + 1]), torch.arange(fed))[-1:]
    return head, cache, root, fed


def test_one_frontier_call_equals_each_path_alone():
    head, cache, root, fed = head_after_context()
    with torch.no_grad():
        tree = expand_tree(head, cache, root, fed, max_depth=4, top_k=3)
        assert cache.length == fed + len(tree.expanded) and len(tree.expanded) == 9  # three depths of three
        assert len(set(tree.parents[c] for c in tree.expanded)) > 3  # the frontiers had several parents
        for node in range(len(tree.ids)):
            path = [node]
            while tree.parents[path[-1]] >= 0:
                path.append(tree.parents[path[-1]])
            path.reverse()
            alone = FeatureCache(cache.k[:, :fed], cache.v[:, :fed])
            state, log_prob = root, 0.0
            for depth, step_node in enumerate(path, start=1):
                log_prob += float(torch.log_softmax(head.logits(state).float(), -1)[0, tree.ids[step_node]])
                if step_node != node:
                    state = head.step(alone, state, tree.ids[step_node], fed + depth)
            assert math.isclose(tree.log_probs[node], log_prob, rel_tol=1e-4, abs_tol=1e-4), node


def test_a_threshold_stops_expanding_without_losing_a_kept_node():
    """Candidates under the threshold are not expanded (their children score no higher): the kept tree is the one
    the full expansion keeps, from fewer head calls once a whole depth falls under it."""
    head, cache, root, fed = head_after_context()
    with torch.no_grad():
        full = expand_tree(head, cache, root, fed, max_depth=5, top_k=3)
        cache.crop(fed)
        scores = sorted(math.exp(x) for x in full.log_probs)
        pruned_any = False
        for threshold in scores[len(scores) // 4 :: max(1, len(scores) // 6)]:
            cut = expand_tree(head, cache, root, fed, max_depth=5, top_k=3, min_log_prob=math.log(threshold))
            cache.crop(fed)
            kept = [best_subtree(tree.ids, tree.parents, [math.exp(x) for x in tree.log_probs], 8, threshold)
                    for tree in (full, cut)]
            assert kept[0].ids == kept[1].ids and kept[0].parents == kept[1].parents, threshold
            assert cut.evaluations <= full.evaluations and len(cut.expanded) <= len(full.expanded)
            pruned_any |= cut.evaluations < full.evaluations
        assert pruned_any  # the highest thresholds stop before the last depth


def test_best_subtree_keeps_parents_and_the_best_nodes():
    ids, parents = [10, 11, 12, 13, 14], [-1, -1, 0, 2, 1]
    out = best_subtree(ids, parents, [0.5, 0.4, 0.45, 0.1, 0.4], max_nodes=3)
    assert out.ids == [10, 11, 12] and out.parents == [-1, -1, 0] and out.node_probs == [0.5, 0.4, 0.45]
    out = best_subtree(ids, parents, [0.5, 0.4, 0.45, 0.45, 0.4], max_nodes=4)  # a tie: the earlier node
    assert out.ids == [10, 11, 12, 13] and out.parents == [-1, -1, 0, 2]
    assert best_subtree(ids, parents, [0.5] * 5, 5, min_score=0.6).parents is None  # nothing kept: the empty chain


def test_feature_tree_sampling_keeps_the_target_distribution():
    V, steps, temperature, num = 5, 3, 1.3, 1500
    model = tiny_random(vocab_size=V, seed=3)
    prompt = [1, 4, 2, 0, 3]
    exact = []
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=steps):
            p = 1.0
            for i in range(steps):
                logits = model(torch.tensor([prompt + list(seq[:i])])).logits[0, -1]
                p *= probs_from_logits(logits, temperature, 1.0)[seq[i]].item()
            exact.append(p)
    exact = torch.tensor(exact)
    draft = FeatureTreeDraft("t", noisy_head(model, torch.tensor([0, 2, 3, 4]), noise=0.5),
                             FeatureTreeSettings("general", LAYERS, draft_len=2, top_k=2, max_nodes=4))
    counts, nodes = torch.zeros(V**steps), 0
    for seed in range(num):
        got, stats = run(model, prompt, draft, steps + 1, temperature=temperature, seed=seed)  # the first step: depth 2
        counts[sum(t * V ** (steps - 1 - i) for i, t in enumerate(got[:steps]))] += 1
        nodes += stats.nodes_verified
    assert nodes >= 4 * num  # trees of depth 2 (four nodes) were verified
    assert int((exact * num >= 5).sum()) >= 20
    assert_follows(counts, exact, num)


@pytest.mark.parametrize("prompt", [REPEATING, PLAIN], ids=["repeating", "plain"])
def test_greedy_merged_equals_hf_generate(model, prompt):
    n = 40
    expected = hf_greedy(model, prompt, n)
    draft_model = tiny_random("llama", seed=1, layers=2)  # another model with the same vocabulary
    sources = {"lookup": LookupTreeDraft(), "successor": SuccessorDraft(),
               "feature": feature_tree(model, draft_len=3, top_k=2, max_nodes=6),
               "model": ModelDraft("m", draft_model, ModelDraftSettings("m", 3))}
    for settings in (MergedSettings(draft_len=5, max_nodes=12), MergedSettings(draft_len=2, max_nodes=1)):
        draft = MergedDraft("merged", sources, settings)
        got, stats = run(model, prompt, draft, n)
        assert got == expected
        assert stats.new_tokens == n == 1 + stats.accepted_tokens + (stats.target_forwards - 1)
        assert max(stats.drafted_per_position, default=0) <= stats.target_forwards
        assert stats.nodes_verified <= settings.max_nodes * (stats.target_forwards - 1)
    if prompt is REPEATING:
        assert stats.accepted_tokens > 0 and sum(r.tried.get((1, 0), 0) for r in draft.rates.values()) > 0


def test_hit_rates_count_what_the_target_emitted():
    rates = HitRates()
    # root -> 5 -> 6 and root -> 7: the target emitted 5, 9: 5 hit, 6 tried and missed, 7 tried and missed
    rates.count([5, 6, 7], [-1, 0, -1], [5, 9])
    assert rates.tried == {(1, 0): 1, (2, 0): 1, (1, 1): 1} and rates.hit == {(1, 0): 1, (2, 0): 0, (1, 1): 0}
    rates.count([5, 6], [-1, 0], [4])  # 6 is never tried: its parent was not emitted
    assert rates.tried == {(1, 0): 2, (2, 0): 1, (1, 1): 1} and rates.hit == {(1, 0): 1, (2, 0): 0, (1, 1): 0}
    # shrinkage: the source 1 hit in 4 tries -> (1 + 1) / (4 + 2); rank 0 1 in 3 -> (1 + 2 source) / (3 + 2); a slot
    # (1 + 2 rank) / (2 + 2) for (1, 0), (0 + 2 rank) / (1 + 2) for (2, 0); a slot never tried reads as its rank
    source = 2 / 6
    rank0, rank1 = (1 + 2 * source) / 5, (0 + 2 * source) / 3
    assert rates.rank_rates()[:2] == pytest.approx([rank0, rank1]) and rates.rank_rates()[3] == pytest.approx(source)
    assert rates.rate((1, 0)) == pytest.approx((1 + 2 * rank0) / 4)
    assert rates.rate((2, 0)) == pytest.approx(2 * rank0 / 3) and rates.rate((5, 1)) == pytest.approx(rank1)
    scores = rates.scores([-1, 0, -1])
    assert scores == pytest.approx([rates.rate((1, 0)), rates.rate((1, 0)) * rates.rate((2, 0)), rates.rate((1, 1))])
    assert HitRates().rate((3, 2)) == 0.5  # nothing counted yet: one hit in two


def test_merged_arm_from_a_pool_builds(tmp_path):
    model = tiny_random("llama")
    save_feature_head(tmp_path / "exits.safetensors", "general", noisy_head(model))

    class Target:
        vocab_size = model.config.vocab_size
        num_layers = 4

    Target.model = model
    arms = [{"name": "feature", "kind": "feature", "settings": {"name": "general", "layers": LAYERS, "draft_len": 4,
                                                                "threshold": 0.0, "draft_vocab": None,
                                                                "weights": "exits.safetensors"}}]
    table = build_successor_table(LayerStack(model), [PLAIN + REPEATING], top_k=2)
    save_successor_table(tmp_path / SUCCESSORS_FILE, table)
    spec = merged_arm_for(arms, draft_len=4, max_nodes=10, table=SUCCESSORS_FILE)
    assert list(spec["settings"]["sources"]) == ["lookup", "successor", "feature"]
    draft = build_draft(spec, Target, tmp_path)
    assert draft.kind == "merged" and draft.state_layers == tuple(LAYERS)
    assert torch.equal(draft.sources["successor"].seed[:, :2], table)
    got, _ = run(model, PLAIN, draft, 20)
    assert got == hf_greedy(model, PLAIN, 20)


@pytest.mark.parametrize("settings", [
    dict(max_nodes=0), dict(draft_len=0), dict(sources={}), dict(sources={"oracle": {}}), dict(sources={"lookup": 3}),
    dict(sources={"lookup": {"max_nodes": 0}}), dict(sources={"successor": {"top_k": 0}}), dict(size=3),
])
def test_bad_merged_settings_are_one_error(settings):
    spec = merged_arm()
    spec["settings"].update(settings)
    with pytest.raises(CtxdraftError):
        build_draft(spec, target=None)


@pytest.mark.parametrize("settings", [dict(top_k=0), dict(max_nodes=0), dict(max_nodes=2000), dict(draft_len=0),
                                      dict(threshold=1.5), dict(layers=[])])
def test_bad_feature_tree_settings_are_one_error(settings):
    with pytest.raises(CtxdraftError):
        FeatureTreeSettings(**{"name": "general", "layers": LAYERS, **settings})


# -- the successor table ------------------------------------------------------------------------------

def test_successor_table_is_the_targets_top_k_and_round_trips(tmp_path):
    model = tiny_random("gemma3")
    stack = LayerStack(model)
    seq = PLAIN + hf_greedy(model, PLAIN, 10)
    table = build_successor_table(stack, [seq], top_k=3, chunk=7)  # chunks: the cache carries across them
    logits = model(torch.tensor([seq])).logits[0]
    last = {token: t for t, token in enumerate(seq)}  # the last occurrence wins
    for token, t in last.items():
        assert table[token].tolist() == logits[t].topk(3).indices.tolist()
    assert (table[[v for v in range(61) if v not in last]] == -1).all()
    path = tmp_path / SUCCESSORS_FILE
    save_successor_table(path, table)
    assert torch.equal(load_successor_table(path, 61, 3), table)
    narrow, wide = load_successor_table(path, 61, 2), load_successor_table(path, 61, 5)
    assert torch.equal(narrow, table[:, :2]) and torch.equal(wide[:, :3], table) and (wide[:, 3:] == -1).all()


def test_a_table_for_another_vocabulary_is_one_error_naming_it(tmp_path):
    path = tmp_path / SUCCESSORS_FILE
    save_successor_table(path, torch.zeros(50, 2, dtype=torch.long))
    with pytest.raises(CtxdraftError, match=f"{SUCCESSORS_FILE}.*50 tokens.*61"):
        load_successor_table(path, 61, 2)

    class Target:
        vocab_size = 61

    spec = successor_arm()
    spec["settings"]["table"] = SUCCESSORS_FILE
    with pytest.raises(CtxdraftError, match=SUCCESSORS_FILE):
        build_draft(spec, Target, tmp_path)
    spec = merged_arm(successor={"table": SUCCESSORS_FILE})
    with pytest.raises(CtxdraftError, match=SUCCESSORS_FILE):
        build_draft(spec, Target, tmp_path)


def test_a_damaged_or_foreign_table_is_one_error(tmp_path):
    path = tmp_path / SUCCESSORS_FILE
    path.write_bytes(b"not safetensors")
    with pytest.raises(CtxdraftError, match=SUCCESSORS_FILE):
        load_successor_table(path, 61, 2)
    save_successor_table(path, torch.full((61, 2), 99, dtype=torch.long))  # ids past the vocabulary
    with pytest.raises(CtxdraftError, match="outside"):
        load_successor_table(path, 61, 2)
    with pytest.raises(CtxdraftError, match="not found"):
        load_successor_table(tmp_path / "missing.safetensors", 61, 2)
