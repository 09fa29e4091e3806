"""Off-policy learning from logged bandit feedback: doubly robust pseudo-rewards and one policy update.

Served requests (``serving/traffic.py``) are *bandit feedback*: for each one only the chosen arm's reward is known,
and the routing chose it with a known probability (its propensity). The offline rows (the bundle's
trajectories, with every arm's reward) are *full information*. Both are costed with this machine's cost profile
(``costs.py``), so an offline and a logged reward of the same arm on the same prompt are the same number.

Terms (Dudik, Langford, Li 2011, "Doubly Robust Policy Evaluation and Learning"):
- reward model q(x, a): ridge regression of each arm's reward on the z-normalised hidden features, fitted on the
  offline rows (every arm) and the logged requests that chose that arm, its penalty picked per arm by exact
  leave-one-out error; without hidden features, each arm's mean. Wherever a logged row is scored, q was fitted
  without it (cross-fitting), so it is independent of the reward it corrects.
- doubly robust pseudo-rewards of a logged row i (arm a_i, propensity p_i, reward r_i), for every arm a:
      G_i(a) = q(x_i, a) + [a = a_i] (r_i - q(x_i, a_i)) / p_i
  E[G_i(a) | x_i] is the true reward of a for every arm the logging policy could choose (p > 0), whatever q;
  a good q only lowers the variance. Arms that were never explored are known through q alone.
- inverse propensity scores: the pseudo-rewards with q = 0, i.e. r_i / p_i for the logged arm and 0 elsewhere
  (unbiased too, noisier, and they credit a choice only with what was observed).
- value of a routing policy pi (the argmax of the network) on the logs: V(pi) = mean_i G_i(pi(x_i)), with a normal
  95% interval from the rows' spread.

``learn_from_feedback`` is one update: REINFORCE (``policy.train_reinforce``, the offline method) on the offline
table plus the logged rows' doubly robust pseudo-rewards; the new policy's value estimated by cross-fitting (each
fold of the logs scored by a policy trained without it) with inverse propensity scores, against the routing policy
in use; the new policy kept only when it is not estimated worse (``force`` overrides). The bundle on disk is
``commands/update_policy.py``'s job; this module works on tables only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from ..base.errors import CtxdraftError
from .policy import PolicyConfig, choose_arms, policy_inputs, train_reinforce
from .rewards import RewardData

Progress = Callable[[str, int, int], None]  # (stage, done, total)


Z_95 = 1.959964


TIE = 1e-6


@dataclass
class Feedback:
    """Logged bandit feedback: n requests, each with its features, chosen arm, propensity and reward."""

    arm_names: list[str]  # the order of `arms` (and of every [n, A] table built from this)
    arms: torch.Tensor  # [n] int64 chosen arm
    propensity: torch.Tensor  # [n] float64, in (0, 1]
    rewards: torch.Tensor  # [n] float64 realised speed-up of the chosen arm
    hidden: torch.Tensor | None = None  # [n, F] float32, or None (a tokens policy)
    tokens: list[list[int]] | None = None  # n prompt token id lists, or None

    def __len__(self) -> int:
        return len(self.arms)

    def __post_init__(self):
        n = len(self.arms)
        if not (self.propensity.shape == self.rewards.shape == (n,)):
            raise CtxdraftError("feedback: arms, propensity and rewards must have one entry per request")
        if n and not bool(((self.propensity > 0) & (self.propensity <= 1)).all()):
            raise CtxdraftError("feedback: every propensity must be in (0, 1]")


class RewardModel:
    """q(x, a): per-arm ridge regression on z-normalised hidden features, or per-arm means without features."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | None, weights: torch.Tensor | None, bias: torch.Tensor,
                 penalties: list[float] | None = None):
        self.mean, self.std, self.weights, self.bias = mean, std, weights, bias  # [F], [F], [F, A], [A]
        self.penalties = penalties  # the ridge penalty per arm, relative to the number of features

    @classmethod
    def fit(cls, rewards: torch.Tensor, hidden: torch.Tensor | None = None, feedback: Feedback | None = None,
            rows: list[int] | None = None, penalties=tuple(10.0 ** k for k in np.arange(-3, 3.01, 0.5))) -> "RewardModel":
        """Fit on full-information rows (rewards [N, A], hidden [N, F] or None) and, per arm, the logged requests
        ``rows`` of ``feedback`` that chose it (None: all of them). Each arm's penalty (times F) is the one with
        the least exact leave-one-out squared error, from one eigendecomposition of that arm's kernel X X^T."""
        A = rewards.shape[1]
        rows = list(range(len(feedback))) if feedback is not None and rows is None else (rows or [])
        logged_arms = feedback.arms[rows] if rows else torch.zeros(0, dtype=torch.long)
        logged_rewards = feedback.rewards[rows] if rows else torch.zeros(0, dtype=torch.float64)
        targets = [torch.cat([rewards[:, a].double(), logged_rewards[logged_arms == a]]) for a in range(A)]
        bias = torch.stack([y.mean() for y in targets])
        use_hidden = hidden is not None and (not rows or feedback.hidden is not None)
        if not use_hidden or len(rewards) < 3:
            return cls(torch.zeros(0), None, None, bias)
        logged_hidden = feedback.hidden[rows].double() if rows else torch.zeros(0, hidden.shape[1], dtype=torch.float64)
        X_all = torch.cat([hidden.double(), logged_hidden])
        mean, std = X_all.mean(0), X_all.std(0, correction=0)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        F = X_all.shape[1]
        weights, chosen = [], []
        for a in range(A):
            X = (torch.cat([hidden.double(), logged_hidden[logged_arms == a]]) - mean) / std  # [N_a, F]
            y = targets[a] - bias[a]
            s, U = torch.linalg.eigh(X @ X.T)  # the kernel [N_a, N_a]
            s = s.clamp(min=0)
            Uty = U.T @ y
            best = (math.inf, None, None)
            for c in penalties:
                shrink = s / (s + c * F)
                leverage = (U * U) @ shrink  # the hat matrix's diagonal
                loo = float((((y - U @ (shrink * Uty)) / (1 - leverage).clamp(min=1e-9)) ** 2).mean())
                if loo < best[0]:
                    best = (loo, c, X.T @ (U @ (Uty / (s + c * F))))
            chosen.append(best[1])
            weights.append(best[2])
        return cls(mean, std, torch.stack(weights, dim=1), bias, chosen)

    def predict(self, num_rows: int, hidden: torch.Tensor | None = None) -> torch.Tensor:  # -> [n, A] float64
        if self.weights is None:
            return self.bias.expand(num_rows, -1).clone()
        if hidden is None:
            raise CtxdraftError("this reward model needs hidden features")
        return ((hidden.double() - self.mean) / self.std) @ self.weights + self.bias


