"""verify_sampling: hand-built accept/reject cases, Triton vs torch reference equality on shared noise,
and the statistical guarantee of speculative sampling (emitted tokens follow the target distribution)."""
import math
import os

import pytest
import torch

from ctxdraft.triton_kernels import SamplingNoise, draw_noise, verify_greedy, verify_sampling
from ctxdraft.triton_kernels.dispatch import MAX_BLOCK_V

IMPLS = ("torch", "triton")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"
NEG = -1e4  # a logit whose probability is exactly 0 in fp32


def tensor(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) if p > 0 else NEG for p in probs]


def race_won_by(token_id: int, B: int, V: int) -> torch.Tensor:
    """[B, V] exponentials under which token_id wins any race where its weight is not tiny."""
    exponentials = torch.ones(B, V, device=DEVICE)
    exponentials[:, token_id] = 1e-6
    return exponentials


@pytest.mark.parametrize("impl", IMPLS)
def test_accept_then_reject_with_one_hot_q(impl):
    # p = [0.5, 0.25, 0.25, 0] at every position; a lookup draft (one-hot q) proposes 0 then 0.
    logits = tensor([[log_probs([0.5, 0.25, 0.25, 0.0])] * 3])  # [1, 3, 4]
    noise = SamplingNoise(uniforms=tensor([[0.4, 0.6]]), exponentials=race_won_by(2, 1, 4))
    result = verify_sampling(logits, tensor([[0, 0]], torch.long), tensor([2], torch.long), None, tensor([1.0]),
                             impl=impl, noise=noise)
    # u=0.4 < p/q = 0.5 accepts; u=0.6 rejects; the residual p minus one-hot(0) is {1: .25, 2: .25}, race -> 2.
    assert result.out_ids.tolist() == [[0, 2, -1]]
    assert result.num_accepted.tolist() == [1]


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_excludes_the_rejected_token(impl):
    logits = tensor([[log_probs([0.5, 0.25, 0.25, 0.0])] * 2])
    # Token 0 wins the race on p, but the residual max(p - q, 0) has no mass at token 0 when q[0] >= p[0].
    draft_probs = tensor([[[0.9, 0.05, 0.05, 0.0]]])
    noise = SamplingNoise(uniforms=tensor([[0.99]]), exponentials=race_won_by(0, 1, 4))
    result = verify_sampling(logits, tensor([[0]], torch.long), tensor([1], torch.long), draft_probs, tensor([1.0]),
                             impl=impl, noise=noise)
    assert result.num_accepted.tolist() == [0]
    assert result.out_ids[0, 0].item() in (1, 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_accept_all_then_bonus_with_draft_probs(impl):
    logits = tensor([[log_probs([0.2, 0.4, 0.4, 0.0])] * 3])
    draft_probs = tensor([[[0.1, 0.8, 0.1, 0.0], [0.4, 0.3, 0.3, 0.0]]])
    # p/q at the drafts: 0.4/0.8 = 0.5 (u=0.45 accepts), 0.2/0.4 = 0.5 (u=0.3 accepts). The exponentials
    # favour token 3, but p[3] = 0 cannot win a race; the bonus is the runner-up, 1.
    exponentials = torch.ones(1, 4, device=DEVICE)
    exponentials[0, 3], exponentials[0, 1] = 1e-6, 1e-3
    noise = SamplingNoise(uniforms=tensor([[0.45, 0.3]]), exponentials=exponentials)
    result = verify_sampling(logits, tensor([[1, 0]], torch.long), tensor([2], torch.long), draft_probs, tensor([1.0]),
                             impl=impl, noise=noise)
    assert result.out_ids.tolist() == [[1, 0, 1]]
    assert result.accepted_mask.tolist() == [[True, True]]


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_draft_probability_rejects_and_zero_target_probability_rejects(impl):
    logits = tensor([[log_probs([0.5, 0.5, 0.0])] * 2] * 2)  # [2, 2, 3]
    draft_probs = tensor([[[0.0, 1.0, 0.0]], [[0.5, 0.0, 0.5]]])
    tiny_u = tensor([[1e-7], [1e-7]])  # would accept anything with p/q > 1e-7
    noise = SamplingNoise(uniforms=tiny_u, exponentials=race_won_by(1, 2, 3))
    # Row 0 drafts token 0 with q = 0: rejected. Row 1 drafts token 2 with p = 0: rejected.
    result = verify_sampling(logits, tensor([[0], [2]], torch.long), tensor([1, 1], torch.long), draft_probs,
                             tensor([1.0, 1.0]), impl=impl, noise=noise)
    assert result.num_accepted.tolist() == [0, 0]
    assert result.out_ids[:, 0].tolist() == [0, 1]  # row 0: residual {0: 0.5} only; row 1: race on residual -> 1


@pytest.mark.parametrize("impl", IMPLS)
def test_noise_of_the_wrong_shape_is_refused_on_both_paths(impl):
    """Noise for one row would broadcast over both rows on the torch path: both paths refuse it alike."""
    logits, draft_ids = torch.zeros(2, 3, 4, device=DEVICE), torch.zeros(2, 2, dtype=torch.long, device=DEVICE)
    one_row = SamplingNoise(torch.full((1, 2), 0.5, device=DEVICE), torch.ones(1, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"noise must hold uniforms \[B, K\] = \(2, 2\)"):
        verify_sampling(logits, draft_ids, tensor([2, 2], torch.long), None, tensor([1.0, 1.0]), impl=impl,
                        noise=one_row)
    with pytest.raises(ValueError, match=r"temperature must be \[B\]"):
        verify_sampling(logits, draft_ids, tensor([2, 2], torch.long), None, tensor([1.0]), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_draft_k_zero_and_single_token_vocab(impl):
    logits = tensor([[log_probs([0.1, 0.9])]])  # K = 0: the row emits one sample of p
    noise = SamplingNoise(uniforms=torch.empty(1, 0, device=DEVICE), exponentials=race_won_by(0, 1, 2))
    k_zero = verify_sampling(logits, torch.empty(1, 0, dtype=torch.long, device=DEVICE), tensor([0], torch.long),
                             None, tensor([1.0]), impl=impl, noise=noise)
    assert k_zero.out_ids.tolist() == [[0]] and k_zero.num_accepted.tolist() == [0]

    generator = torch.Generator(device=DEVICE).manual_seed(0)
    v_one = verify_sampling(torch.randn(2, 3, 1, device=DEVICE), torch.zeros(2, 2, dtype=torch.long, device=DEVICE),
                            tensor([2, 0], torch.long), None, tensor([0.7, 1.0]), generator=generator, impl=impl)
    assert v_one.out_ids.tolist() == [[0, 0, 0], [0, -1, -1]] and v_one.num_accepted.tolist() == [2, 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_temperature_rows_are_greedy(impl):
    B, K, V = 6, 4, 50
    logits = torch.randn(B, K + 1, V, device=DEVICE)
    target_ids = logits.argmax(-1)
    draft_ids = target_ids[:, :K].clone()
    draft_ids[::2, 2] = (draft_ids[::2, 2] + 1) % V  # even rows reject at position 2
    num_draft = tensor([4, 4, 3, 2, 0, 4], torch.long)
    temperature = tensor([0.0, 0.0, 0.0, -1.0, 0.0, 0.0])
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    result = verify_sampling(logits, draft_ids, num_draft, torch.softmax(torch.randn(B, K, V, device=DEVICE), -1),
                             temperature, generator=generator, impl=impl)
    expected = verify_greedy(logits, draft_ids, num_draft, impl="torch")
    assert torch.equal(result.out_ids, expected.out_ids)
    assert torch.equal(result.num_accepted, expected.num_accepted)


def random_case(B, K, V, dtype, with_probs, seed):
    """Ragged, mixed greedy/stochastic batch with draft ids drawn near the target (so some are accepted)."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, K + 1, V, generator=generator) * 2).to(dtype)
    draft_probs = torch.softmax(logits[:, :K].float() + torch.randn(B, K, V, generator=generator), -1)
    draft_ids = torch.multinomial(draft_probs.reshape(B * K, V), 1, generator=generator).reshape(B, K) if K else \
        torch.empty(B, 0, dtype=torch.long)
    num_draft = torch.randint(0, K + 1, (B,), generator=generator)
    num_draft[0] = K
    draft_ids = torch.where(torch.arange(K)[None, :] < num_draft[:, None], draft_ids, -1)  # -1 padding
    temperature = torch.rand(B, generator=generator) + 0.5
    temperature[1::3] = 0.0  # every third row greedy
    noise = draw_noise(B, K, V, torch.device("cpu"), generator)
    noise = SamplingNoise(noise.uniforms.to(DEVICE), noise.exponentials.to(DEVICE))
    probs = draft_probs.to(dtype).to(DEVICE) if with_probs else None
    return logits.to(DEVICE), draft_ids.to(DEVICE), num_draft.to(DEVICE), probs, temperature.to(DEVICE), noise


@pytest.mark.parametrize("with_probs", [True, False], ids=["q", "one_hot_q"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [0, 1, 4, 8])
@pytest.mark.parametrize("V", [1, 2, MAX_BLOCK_V + 1, 1000, 49152])
def test_triton_matches_reference(V, K, dtype, with_probs):
    B = 3 if V == 49152 else 8
    logits, draft_ids, num_draft, draft_probs, temperature, noise = random_case(
        B, K, V, dtype, with_probs, seed=V * 100 + K * 2 + with_probs)
    args = (logits, draft_ids, num_draft, draft_probs, temperature)
    expected = verify_sampling(*args, impl="torch", noise=noise)
    result = verify_sampling(*args, impl="triton", noise=noise)
    assert torch.equal(result.out_ids, expected.out_ids)
    assert torch.equal(result.num_accepted, expected.num_accepted)
    assert (result.out_ids < V).all()


def test_triton_matches_reference_on_many_rows():
    """Enough rows that accepts, rejections, residual samples and bonus tokens all occur many times."""
    logits, draft_ids, num_draft, draft_probs, temperature, noise = random_case(
        512, 4, 37, torch.float32, with_probs=True, seed=7)
    args = (logits, draft_ids, num_draft, draft_probs, temperature)
    expected = verify_sampling(*args, impl="torch", noise=noise)
    result = verify_sampling(*args, impl="triton", noise=noise)
    assert torch.equal(result.out_ids, expected.out_ids)
    rejected = expected.num_accepted < num_draft
    assert 50 < rejected.sum() < 500 and (expected.num_accepted > 0).sum() > 50  # the case is not degenerate


# Statistical guarantee: whatever q, the first emitted token of every row is distributed as p_0.
TARGET = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.0, 0.30])
DRAFT = torch.tensor([0.40, 0.05, 0.25, 0.05, 0.20, 0.05])  # far from TARGET (TV = 0.6)
TEMPERATURE = 0.8


def first_token_tv(impl: str, num_samples: int, with_probs: bool, seed: int, claimed_q=None) -> float:
    """TV distance between the first emitted token's empirical distribution and the target's, one batched call.

    ``claimed_q`` passes the verifier a q other than the one the drafts were sampled from (a caller bug).
    """
    B, K, V = num_samples, 2, len(TARGET)
    generator = torch.Generator().manual_seed(seed)
    # logits / T must give TARGET: logits = T * log(TARGET), with a probability-0 token.
    logits = (TEMPERATURE * torch.tensor(log_probs(TARGET.tolist()))).expand(B, K + 1, V)
    draft_ids = torch.multinomial(DRAFT, B * K, replacement=True, generator=generator).reshape(B, K)
    num_draft = torch.randint(0, K + 1, (B,), generator=generator)  # n = 0 rows emit a bonus sample of p_0
    draft_probs = (DRAFT if claimed_q is None else claimed_q).expand(B, K, V) if with_probs else None
    temperature = torch.full((B,), TEMPERATURE)
    noise = draw_noise(B, K, V, torch.device("cpu"), generator)
    noise = SamplingNoise(noise.uniforms.to(DEVICE), noise.exponentials.to(DEVICE))
    result = verify_sampling(logits.to(DEVICE), draft_ids.to(DEVICE), num_draft.to(DEVICE),
                             None if draft_probs is None else draft_probs.to(DEVICE), temperature.to(DEVICE),
                             impl=impl, noise=noise)
    first = result.out_ids[:, 0].cpu()
    empirical = torch.bincount(first, minlength=V).float() / B
    return 0.5 * (empirical - TARGET).abs().sum().item()


def tv_bound(num_samples: int) -> float:
    """~4x the expected TV of an exact sampler: 0.5 * sum_v sqrt(2 p_v / (pi n)) <= 0.4 sqrt(V / n)."""
    return 1.6 * math.sqrt(len(TARGET) / num_samples)


@pytest.mark.parametrize("with_probs", [True, False], ids=["q", "one_hot_q"])
def test_reference_emits_the_target_distribution(with_probs):
    for num_samples in (1_000, 10_000, 100_000):  # the distance shrinks like 1/sqrt(n)
        assert first_token_tv("torch", num_samples, with_probs, seed=num_samples) < tv_bound(num_samples)


@pytest.mark.parametrize("with_probs", [True, False], ids=["q", "one_hot_q"])
def test_triton_emits_the_target_distribution(with_probs):
    for num_samples in (1_000, 8_000):
        assert first_token_tv("triton", num_samples, with_probs, seed=num_samples + 1) < tv_bound(num_samples)


def test_the_statistical_test_can_fail():
    """Verifying against a q the drafts were not sampled from breaks the guarantee, and the bound catches it."""
    uniform = torch.full((len(TARGET),), 1.0 / len(TARGET))
    assert first_token_tv("torch", 10_000, True, seed=3, claimed_q=uniform) > tv_bound(10_000)
