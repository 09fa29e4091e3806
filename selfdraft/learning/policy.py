"""The routing policy: which draft (arm) to use for a query, learned offline from logged rewards.

After Huang, Parthasarathi, Rezagholizadeh, Chandar (2024), "Context-Aware Assistant Selection for
Improved Inference Acceleration with Large Language Models" (arXiv 2408.08470): choosing a draft per
query is a contextual bandit. The context is a feature vector of the prompt, the arms are the drafts
with their settings (plus `none`), and the reward of an arm is the speed-up it gives over plain decoding.
`collect` logs the reward of *every* arm for every training prompt (full information is cheap under
greedy decoding, see DESIGN.md), and the policy is trained offline on that table with REINFORCE.

Terms used here:
- reward: an arm's modelled speed-up over plain decoding for one prompt (`none` has 1.0).
- oracle: the per-prompt best arm; its reward is the ceiling no policy can beat.
- regret: 1 - policy / oracle, on the mean speed-ups of a set of prompts.

Two feature kinds, each with its own network (`nn.Module` holds only weights and buffers):
- `hidden`: [B, F] floats, the target's prefill hidden state mean-pooled at one layer, then
  log(prompt_len). Normalisation (mean/std fitted on the training rows) is a buffer of the model,
  so it travels into the ONNX graph.
- `tokens`: [B, T] int64 prompt token ids right-padded with -1. Ids are hashed into
  `num_buckets` embedding rows (id % num_buckets), mean-pooled over the non-padding positions and
  joined with log(number of tokens), so a runtime holding only token ids can route.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..base import checks
from ..base.errors import CtxdraftError
from ..base.features import FEATURE_KINDS, PADDING_ID, hidden_spec, tokens_spec
from .rewards import RewardData

# ----------------------------------------------------------------------------------------------
# Networks


BASELINES = ("loo", "batch", "running")


@dataclass
class PolicyConfig:
    """Network and training settings. The defaults suit ~200 prompts and ~6-10 arms."""

    feature_kind: str = "hidden"  # "hidden" or "tokens"
    hidden_sizes: tuple[int, ...] = (64,)
    dropout: float = 0.1
    num_buckets: int = 4096  # tokens: embedding rows, ids are hashed with id % num_buckets
    embed_dim: int = 32  # tokens: embedding width
    embed_lr: float = 1.0  # tokens: SGD rate of the embeddings, times the median prompt length
    epochs: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # REINFORCE only
    num_samples: int = 4  # arms sampled per prompt per step
    baseline: str = "loo"  # "loo" (mean of the other samples of the same prompt), "batch", "running"
    entropy_coef: float = 0.01

    def validate(self) -> "PolicyConfig":
        """Every field checked (``base/checks.py``); returns self."""
        checks.choice("feature_kind", self.feature_kind, FEATURE_KINDS)
        if not isinstance(self.hidden_sizes, (tuple, list)):
            raise CtxdraftError(f"hidden_sizes must be a list of layer widths, got {self.hidden_sizes!r}")
        for width in self.hidden_sizes:
            checks.integer("hidden_sizes (a layer width)", width, minimum=1)
        checks.number("dropout", self.dropout, minimum=0.0, maximum=0.99)
        checks.integer("num_buckets", self.num_buckets, minimum=1)
        checks.integer("embed_dim", self.embed_dim, minimum=1)
        checks.number("embed_lr", self.embed_lr, minimum=0.0)
        checks.integer("epochs (--epochs)", self.epochs, minimum=1)
        checks.integer("batch_size", self.batch_size, minimum=1)
        checks.number("lr", self.lr, above=0.0)
        checks.number("weight_decay", self.weight_decay, minimum=0.0)
        checks.seed("seed (--seed)", self.seed)
        checks.integer("num_samples", self.num_samples, minimum=1)
        checks.choice("baseline", self.baseline, BASELINES)
        checks.number("entropy_coef", self.entropy_coef, minimum=0.0)
        return self

    @classmethod
    def from_dict(cls, d, **overrides) -> "PolicyConfig":
        """The config bundle.json stores under ``policy_model.config``, validated; ``overrides`` replace fields
        (None keeps the stored value)."""
        if not isinstance(d, dict):
            raise CtxdraftError(f"the policy config must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise CtxdraftError(f"the policy config has unknown fields {unknown}; was it written by a newer ctxdraft?")
        values = dict(d, **{k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("hidden_sizes", ()), (list, tuple)):
            values["hidden_sizes"] = tuple(values.get("hidden_sizes", ()))  # stored as a JSON list
        return cls(**values).validate()


def _mlp(in_dim: int, hidden_sizes: tuple[int, ...], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class HiddenPolicy(nn.Module):
    """features [B, F] float32 -> logits [B, A]; z-normalisation with fitted buffers, then an MLP."""

    feature_kind = "hidden"

    def __init__(self, feature_dim: int, num_arms: int, config: PolicyConfig):
        super().__init__()
        self.feature_dim = feature_dim
        self.num_arms = num_arms
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.mlp = _mlp(feature_dim, tuple(config.hidden_sizes), num_arms, config.dropout)

    def fit_normalisation(self, features: torch.Tensor) -> None:  # [N, F]
        self.feature_mean.copy_(features.mean(0))
        std = features.std(0, correction=0) if len(features) > 1 else torch.ones_like(self.feature_std)
        self.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # constant features stay put

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, F] -> [B, A]
        return self.mlp((features - self.feature_mean) / self.feature_std)


class TokenPolicy(nn.Module):
    """token_ids [B, T] int64 (padding -1) -> logits [B, A]: hashed embeddings, masked mean,
    log(number of tokens) z-normalised with fitted buffers, then an MLP."""

    feature_kind = "tokens"

    def __init__(self, num_arms: int, config: PolicyConfig):
        super().__init__()
        self.num_arms = num_arms
        self.num_buckets = config.num_buckets
        self.embedding = nn.Embedding(config.num_buckets, config.embed_dim)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.register_buffer("log_len_mean", torch.zeros(()))
        self.register_buffer("log_len_std", torch.ones(()))
        self.mlp = _mlp(config.embed_dim + 1, tuple(config.hidden_sizes), num_arms, config.dropout)

    def _pool(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (token_ids != PADDING_ID).to(torch.float32)  # [B, T]
        buckets = token_ids.clamp(min=0) % self.num_buckets  # padding maps to bucket 0, then is masked out
        num_tokens = mask.sum(1, keepdim=True)  # [B, 1]
        pooled = (self.embedding(buckets) * mask.unsqueeze(-1)).sum(1) / num_tokens.clamp(min=1.0)  # [B, E]
        return pooled, torch.log(num_tokens.clamp(min=1.0))

    def fit_normalisation(self, token_ids: torch.Tensor) -> None:  # [N, T]
        _, log_len = self._pool(token_ids)
        self.log_len_mean.copy_(log_len.mean())
        std = log_len.std(correction=0)
        self.log_len_std.copy_(std if std > 1e-6 else torch.ones(()))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, A]
        pooled, log_len = self._pool(token_ids)
        log_len = (log_len - self.log_len_mean) / self.log_len_std
        return self.mlp(torch.cat([pooled, log_len], dim=-1))


def pad_token_ids(token_lists: list[list[int]]) -> torch.Tensor:
    """Right-pad ragged token id lists with -1 into [B, T] int64 (T >= 1)."""
    num_cols = max([len(t) for t in token_lists] + [1])
    token_ids = torch.full((len(token_lists), num_cols), PADDING_ID, dtype=torch.int64)
    for row, tokens in enumerate(token_lists):
        token_ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.int64)
    return token_ids


def policy_inputs(data: RewardData, idx: list[int], feature_kind: str) -> torch.Tensor:
    """The network input for rows `idx`: hidden [n, F] float32, or tokens [n, T] int64."""
    if feature_kind == "hidden":
        if data.hidden is None:
            raise CtxdraftError("the rewards have no features.hidden; re-collect them or use --features tokens")
        return data.hidden[idx]
    if feature_kind == "tokens":
        if data.tokens is None:
            raise CtxdraftError("the rewards have no features.tokens; re-collect them or use --features hidden")
        return pad_token_ids([data.tokens[i] for i in idx])
    raise CtxdraftError(f"unknown feature kind {feature_kind!r}; use one of {', '.join(FEATURE_KINDS)}")


def build_policy(data: RewardData, train_idx: list[int], config: PolicyConfig) -> nn.Module:
    """A fresh network for `config.feature_kind`, its normalisation fitted on the training rows."""
    inputs = policy_inputs(data, train_idx, config.feature_kind)
    if config.feature_kind == "hidden":
        policy = HiddenPolicy(inputs.shape[1], len(data.arm_names), config)
    else:
        policy = TokenPolicy(len(data.arm_names), config)
    policy.fit_normalisation(inputs)
    return policy


# ----------------------------------------------------------------------------------------------
# Training


def _check_train_idx(data: RewardData, train_idx: list[int]) -> None:
    if len(train_idx) < 2:
        raise CtxdraftError(f"need at least 2 training rows, got {len(train_idx)}; collect more prompts")


@contextmanager
def _seeded_single_thread(seed: int):
    """Seed torch's global RNG (for weight init) without disturbing the caller's state, and train on one
    thread: for networks this small, intra-op threads only add synchronisation (10-100x slower on a busy box)."""
    num_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(num_threads)


def _optimizer(policy: nn.Module, config: PolicyConfig, inputs: torch.Tensor):
    """AdamW for the MLP; plain SGD for token embeddings. Adam normalises each parameter's step, so the
    embedding of a token seen in one prompt moves as fast as that of a token shared by half the prompts,
    and the policy memorises prompts by their rare tokens (train 100%, held-out ~75% on a one-token rule);
    SGD steps grow with how often a bucket is seen. A token's gradient through the masked mean is 1/T of
    the pooled one, so the SGD rate is `embed_lr` times the median prompt length."""
    embedding = [p for name, p in policy.named_parameters() if name.startswith("embedding.")]
    rest = [p for name, p in policy.named_parameters() if not name.startswith("embedding.")]
    optimizer = torch.optim.AdamW(rest, lr=config.lr, weight_decay=config.weight_decay)
    if not embedding:
        return optimizer
    median_len = (inputs != PADDING_ID).sum(1).float().median().clamp(min=1.0).item()
    return _Optimizers(optimizer, torch.optim.SGD(embedding, lr=config.embed_lr * median_len))


class _Optimizers:
    """Step several optimizers as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def _minibatches(num_rows: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(num_rows, generator=generator)
    for start in range(0, num_rows, batch_size):
        yield order[start : start + batch_size]


def train_reinforce(data: RewardData, train_idx: list[int], config: PolicyConfig | None = None) -> nn.Module:
    """REINFORCE with a baseline on the logged full-information rewards (the paper's method).

    Each step samples `num_samples` arms a ~ pi(.|x) per prompt, reads r(x, a) from the table and
    descends -(r - b) log pi(a|x) - entropy_coef * H(pi(.|x)). The baseline b is, by `config.baseline`:
    "loo", the mean reward of the prompt's other samples (removes the per-prompt level of speed-up);
    "batch", the mean sampled reward of the batch; "running", an exponential mean over steps.
    Deterministic for a given seed; the caller's global RNG state is left untouched.
    """
    config = config or PolicyConfig()
    _check_train_idx(data, train_idx)
    if config.baseline not in ("loo", "batch", "running"):
        raise CtxdraftError(f"unknown baseline {config.baseline!r}; use loo, batch or running")
    if config.baseline == "loo" and config.num_samples < 2:
        raise CtxdraftError("the 'loo' baseline needs num_samples >= 2")
    with _seeded_single_thread(config.seed):
        generator = torch.Generator().manual_seed(config.seed)
        policy = build_policy(data, train_idx, config)
        inputs = policy_inputs(data, train_idx, config.feature_kind)
        rewards = data.rewards[train_idx]  # [N, A]
        optimizer = _optimizer(policy, config, inputs)
        running_baseline = rewards.mean().item()
        policy.train()
        for _ in range(config.epochs):
            for batch in _minibatches(len(train_idx), config.batch_size, generator):
                log_probs = F.log_softmax(policy(inputs[batch]), dim=-1)  # [B, A]
                arms = torch.multinomial(log_probs.exp().detach(), config.num_samples, replacement=True,
                                         generator=generator)  # [B, S]
                sampled_rewards = rewards[batch].gather(1, arms)  # [B, S]
                if config.baseline == "loo":
                    S = config.num_samples
                    baseline = (sampled_rewards.sum(1, keepdim=True) - sampled_rewards) / (S - 1)
                elif config.baseline == "batch":
                    baseline = sampled_rewards.mean()
                else:
                    baseline = running_baseline
                    running_baseline = 0.9 * running_baseline + 0.1 * sampled_rewards.mean().item()
                advantage = sampled_rewards - baseline  # [B, S]
                entropy = -(log_probs.exp() * log_probs).sum(-1)  # [B]
                loss = -(advantage * log_probs.gather(1, arms)).mean() - config.entropy_coef * entropy.mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return policy.eval()


def train_supervised(data: RewardData, train_idx: list[int], config: PolicyConfig | None = None) -> nn.Module:
    """The obvious baseline: classify each prompt's oracle arm (cross-entropy). It ignores how much
    the other arms lose, which is what REINFORCE's reward-weighted objective sees."""
    config = config or PolicyConfig()
    _check_train_idx(data, train_idx)
    with _seeded_single_thread(config.seed):
        generator = torch.Generator().manual_seed(config.seed)
        policy = build_policy(data, train_idx, config)
        inputs = policy_inputs(data, train_idx, config.feature_kind)
        oracle_arms = data.rewards[train_idx].argmax(1)  # [N]
        optimizer = _optimizer(policy, config, inputs)
        policy.train()
        for _ in range(config.epochs):
            for batch in _minibatches(len(train_idx), config.batch_size, generator):
                loss = F.cross_entropy(policy(inputs[batch]), oracle_arms[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return policy.eval()


@torch.no_grad()
def choose_arms(policy: nn.Module, inputs: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B] arm indices
    was_training = policy.training
    policy.eval()
    choices = policy(inputs).argmax(-1)
    policy.train(was_training)
    return choices


def feature_spec(policy: nn.Module, layer: int | None = None) -> dict:
    """The feature description stored with an exported policy (``features.py``'s schema), read from the
    network itself so that it cannot drift from it. ``layer``: where the hidden state was pooled."""
    if policy.feature_kind == "hidden":
        if layer is None:
            raise CtxdraftError("a hidden-feature policy needs the layer its features were pooled at")
        return hidden_spec(layer, policy.feature_dim)
    return tokens_spec(policy.num_buckets)
