"""verify_tree_greedy / verify_tree_sampling: hand-built trees on both paths, chains equal to the chain verifiers,
Triton vs torch reference equality on shared noise, and chi-square tests that tree sampling keeps the target's
distribution."""
import importlib
import math
import os

import pytest
import torch
from tiny import assert_follows

from ctxdraft.triton_kernels import (
    SamplingNoise,
    draw_noise,
    verify_greedy,
    verify_sampling,
    verify_tree_greedy,
    verify_tree_sampling,
)
from ctxdraft.triton_kernels.dispatch import MAX_BLOCK_V

# The package exports the function under the module's name, so reach the module itself through importlib.
tree_sampling_module = importlib.import_module("ctxdraft.triton_kernels.verify_tree_sampling")

IMPLS = ("torch", "triton")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"
NEG = -1e4  # a logit whose probability is exactly 0 in fp32
SIZES = [(1, 4), (2, 1), (MAX_BLOCK_V + 1, 5), (1000, 16), (1000, 0), (49152, 5)]  # (V, N)


def tensor(values, dtype=torch.long):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) if p > 0 else NEG for p in probs]


def one_hot_logits(target_ids: list[list[int]], V: int) -> torch.Tensor:
    """[B, N+1, V] logits whose argmax at each position is the given id."""
    return torch.nn.functional.one_hot(tensor(target_ids), V).float() * 5.0 - 1.0


# root -+- node 0 (2) -+- node 2 (4)
#       |              +- node 4 (6)
#       +- node 1 (3) --- node 3 (5) --- node 5 (7)
TREE_IDS, PARENTS = [2, 3, 4, 5, 6, 7], [-1, -1, 0, 1, 0, 3]


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_hand_built_tree(impl):
    targets = [  # the target's argmax at positions 0 (root) and 1 + i (after node i)
        [5, 0, 0, 0, 0, 0, 0],  # num_nodes 0: the root alone, bonus only
        [3, 0, 5, 0, 7, 0, 1],  # the deep path 1 -> 3 -> 5, then the bonus 1 at leaf 5
        [0, 2, 3, 0, 0, 0, 0],  # no child of the root matches: correction 0
        [3, 0, 0, 0, 0, 0, 0],  # the root's second child matches, none of its children: correction 0
        [2, 6, 0, 0, 0, 1, 0],  # node 0, then its second child node 4 (a leaf): bonus 1
        [3, 0, 5, 0, 7, 0, 1],  # as row 1 with num_nodes 3: node 3 is padding, so 5 is a correction at node 1
    ]
    B = len(targets)
    result = verify_tree_greedy(one_hot_logits(targets, V=8), tensor([TREE_IDS] * B), tensor([PARENTS] * B),
                                tensor([0, 6, 6, 6, 6, 3]), impl=impl)
    assert result.out_ids.tolist() == [
        [5, -1, -1, -1, -1, -1, -1], [3, 5, 7, 1, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1],
        [3, 0, -1, -1, -1, -1, -1], [2, 6, 1, -1, -1, -1, -1], [3, 5, -1, -1, -1, -1, -1],
    ]
    assert result.path_nodes.tolist() == [
        [-1] * 6, [1, 3, 5, -1, -1, -1], [-1] * 6, [1, -1, -1, -1, -1, -1], [0, 4, -1, -1, -1, -1],
        [1, -1, -1, -1, -1, -1],
    ]
    assert result.num_accepted.tolist() == [0, 3, 0, 1, 2, 1]
    assert result.num_emitted.tolist() == [1, 4, 1, 2, 3, 2]
    assert result.out_ids.dtype == result.path_nodes.dtype == result.num_accepted.dtype == torch.int64


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_duplicate_siblings_take_the_first_in_node_order(impl):
    # Nodes 0 and 1 both carry token 2; only node 1 has a child (token 4, which the target would accept).
    result = verify_tree_greedy(one_hot_logits([[2, 3, 4, 0]], V=5), tensor([[2, 2, 4]]), tensor([[-1, -1, 1]]),
                                tensor([3]), impl=impl)
    assert result.path_nodes.tolist() == [[0, -1, -1]] and result.out_ids.tolist() == [[2, 3, -1, -1]]


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_no_nodes_and_single_token_vocab(impl):
    n_zero = verify_tree_greedy(one_hot_logits([[2], [0]], V=3), tensor([[], []]).reshape(2, 0),
                                tensor([[], []]).reshape(2, 0), tensor([0, 0]), impl=impl)
    assert n_zero.out_ids.tolist() == [[2], [0]] and n_zero.path_nodes.shape == (2, 0)
    # V = 1 accepts every child it reaches: node 0 first, then node 0's child node 2 (node 1 is a sibling).
    v_one = verify_tree_greedy(torch.randn(1, 4, 1, device=DEVICE), tensor([[0, 0, 0]]), tensor([[-1, -1, 0]]),
                               tensor([3]), impl=impl)
    assert v_one.path_nodes.tolist() == [[0, 2, -1]] and v_one.out_ids.tolist() == [[0, 0, 0, -1]]


