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
