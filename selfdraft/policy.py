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

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CtxdraftError
from .fileio import read_jsonl

FEATURE_KINDS = ("hidden", "tokens")
PADDING_ID = -1


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class RewardData:
    """The logged bandit table: one row per prompt, one column per arm."""

    ids: list
    domains: list[str]
    arm_names: list[str]
    rewards: torch.Tensor  # [N, A] float32 speed-ups
    prompt_lens: list[int]
    hidden: torch.Tensor | None = None  # [N, F] float32, or None when rows carry no hidden features
    tokens: list[list[int]] | None = None  # N prompt token id lists, or None

    def __len__(self) -> int:
        return len(self.ids)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def rewards_from_rows(rows: list[dict], source: str = "rewards") -> RewardData:
    """Build a RewardData from parsed `collect` rows (see `load_rewards` for the row format)."""
    if not rows:
        raise CtxdraftError(f"{source} has no rows; run `ctxdraft collect` first")
    ids, domains, prompt_lens, reward_rows, hidden_rows, token_rows = [], [], [], [], [], []
    arm_names: list[str] | None = None
    first_line_of_id: dict = {}
    for i, row in enumerate(rows):
        where = f"{source}, row {i + 1}"
        arms = row.get("arms")
        if not isinstance(arms, dict) or not arms:
            raise CtxdraftError(f"{where}: needs an 'arms' object mapping arm name -> {{'speedup': ...}}")
        if arm_names is None:
            arm_names = list(arms)
        elif set(arms) != set(arm_names):
            missing = sorted(set(arm_names) - set(arms))
            extra = sorted(set(arms) - set(arm_names))
            raise CtxdraftError(
                f"{where}: its arms differ from row 1 (missing {missing}, extra {extra}); all rows must be "
                "collected with the same pool; re-run `ctxdraft collect` for this bundle into a fresh file"
            )
        reward_row = []
        for name in arm_names:
            arm = arms[name]
            speedup = arm.get("speedup") if isinstance(arm, dict) else None
            if not _finite_number(speedup) or speedup <= 0:
                raise CtxdraftError(f"{where}: arm {name!r} needs a positive finite 'speedup', got {speedup!r}")
            reward_row.append(float(speedup))
        reward_rows.append(reward_row)

        row_id = row.get("id", i)
        if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
            raise CtxdraftError(f"{where}: 'id' must be a string or an integer, got {row_id!r}")
        if row_id in first_line_of_id:
            raise CtxdraftError(
                f"{where}: id {row_id!r} already appeared in row {first_line_of_id[row_id] + 1}; "
                "remove the duplicate (an interrupted collect resumed without --resume?)"
            )
        first_line_of_id[row_id] = i
        ids.append(row_id)
        domain = row.get("domain", "all")
        domains.append(str(domain) if domain is not None else "all")

        features = row.get("features")
        if not isinstance(features, dict):
            raise CtxdraftError(f"{where}: needs a 'features' object with 'hidden' and/or 'tokens'")
        hidden = features.get("hidden")
        if hidden is not None:
            if not isinstance(hidden, list) or not hidden or not all(_finite_number(v) for v in hidden):
                raise CtxdraftError(f"{where}: features.hidden must be a non-empty list of finite numbers")
            if hidden_rows and len(hidden) != len(hidden_rows[0]):
                raise CtxdraftError(
                    f"{where}: features.hidden has {len(hidden)} values but row 1 has {len(hidden_rows[0])}; "
                    "rows were collected with different feature layers or targets"
                )
        hidden_rows.append(hidden)
        tokens = features.get("tokens")
        if tokens is not None:
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                      for t in tokens):
                raise CtxdraftError(f"{where}: features.tokens must be a list of non-negative integer token ids")
        token_rows.append(tokens)

        prompt_len = row.get("prompt_len", len(tokens) if tokens is not None else None)
        if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or prompt_len < 0:
            raise CtxdraftError(f"{where}: needs a non-negative integer 'prompt_len', got {prompt_len!r}")
        prompt_lens.append(prompt_len)

    def all_or_none(values: list, name: str):
        present = [v is not None for v in values]
        if all(present):
            return values
        if not any(present):
            return None
        first_missing = present.index(False) if present[0] else present.index(True)
        raise CtxdraftError(
            f"{source}: features.{name} is present in some rows and missing in others (see row "
            f"{first_missing + 1}); re-collect so every row has the same features"
        )

    hidden_rows = all_or_none(hidden_rows, "hidden")
    token_rows = all_or_none(token_rows, "tokens")
    return RewardData(
        ids=ids,
        domains=domains,
        arm_names=list(arm_names),
        rewards=torch.tensor(reward_rows, dtype=torch.float32),
        prompt_lens=prompt_lens,
        hidden=torch.tensor(hidden_rows, dtype=torch.float32) if hidden_rows is not None else None,
        tokens=token_rows,
    )


