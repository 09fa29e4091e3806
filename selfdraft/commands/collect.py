"""Offline bandit data for the routing policy: every arm's exact greedy trajectory and its reward, per prompt.

Per prompt the target's greedy continuation is decoded once (for real, with a lookup arm, whose real run is
checked against its simulation), then ONE teacher pass gives every arm's exact trajectory
(``trajectories.py``), and the cost model (``costs.py``) turns each into a reward: the modelled speed-up over
plain decoding on this machine. Rows keep the trajectories (hardware-independent) next to the rewards
(hardware-dependent), so ``rewards.recompute_rewards`` can redo the rewards for another machine's profile without
running the target again. Rows are appended and flushed as they are done; ``resume`` continues a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..base import checks
from ..base.data import read_prompts
from ..base.errors import CtxdraftError
from ..base.features import default_feature_layer, hidden_features, hidden_spec
from ..base.fileio import atomic_path, display_path, write_json_atomic
from ..base.layout import COLLECT_REPORT
from ..drafting.draft import Draft
from ..drafting.pool import build_drafts, pool_key, with_draft_len
from ..learning.costs import (
    CostProfile,
    context_ids,
    max_depth,
    max_positions,
    measure_profile,
    plain_steps,
    plain_trajectory,
    reward,
    set_costs,
)
from ..learning.rewards import summarize
from ..learning.trajectories import Trajectory, greedy_continuation, teacher_pass, trajectories
from ..runtime.distributed import Group
from ..serving.bundle import load_bundle
from ..serving.profiles import profile_for
from .wallclock import wallclock_check

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class CollectConfig:
    max_new_tokens: int = 128
    draft_len: int | None = None  # override every drafting arm's draft length (recorded in the rows' pool hash)
    feature_layer: int | None = None  # None: the bundle's hidden-feature layer, else round(L / 3)
    resume: bool = False  # skip ids already in the output file
    wallclock_sample: int = 0  # prompts to also run for real with every arm, to check the cost model
    reprofile: bool = False  # measure the costs again even when the bundle has a fitting profile
    profile_reps: int = 7

    def validate(self) -> None:
        checks.integer("max_new_tokens (--max-new-tokens)", self.max_new_tokens, minimum=1)
        if self.draft_len is not None:
            checks.integer("draft_len (--draft-len)", self.draft_len, minimum=1)
        if self.feature_layer is not None:
            checks.integer("feature_layer", self.feature_layer, minimum=1)
        checks.integer("wallclock_sample (--wallclock-sample)", self.wallclock_sample, minimum=0)
        checks.integer("profile_reps", self.profile_reps, minimum=1)


def _round(x: float) -> float:
    return float(f"{x:.7g}")


def _prompt_sha(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


def arm_record(traj: Trajectory, profile: CostProfile, cost_key: str, num_plain_steps: int) -> dict:
    seconds = profile.seconds(traj, cost_key)
    return {
        "speedup": _round(reward(profile, cost_key, traj, num_plain_steps)),
        "target_forwards": traj.target_forwards,
        "drafted_tokens": traj.drafted_tokens,
        "accepted_tokens": traj.accepted_tokens,
        "evaluations": traj.evaluations,
        "tokens_per_forward": _round(traj.tokens_per_forward),
        "nodes_per_step": _round(traj.nodes_per_step),
        "modelled_s": _round(seconds),
        "trajectory": traj.to_dict(),
    }


def collect_prompt(bundle, drafts: dict[str, Draft], prompt_ids: list[int], profile: CostProfile,
                   config: CollectConfig, feature_layer: int | None, check_arm: str | None) -> dict:
    """One prompt: the target's continuation, its features, and every arm's trajectory and reward."""
    target, stack = bundle.target, bundle.stack
    t0 = time.perf_counter()
    run = greedy_continuation(stack, prompt_ids, config.max_new_tokens, target.eos_ids,
                              drafts[check_arm] if check_arm is not None else None, feature_layer)
    generate_s = time.perf_counter() - t0
    layers = sorted({E for d in drafts.values() for E in d.state_layers})
    topk = max([d.observe_top_k for d in drafts.values()] + [0])  # a successor table replays from the target's top-k
    tp = teacher_pass(stack, prompt_ids, run.new_ids, target.eos_ids, ended_on_eos=run.ended_on_eos, layers=layers,
                      extend=max_depth(drafts), topk=topk)
    trajs = trajectories(drafts, tp, config.max_new_tokens, target.eos_ids, target.vocab_size)
    num_plain_steps = plain_steps(len(run.new_ids), config.max_new_tokens, run.ended_on_eos)
    checked = None
    if check_arm is not None:
        t, s = trajs[check_arm], run.stats
        checked = (t.target_forwards, t.drafted_tokens, t.accepted_tokens, t.new_tokens) == (
            s.target_forwards, s.drafted_tokens, s.accepted_tokens, s.new_tokens)
    hidden = hidden_features(run.pooled_hidden, len(prompt_ids)) if run.pooled_hidden is not None else None
    return {
        "prompt_len": len(prompt_ids), "max_new_tokens": config.max_new_tokens, "new_tokens": len(run.new_ids),
        "stop": "eos" if run.ended_on_eos else "length",
        "features": {"hidden": [_round(x) for x in hidden.tolist()] if hidden is not None else None,
                     "hidden_layer": feature_layer, "tokens": list(prompt_ids)},
        "arms": {name: arm_record(t, profile, drafts[name].cost_key, num_plain_steps) for name, t in trajs.items()},
        "plain_steps": num_plain_steps,
        "plain_s": _round(profile.plain_seconds(plain_trajectory(num_plain_steps, len(run.new_ids)))),
        "generate_s": round(generate_s, 4), "simulate_s": round(time.perf_counter() - t0 - generate_s, 4),
        "checked": checked,
    }


def bundle_profile(bundle, drafts: dict[str, Draft], token_lists: list[list[int]], max_new_tokens: int, reps: int,
                   reprofile: bool = False) -> tuple[CostProfile, bool]:
    """The bundle's stored cost profile when it has every timing ``drafts`` need, else a fresh measurement
    (stored in bundle.json). Returns the profile and whether it was measured now."""
    target = bundle.target
    profile, _ = profile_for(bundle, calibration="ignore")
    if profile is not None and not reprofile and profile.fits(drafts, target.content_hash):
        return profile, False
    context = context_ids(token_lists, max_new_tokens, target.max_context, max_positions(drafts))
    profile = measure_profile(bundle.stack, drafts, context, target.vocab_size, reps, target.content_hash)
    bundle.info["cost_profile"] = profile.to_dict()
    return profile, True


def collect(bundle, rows: list[dict], out_path: str | os.PathLike, config: CollectConfig | None = None,
            progress: Progress | None = None, group: Group | None = None) -> dict:
    """Log every arm's trajectory and reward for every prompt of ``rows`` (``data.read_prompts`` rows) into
    ``out_path``, one JSON row per prompt (``rewards.load_rewards`` reads them)::

        {"id", "domain", "prompt_sha", "prompt_len", "max_new_tokens", "new_tokens", "stop": "eos"|"length",
         "pool": <hash of the arms' settings>,
         "features": {"hidden": [D + 1 floats], "hidden_layer": f, "tokens": [prompt ids]},
         "arms": {name: {"speedup", "target_forwards", "drafted_tokens", "accepted_tokens", "evaluations",
                         "tokens_per_forward", "nodes_per_step", "modelled_s", "trajectory": {"new_tokens", "steps"}}},
         "plain_steps", "plain_s": modelled seconds of plain decoding, "generate_s": seconds of the real run}

    Profiles the costs once per bundle (bundle.json ``cost_profile``) and sets bundle.json ``features`` when
    the bundle has no policy yet. Returns a summary (also in ``reports/collect.json``).

    Under torchrun (``group``) the prompts are sharded over the ranks: each writes its rows to its own
    resumable ``OUT.rank<r>`` file, rank 0 measures the costs once (and shares them) and at the end merges the
    shards into ``out_path`` in prompt order, atomically; the rows equal a one-process run's.
    """
    group = group or Group.single()
    config = config or CollectConfig()
    config.validate()
    if not rows:
        raise CtxdraftError("no prompts to collect")
    _check_rows(rows)
    t_start = time.perf_counter()
    out_path = Path(out_path)
    target = bundle.target
    L = target.num_layers
    arms = with_draft_len(bundle.info["arms"], config.draft_len)
    key = pool_key(arms)
    arm_names = [a["name"] for a in arms]
    drafts = build_drafts(arms, target, bundle.path, bundle.shared)

    features_info = bundle.info.get("features") or {}
    feature_layer = config.feature_layer or (features_info.get("layer") if features_info.get("kind") == "hidden" else None) \
        or default_feature_layer(L)
    if not 0 < feature_layer <= L:
        raise CtxdraftError(f"feature layer {feature_layer} is outside 1..{L}")

    prompts = {r["id"]: _prompt_sha(r["prompt"]) for r in rows}
    # Rank 0 folds the shards of an interrupted multi-rank run into the file (or clears them), then every rank
    # reads what is done.
    group.run(lambda: _merge_shards(out_path, keep=config.resume) if group.main else None)
    done_rows = read_rows_for_resume(out_path) if config.resume else []
    _check_resume(done_rows, out_path, key, config, prompts)
    done_ids = {r.get("id") for r in done_rows}
    todo = [r for r in rows if r["id"] not in done_ids]
    encoded = {}
    for r in todo:
        ids = target.encode(r["prompt"], chat=True)
        if len(ids) + config.max_new_tokens > target.max_context:
            raise CtxdraftError(f"prompt {r['id']!r} ({len(ids)} tokens) + --max-new-tokens {config.max_new_tokens} "
                                f"exceeds the model's context of {target.max_context} tokens")
        encoded[r["id"]] = ids

    def measure():  # rank 0: the costs are measured once and shared
        token_lists = list(encoded.values()) or [target.encode(rows[0]["prompt"])]
        profile, profiled = bundle_profile(bundle, drafts, token_lists, config.max_new_tokens, config.profile_reps,
                                           config.reprofile)
        # The routing features: the hidden state at the collection's layer, unless a trained policy fixed them.
        spec = hidden_spec(feature_layer, target.model.config.hidden_size + 1)
        features_changed = not bundle.info.get("policy") and bundle.info.get("features") != spec
        if features_changed:
            bundle.info["features"] = spec
        if (profiled or features_changed) and bundle.path is not None:
            bundle.save()
        return profile.to_dict(), profiled, bundle.info.get("features")

    profile_dict, profiled, features = group.broadcast(group.run(lambda: measure() if group.main else None))
    profile = CostProfile.from_dict(profile_dict)
    bundle.info["cost_profile"], bundle.info["features"] = profile_dict, features
    set_costs(drafts, profile)  # tree drafts size their trees with it, as when the bundle serves them

    check_arm = next((a["name"] for a in arms if a["kind"] == "lookup"), None)
    mine = group.shard(todo)
    path = out_path if not group.active else _shard_path(out_path, group.rank)

    def collect_mine() -> dict:
        counts = {"checked": 0, "exact": 0, "generate_s": 0.0, "simulate_s": 0.0}
        path.parent.mkdir(parents=True, exist_ok=True)
        resume = config.resume and path.is_file()
        if resume:
            read_rows_for_resume(path)  # drops a half-written last line
        with open(path, "a" if resume else "w", encoding="utf-8") as f:
            if resume and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
                f.write("\n")
            for i, r in enumerate(mine):
                result = collect_prompt(bundle, drafts, encoded[r["id"]], profile, config, feature_layer, check_arm)
                counts["generate_s"] += result["generate_s"]
                counts["simulate_s"] += result["simulate_s"]
                checked = result.pop("checked")
                if checked is not None:
                    counts["checked"] += 1
                    counts["exact"] += bool(checked)
                row = {"id": r["id"], "domain": r.get("domain", "all"), "prompt_sha": prompts[r["id"]], "pool": key,
                       **result}
                f.write(json.dumps(row) + "\n")
                f.flush()
                if progress is not None:
                    progress("collect", i + 1, len(mine))
        return counts

    counts = group.gather(group.run(collect_mine))
    order = {r["id"]: i for i, r in enumerate(rows)}
    group.run(lambda: _merge_shards(out_path, keep=True, order=order) if group.main and group.active else None)

    def summarise() -> dict:
        all_rows = read_rows_for_resume(out_path)
        summary = summarize(all_rows, arm_names)
        total = lambda name: sum(c[name] for c in counts)  # noqa: E731
        summary.update({
            "out": display_path(out_path),
            "num_new": len(todo),
            "num_skipped": len(rows) - len(todo),
            "ranks": group.size,
            "max_new_tokens": config.max_new_tokens,
            "feature_layer": feature_layer,
            "pool": key,
            "profiled_now": profiled,
            "cost_profile": {"context_tokens": profile.context_tokens,
                             "target_step_ms": {str(m): round(s * 1e3, 3) for m, s in profile.target_step_s.items()},
                             "evaluation_ms": {name: round(profile.drafts[d.cost_key]["evaluation_s"] * 1e3, 4)
                                               for name, d in drafts.items()}},
            "exactness_check": {"arm": check_arm, "prompts": total("checked"), "exact": total("exact")},
            "seconds": {"total": round(time.perf_counter() - t_start, 1), "generate": round(total("generate_s"), 1),
                        "simulate": round(total("simulate_s"), 1)},
        })
        if config.wallclock_sample:
            if config.draft_len is not None:
                summary["wallclock"] = {"skipped": "--draft-len overrides the bundle's arms; Bundle.generate runs the "
                                                   "bundle's own settings"}
            else:
                summary["wallclock"] = wallclock_check(bundle, rows, all_rows, arm_names, config.wallclock_sample,
                                                       config.max_new_tokens)
        if bundle.path is not None:
            write_json_atomic(bundle.path / COLLECT_REPORT, summary)
        return summary

    return group.broadcast(group.run(lambda: summarise() if group.main else None))


def _shard_path(out_path: Path, rank: int) -> Path:
    return out_path.with_name(f"{out_path.name}.rank{rank}")


def _merge_shards(out_path: Path, keep: bool, order: dict | None = None) -> None:
    """Fold the per-rank files ``OUT.rank<r>`` into ``out_path`` (atomically; rows already there first, then the
    shards' rows in prompt order ``order``), then delete them; with ``keep`` False just delete them."""
    shards = sorted(out_path.parent.glob(f"{out_path.name}.rank*")) if out_path.parent.is_dir() else []
    if not shards:
        return
    if keep:
        done = read_rows_for_resume(out_path)
        seen = {r.get("id") for r in done}
        new = [r for shard in shards for r in read_rows_for_resume(shard) if r.get("id") not in seen]
        if order is not None:
            new.sort(key=lambda r: order.get(r.get("id"), len(order)))
        with atomic_path(out_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in done + new), encoding="utf-8")
    for shard in shards:
        shard.unlink(missing_ok=True)