def pseudo_rewards(predicted: torch.Tensor, feedback: Feedback) -> torch.Tensor:
    """Doubly robust pseudo-rewards G [n, A] (module docstring) from the reward model's predictions [n, A];
    predictions of zero give the inverse propensity scores."""
    G = predicted.double().clone()
    rows = torch.arange(len(feedback))
    G[rows, feedback.arms] += (feedback.rewards - G[rows, feedback.arms]) / feedback.propensity
    return G


@dataclass
class Estimate:
    """A mean with its normal 95% interval (low/high are None for fewer than two rows)."""

    value: float
    low: float | None
    high: float | None
    num_rows: int

    @classmethod
    def of(cls, values: torch.Tensor) -> "Estimate":
        values = values.double()
        n = len(values)
        mean = float(values.mean())
        if n < 2:
            return cls(mean, None, None, n)
        half = Z_95 * float(values.std()) / math.sqrt(n)
        return cls(mean, mean - half, mean + half, n)

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def policy_value(G: torch.Tensor, choices: torch.Tensor) -> Estimate:
    """V(pi) for a routing policy whose choice on logged row i is ``choices[i]``."""
    return Estimate.of(G[torch.arange(len(G)), choices])


def feedback_table(offline: RewardData, feedback: Feedback, G: torch.Tensor) -> RewardData:
    """One bandit table: the offline rows (full-information rewards) followed by the logged rows (pseudo-rewards),
    in the offline rows' arm order."""
    if feedback.arm_names != offline.arm_names:
        raise CtxdraftError(f"internal: feedback arms {feedback.arm_names} are not in the offline order {offline.arm_names}")
    n = len(feedback)
    hidden = None
    if offline.hidden is not None and feedback.hidden is not None:
        hidden = torch.cat([offline.hidden, feedback.hidden.float()])
    tokens = offline.tokens + feedback.tokens if offline.tokens is not None and feedback.tokens is not None else None
    prompt_lens = offline.prompt_lens + ([len(t) for t in feedback.tokens] if feedback.tokens is not None else [0] * n)
    return RewardData(ids=list(offline.ids) + [f"logged-{i}" for i in range(n)],
                      domains=list(offline.domains) + ["logged"] * n, arm_names=list(offline.arm_names),
                      rewards=torch.cat([offline.rewards, G.float()]), prompt_lens=prompt_lens, hidden=hidden, tokens=tokens)


def train_on_feedback(offline: RewardData, feedback: Feedback, G: torch.Tensor, config: PolicyConfig,
                      logged_rows: list[int] | None = None) -> torch.nn.Module:
    """REINFORCE on every offline row and the logged rows ``logged_rows`` (None: all of them)."""
    table = feedback_table(offline, feedback, G)
    N = len(offline)
    rows = range(len(feedback)) if logged_rows is None else logged_rows
    return train_reinforce(table, list(range(N)) + [N + i for i in rows], config)