def chain_case(B, N, V, dtype, seed):
    """Ragged chains (parents -1, 0, 1, ...) drafted near the target, -1 padded."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, N + 1, V, generator=generator) * 3).to(dtype)
    guesses = torch.randint(0, V, (B, N), generator=generator)
    agree = torch.rand(B, N, generator=generator) < 0.7
    draft_ids = torch.where(agree, logits.float().argmax(-1)[:, :N], guesses)
    num_draft = torch.randint(0, N + 1, (B,), generator=generator)
    num_draft[0] = N
    draft_ids = torch.where(torch.arange(N)[None, :] < num_draft[:, None], draft_ids, -1)
    parents = (torch.arange(N) - 1).expand(B, N)
    return logits.to(DEVICE), draft_ids.to(DEVICE), parents.to(DEVICE), num_draft.to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V,N", SIZES)
def test_greedy_chain_equals_verify_greedy(V, N, impl):
    logits, draft_ids, parents, num_draft = chain_case(3 if V == 49152 else 6, N, V, torch.float32, seed=V + N)
    expected = verify_greedy(logits, draft_ids, num_draft, impl="torch")
    result = verify_tree_greedy(logits, draft_ids, parents, num_draft, impl=impl)
    assert torch.equal(result.out_ids, expected.out_ids)
    assert torch.equal(result.num_accepted, expected.num_accepted)
    depths = torch.arange(N, device=DEVICE)[None, :]
    assert torch.equal(result.path_nodes, torch.where(depths < expected.num_accepted[:, None], depths, -1))


def random_trees(B, N, V, dtype, seed, match_rate=0.6):
    """Ragged random trees whose nodes often carry the target's argmax at their parent (so paths get accepted),
    with duplicate siblings and ids outside the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, N + 1, V, generator=generator) * 2).to(dtype)
    target_ids = logits.float().argmax(-1)
    parents = torch.full((B, N), -1, dtype=torch.long)
    tree_ids = torch.zeros(B, N, dtype=torch.long)
    for node in range(N):
        any_earlier = torch.randint(-1, node, (B,), generator=generator)
        parents[:, node] = torch.where(torch.rand(B, generator=generator) < 0.5, node - 1, any_earlier)
        at_parent = target_ids.gather(1, parents[:, node, None] + 1)[:, 0]
        guess = torch.randint(0, V, (B,), generator=generator)
        tree_ids[:, node] = torch.where(torch.rand(B, generator=generator) < match_rate, at_parent, guess)
    tree_ids[torch.rand(B, N, generator=generator) < 0.05] = V + 2  # outside the vocabulary: always rejected
    num_nodes = torch.randint(0, N + 1, (B,), generator=generator)
    num_nodes[0] = N
    # Half the rows keep real-looking nodes in their padding (accepted if read), half hold garbage (read: a crash).
    padding = torch.arange(N)[None, :] >= num_nodes[:, None]
    garbage = padding & (torch.rand(B, 1, generator=generator) < 0.5)
    tree_ids[garbage], parents[garbage] = -5, 3 * N + 7
    temperature = torch.rand(B, generator=generator) + 0.5
    temperature[1::3] = 0.0  # every third row greedy
    noise = draw_noise(B, N, V, torch.device("cpu"), generator)
    noise = SamplingNoise(noise.uniforms.to(DEVICE), noise.exponentials.to(DEVICE))
    tree = (logits, tree_ids, parents, num_nodes)
    return tuple(t.to(DEVICE) for t in tree), temperature.to(DEVICE), noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,N", SIZES)
