"""One forward over a layer range: equal to the model's own forward, in one piece or split at any layer."""
from __future__ import annotations

import pytest
import torch
from tiny import ARCHS, tiny_random

from ctxdraft.selfdraft.runtime.layers import LayerStack


@pytest.mark.parametrize("arch", ARCHS)
def test_full_range_equals_the_models_forward(arch):
    model = tiny_random(arch)
    ids = torch.tensor([[5, 9, 2, 33, 7, 7, 18, 40, 3, 11]])
    stack = LayerStack(model)
    hidden = stack.run(stack.embed(ids), 0, stack.num_layers, stack.new_cache(), torch.arange(ids.shape[1]))
    torch.testing.assert_close(stack.logits(hidden), model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("split", [1, 2, 3])
def test_split_ranges_and_incremental_positions_equal_one_pass(arch, split):
    """[0, E) then [E, L), fed in two chunks of positions with one cache: the early-exit access pattern."""
    model = tiny_random(arch)
    ids = [5, 9, 2, 33, 7, 7, 18, 40, 3, 11]
    stack = LayerStack(model)
    L = stack.num_layers
    reference = model(torch.tensor([ids])).logits
    cache = stack.new_cache()
    out = []
    for start, stop in ((0, 6), (6, 10)):  # 6 > the Gemma window of 4: the second chunk crosses it
        positions = torch.arange(start, stop)
        early = stack.run(stack.embed(torch.tensor([ids[start:stop]])), 0, split, cache, positions)
        out.append(stack.logits(stack.run(early, split, L, cache, positions)))
    torch.testing.assert_close(torch.cat(out, dim=1), reference, rtol=1e-4, atol=1e-4)
    assert [LayerStack.seq_len(cache, i) for i in range(L)] == [10] * L


def test_crop_rolls_back_rejected_positions():
    model = tiny_random("gemma3")
    stack = LayerStack(model)
    ids = [5, 9, 2, 33, 7, 7, 18]
    cache = stack.new_cache()
    stack.run(stack.embed(torch.tensor([ids])), 0, stack.num_layers, cache, torch.arange(len(ids)))
    stack.run(stack.embed(torch.tensor([[1, 2, 3]])), 0, stack.num_layers, cache, torch.arange(7, 10))  # a rejected draft
    stack.crop(cache, 7)
    assert [LayerStack.seq_len(cache, i) for i in range(stack.num_layers)] == [7] * stack.num_layers
    hidden = stack.run(stack.embed(torch.tensor([[40]])), 0, stack.num_layers, cache, torch.tensor([7]))
    torch.testing.assert_close(stack.logits(hidden)[0, -1], model(torch.tensor([ids + [40]])).logits[0, -1], rtol=1e-4, atol=1e-4)


# -- token trees ------------------------------------------------------------------------------------

PREFIX = [5, 9, 2, 33, 7, 7]
# Root (the pending token) at 0, then nodes; depths up to 5 > the Gemma window of 4.
TREE_TOKENS = [12, 40, 3, 40, 8, 21, 3, 30, 30, 17]
TREE_PARENTS = [-1, 0, 1, 0, 2, 4, 3, 5, 6, 7]


def path_to(t: int) -> list[int]:
    path = []
    while t >= 0:
        path.append(t)
        t = TREE_PARENTS[t]
    return path[::-1]


def prefilled(stack: LayerStack):
    cache = stack.new_cache()
    stack.run(stack.embed(torch.tensor([PREFIX])), 0, stack.num_layers, cache, torch.arange(len(PREFIX)))
    return cache


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tree_forward_equals_each_path_as_a_chain(arch):
    """Catches a wrong tree mask (a node seeing a sibling, or past a sliding window) or wrong positions."""
    stack = LayerStack(tiny_random(arch))
    L = stack.num_layers
    cache = prefilled(stack)
    positions = stack.tree_positions(TREE_PARENTS, len(PREFIX))
    tree_logits = stack.logits(stack.run(stack.embed(torch.tensor([TREE_TOKENS])), 0, L, cache, positions, tree=TREE_PARENTS))
    for t in range(len(TREE_TOKENS)):
        path = path_to(t)
        chain_cache = prefilled(stack)
        ids = [TREE_TOKENS[s] for s in path]
        hidden = stack.run(stack.embed(torch.tensor([ids])), 0, L, chain_cache, torch.arange(len(PREFIX), len(PREFIX) + len(ids)))
        torch.testing.assert_close(tree_logits[0, t], stack.logits(hidden)[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_keep_rows_leaves_the_cache_of_the_path_as_a_chain(arch):
    """After a tree forward, keeping one root-to-leaf path gives the cache a chain forward of it gives (sliding layers
    included): the next token's logits are equal."""
    stack = LayerStack(tiny_random(arch))
    L = stack.num_layers
    cache = prefilled(stack)
    positions = stack.tree_positions(TREE_PARENTS, len(PREFIX))
    stack.run(stack.embed(torch.tensor([TREE_TOKENS])), 0, L, cache, positions, tree=TREE_PARENTS)
    path = path_to(9)  # 0, 1, 2, 4, 5, 7, 9: not a prefix of the rows
    stack.keep_rows(cache, len(PREFIX), path)
    ids = [TREE_TOKENS[s] for s in path]
    assert [LayerStack.seq_len(cache, i) for i in range(L)] == [len(PREFIX) + len(path)] * L
    nxt = torch.tensor([[44]])
    hidden = stack.run(stack.embed(nxt), 0, L, cache, torch.tensor([len(PREFIX) + len(path)]))
    expected = stack.model(torch.tensor([PREFIX + ids + [44]])).logits[0, -1]
    torch.testing.assert_close(stack.logits(hidden)[0, -1], expected, rtol=1e-4, atol=1e-4)


def test_a_parent_after_its_child_is_refused():
    stack = LayerStack(tiny_random("llama"))
    with pytest.raises(ValueError, match="parents must come before"):
        stack.run(stack.embed(torch.tensor([[1, 2]])), 0, 1, stack.new_cache(), torch.tensor([0, 1]), tree=[1, -1])