def load_rewards(path: str | os.PathLike) -> RewardData:
    """Read the rows `ctxdraft collect` wrote, one JSON object per prompt:

    {"id": ..., "domain": "qa", "prompt_len": 123,
     "features": {"hidden": [F floats], "tokens": [token ids]},
     "arms": {"none": {"speedup": 1.0, ...}, "lookup": {"speedup": 1.7, ...}, ...}}

    Every row must have the same set of arms; an arm's reward is its "speedup".
    """
    return rewards_from_rows(read_jsonl(path, what="rewards file"), source=f"rewards file {path}")


def split_indices(domains: list[str], eval_frac: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded train/eval split, stratified by domain: each domain gives round(eval_frac * n) eval rows
    (at least one when it has two or more rows, never all of them)."""
    if not 0.0 < eval_frac < 1.0:
        raise CtxdraftError(f"eval fraction must be between 0 and 1 (exclusive), got {eval_frac}")
    generator = torch.Generator().manual_seed(seed)
    train_idx, eval_idx = [], []
    for domain in sorted(set(domains)):
        rows = [i for i, d in enumerate(domains) if d == domain]
        order = [rows[j] for j in torch.randperm(len(rows), generator=generator).tolist()]
        num_eval = min(max(round(eval_frac * len(rows)), 1 if len(rows) >= 2 else 0), len(rows) - 1)
        eval_idx += order[:num_eval]
        train_idx += order[num_eval:]
    if not eval_idx:
        raise CtxdraftError(f"eval fraction {eval_frac} leaves no held-out rows; use more data or a larger fraction")
    return sorted(train_idx), sorted(eval_idx)


# ----------------------------------------------------------------------------------------------
# Networks


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


# ----------------------------------------------------------------------------------------------
# Evaluation and the report


@torch.no_grad()
def choose_arms(policy: nn.Module, inputs: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B] arm indices
    was_training = policy.training
    policy.eval()
    choices = policy(inputs).argmax(-1)
    policy.train(was_training)
    return choices


def _summary(rewards: torch.Tensor, choices: torch.Tensor, arm_names: list[str]) -> dict:
    """Mean speed-ups of the policy's greedy choices, of each arm alone and of the oracle on these rows."""
    policy_speedup = rewards.gather(1, choices[:, None]).mean().item()
    oracle_speedup = rewards.max(1).values.mean().item()
    arm_speedups = {name: rewards[:, a].mean().item() for a, name in enumerate(arm_names)}
    best_arm = max(arm_speedups, key=arm_speedups.get)
    counts = torch.bincount(choices, minlength=len(arm_names)).tolist()
    return {
        "num_prompts": len(rewards),
        "policy": policy_speedup,
        "oracle": oracle_speedup,
        "regret": 1.0 - policy_speedup / oracle_speedup,
        "best_single_arm": best_arm,
        "best_single_arm_speedup": arm_speedups[best_arm],
        "gain_over_best_single_arm": policy_speedup / arm_speedups[best_arm] - 1.0,
        "arms": arm_speedups,
        "choices": dict(zip(arm_names, counts)),
    }


def evaluate(policy: nn.Module, data: RewardData, idx: list[int]) -> dict:
    """Held-out report of one policy, overall and per domain. The best single arm is picked on the
    same rows, so the comparison flatters the fixed-arm baseline, not the policy."""
    if not idx:
        raise CtxdraftError("nothing to evaluate: the evaluation split is empty")
    choices = choose_arms(policy, policy_inputs(data, idx, policy.feature_kind))
    rewards = data.rewards[idx]
    report = {"overall": _summary(rewards, choices, data.arm_names), "domains": {}}
    domains = [data.domains[i] for i in idx]
    for domain in sorted(set(domains)):
        rows = torch.tensor([j for j, d in enumerate(domains) if d == domain])
        report["domains"][domain] = _summary(rewards[rows], choices[rows], data.arm_names)
    return report


@dataclass
class PolicyTrainResult:
    """What `train_policies` produced: both networks, the split and the report."""

    reinforce: nn.Module
    supervised: nn.Module
    train_idx: list[int]
    eval_idx: list[int]
    report: dict = field(default_factory=dict)


def train_policies(data: RewardData, config: PolicyConfig | None = None, eval_frac: float = 0.25,
                   split_seed: int | None = None) -> PolicyTrainResult:
    """Split (stratified by domain), train REINFORCE and the supervised baseline on the training rows,
    and build the held-out report (`policy_report`). The REINFORCE policy is the one to export."""
    config = config or PolicyConfig()
    train_idx, eval_idx = split_indices(data.domains, eval_frac, config.seed if split_seed is None else split_seed)
    reinforce = train_reinforce(data, train_idx, config)
    supervised = train_supervised(data, train_idx, config)
    report = policy_report(data, train_idx, eval_idx, {"reinforce": reinforce, "supervised": supervised}, config)
    return PolicyTrainResult(reinforce, supervised, train_idx, eval_idx, report)


def policy_report(data: RewardData, train_idx: list[int], eval_idx: list[int], policies: dict[str, nn.Module],
                  config: PolicyConfig) -> dict:
    """The dict written to reports/train_policy.json: config, split sizes and each policy's `evaluate`."""
    from dataclasses import asdict

    return {
        "feature_kind": config.feature_kind,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "arms": list(data.arm_names),
        "num_train": len(train_idx),
        "num_eval": len(eval_idx),
        "eval_ids": [data.ids[i] for i in eval_idx],
        "policies": {name: evaluate(policy, data, eval_idx) for name, policy in policies.items()},
    }


def report_markdown(report: dict) -> str:
    """Held-out mean speed-ups as a Markdown table: rows are the policies, each single arm and the
    oracle; columns are the domains and overall. Regret and choices follow below the table."""
    policies = report["policies"]
    first = next(iter(policies.values()))
    columns = sorted(first["domains"]) + ["overall"]

    def cell(summary: dict, key: str, arm: str | None = None) -> float:
        return summary["arms"][arm] if arm is not None else summary[key]

    def block(evaluation: dict, column: str) -> dict:
        return evaluation["overall"] if column == "overall" else evaluation["domains"][column]

    counts = [str(block(first, c)["num_prompts"]) for c in columns]
    lines = [
        f"Held-out mean speed-up over plain decoding ({report['num_eval']} prompts, "
        f"policy trained on {report['num_train']}, features: {report['feature_kind']}).",
        "",
        "| | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
        "| prompts | " + " | ".join(counts) + " |",
    ]
    for name, evaluation in policies.items():
        lines.append(f"| **policy ({name})** | " + " | ".join(
            f"**{block(evaluation, c)['policy']:.3f}**" for c in columns) + " |")
    for arm in report["arms"]:
        lines.append(f"| {arm} | " + " | ".join(f"{cell(block(first, c), '', arm):.3f}" for c in columns) + " |")
    lines.append("| oracle (per prompt) | " + " | ".join(f"{block(first, c)['oracle']:.3f}" for c in columns) + " |")
    lines.append("")
    for name, evaluation in policies.items():
        overall = evaluation["overall"]
        chosen = ", ".join(f"{arm} {n}" for arm, n in overall["choices"].items() if n)
        lines.append(
            f"- {name}: regret to the oracle {overall['regret']:.1%}, "
            f"{overall['gain_over_best_single_arm']:+.1%} vs the best single arm "
            f"({overall['best_single_arm']}, {overall['best_single_arm_speedup']:.3f}); chose: {chosen}"
        )
    return "\n".join(lines) + "\n"


def feature_spec(policy: nn.Module, layer: int | None = None) -> dict:
    """The feature description stored with an exported policy (`ctxdraft.features`), read from the
    network itself so it cannot drift from it. `layer` is the target layer the hidden state was pooled at."""
    if policy.feature_kind == "hidden":
        if layer is None:
            raise CtxdraftError("a hidden-feature policy needs the layer its features were pooled at")
        return {
            "kind": "hidden",
            "layer": int(layer),
            "pooling": "mean",
            "dim": policy.feature_dim,
            "input": {
                "name": "features", "dtype": "float32", "shape": ["batch", policy.feature_dim],
                "description": f"the target's hidden state after decoder layer {layer} during prefill, mean over "
                               f"all prompt positions ({policy.feature_dim - 1} values), then log(prompt_len); "
                               "raw values: the normalisation is inside the graph",
            },
        }
    return {
        "kind": "tokens",
        "layer": None,
        "pooling": "mean",
        "dim": None,
        "num_buckets": policy.num_buckets,
        "padding_id": PADDING_ID,
        "input": {
            "name": "token_ids", "dtype": "int64", "shape": ["batch", "time"],
            "description": "the prompt's token ids from the target's tokenizer (chat template applied, as fed to "
                           f"the target), right-padded with {PADDING_ID}; hashed inside the graph",
        },
    }
