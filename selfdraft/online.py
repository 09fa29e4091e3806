"""Learning from served traffic: doubly robust off-policy estimates and ``ctxdraft update-policy``.

Served requests (``traffic.py``) are *bandit feedback*: for each one only the chosen arm's reward is known,
and the routing chose it with a known probability (its propensity). The offline rows (the bundle's
trajectories, with every arm's reward) are *full information*. Both are costed with this machine's cost profile
(``costs.py``): the offline trajectories as ``calibrate`` does, the logged ones from the trajectory each request
realised, so an offline and a logged reward of the same arm on the same prompt are the same number.

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
in use; the new policy kept only when it is not estimated worse (``force`` overrides). ``update_policy`` does that
for a bundle on disk: it writes policy.onnx (and its weights, report, bundle.json) whole or not at all, records in
bundle.json what it learned from, and stores the new policy as this machine's calibration of the new bundle (the
policy was trained for this machine's costs).

Longer than 400 lines because the estimator, the training on logged feedback and the update of a bundle on disk
share one set of definitions (the pseudo-rewards) that would otherwise have to be passed between three files.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import checks
from .errors import CtxdraftError
from .fileio import display_path, write_json_atomic, write_text_atomic
from .layout import BUNDLE_FILE, EXITS_FILE, POLICY_FILE, POLICY_WEIGHTS_FILE, TRAJECTORIES_FILE
from .policy import PolicyConfig, choose_arms, policy_inputs, train_reinforce
from .rewards import RewardData

Progress = Callable[[str, int, int], None]  # (stage, done, total)
UPDATE_REPORT = "reports/update_policy.json"
Z_95 = 1.959964
# Two arms with the same speed-up are a tie, not "the policy in use is estimated better": rewards carry about 7
# significant digits (float32 tables, collect's rounding), so gains below this are rounding.
TIE = 1e-6


# ----------------------------------------------------------------------------------------------
# Logged feedback, the reward model and the pseudo-rewards


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


# ----------------------------------------------------------------------------------------------
# Training on offline rows plus logged feedback


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


# ----------------------------------------------------------------------------------------------
# update-policy: a bundle on disk


@dataclass
class UpdateConfig:
    folds: int = 5  # cross-fitting folds of the logs for the estimate of the new policy
    seed: int = 0  # which logged rows go into which fold
    epochs: int | None = None  # training epochs (None: the bundle's policy config)

    def validate(self) -> None:
        checks.integer("folds (--folds)", self.folds, minimum=2)
        checks.seed("seed (--seed)", self.seed)
        if self.epochs is not None:
            checks.integer("epochs (--epochs)", self.epochs, minimum=1)


@dataclass
class UpdateResult:
    replaced: bool  # False: the policy in use is estimated better, nothing was written
    path: Path | None  # the bundle written (None when nothing was)
    report: dict


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _row_features(row: dict, where: str, meta: dict) -> tuple[list[float] | None, list[int] | None]:
    features = row.get("features")
    if not isinstance(features, dict):
        raise CtxdraftError(f"{where}: no 'features' object; the line is not a complete traffic row")
    if meta["feature_kind"] == "tokens":
        tokens = features.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise CtxdraftError(f"{where}: features.tokens must be the prompt's token ids (this bundle routes on tokens)")
        return None, tokens
    hidden = features.get("hidden")
    if not isinstance(hidden, list) or len(hidden) != meta["feature_dim"] or not all(_finite(v) for v in hidden):
        got = len(hidden) if isinstance(hidden, list) else hidden
        raise CtxdraftError(f"{where}: features.hidden must be {meta['feature_dim']} finite numbers (got {got!r}); "
                            "the row was logged by a bundle with other features")
    if features.get("hidden_layer") != meta.get("layer"):
        raise CtxdraftError(f"{where}: features pooled at layer {features.get('hidden_layer')}, but this bundle's policy "
                            f"reads layer {meta.get('layer')}; pass only this bundle's logs")
    return hidden, None


def feedback_from_traffic(traffic, bundle, profile, arm_names: list[str], bundle_hashes: set[str]) -> Feedback:
    """Check every logged row against ``bundle`` and recompute its reward under ``profile`` from the logged
    trajectory. A row from another target, bundle or pool, a propensity outside (0, 1], or a row without its
    trajectory is one CtxdraftError naming the line."""
    from .calibrate import bundle_hash
    from .pool import cost_key, pool_key
    from .traffic import modelled_reward
    from .trajectories import Trajectory

    meta = bundle.info["policy_model"]
    target = bundle.info["target"]
    pool = pool_key(bundle.info["arms"])
    keys = {a["name"]: cost_key(a) for a in bundle.info["arms"]}
    arms, propensity, rewards, hidden, tokens = [], [], [], [], []
    for row, where in zip(traffic.rows, traffic.where):
        if row.get("target") != target.get("hash"):
            raise CtxdraftError(f"{where}: logged for another target (hash {row.get('target')}), not this bundle's "
                                f"{target.get('name')} (hash {target.get('hash')}); pass only this bundle's logs")
        if row.get("bundle") not in bundle_hashes:
            raise CtxdraftError(f"{where}: logged by another bundle (content hash {row.get('bundle')}); this one is "
                                f"{bundle_hash(bundle)} (earlier versions it learned from: {len(bundle_hashes) - 1}); "
                                "pass only this bundle's logs")
        if row.get("pool") != pool:
            raise CtxdraftError(f"{where}: logged for another pool of arms; pass only this bundle's logs")
        arm, p = row.get("arm"), row.get("propensity")
        if arm not in arm_names:
            raise CtxdraftError(f"{where}: arm {arm!r} is not in this bundle's pool {arm_names}")
        if not _finite(p) or not 0 < p <= 1:
            raise CtxdraftError(f"{where}: propensity {p!r} must be in (0, 1]; a row whose arm had no chance of being "
                                "chosen cannot be reweighted (the log is damaged or was written by another program)")
        m = row.get("measurement")
        if not isinstance(m, dict) or not isinstance(m.get("trajectory"), dict) or not isinstance(m.get("plain_steps"), int) \
                or m["plain_steps"] < 0:
            raise CtxdraftError(f"{where}: no measurement.trajectory / plain_steps; the line is not a complete traffic row")
        traj = Trajectory.from_dict(m["trajectory"], f"{where}: measurement.trajectory")
        if 1 + sum(s.accepted + 1 for s in traj.steps) < traj.new_tokens or m["plain_steps"] > traj.new_tokens:
            raise CtxdraftError(f"{where}: the trajectory's steps emit fewer tokens than its new_tokens (or plain_steps "
                                "exceeds them); the line was edited or damaged")
        row_hidden, row_tokens = _row_features(row, where, meta)
        arms.append(arm_names.index(arm))
        propensity.append(float(p))
        rewards.append(modelled_reward(profile, keys[arm], traj, m["plain_steps"]))
        hidden.append(row_hidden)
        tokens.append(row_tokens)
    return Feedback(arm_names, torch.tensor(arms, dtype=torch.long), torch.tensor(propensity, dtype=torch.float64),
                    torch.tensor(rewards, dtype=torch.float64),
                    torch.tensor(hidden, dtype=torch.float32) if meta["feature_kind"] == "hidden" else None,
                    tokens if meta["feature_kind"] == "tokens" else None)


def _profile(bundle):
    """The cost profile rewards are computed with on this machine: the bundle's calibration (made now if routing
    would make it), else the profile in bundle.json."""
    from .costs import CostProfile

    calibration = bundle.calibration(create=True)
    if calibration is not None:
        return calibration.profile, calibration
    profile = CostProfile.from_dict(bundle.info.get("cost_profile"))
    if profile is None:
        raise CtxdraftError(f"bundle {display_path(bundle.path)} has no cost profile of this version to compute rewards "
                            "with; calibrate it (`ctxdraft calibrate`) or collect with it once")
    return profile, None


def _old_choices(bundle, feedback: Feedback, arm_names: list[str]) -> torch.Tensor:
    """What the routing policy in use (``Bundle.router``: this machine's calibration or the shipped policy) picks
    on every logged row, without exploration."""
    router = bundle.router()
    batch = feedback.tokens if feedback.hidden is None else feedback.hidden.numpy()
    picks = router.probs(batch).argmax(1)
    return torch.tensor([arm_names.index(router.arms[int(k)]) for k in picks], dtype=torch.long)


def _file_sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def update_policy(bundle, logs, out: str | os.PathLike | None = None, force: bool = False,
                  config: UpdateConfig | None = None, progress: Progress | None = None) -> UpdateResult:
    """What ``ctxdraft update-policy`` does (module docstring): learn from the traffic ``logs`` (files ``generate
    --log`` wrote) and write the updated bundle to ``out`` (None: in place), unless the policy in use is estimated
    better and ``force`` is False; then nothing is written."""
    from .rewards import read_trajectories, recompute_rewards, rewards_from_rows
    from .pool import cost_key
    from .calibrate import bundle_hash
    from .traffic import read_traffic

    config = config or UpdateConfig()
    config.validate()
    checks.flag("force", force)
    t0 = time.perf_counter()
    meta = bundle.info.get("policy_model")
    if bundle.path is None or not meta or not bundle.info.get("policy"):
        raise CtxdraftError(f"bundle {display_path(bundle.path)} has no trained policy to update; "
                            "run `ctxdraft train-policy` first")
    final = _output_dir(bundle, out)
    traffic = read_traffic(logs)
    if not (bundle.path / TRAJECTORIES_FILE).is_file():
        raise CtxdraftError(f"bundle {display_path(bundle.path)} carries no offline data ({TRAJECTORIES_FILE}) to learn "
                            "alongside the logs; train its policy with `ctxdraft train-policy --data ...`")
    online = bundle.info.get("online") or {}
    hashes = {bundle_hash(bundle), *online.get("lineage", [])}
    rows = read_trajectories(bundle.path)
    profile, calibration = _profile(bundle)
    if progress:
        progress("update-policy: rewards", 0, 1)
    offline = rewards_from_rows(recompute_rewards(rows, {a["name"]: cost_key(a) for a in bundle.info["arms"]}, profile,
                                                  source=TRAJECTORIES_FILE), source=TRAJECTORIES_FILE)
    if set(offline.arm_names) != set(bundle.arms) or set(meta["arms"]) != set(bundle.arms):
        raise CtxdraftError(f"the trajectories in {display_path(bundle.path / TRAJECTORIES_FILE)} are for arms "
                            f"{offline.arm_names}, not the bundle's {bundle.arms}; train the policy again")
    feedback = feedback_from_traffic(traffic, bundle, profile, offline.arm_names, hashes)
    cfg = dict(meta["config"], hidden_sizes=tuple(meta["config"].get("hidden_sizes", ())))
    if config.epochs is not None:
        cfg["epochs"] = config.epochs
    learned = learn_from_feedback(offline, feedback, PolicyConfig(**cfg), _old_choices(bundle, feedback, offline.arm_names),
                                  config.folds, config.seed, force, progress)
    comparison, model = learned.comparison, learned.model
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "logs": traffic.files, "skipped_lines": traffic.skipped,
        "logged_requests": len(feedback),
        "explored": sum(r.get("arm") != r.get("greedy_arm") for r in traffic.rows),
        "logged_arms": {name: int((feedback.arms == a).sum()) for a, name in enumerate(offline.arm_names)},
        "from_bundles": sorted({r["bundle"] for r in traffic.rows}),
        "offline_rows": len(offline),
        "profile": f"calibration {calibration.machine.get('hash')}" if calibration is not None else "bundle.json",
        "reward_model": {"kind": "ridge" if model.weights is not None else "mean",
                         "penalties": dict(zip(offline.arm_names, model.penalties)) if model.penalties else None},
        "mean_logged_speedup": round(float(feedback.rewards.mean()), 6),
        "estimate": comparison.to_dict(), "folds": min(config.folds, len(feedback)),
        "replaced": learned.replace, "forced": bool(force and comparison.gain.value < -TIE),
    }
    if not learned.replace:
        report["total_s"] = round(time.perf_counter() - t0, 1)
        return UpdateResult(False, None, report)
    policy = learned.policy
    report["total_s"] = round(time.perf_counter() - t0, 1)
    record = {"created": report["created"], "logs": [dict(f, sha256=_file_sha(p)) for f, p in zip(traffic.files, logs)],
              "logged_requests": len(feedback), "from_bundles": report["from_bundles"], "estimate": report["estimate"],
              "forced": report["forced"]}
    info = dict(bundle.info, online={"lineage": sorted(hashes), "updates": online.get("updates", []) + [record]})
    _write_bundle(bundle, final, info, policy, meta, offline.arm_names, report, calibration, profile)
    return UpdateResult(True, final, report)


def _output_dir(bundle, out) -> Path:
    from .bundle import DEFAULT_BUNDLE_DIR

    if out is None:
        if bundle.path.resolve() == DEFAULT_BUNDLE_DIR.resolve():
            raise CtxdraftError("the shipped default bundle is part of the installed package; write the update "
                                "elsewhere with --out DIR")
        return bundle.path
    final = Path(out)
    if final.resolve() == bundle.path.resolve():
        return bundle.path
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise CtxdraftError(f"--out {display_path(final)} exists and is not an empty directory; give a new directory "
                            "(or leave --out out to update the bundle in place)")
    return final


def _write_bundle(bundle, final: Path, info: dict, policy, meta: dict, arm_names: list[str], report: dict,
                  calibration, profile) -> None:
    """Stage the updated bundle beside ``final`` and commit it: a new directory is renamed into place; in place,
    the policy files are replaced first and bundle.json (the commit point) last. When the profile came from this
    machine's calibration, the new policy is also stored as the calibration of the new bundle, so that routing
    uses it instead of recalibrating from the offline trajectories alone."""
    from types import SimpleNamespace

    from .calibrate import bundle_hash
    from .train_policy import save_policy

    in_place = final == bundle.path
    weights = meta.get("weights", POLICY_WEIGHTS_FILE)
    stage = final.parent / f".{final.name}.update-{os.getpid()}-{time.time_ns()}.tmp"
    try:
        if in_place:
            stage.mkdir()
            for name in (EXITS_FILE, TRAJECTORIES_FILE):  # what the bundle's content hash reads besides bundle.json
                if (bundle.path / name).is_file():
                    shutil.copy2(bundle.path / name, stage / name)
        else:
            shutil.copytree(bundle.path, stage)
        info["features"] = save_policy(bundle, policy, meta.get("layer"), arm_names, stage / POLICY_FILE, stage / weights)
        info["policy"] = POLICY_FILE
        write_json_atomic(stage / UPDATE_REPORT, report)
        write_text_atomic((stage / UPDATE_REPORT).with_suffix(".md"), report_markdown(report))
        write_json_atomic(stage / BUNDLE_FILE, info)
        if calibration is not None:
            _store_calibration(bundle, bundle_hash(SimpleNamespace(path=stage)), calibration, profile, stage, weights, report)
        if not in_place:
            if final.is_dir():
                final.rmdir()
            os.replace(stage, final)
            return
        for name in (POLICY_FILE, weights, UPDATE_REPORT, str(Path(UPDATE_REPORT).with_suffix(".md")), BUNDLE_FILE):
            (final / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, final / name)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    bundle._router = None


def _store_calibration(bundle, new_hash: str, calibration, profile, stage: Path, weights: str, report: dict) -> None:
    """The updated policy as this machine's calibration of the new bundle (``calibrate.py``'s layout and record)."""
    from .cache import item_lock, staged
    from .calibrate import CALIBRATION_FILE, CALIBRATION_VERSION, calibrations_dir

    final = calibrations_dir() / f"{new_hash}-{calibration.machine['hash']}"
    with item_lock(f"calibration-{final.name}"), staged(final, directory=True) as tmp:
        shutil.copy2(stage / POLICY_FILE, tmp / POLICY_FILE)
        shutil.copy2(stage / weights, tmp / POLICY_WEIGHTS_FILE)
        write_json_atomic(tmp / CALIBRATION_FILE, {
            "version": CALIBRATION_VERSION, "bundle_hash": new_hash, "machine": calibration.machine,
            "profile": profile.to_dict(),
            "report": {"created": report["created"], "update_policy": True, "logged_requests": report["logged_requests"],
                       "rows": report["offline_rows"], "estimate": report["estimate"]}})


def report_markdown(report: dict) -> str:
    """update-policy's report as Markdown: the off-policy estimates and what was learned from."""
    e = report["estimate"]

    def cell(est: dict) -> str:
        if est["low"] is None:
            return f"{est['value']:.3f}"
        return f"{est['value']:.3f} [{est['low']:.3f}, {est['high']:.3f}]"

    decision = "replaced" + (" (forced)" if report["forced"] else "") if report["replaced"] else "kept the policy in use"
    lines = [
        "## update-policy",
        "",
        f"{report['logged_requests']} logged requests ({report['explored']} explored) from "
        f"{len(report['logs'])} log(s), {len(report['skipped_lines'])} unreadable line(s) skipped; "
        f"{report['offline_rows']} offline rows; rewards under the {report['profile']} cost profile.",
        "",
        "| policy | off-policy value (mean speed-up, 95% CI) |",
        "| --- | --- |",
        f"| in use | {cell(e['old'])} |",
        f"| updated ({report['folds']}-fold cross-fitted) | {cell(e['new'])} |",
        f"| gain | {cell(e['gain'])} |",
        "",
        f"Decision: {decision}.",
        "",
    ]
    return "\n".join(lines)