def feedback_inputs(feedback: Feedback, kind: str) -> torch.Tensor:
    """The network input for every logged row (hidden [n, F], or tokens [n, T])."""
    table = RewardData([], [], feedback.arm_names, torch.zeros(len(feedback), len(feedback.arm_names)), [],
                       feedback.hidden, feedback.tokens)
    return policy_inputs(table, list(range(len(feedback))), kind)


@dataclass
class Comparison:
    new: Estimate  # the value of the policy trained with the logs (cross-fitted)
    old: Estimate  # the value of the policy in use
    gain: Estimate  # new - old, paired by row

    def to_dict(self) -> dict:
        return {"new": self.new.to_dict(), "old": self.old.to_dict(), "gain": self.gain.to_dict()}


def compare(G: torch.Tensor, new_choices: torch.Tensor, old_choices: torch.Tensor) -> Comparison:
    rows = torch.arange(len(G))
    new, old = G[rows, new_choices], G[rows, old_choices]
    return Comparison(Estimate.of(new), Estimate.of(old), Estimate.of(new - old))


@dataclass
class Learned:
    comparison: Comparison
    replace: bool  # the new policy is not estimated worse than the one in use (or `force`)
    policy: torch.nn.Module | None  # trained on the offline rows and every logged row; None when not `replace`
    model: RewardModel  # the reward model fitted on the offline rows and every logged row
    choices: torch.Tensor  # [n] the cross-fitted policies' choice on each logged row (what `comparison.new` scores)


def learn_from_feedback(offline: RewardData, feedback: Feedback, config: PolicyConfig, old_choices: torch.Tensor,
                        folds: int = 5, seed: int = 0, force: bool = False, progress: Progress | None = None) -> Learned:
    """One update, as ``update-policy`` (and the replay benchmark's "update every N requests") does it.

    Training uses the doubly robust pseudo-rewards. The estimate that guards the update uses the inverse
    propensity scores (q = 0) instead, by cross-fitting: the logged rows are split into ``folds``, each fold is
    scored by a policy trained (with a reward model fitted) on the offline rows and the *other* folds only, and
    compared, row by row, with the policy in use (its choices on the logged rows are ``old_choices``). The reward
    model stays out of the estimate on purpose: a policy trained on the model's pseudo-rewards exploits the model's
    errors, and the same model would then vouch for them (in the replay benchmark every doubly robust gain that was
    significant was a true loss); inverse propensity scoring credits a choice only with what was observed. Unless
    the policy in use is estimated better, the new policy is trained on everything."""
    n, A = len(feedback), len(offline.arm_names)
    folds = max(1, min(folds, n))
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = torch.arange(n) % folds
    hidden = offline.hidden if feedback.hidden is not None else None
    inputs = feedback_inputs(feedback, config.feature_kind)
    new_choices = torch.empty(n, dtype=torch.long)
    for k in range(folds):
        if progress:
            progress("update-policy: estimate", k, folds)
        held_out, rest = (fold_of == k).nonzero().flatten(), (fold_of != k).nonzero().flatten().tolist()
        model = RewardModel.fit(offline.rewards, hidden, feedback, rest)
        policy = train_on_feedback(offline, feedback, pseudo_rewards(model.predict(n, feedback.hidden), feedback), config, rest)
        new_choices[held_out] = choose_arms(policy, inputs[held_out])
    comparison = compare(pseudo_rewards(torch.zeros(n, A, dtype=torch.float64), feedback), new_choices, old_choices)
    replace = force or comparison.gain.value >= -TIE
    model = RewardModel.fit(offline.rewards, hidden, feedback)
    if not replace:
        return Learned(comparison, False, None, model, new_choices)
    if progress:
        progress("update-policy: train", 0, 1)
    G = pseudo_rewards(model.predict(n, feedback.hidden), feedback)
    return Learned(comparison, True, train_on_feedback(offline, feedback, G, config), model, new_choices)


@dataclass
class Choice:
    arm: str
    propensity: float  # the probability with which `arm` was chosen
    greedy_arm: str  # the policy's argmax


def choose_arm(arm_names: list[str], probs, explore: float = 0.0, rng: np.random.Generator | None = None) -> Choice:
    """Epsilon-greedy over the policy's argmax: with probability ``explore`` a uniformly random arm (the argmax
    included), else the argmax. ``probs``: the policy's [A] arm probabilities (only their argmax is used)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    A = len(arm_names)
    if probs.shape != (A,):
        raise CtxdraftError(f"the policy gave {probs.shape[0]} probabilities for {A} arms")
    greedy = int(probs.argmax())
    arm = greedy
    if explore > 0:
        rng = rng if rng is not None else np.random.default_rng()
        if rng.random() < explore:
            arm = int(rng.integers(A))
    propensity = (1.0 - explore) * (arm == greedy) + explore / A
    return Choice(arm_names[arm], float(propensity), arm_names[greedy])