def read_rows_for_resume(path: Path) -> list[dict]:
    """Rows already collected; a half-written last line (an interrupted run) is cut off the file."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows = []
    good_bytes = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            if lineno >= len(lines) - 1 and not raw.endswith(b"\n"):
                with open(path, "r+b") as f:  # the interrupted last row: drop it, it will be collected again
                    f.truncate(good_bytes)
                break
            raise CtxdraftError(f"rewards file {display_path(path)}, line {lineno}: not a JSON object; fix or delete the file") from None
        rows.append(row)
        good_bytes += len(line) + 1
    return rows


def can_resume(path: Path, key: str, max_new_tokens: int) -> bool:
    """Whether an existing rewards file can be continued (same pool and settings); otherwise start over."""
    try:
        rows = read_rows_for_resume(Path(path))
    except CtxdraftError:
        return False
    return bool(rows) and all(r.get("pool") == key and r.get("max_new_tokens") == max_new_tokens for r in rows)


def _check_resume(rows: list[dict], path: Path, key: str, config: CollectConfig, prompts: dict) -> None:
    for i, row in enumerate(rows):
        where = f"{display_path(path)}, row {i + 1}"
        if row.get("pool") != key:
            raise CtxdraftError(f"{where} was collected for another pool of arms (or --draft-len); "
                                "run without --resume to start over, or write to another --out")
        if row.get("max_new_tokens") != config.max_new_tokens:
            raise CtxdraftError(f"{where} was collected with --max-new-tokens {row.get('max_new_tokens')}, not "
                                f"{config.max_new_tokens}; use the same value or start over without --resume")
        sha = prompts.get(row.get("id"))
        if sha is not None and sha != row.get("prompt_sha"):
            raise CtxdraftError(f"{where}: id {row.get('id')!r} has another prompt in the data file; "
                                "ids must identify prompts (start over without --resume)")


def _check_rows(rows: list[dict]) -> None:
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool):
            raise CtxdraftError(f"data row {i + 1}: 'id' must be a string or an integer, got {row.get('id')!r}")
        if row["id"] in seen:
            raise CtxdraftError(f"data row {i + 1}: duplicate id {row['id']!r}; ids must be unique")
        seen.add(row["id"])


def collect_file(bundle_dir: str | os.PathLike, data_path: str | os.PathLike, out_path: str | os.PathLike,
                 config: CollectConfig, *, dtype: str = "auto", progress: Progress | None = None,
                 group: Group | None = None) -> dict:
    """What ``ctxdraft collect`` does: check ``config``, read the prompt file, load the bundle (with its shipped
    policy: collecting measures the arms, not a calibration) and ``collect`` into ``out_path``."""
    config.validate()
    rows = read_prompts(data_path)
    return collect(load_bundle(bundle_dir, dtype=dtype, calibrate=False), rows, out_path, config, progress, group)
