"""The logged bandit table the policy learns from: one row per prompt, one reward per arm.

A reward is an arm's modelled speed-up over plain decoding on one prompt (``none`` has 1.0). Rows come from
``collect``; rows that carry trajectories can have their rewards recomputed for another machine's cost
profile (``recompute_rewards``), since trajectories are hardware-independent and costs are not.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.errors import CtxdraftError
from ..base.fileio import atomic_path, display_path, read_jsonl
from ..base.layout import TRAJECTORIES_FILE
from .costs import CostProfile, plain_trajectory, reward
from .trajectories import Trajectory


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


def finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def row_features(row: dict, where: str) -> tuple[list[float] | None, list[int] | None]:
    """The routing features of a logged row (collect rows, bundle trajectories and traffic rows share the format:
    ``"features": {"hidden": [F finite numbers], "tokens": [token ids]}``, either may be absent), checked; the one
    validator of them. Returns (hidden, tokens)."""
    features = row.get("features")
    if not isinstance(features, dict):
        raise CtxdraftError(f"{where}: needs a 'features' object with 'hidden' and/or 'tokens'")
    hidden = features.get("hidden")
    if hidden is not None and (not isinstance(hidden, list) or not hidden or not all(finite_number(v) for v in hidden)):
        raise CtxdraftError(f"{where}: features.hidden must be a non-empty list of finite numbers")
    tokens = features.get("tokens")
    if tokens is not None and not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                                    and t >= 0 for t in tokens)):
        raise CtxdraftError(f"{where}: features.tokens must be a list of non-negative integer token ids")
    return hidden, tokens


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
            if not finite_number(speedup) or speedup <= 0:
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

        hidden, tokens = row_features(row, where)
        if hidden is not None:
            if hidden_rows and hidden_rows[0] is not None and len(hidden) != len(hidden_rows[0]):
                raise CtxdraftError(
                    f"{where}: features.hidden has {len(hidden)} values but row 1 has {len(hidden_rows[0])}; "
                    "rows were collected with different feature layers or targets"
                )
        hidden_rows.append(hidden)
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
    return rewards_from_rows(read_jsonl(path, what="rewards file"), source=f"rewards file {display_path(path)}")


def recompute_rewards(rows: list[dict], cost_keys: dict[str, str], profile: CostProfile, source: str = "rewards") -> list[dict]:
    """``rows`` with every arm's ``speedup`` and ``modelled_s`` recomputed from its stored trajectory under
    ``profile``; ``cost_keys`` maps arm names to their drafts' cost keys (``pool.cost_key``)."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source}, row {i + 1}"
        if not isinstance(row.get("plain_steps"), int):
            raise CtxdraftError(f"{where} has no trajectories (plain_steps); re-collect it with this version of ctxdraft")
        num_plain_steps = row["plain_steps"]
        arms = {}
        for name, record in row["arms"].items():
            if name not in cost_keys:
                raise CtxdraftError(f"{where}: arm {name!r} is not in the bundle's pool")
            if not isinstance(record, dict) or "trajectory" not in record:
                raise CtxdraftError(f"{where}: arm {name!r} has no trajectory; re-collect it")
            traj = Trajectory.from_dict(record["trajectory"], f"{where}, arm {name!r}")
            arms[name] = dict(record, speedup=reward(profile, cost_keys[name], traj, num_plain_steps),
                              modelled_s=profile.seconds(traj, cost_keys[name]), tokens_per_forward=traj.tokens_per_forward,
                              nodes_per_step=traj.nodes_per_step)
        out.append(dict(row, arms=arms, plain_s=profile.plain_seconds(plain_trajectory(num_plain_steps, int(row.get("new_tokens", 0))))))
    return out


def write_trajectories(path: Path, rows: list[dict]) -> int:
    """Store the hardware-independent part of collected rows (ids, domains, features, every arm's trajectory)
    as gzipped JSONL, atomically; returns the number of rows written (0, and nothing written, when the rows
    carry no trajectories)."""
    keep = []
    for row in rows:
        arms = row.get("arms") or {}
        if not isinstance(row.get("plain_steps"), int) or not all(isinstance(a, dict) and "trajectory" in a for a in arms.values()):
            return 0
        features = dict(row.get("features") or {})
        if features.get("hidden") is not None:
            features["hidden"] = [float(f"{x:.5g}") for x in features["hidden"]]
        keep.append({"id": row["id"], "domain": row.get("domain", "all"), "prompt_len": row.get("prompt_len"),
                     "max_new_tokens": row.get("max_new_tokens"), "new_tokens": row.get("new_tokens"),
                     "plain_steps": row["plain_steps"], "features": features,
                     "arms": {name: {"trajectory": a["trajectory"]} for name, a in arms.items()}})
    payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in keep).encode()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
            f.write(payload)
    return len(keep)


def read_trajectories(bundle_dir: Path | None) -> list[dict]:
    """The rows ``write_trajectories`` stored in a bundle."""
    path = Path(bundle_dir) / TRAJECTORIES_FILE if bundle_dir is not None else None
    if path is None or not path.is_file():
        raise CtxdraftError(f"bundle {display_path(bundle_dir)} carries no trajectories ({TRAJECTORIES_FILE}), so it "
                            "cannot be calibrated; train its policy again with `ctxdraft train-policy --data ...`")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as e:
        raise CtxdraftError(f"{display_path(path)} is damaged ({type(e).__name__}); rebuild the bundle") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise CtxdraftError(f"{display_path(path)} holds no trajectory rows; rebuild the bundle")
    return rows


def nodes_per_step(record: dict) -> float:
    """An arm record's mean draft positions verified per step (rows collected before trees: from its trajectory)."""
    if "nodes_per_step" in record:
        return record["nodes_per_step"]
    return Trajectory.from_dict(record["trajectory"]).nodes_per_step if "trajectory" in record else 0.0


def summarize(rows: list[dict], arm_names: list[str]) -> dict:
    """Mean speed-up per arm, of the per-prompt oracle, and which arm is best how often, overall and per domain."""

    def block(subset: list[dict]) -> dict:
        speedups = {a: statistics.fmean(r["arms"][a]["speedup"] for r in subset) for a in arm_names}
        tpf = {a: statistics.fmean(r["arms"][a]["tokens_per_forward"] for r in subset) for a in arm_names}
        nps = {a: statistics.fmean(nodes_per_step(r["arms"][a]) for r in subset) for a in arm_names}
        best_counts = {a: 0 for a in arm_names}
        for r in subset:
            best_counts[max(arm_names, key=lambda a: r["arms"][a]["speedup"])] += 1
        best = max(speedups, key=speedups.get)
        return {"num_prompts": len(subset), "speedup": speedups, "tokens_per_forward": tpf, "nodes_per_step": nps,
                "oracle": statistics.fmean(max(r["arms"][a]["speedup"] for a in arm_names) for r in subset),
                "best_single_arm": best, "oracle_choices": best_counts}

    rows = [r for r in rows if all(a in r.get("arms", {}) for a in arm_names)]
    if not rows:
        return {"num_rows": 0}
    domains = sorted({str(r.get("domain", "all")) for r in rows})
    return {"num_rows": len(rows), "overall": block(rows),
            "domains": {d: block([r for r in rows if str(r.get("domain", "all")) == d]) for d in domains}}