def test_greedy_triton_matches_reference(V, N, dtype):
    tree, _, _ = random_trees(3 if V == 49152 else 8, N, V, dtype, seed=V * 10 + N)
    expected = verify_tree_greedy(*tree, impl="torch")
    result = verify_tree_greedy(*tree, impl="triton")
    for name in ("out_ids", "path_nodes", "num_accepted"):
        assert torch.equal(getattr(result, name), getattr(expected, name)), name
    assert (result.out_ids < V).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_sampling_renormalises_the_residual_and_walks_deeper(impl):
    probs = [[0.5, 0.25, 0.25, 0.0], [0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]]
    logits = tensor([[log_probs(p) for p in probs]], torch.float32)  # [1, 4, 4]
    exponentials = torch.ones(1, 4, device=DEVICE)
    exponentials[0, 3] = 1e-6  # token 3 wins any race it is in
    # Node 0 (token 0): u = 0.6 >= 0.5 rejects. Node 1 (token 1): r(1) = 0.25 / (1 - 0.5) = 0.5 > u = 0.4 accepts
    # (without the renormalisation 0.4 >= 0.25 would reject). Node 2 (token 2, child of node 1): 0.3 < 0.5
    # accepts. Node 2 is a leaf: the bonus is a sample of p after node 2, where the race picks 3.
    noise = SamplingNoise(uniforms=tensor([[0.6, 0.4, 0.3]], torch.float32), exponentials=exponentials)
    result = verify_tree_sampling(logits, tensor([[0, 1, 2]]), tensor([[-1, -1, 1]]), tensor([3]),
                                  tensor([1.0], torch.float32), impl=impl, noise=noise)
    assert result.out_ids.tolist() == [[1, 2, 3, -1]]
    assert result.path_nodes.tolist() == [[1, 2, -1]]


@pytest.mark.parametrize("impl", IMPLS)
def test_sampling_rejects_a_duplicate_sibling_and_excludes_every_rejected_token(impl):
    logits = tensor([[log_probs([0.5, 0.25, 0.25, 0.0])] * 4], torch.float32)
    # Nodes 0 and 1 carry token 0, node 2 token 2. u = 0.9 rejects node 0; node 1, a duplicate, must be rejected
    # even with u = 1e-7; node 2: r(2) = 0.25 / 0.5 = 0.5 <= u = 0.99 rejects. The residual is {1: 0.25} alone, so
    # the correction is 1 although the exponentials favour 0, then 2.
    exponentials = torch.ones(1, 4, device=DEVICE)
    exponentials[0, 0], exponentials[0, 2] = 1e-6, 1e-5
    noise = SamplingNoise(uniforms=tensor([[0.9, 1e-7, 0.99]], torch.float32), exponentials=exponentials)
    result = verify_tree_sampling(logits, tensor([[0, 0, 2]]), tensor([[-1, -1, -1]]), tensor([3]),
                                  tensor([1.0], torch.float32), impl=impl, noise=noise)
    assert result.out_ids.tolist() == [[1, -1, -1, -1]] and result.num_accepted.tolist() == [0]


@pytest.mark.parametrize("impl", IMPLS)
def test_sampling_no_nodes_and_single_token_vocab(impl):
    noise = SamplingNoise(uniforms=torch.empty(1, 0, device=DEVICE), exponentials=tensor([[1.0, 1e-6]], torch.float32))
    n_zero = verify_tree_sampling(tensor([[log_probs([0.9, 0.1])]], torch.float32), tensor([[]]).reshape(1, 0),
                                  tensor([[]]).reshape(1, 0), tensor([0]), tensor([1.0], torch.float32),
                                  impl=impl, noise=noise)
    assert n_zero.out_ids.tolist() == [[1]]  # the bonus: a sample of p at the root
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    v_one = verify_tree_sampling(torch.randn(2, 4, 1, device=DEVICE), tensor([[0, 0, 0]] * 2),
                                 tensor([[-1, -1, 0]] * 2), tensor([3, 3]), tensor([0.7, 0.0], torch.float32),
                                 generator=generator, impl=impl)
    assert v_one.path_nodes.tolist() == [[0, 2, -1]] * 2 and v_one.out_ids.tolist() == [[0, 0, 0, -1]] * 2


