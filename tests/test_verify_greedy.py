"""verify_greedy: hand-built accept/reject cases on both paths, Triton vs torch reference equality."""
import os
import subprocess
import sys

import pytest
import torch

from ctxdraft.triton_kernels import verify_greedy
from ctxdraft.triton_kernels.dispatch import MAX_BLOCK_V

IMPLS = ("torch", "triton")
# The Triton path runs on CUDA when real kernels are wanted (TRITON_INTERPRET=0), else interpreted on CPU.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"


def one_hot_logits(target_ids: list[list[int]], V: int) -> torch.Tensor:
    """[B, K+1, V] logits whose argmax at each position is the given id."""
    ids = torch.tensor(target_ids, device=DEVICE)
    return torch.nn.functional.one_hot(ids, V).float() * 5.0 - 1.0


def run(impl, logits, draft, num_draft):
    draft = torch.tensor(draft, dtype=torch.long, device=DEVICE).reshape(logits.shape[0], logits.shape[1] - 1)
    return verify_greedy(logits, draft, torch.tensor(num_draft, device=DEVICE), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_built_cases(impl):
    logits = one_hot_logits([[3, 1, 4, 2], [3, 1, 4, 2], [3, 1, 4, 2], [3, 1, 4, 2], [3, 1, 4, 2]], V=6)
    result = run(
        impl,
        logits,
        [
            [3, 1, 4],  # accept all: the bonus token 2 follows
            [0, 1, 4],  # reject first: correction 3
            [3, 1, 5],  # reject the third: two accepted, then the correction 4
            [9, 9, 9],  # empty draft: the target's own next token (padding ids are ignored)
            [3, -1, -1],  # ragged: one draft token, accepted, then the bonus at position 1
        ],
        [3, 3, 3, 0, 1],
    )
    expected = [[3, 1, 4, 2], [3, -1, -1, -1], [3, 1, 4, -1], [3, -1, -1, -1], [3, 1, -1, -1]]
    assert result.out_ids.tolist() == expected
    assert result.num_accepted.tolist() == [3, 0, 2, 0, 1]
    assert result.accepted_mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert result.num_emitted.tolist() == [4, 1, 3, 1, 2]
    assert result.out_ids.dtype == result.num_accepted.dtype == torch.int64


@pytest.mark.parametrize("impl", IMPLS)
def test_no_draft_tokens_and_single_token_vocab(impl):
    k_zero = run(impl, one_hot_logits([[2], [0]], V=3), [[], []], [0, 0])  # K = 0: one token per row
    assert k_zero.out_ids.tolist() == [[2], [0]] and k_zero.num_accepted.tolist() == [0, 0]
    v_one = run(impl, torch.randn(2, 3, 1, device=DEVICE), [[0, 0], [0, 0]], [2, 1])  # V = 1 accepts all
    assert v_one.out_ids.tolist() == [[0, 0, 0], [0, 0, -1]] and v_one.num_accepted.tolist() == [2, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_the_first_index_across_tiles(impl):
    V = 3 * MAX_BLOCK_V
    logits = torch.zeros(1, 2, V, device=DEVICE)
    logits[0, 0, [7, MAX_BLOCK_V + 7]] = 2.0  # a tie within the first tile's row and across tiles
    logits[0, 1, [MAX_BLOCK_V + 1, 2 * MAX_BLOCK_V + 1]] = 2.0  # a tie between the second and third tiles
    result = run(impl, logits, [[7]], [1])
    assert result.out_ids.tolist() == [[7, MAX_BLOCK_V + 1]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fill", [float("-inf"), -1e30, torch.finfo(torch.float32).min])
def test_masked_tail_never_wins(impl, fill):
    """Regression for ids >= V from a masked tail tile (vLLM GHSA-8wr5-jm2h-8r4f): V = BLOCK + 1."""
    V = MAX_BLOCK_V + 1
    logits = torch.full((3, 2, V), fill, device=DEVICE)
    logits[1, :, V - 1] = fill / 2 if fill != float("-inf") else 0.0  # the lone tail lane is the max
    result = run(impl, logits, [[0], [V - 1], [5]], [1, 1, 1])
    assert (result.out_ids < V).all()
    # All-equal rows: torch.argmax's first index, 0; row 1 accepts V-1 and its bonus is V-1 again.
    assert result.out_ids.tolist() == [[0, 0], [V - 1, V - 1], [0, -1]]


def random_case(B, K, V, dtype, seed, match_rate=0.7):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, K + 1, V, generator=generator) * 3).to(dtype)
    target_ids = logits.float().argmax(-1)[:, :K]
    guesses = torch.randint(0, V, (B, K), generator=generator)
    draft_ids = torch.where(torch.rand(B, K, generator=generator) < match_rate, target_ids, guesses)
    num_draft = torch.randint(0, K + 1, (B,), generator=generator)
    num_draft[0] = K  # at least one full-length row, so the bonus path is always exercised
    draft_ids = torch.where(torch.arange(K)[None, :] < num_draft[:, None], draft_ids, -1)  # -1 padding
    return logits.to(DEVICE), draft_ids.to(DEVICE), num_draft.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [0, 1, 4, 8])
@pytest.mark.parametrize("V", [1, 2, MAX_BLOCK_V + 1, 1000, 49152])
def test_triton_matches_reference(V, K, dtype):
    B = 3 if V == 49152 else 7
    logits, draft_ids, num_draft = random_case(B, K, V, dtype, seed=V * 10 + K)
    expected = verify_greedy(logits, draft_ids, num_draft, impl="torch")
    result = verify_greedy(logits, draft_ids, num_draft, impl="triton")
    assert torch.equal(result.out_ids, expected.out_ids)
    assert torch.equal(result.num_accepted, expected.num_accepted)
    assert (result.out_ids < V).all()


def test_strided_and_int32_inputs():
    logits, draft_ids, num_draft = random_case(16, 4, 1000, torch.float32, seed=1)
    wider = torch.randn(16, 7, 1000, device=DEVICE)
    wider[:, 2:] = logits  # the last K+1 positions of a longer forward: a non-contiguous view
    view = wider[:, 2:]
    assert not view.is_contiguous()
    expected = verify_greedy(logits, draft_ids, num_draft, impl="torch")
    result = verify_greedy(view, draft_ids.int(), num_draft.int(), impl="triton")
    assert torch.equal(result.out_ids, expected.out_ids)


def test_input_checks():
    with pytest.raises(ValueError, match="draft_ids must be"):
        verify_greedy(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_package_works_without_triton():
    """The references need only torch; asking for the Triton path without triton is a clear error."""
    script = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from ctxdraft.triton_kernels import verify_greedy
logits, draft_ids, num_draft = torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long), torch.tensor([2, 1])
assert verify_greedy(logits, draft_ids, num_draft).out_ids.shape == (2, 3)
try:
    verify_greedy(logits, draft_ids, num_draft, impl="triton")
except RuntimeError as error:
    assert "needs the triton package" in str(error)
else:
    raise AssertionError("impl='triton' without triton did not raise")
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
