"""The batch cache: rows of different lengths in one forward give each row's own single-row logits."""
from __future__ import annotations

import pytest
import torch
from tiny import ARCHS, tiny_random

from ctxdraft.selfdraft.runtime.batch_cache import BatchCache
from ctxdraft.selfdraft.runtime.layers import LayerStack

V = 61


@pytest.fixture(scope="module", params=ARCHS)
def stack(request):
    return LayerStack(tiny_random(request.param, vocab_size=V))


def single(stack, prompt, new, tree=None):
    cache = stack.new_cache()
    L = stack.num_layers
    stack.run(stack.embed(torch.tensor([prompt])), 0, L, cache, torch.arange(len(prompt)))
    positions = stack.tree_positions(tree, len(prompt)) if tree else torch.arange(len(prompt), len(prompt) + len(new))
    return stack.logits(stack.run(stack.embed(torch.tensor([new])), 0, L, cache, positions, tree=tree))[0]


@torch.inference_mode()
def test_ragged_rows_match_single_row_forwards(stack):
    """Catches writes at the wrong offset, a mask that lets a row see another length's padding, sliding windows."""
    prompts = [[3, 7, 9, 11, 4, 5, 6, 8, 20, 21], [5, 6], [30, 31, 32, 33, 34, 35]]
    news = [[12, 13, 14], [40], [41, 42]]
    cache = BatchCache(stack.num_layers)
    for prompt in prompts:
        slot = cache.add_row()
        stack.run(stack.embed(torch.tensor([prompt])), 0, stack.num_layers, cache.row(slot), torch.arange(len(prompt)))
    T = max(map(len, news))
    ids = torch.tensor([new + [0] * (T - len(new)) for new in news])
    positions = torch.stack([torch.arange(len(p), len(p) + T) for p in prompts])
    logits = stack.logits(stack.run(stack.embed(ids), 0, stack.num_layers, cache.view(), positions))
    for b, (prompt, new) in enumerate(zip(prompts, news)):
        torch.testing.assert_close(logits[b, : len(new)], single(stack, prompt, new), atol=1e-4, rtol=1e-4)
    # Crop the rejected tail of row 0 and continue: the next forward must not see the dropped positions.
    cache.row(0).crop(len(prompts[0]) + 1)
    cache.row(1).crop(len(prompts[1]) + 1)
    cache.row(2).crop(len(prompts[2]) + 2)
    out = stack.logits(stack.run(stack.embed(torch.tensor([[50], [51], [52]])), 0, stack.num_layers, cache.view(),
                                 torch.tensor([[11], [3], [8]])))
    for b, (prompt, new, kept) in enumerate(zip(prompts, ([12, 50], [40, 51], [41, 42, 52]), (1, 1, 2))):
        torch.testing.assert_close(out[b, 0], single(stack, prompt, new)[-1], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_tree_row_and_keep_rows(stack):
    prompt = [3, 7, 9, 11, 4, 5, 6]
    tree = [-1, 0, 0, 1]  # root, two children, a grandchild
    nodes = [10, 11, 12, 13]
    cache = BatchCache(stack.num_layers)
    cache.add_row()
    row = cache.row(0)
    stack.run(stack.embed(torch.tensor([prompt])), 0, stack.num_layers, row, torch.arange(len(prompt)))
    positions = stack.tree_positions(tree, len(prompt))
    got = stack.logits(stack.run(stack.embed(torch.tensor([nodes])), 0, stack.num_layers, row, positions, tree=tree))[0]
    torch.testing.assert_close(got, single(stack, prompt, nodes, tree), atol=1e-4, rtol=1e-4)
    LayerStack.keep_rows(row, len(prompt), [0, 2])  # the path root -> node 2 (token 12)
    nxt = stack.logits(stack.run(stack.embed(torch.tensor([[20]])), 0, stack.num_layers, row, torch.tensor([len(prompt) + 2])))
    torch.testing.assert_close(nxt[0, 0], single(stack, prompt, [10, 12, 20])[-1], atol=1e-4, rtol=1e-4)


def test_remove_row_moves_the_last_row():
    cache = BatchCache(2)
    for _ in range(3):
        cache.add_row()
    cache.lengths[:, 2] = 7
    assert cache.remove_row(0) == 2 and cache.num_rows == 2 and cache.lengths[:, 0].tolist() == [7, 7]
    assert cache.remove_row(1) is None and cache.num_rows == 1


@torch.inference_mode()
def test_admitting_rows_one_at_a_time_does_not_grow_the_width():
    """Catches buffers that double their width each time a row is added (8 rows: 256x the memory, every forward
    copying it): rows and positions grow independently."""
    stack = LayerStack(tiny_random(ARCHS[0], vocab_size=V))
    cache = BatchCache(stack.num_layers, max_rows=2)
    for _ in range(8):
        slot = cache.add_row()
        stack.run(stack.embed(torch.tensor([[3] * 10])), 0, stack.num_layers, cache.row(slot), torch.arange(10))
    rows, _, width, _ = cache.keys[0].shape
    assert rows == 8 and width < 64


@torch.inference_mode()
def test_ragged_rows_are_packed_without_padding():
    """Catches a batched forward that computes the padding of short rows (every row as long as the longest draft):
    the MLPs see exactly the rows' real positions, and each row still gets its single-row logits."""
    stack = LayerStack(tiny_random(ARCHS[0], vocab_size=V))
    assert stack.row_attention
    prompts, news = [[3, 7, 9, 11], [5, 6], [30, 31, 32]], [[12, 13, 14, 15], [40], [41, 42]]
    cache = BatchCache(stack.num_layers, max_rows=3)
    for prompt in prompts:
        stack.run(stack.embed(torch.tensor([prompt])), 0, stack.num_layers, cache.row(cache.add_row()),
                  torch.arange(len(prompt)))
    seen = []
    hook = stack.layers[0].mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[:2]))
    T = max(map(len, news))
    ids = torch.tensor([new + [0] * (T - len(new)) for new in news])
    positions = torch.stack([torch.arange(len(p), len(p) + T) for p in prompts])
    logits = stack.logits(stack.run(stack.embed(ids), 0, stack.num_layers, cache.view(), positions, None, None,
                                    [len(n) for n in news]))
    hook.remove()
    assert seen == [torch.Size([1, sum(map(len, news))])]
    for b, (prompt, new) in enumerate(zip(prompts, news)):
        torch.testing.assert_close(logits[b, : len(new)], single(stack, prompt, new), atol=1e-4, rtol=1e-4)
    assert cache.lengths[:, :].tolist()[0] == [len(p) + len(n) for p, n in zip(prompts, news)]