@pytest.mark.parametrize("impl", IMPLS)
def test_sampling_zero_temperature_rows_are_greedy(impl):
    tree, _, _ = random_trees(8, 6, 50, torch.float32, seed=5, match_rate=0.8)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    result = verify_tree_sampling(*tree, torch.zeros(8, device=DEVICE), generator=generator, impl=impl)
    expected = verify_tree_greedy(*tree, impl="torch")
    assert torch.equal(result.out_ids, expected.out_ids) and torch.equal(result.path_nodes, expected.path_nodes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V,N", SIZES)
def test_sampling_chain_equals_verify_sampling_with_one_hot_q(V, N, impl):
    """Same noise, same ids: the first child's test is exactly verify_sampling's u < p(d) / q(d) with q one-hot."""
    B = 3 if V == 49152 else 8
    (logits, _, _, _), temperature, noise = random_trees(B, N, V, torch.float32, seed=V + 3 * N)
    _, draft_ids, parents, num_draft = chain_case(B, N, V, torch.float32, seed=V + 3 * N)
    expected = verify_sampling(logits, draft_ids, num_draft, None, temperature, impl="torch", noise=noise)
    result = verify_tree_sampling(logits, draft_ids, parents, num_draft, temperature, impl=impl, noise=noise)
    assert torch.equal(result.out_ids, expected.out_ids)
    assert torch.equal(result.num_accepted, expected.num_accepted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,N", SIZES)
def test_sampling_triton_matches_reference(V, N, dtype):
    tree, temperature, noise = random_trees(3 if V == 49152 else 8, N, V, dtype, seed=V * 100 + N)
    expected = verify_tree_sampling(*tree, temperature, impl="torch", noise=noise)
    result = verify_tree_sampling(*tree, temperature, impl="triton", noise=noise)
    for name in ("out_ids", "path_nodes", "num_accepted"):
        assert torch.equal(getattr(result, name), getattr(expected, name)), name
    assert (result.out_ids < V).all()


def test_sampling_triton_matches_reference_on_many_rows():
    """Enough rows that accepts, renormalised accepts, residual samples and bonus tokens all occur many times."""
    tree, temperature, noise = random_trees(1024, 8, 37, torch.float32, seed=7)
    expected = verify_tree_sampling(*tree, temperature, impl="torch", noise=noise)
    result = verify_tree_sampling(*tree, temperature, impl="triton", noise=noise)
    assert torch.equal(result.out_ids, expected.out_ids) and torch.equal(result.path_nodes, expected.path_nodes)
    _, _, parents, num_nodes = tree
    node_ids = torch.arange(8, device=DEVICE)[None, :]
    root_children = (parents == -1) & (node_ids < num_nodes[:, None])
    first = expected.path_nodes[:, :1]
    after_a_rejection = (root_children & (node_ids < first)).any(dim=1) & (temperature > 0)
    assert (expected.num_accepted >= 2).sum() > 100 and (expected.num_accepted == 0).sum() > 100
    assert after_a_rejection.sum() > 10  # a root child accepted after an earlier root child was rejected


def test_input_checks():
    logits, ids = torch.randn(2, 4, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="tree_ids must be"):
        verify_tree_greedy(logits, ids[:, :2], ids[:, :2], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="parents must be"):
        verify_tree_greedy(logits, ids, ids[:, :2], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="noise must hold"):
        verify_tree_sampling(logits, ids, ids, torch.zeros(2, dtype=torch.long), torch.ones(2),
                             noise=draw_noise(2, 2, 5, torch.device("cpu")))


def test_int32_and_strided_inputs():
    (logits, tree_ids, parents, num_nodes), temperature, noise = random_trees(16, 6, 300, torch.float32, seed=2)
    wider = torch.randn(16, 9, 300, device=DEVICE)
    wider[:, 2:] = logits
    view = wider[:, 2:]  # the last N+1 positions of a longer forward: a non-contiguous view
    expected = verify_tree_sampling(logits, tree_ids, parents, num_nodes, temperature, impl="torch", noise=noise)
    result = verify_tree_sampling(view, tree_ids.int(), parents.int(), num_nodes.int(), temperature, impl="triton",
                                  noise=noise)
    assert torch.equal(result.out_ids, expected.out_ids)
    greedy = verify_tree_greedy(view, tree_ids.int(), parents.int(), num_nodes.int(), impl="triton")
    assert torch.equal(greedy.out_ids, verify_tree_greedy(logits, tree_ids, parents, num_nodes, impl="torch").out_ids)


# Statistical guarantee. The target is a bigram model over V = 6 tokens: the first token follows FIRST, the one
# after token x follows NEXT[x]; so the tree forward's distribution after node i is NEXT[tree_ids[i]]. The tree
# has a duplicate root child, a root child with p = 0 and grandchildren, so every rule of the walk is exercised.
FIRST = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.0, 0.30])
NEXT = torch.softmax(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 1.5, -1)
NEXT[2, 5] = 0.0  # a zero inside a conditional too
NEXT /= NEXT.sum(-1, keepdim=True)
# root -+- 0 (1) -+- 3 (2)
#       |         +- 4 (0) --- 7 (3)
#       +- 1 (3) --- 5 (3)
#       +- 2 (1)   a duplicate of node 0
#       +- 6 (4)   p = 0 at the root
STAT_IDS, STAT_PARENTS = [1, 3, 1, 2, 0, 3, 4, 3], [-1, -1, -1, 0, 0, 1, -1, 4]
TEMPERATURE = 0.8


