"""How good a routing policy is on held-out prompts: its mean speed-up against every single arm and the
per-prompt oracle, overall and per domain, as a dict (reports/train_policy.json) and a Markdown table."""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from ..base.errors import CtxdraftError
from ..base.report import Report, Table
from .policy import PolicyConfig, choose_arms, policy_inputs
from .rewards import RewardData


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


def policy_report(data: RewardData, train_idx: list[int], eval_idx: list[int], policies: dict[str, nn.Module],
                  config: PolicyConfig) -> dict:
    """The dict written to reports/train_policy.json: config, split sizes and each policy's `evaluate`."""
    return {
        "feature_kind": config.feature_kind,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "arms": list(data.arm_names),
        "num_train": len(train_idx),
        "num_eval": len(eval_idx),
        "eval_ids": [data.ids[i] for i in eval_idx],
        "policies": {name: evaluate(policy, data, eval_idx) for name, policy in policies.items()},
    }


def training_report(report: dict) -> Report:
    """Held-out mean speed-ups as a table: rows are the policies, each single arm and the oracle; columns are the
    domains and overall. Regret and choices follow below the table."""
    policies = report["policies"]
    first = next(iter(policies.values()))
    columns = sorted(first["domains"]) + ["overall"]

    def block(evaluation: dict, column: str) -> dict:
        return evaluation["overall"] if column == "overall" else evaluation["domains"][column]

    table = Table(["", *columns], [["prompts", *(str(block(first, c)["num_prompts"]) for c in columns)]],
                  ["---"] + ["---:"] * len(columns))
    for name, evaluation in policies.items():
        table.rows.append([f"**policy ({name})**", *(f"**{block(evaluation, c)['policy']:.3f}**" for c in columns)])
    for arm in report["arms"]:
        table.rows.append([arm, *(f"{block(first, c)['arms'][arm]:.3f}" for c in columns)])
    table.rows.append(["oracle (per prompt)", *(f"{block(first, c)['oracle']:.3f}" for c in columns)])
    choices = []
    for name, evaluation in policies.items():
        overall = evaluation["overall"]
        chosen = ", ".join(f"{arm} {n}" for arm, n in overall["choices"].items() if n)
        choices.append(
            f"- {name}: regret to the oracle {overall['regret']:.1%}, "
            f"{overall['gain_over_best_single_arm']:+.1%} vs the best single arm "
            f"({overall['best_single_arm']}, {overall['best_single_arm_speedup']:.3f}); chose: {chosen}"
        )
    intro = (f"Held-out mean speed-up over plain decoding ({report['num_eval']} prompts, "
             f"policy trained on {report['num_train']}, features: {report['feature_kind']}).")
    return Report(None, [intro, table, "\n".join(choices)])


