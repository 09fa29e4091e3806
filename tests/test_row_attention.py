"""Row attention: in bfloat16 a row of a batched forward gives bit for bit the logits it gives alone."""
from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama

from ctxdraft.selfdraft.drafting.decoding import prefill
from ctxdraft.selfdraft.runtime.batch_cache import BatchCache
from ctxdraft.selfdraft.runtime.layers import LayerStack
from ctxdraft.selfdraft.runtime.row_attention import ROW_SDPA

PROMPT_LENGTHS = (300, 7, 61, 2)  # one long row pads the others' keys by hundreds of positions


@torch.inference_mode()
def decode_step_logits(stack: LayerStack, prompts: list[list[int]], tokens: list[int]) -> torch.Tensor:  # [B, V]
    cache = BatchCache(stack.num_layers)
    for prompt in prompts:
        prefill(stack, prompt, cache=cache.row(cache.add_row()))
    positions = torch.tensor([[len(p)] for p in prompts])
    hidden = stack.run(stack.embed(torch.tensor([[t] for t in tokens])), 0, stack.num_layers, cache.view(), positions,
                       None, None, [1] * len(prompts))
    return stack.logits(hidden)[:, -1]


@pytest.mark.parametrize("row_attention", [True, False])
def test_batched_row_equals_alone_in_bf16(row_attention):
    """Catches padded keys reaching a row's attention: the bf16 SDPA kernel rounds differently over more (masked)
    keys, which flips greedy tokens of a real model. Padded attention (row attention off) must differ somewhere,
    so the test can see the bug it guards against."""
    model = tiny_llama(97, layers=2, hidden=64).to(torch.bfloat16)
    stack = LayerStack(model)
    assert model.config._attn_implementation == ROW_SDPA and stack.row_attention
    stack.row_attention = row_attention
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    tokens = [5, 6, 7, 8]
    batched = decode_step_logits(stack, prompts, tokens)
    with torch.inference_mode():
        alone = [stack.logits(stack.run(stack.embed(torch.tensor([[t]])), 0, stack.num_layers, pre.cache,
                                        torch.tensor([len(p)])))[0, -1]
                 for p, t in zip(prompts, tokens) for pre in [prefill(stack, p)]]
    equal = [torch.equal(batched[b], alone[b]) for b in range(len(prompts))]
    assert all(equal) if row_attention else not all(equal), equal
