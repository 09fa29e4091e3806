"""The replay benchmark: how fast does each learner approach the per-prompt oracle on traffic the offline policy
was not trained for, when it only sees the reward of the arm it chose?

A full-information rewards file (``ctxdraft collect``: every arm's speed-up on every prompt) is replayed as a
bandit. Per seed, the prompts are split (stratified by domain, ``data.stratified_split``) into a *pool* and a
held-out *evaluation* set. The offline policy is trained (``policy.train_reinforce``) on the pool's rows of three
domains only; then ``num_requests`` requests are drawn independently and uniformly from the pool's rows of all
domains, and each learner is shown only the speed-up of the arm it picked:

- ``frozen``: the offline policy, never updated (routing is its argmax);
- ``updated``: routes epsilon-greedy over its current policy, logs (arm, propensity, speed-up), and every
  ``update_every`` requests runs ``online.learn_from_feedback`` on the offline rows plus everything logged so far
  (what ``ctxdraft update-policy`` does, guard included: a policy estimated worse than the one in use is not
  taken);
- ``linucb-<alpha>``: LinUCB (Li, Chu, Langford, Schapire 2010), one ridge model per arm on the same features
  (z-normalised, projected on the offline rows' top principal components, plus an intercept), warm-started with
  every arm's reward on the offline rows, choosing the arm with the highest upper confidence bound;
- ``full-information``: a reference, not a learner: the offline policy trained on the pool's rows of all domains
  with every arm's reward, i.e. what the learners could reach with full information.

Regret (``policy.py``'s definition): 1 - mean speed-up of a policy's choices / mean speed-up of the per-prompt
oracle. ``eval regret`` scores each learner's current greedy policy on the held-out set after t logged requests;
``online regret`` scores the arms it actually chose on the first t requests (exploration included).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from ..base import checks
from ..base.data import stratified_split
from ..base.errors import CtxdraftError
from .offpolicy import Feedback, choose_arm, learn_from_feedback
from .policy import PolicyConfig, choose_arms, train_reinforce
from .rewards import RewardData

Progress = Callable[[str, int, int], None]


@dataclass
class ReplayConfig:
    offline_domains: list[str] | None = None  # None: the first three domains in the file
    eval_frac: float = 0.25
    num_requests: int = 300
    update_every: int = 50
    explore: float = 0.1
    seeds: int = 3
    folds: int = 5
    linucb_alphas: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    linucb_dims: int = 32
    checkpoint_every: int = 25
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def validate(self) -> None:
        checks.number("eval_frac", self.eval_frac, above=0.0, maximum=0.9)
        checks.integer("num_requests", self.num_requests, minimum=1)
        checks.integer("update_every", self.update_every, minimum=1)
        checks.number("explore", self.explore, minimum=0.0, maximum=1.0)
        checks.integer("seeds", self.seeds, minimum=1)
        checks.integer("folds", self.folds, minimum=2)
        checks.integer("linucb_dims", self.linucb_dims, minimum=1)
        checks.integer("checkpoint_every", self.checkpoint_every, minimum=1)
        for alpha in self.linucb_alphas:
            checks.number("linucb alpha", alpha, minimum=0.0)


def subset(data: RewardData, idx: list[int]) -> RewardData:
    """The rows ``idx`` of ``data`` as a table of their own."""
    return RewardData([data.ids[i] for i in idx], [data.domains[i] for i in idx], list(data.arm_names), data.rewards[idx],
                      [data.prompt_lens[i] for i in idx], data.hidden[idx] if data.hidden is not None else None,
                      [data.tokens[i] for i in idx] if data.tokens is not None else None)


def regret(rewards: torch.Tensor, choices: torch.Tensor) -> float:
    """1 - mean chosen speed-up / mean oracle speed-up. rewards [n, A], choices [n]."""
    return 1.0 - float(rewards.gather(1, choices[:, None]).mean() / rewards.max(1).values.mean())


class LinUCB:
    """Disjoint LinUCB on z-normalised hidden features projected on ``dims`` principal components (+ intercept)."""

    def __init__(self, offline: RewardData, alpha: float, dims: int, ridge: float = 1.0):
        X = offline.hidden.double()
        self.mean, std = X.mean(0), X.std(0, correction=0)
        self.std = torch.where(std > 1e-6, std, torch.ones_like(std))
        Z = (X - self.mean) / self.std
        _, _, Vh = torch.linalg.svd(Z, full_matrices=False)
        self.components = Vh[: min(dims, Vh.shape[0])].T  # [F, k]
        self.alpha = alpha
        A = len(offline.arm_names)
        k = self.components.shape[1] + 1
        self.A_inv = torch.eye(k, dtype=torch.float64).repeat(A, 1, 1) / ridge  # [A, k, k]
        self.b = torch.zeros(A, k, dtype=torch.float64)
        for x, rewards in zip(self.embed(offline.hidden), offline.rewards.double()):  # warm start: full information
            for a, r in enumerate(rewards):
                self.update(x, a, float(r))

    def embed(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, F] -> [n, k+1]
        z = ((hidden.double() - self.mean) / self.std) @ self.components
        return torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], dim=1)

    def update(self, x: torch.Tensor, arm: int, reward: float) -> None:
        A_inv = self.A_inv[arm]
        Ax = A_inv @ x
        self.A_inv[arm] = A_inv - torch.outer(Ax, Ax) / (1.0 + x @ Ax)  # Sherman-Morrison
        self.b[arm] += reward * x

    def scores(self, x: torch.Tensor, bonus: bool) -> torch.Tensor:  # x [k+1] -> [A]
        theta = torch.einsum("aij,aj->ai", self.A_inv, self.b)
        mean = theta @ x
        if not bonus:
            return mean
        return mean + self.alpha * torch.einsum("i,aij,j->a", x, self.A_inv, x).clamp(min=0).sqrt()

    def choices(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.scores(x, bonus=False).argmax() for x in self.embed(hidden)])


def replay_seed(data: RewardData, config: ReplayConfig, offline_domains: list[str], seed: int,
                progress: Progress | None = None) -> dict:
    """One seed of the benchmark: per learner, eval and online regret at every checkpoint, and what the updates did."""
    pool_idx, eval_idx = stratified_split(data.domains, config.eval_frac, seed)
    offline_idx = [i for i in pool_idx if data.domains[i] in offline_domains]
    if len(offline_idx) < 2:
        raise CtxdraftError(f"the offline domains {offline_domains} have {len(offline_idx)} training row(s); need at least 2")
    rng = np.random.default_rng(seed)
    stream = rng.choice(pool_idx, size=config.num_requests, replace=True).tolist()
    offline = subset(data, offline_idx)
    eval_rewards, eval_hidden = data.rewards[eval_idx], data.hidden[eval_idx]
    policy_config = PolicyConfig(**{**asdict(config.policy), "seed": seed})
    frozen = train_reinforce(offline, list(range(len(offline))), policy_config)
    full = train_reinforce(data, pool_idx, policy_config)
    bandits = {f"linucb-{alpha:g}": LinUCB(offline, alpha, config.linucb_dims) for alpha in config.linucb_alphas}

    current = frozen
    logged: dict[str, list] = {"idx": [], "arm": [], "propensity": [], "reward": []}
    chosen: dict[str, list[float]] = {"frozen": [], "updated": [], **{name: [] for name in bandits}}
    curves: dict[str, dict[str, list]] = {name: {"eval": [], "online": []} for name in ["frozen", "updated", *bandits]}
    updates = []
    oracle_sum = 0.0
    checkpoints = [0]
    frozen_eval = regret(eval_rewards, choose_arms(frozen, eval_hidden))

    def checkpoint(t: int) -> None:
        for name, curve in curves.items():
            if name == "frozen":
                curve["eval"].append(frozen_eval)
            elif name == "updated":
                curve["eval"].append(regret(eval_rewards, choose_arms(current, eval_hidden)))
            else:
                curve["eval"].append(regret(eval_rewards, bandits[name].choices(eval_hidden)))
            curve["online"].append(1.0 - sum(chosen[name]) / oracle_sum if t else None)

    checkpoint(0)
    for t, i in enumerate(stream, 1):
        rewards = data.rewards[i].double()
        x = data.hidden[i : i + 1]
        oracle_sum += float(rewards.max())
        chosen["frozen"].append(float(rewards[choose_arms(frozen, x)[0]]))
        with torch.no_grad():
            probs = torch.softmax(current.eval()(x), -1)[0].numpy()
        choice = choose_arm(data.arm_names, probs, config.explore, rng)
        arm = data.arm_names.index(choice.arm)
        chosen["updated"].append(float(rewards[arm]))
        for key, value in zip(logged, (i, arm, choice.propensity, float(rewards[arm]))):
            logged[key].append(value)
        for name, bandit in bandits.items():
            z = bandit.embed(x)[0]
            picked = int(bandit.scores(z, bonus=True).argmax())
            chosen[name].append(float(rewards[picked]))
            bandit.update(z, picked, float(rewards[picked]))
        if t % config.update_every == 0:
            feedback = Feedback(data.arm_names, torch.tensor(logged["arm"]), torch.tensor(logged["propensity"], dtype=torch.float64),
                                torch.tensor(logged["reward"], dtype=torch.float64), hidden=data.hidden[logged["idx"]])
            old_choices = choose_arms(current, feedback.hidden)
            learned = learn_from_feedback(offline, feedback, policy_config, old_choices, config.folds, seed)
            if learned.replace:
                current = learned.policy
            # What the estimate targets, known here because the rewards file has every arm: the mean speed-up of
            # the cross-fitted choices minus that of the policy in use, on the logged rows.
            logged_rewards = data.rewards[logged["idx"]]
            true_gain = float(logged_rewards.gather(1, learned.choices[:, None]).mean()
                              - logged_rewards.gather(1, old_choices[:, None]).mean())
            updates.append({"requests": t, "replaced": learned.replace, **learned.comparison.to_dict(),
                            "true_gain": round(true_gain, 6)})
            if progress:
                progress(f"replay seed {seed}", t, config.num_requests)
        if t % config.checkpoint_every == 0 or t == config.num_requests:
            checkpoints.append(t)
            checkpoint(t)
    return {"seed": seed, "checkpoints": checkpoints, "curves": curves, "updates": updates,
            "full_information_eval_regret": regret(eval_rewards, choose_arms(full, eval_hidden)),
            "num_pool": len(pool_idx), "num_eval": len(eval_idx), "num_offline": len(offline_idx)}


def _mean_se(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "se": None}
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se}


def run_replay(data: RewardData, config: ReplayConfig | None = None, progress: Progress | None = None,
               at: int = 200) -> dict:
    """The benchmark over ``config.seeds`` seeds: per learner, mean (and standard error over seeds) of eval and
    online regret at every checkpoint, and a summary at ``at`` logged requests."""
    config = config or ReplayConfig()
    config.validate()
    if data.hidden is None:
        raise CtxdraftError("the replay benchmark needs rows with features.hidden (collect them with `ctxdraft collect`)")
    domains = list(dict.fromkeys(data.domains))
    offline_domains = list(config.offline_domains) if config.offline_domains else domains[:3]
    unknown = sorted(set(offline_domains) - set(domains))
    if unknown:
        raise CtxdraftError(f"offline domains {unknown} are not in the rewards (domains: {', '.join(domains)})")
    if set(offline_domains) == set(domains):
        raise CtxdraftError("the offline domains cover every domain; leave some out so that the traffic differs")
    runs = [replay_seed(data, config, offline_domains, seed, progress) for seed in range(config.seeds)]
    checkpoints = runs[0]["checkpoints"]
    learners = {}
    for name in runs[0]["curves"]:
        learners[name] = {kind: [_mean_se([run["curves"][name][kind][k] for run in runs]) for k in range(len(checkpoints))]
                          for kind in ("eval", "online")}
    full = _mean_se([run["full_information_eval_regret"] for run in runs])
    summary = None
    if at in checkpoints:
        k = checkpoints.index(at)
        summary = {"requests": at, **{name: {"eval_regret": curves["eval"][k], "online_regret": curves["online"][k]}
                                      for name, curves in learners.items()}}
        frozen, updated = summary["frozen"]["eval_regret"]["mean"], summary["updated"]["eval_regret"]["mean"]
        best_bandit = min((n for n in learners if n.startswith("linucb")), key=lambda n: summary[n]["eval_regret"]["mean"],
                          default=None)
        summary["best_bandit"] = best_bandit
        summary["target_half_of_frozen"] = updated <= 0.5 * frozen
        summary["target_no_worse_than_bandit"] = best_bandit is None or updated <= summary[best_bandit]["eval_regret"]["mean"]
    return {
        "config": {**{k: v for k, v in asdict(config).items() if k != "policy"}, "policy": asdict(config.policy),
                   "offline_domains": offline_domains},
        "domains": domains, "arms": list(data.arm_names), "num_rows": len(data),
        "checkpoints": checkpoints, "learners": learners, "full_information_eval_regret": full,
        "summary": summary, "runs": [{k: v for k, v in run.items() if k != "curves"} for run in runs],
    }


def synthetic_rewards(per_domain: int = 40, feature_dim: int = 16, seed: int = 0) -> RewardData:
    """Six domains, each a cluster in feature space with its own best arm; the first three share one best arm,
    so a policy trained on them alone routes the other three poorly. For dry runs and tests."""
    g = torch.Generator().manual_seed(seed)
    arms = ["none", "lookup", "lookup-k2", "lookup-k8", "exit@10", "exit@24"]
    domains = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
    best = {"mt_bench": 2, "translation": 2, "summarization": 2, "qa": 4, "math_reasoning": 5, "rag": 3}
    centers = 2.0 * torch.randn(len(domains), feature_dim, generator=g)
    ids, doms, rewards, hidden = [], [], [], []
    for d, domain in enumerate(domains):
        for i in range(per_domain):
            r = 1.0 + 0.3 * torch.rand(len(arms), generator=g)
            r[0] = 1.0
            r[2] += 0.3  # the best single arm
            r[best[domain]] += 0.6
            ids.append(f"{domain}-{i}")
            doms.append(domain)
            rewards.append(r)
            hidden.append(centers[d] + torch.randn(feature_dim, generator=g))
    return RewardData(ids, doms, arms, torch.stack(rewards), [20] * len(ids), hidden=torch.stack(hidden))