def emitted_prefixes(impl: str, B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first token [B], second token [B]) of B independent verifications of the same tree. A row that emits one
    token gets its second from the target itself, as the next decoding step would."""
    generator = torch.Generator().manual_seed(seed)
    dists = torch.stack([FIRST] + [NEXT[token] for token in STAT_IDS])  # [N+1, V]
    logits = (TEMPERATURE * torch.tensor([log_probs(p) for p in dists.tolist()])).expand(B, -1, -1)
    N, V = len(STAT_IDS), len(FIRST)
    noise = draw_noise(B, N, V, torch.device("cpu"), generator)
    result = verify_tree_sampling(
        logits.to(DEVICE), tensor([STAT_IDS]).expand(B, N), tensor([STAT_PARENTS]).expand(B, N),
        tensor([N] * B), torch.full((B,), TEMPERATURE, device=DEVICE), impl=impl,
        noise=SamplingNoise(noise.uniforms.to(DEVICE), noise.exponentials.to(DEVICE)))
    out_ids, num_accepted = result.out_ids.cpu(), result.num_accepted.cpu()
    first = out_ids[:, 0]
    next_step = torch.multinomial(NEXT[first], 1, generator=generator)[:, 0]
    second = torch.where(num_accepted >= 1, out_ids[:, 1], next_step)
    assert (num_accepted == 2).sum() > B // 20 and (num_accepted == 0).sum() > B // 20  # the walk goes deep
    return first, second


@pytest.mark.parametrize("impl", IMPLS)
def test_tree_sampling_keeps_the_target_distribution(impl):
    """Chi-square of the first token and of the 2-token prefix against FIRST[x] * NEXT[x, y]. Catches a residual
    that is not renormalised, a duplicate sibling accepted, a rejected token left in the residual, a child tested
    at the wrong position."""
    B = 20_000
    first, second = emitted_prefixes(impl, B, seed=1 if impl == "torch" else 2)
    V = len(FIRST)
    assert_follows(torch.bincount(first, minlength=V).float(), FIRST, B)
    pairs = torch.bincount(first * V + second, minlength=V * V).float()
    assert_follows(pairs, (FIRST[:, None] * NEXT).flatten(), B)


def test_the_chi_square_test_catches_a_residual_that_is_not_renormalised(monkeypatch):
    """Accepting a later sibling with p(c) instead of p(c) / (1 - p(S)) under-emits it; the test must see that."""
    monkeypatch.setattr(tree_sampling_module, "_log_remaining", lambda mass: torch.zeros_like(mass))
    first, _ = emitted_prefixes("torch", 20_000, seed=1)
    with pytest.raises(AssertionError):
        assert_follows(torch.bincount(first, minlength=len(FIRST)).float(), FIRST, 20_000)
