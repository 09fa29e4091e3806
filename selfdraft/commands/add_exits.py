"""``ctxdraft add-exits`` end to end: train exit heads at some layers and add them as ``exit@E`` arms.

1. Data: the prompts (a stratified train/held-out split) with the target's greedy continuations and its
   states at the exit layers (``exits.data``), cached in ``BUNDLE/.add_exits_work`` for ``--resume``.
2. Heads: distilled on the training prompts (``exits.train``); top-1 agreement on the held-out ones.
3. Settings, with the one cost model (``costs.py``): a cost profile of the bundle's whole pool is measured
   on this machine, each exit's exact greedy trajectories on the held-out prompts are replayed for every
   draft length and confidence threshold (``trajectories.replay``), and the setting with the best mean
   modelled speed-up becomes the arm. ``collect`` computes the policy's rewards from the same profile and
   the same replay, so an exit's speed-up here is the reward collect gives it on the same prompts.
4. Write: weights, report, then bundle.json (the commit point), each atomically.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..base.data import read_prompts, stratified_split, subsample
from ..base.errors import CtxdraftError
from ..base.fileio import display_path, read_json, write_json_atomic
from ..base.layout import EXITS_FILE, EXITS_REPORT, feature_report
from ..drafting.draft import Draft, TeacherForced
from ..drafting.exit_draft import ExitDraft, ExitSettings
from ..drafting.exit_head import ExitHead, save_heads
from ..drafting.feature_draft import FeatureDraft, FeatureSettings, feature_arm
from ..drafting.feature_head import FeatureHead, save_feature_head
from ..drafting.pool import build_draft, cost_key, exit_arm
from ..learning.costs import context_ids, max_positions, measure_profile
from ..learning.exit_train import ExitTrainConfig, agreement, steps_for_budget, train_head
from ..learning.feature_train import acceptance_per_position, train_feature_head
from ..learning.head_data import build_examples, reduced_vocab
from ..learning.trajectories import replay
from ..runtime.distributed import Group
from ..runtime.layers import LayerStack
from ..runtime.target import DEFAULT_TARGET, load_target
from ..serving.bundle import open_or_create_bundle
from ..serving.bundle_info import record_training_ids

WORK_DIR = ".add_exits_work"
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _data_key(target, rows: list[dict], config: ExitTrainConfig) -> str:
    """What the cached training text and states depend on (head checkpoints carry their own settings)."""
    h = hashlib.sha256()
    h.update(target.content_hash.encode())
    h.update(json.dumps([r["prompt"] for r in rows]).encode())
    relevant = {k: getattr(config, k) for k in ("self_distill_tokens", "max_prompt_tokens", "max_prompts",
                                                "eval_frac", "seed", "teacher_topk", "sample_temperature", "use_answers")}
    if config.use_answers:
        h.update(json.dumps([r.get("answer") for r in rows]).encode())
    relevant["layers"] = sorted(config.layers)
    relevant["extend"] = max(config.draft_lens)
    h.update(json.dumps(relevant, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _head_ckpt_name(E: int, config: ExitTrainConfig) -> str:
    tag = hashlib.sha256(json.dumps([config.head, config.draft_vocab, config.steps, config.batch_size, config.lr,
                                     config.ridge] + ([True] if config.aligned_loss else [])).encode()).hexdigest()[:8]
    return f"exit{E}-{tag}.safetensors"


def _prepare_work(work: Path, key: str, resume: bool) -> None:
    if resume and work.is_dir():
        found = read_json(work / "key.json", "add-exits checkpoint key") if (work / "key.json").is_file() else {}
        if not isinstance(found, dict) or found.get("key") != key:
            raise CtxdraftError(f"the checkpoint in {display_path(work)} was made with other data or settings; "
                                "run without --resume to start over")
    elif work.is_dir():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "key.json", {"key": key})


def choose_settings(draft, held_out: list, plain: list, profile, config: ExitTrainConfig, max_new_tokens: int, eos_ids,
                    vocab_size: int) -> list[dict]:
    """Every (draft length, threshold) of ``config`` replayed on the held-out examples and costed with
    ``profile``: mean speed-up over plain decoding, acceptance and tokens per target forward, per setting.
    ``draft`` is the candidate at its longest draft length; its teacher-forced replay is computed once."""
    key = draft.cost_key
    full = [draft.teacher_forced(ex.tp, vocab_size) for ex in held_out]
    options = []
    for K in config.draft_lens:
        for threshold in config.thresholds:
            trajs = [replay(tf.with_settings(K, threshold), ex.tp.token_ids, ex.tp.prompt_len, max_new_tokens, eos_ids)
                     for tf, ex in zip(full, held_out)]
            speedups = [profile.speedup(t, p, key) for t, p in zip(trajs, plain)]
            drafted = sum(t.drafted_tokens for t in trajs)
            options.append({
                "draft_len": K, "threshold": threshold, "speedup": statistics.fmean(speedups),
                "speedups": speedups,
                "acceptance": sum(t.accepted_tokens for t in trajs) / drafted if drafted else 0.0,
                "tokens_per_forward": statistics.fmean(t.tokens_per_forward for t in trajs),
            })
    return options


@dataclass
class Trained:
    """A trained self-draft head, ready to be costed, given its settings and written."""

    draft: Draft  # the candidate arm: the longest draft length, no threshold
    arm: Callable[[int, float], dict]  # (draft length, threshold) -> the arm spec to add
    entry: dict  # what the report (and bundle.json) says about it
    save: Callable[[Path], None]  # writes its weights into the bundle's weights file


def _train_exits(target, layers, vocab_ids, train_ex, held_ex, config, work, progress, group) -> list[Trained]:
    out = []
    for E in layers:
        head = ExitHead(target.model, E, config.head, vocab_ids).float()  # trained in float32, whatever the target's dtype
        info = group.run(lambda: train_head(head, train_ex, config, work / _head_ckpt_name(E, config), progress, group))
        head.to(target.model.dtype)  # drafts in the target's dtype
        spec = exit_arm(ExitSettings(E, max(config.draft_lens), 0.0, head.kind, head.draft_vocab))
        draft = ExitDraft(spec["name"], head, ExitSettings(**spec["settings"]))
        draft.cost_key = cost_key(spec)
        arm = (lambda h: lambda K, thr: exit_arm(ExitSettings(h.exit_layer, K, thr, h.kind, h.draft_vocab, EXITS_FILE)))(head)
        entry = {"kind": "exit", "layer": E, "arm": spec["name"], "head": head.kind, "draft_vocab": head.draft_vocab,
                 "num_params": head.num_params, **agreement(head, held_ex), "train": info}
        out.append(Trained(draft, arm, entry, (lambda h: lambda path: save_heads(path, [h]))(head)))
    return out


def _train_feature(target, layers, vocab_ids, train_ex, held_ex, config, work, progress, group) -> list[Trained]:
    head = FeatureHead(target.model, layers, vocab_ids).float()  # trained in float32, whatever the target's dtype
    ckpt = work / f"feature-{config.name}-{_head_ckpt_name(0, config)}"
    info = group.run(lambda: train_feature_head(head, train_ex, config, ckpt, progress, group))
    head.to(target.model.dtype)
    settings = FeatureSettings(config.name, layers, max(config.draft_lens), 0.0, head.draft_vocab)
    spec = feature_arm(settings)
    draft = FeatureDraft(spec["name"], head, settings)
    draft.cost_key = cost_key(spec)
    chains = [draft.teacher_forced(ex.tp, target.vocab_size) for ex in held_ex]
    arm = lambda K, thr: feature_arm(FeatureSettings(config.name, layers, K, thr, head.draft_vocab, EXITS_FILE))  # noqa: E731
    entry = {"kind": "feature", "name": config.name, "arm": spec["name"], "layers": layers,
             "draft_vocab": head.draft_vocab, "num_params": head.num_params,
             "acceptance_per_position": acceptance_per_position(chains, held_ex, max(config.draft_lens)), "train": info}
    return [Trained(draft, arm, entry, lambda path: save_feature_head(path, config.name, head))]


def add_exits(target, target_spec: str, rows: list[dict], out_dir: str | Path, config: ExitTrainConfig,
              progress: Progress | None = None, group: Group | None = None) -> dict:
    """Train exit heads at ``config.layers`` and add them (weights, arms ``exit@E``, report) to the bundle.

    ``rows``: prompt rows as ``data.read_prompts`` returns them. ``out_dir`` may hold an existing bundle for the
    same target (the exits are added to it; an exit at a layer it already has is replaced).
    Returns the report (also written to ``BUNDLE/reports/add_exits.json``, or ``add_exits_feature_NAME.json`` for a
    feature head).

    Under torchrun (``group``) the ranks build the training data of their share of the prompts, train each head
    under DistributedDataParallel, and rank 0 measures the costs, picks the settings and writes the bundle.
    """
    group = group or Group.single()
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    config.layers = [int(x) for x in config.layers]
    config.validate(target.num_layers, target.vocab_size)
    bundle = open_or_create_bundle(out_dir, target, target_spec, ignore=(WORK_DIR,))
    if len(rows) < 2:
        raise CtxdraftError(f"need at least 2 prompts (training + held-out), the data has {len(rows)}")
    rows = [rows[i] for i in subsample(len(rows), config.max_prompts, config.seed)]
    train_idx, held_idx = stratified_split([r["domain"] for r in rows], config.eval_frac, config.seed)

    work = out_dir / WORK_DIR
    group.run(lambda: _prepare_work(work, _data_key(target, rows, config), config.resume) if group.main else None)
    layers = sorted(config.layers)
    t0 = time.perf_counter()
    common = dict(max_prompt_tokens=config.max_prompt_tokens, new_tokens=config.self_distill_tokens,
                  topk=min(config.teacher_topk, target.vocab_size), work=work, progress=progress, group=group)
    # Training text needs nothing past EOS (extend 0: batched teacher passes); held-out replays do.
    train_rows = [rows[i] for i in train_idx]
    train_ex = build_examples(target, train_rows, layers, extend=0, name="train", use_answers=config.use_answers,
                              **common)
    held_ex = build_examples(target, [rows[i] for i in held_idx], layers, extend=max(config.draft_lens), name="heldout",
                             use_answers=config.use_answers, **common)
    for s in range(config.samples):  # sampled continuations of the training prompts: training text only
        train_ex += build_examples(target, train_rows, layers, extend=0, name="train", sample=s,
                                   temperature=config.sample_temperature, seed=config.seed, **common)
    data_s = time.perf_counter() - t0

    if config.train_tokens is not None:
        config.steps = steps_for_budget(config, train_ex)
    vocab_ids = reduced_vocab(target, train_ex, config.draft_vocab) if config.draft_vocab else None
    train = _train_feature if config.head == "feature" else _train_exits
    trained = train(target, layers, vocab_ids, train_ex, held_ex, config, work, progress, group)

    def finish() -> dict | None:
        return _choose_and_write(target, target_spec, bundle, rows, train_idx, held_idx, train_ex, held_ex, trained,
                                 config, data_s, t_start, progress) if group.main else None

    report = group.broadcast(group.run(finish))
    group.run(lambda: shutil.rmtree(work, ignore_errors=True) if group.main else None)
    return report


def rows_of_domains(rows: list[dict], domains: str | None) -> list[dict]:
    """The rows of the comma-separated ``domains`` (all rows when None or empty); none left is an error."""
    if not domains:
        return rows
    wanted = {d.strip() for d in domains.split(",") if d.strip()}
    kept = [r for r in rows if r["domain"] in wanted]
    if not kept:
        raise CtxdraftError(f"--domain {domains}: no prompt of the data file has that domain")
    return kept


def add_exits_from_file(data_path: str | Path, out_dir: str | Path, config: ExitTrainConfig, *, target: str | None = None,
                        domains: str | None = None, dtype: str = "auto", progress: Progress | None = None,
                        group: Group | None = None) -> dict:
    """What ``ctxdraft add-exits`` does: read the prompt file (only the rows of ``domains`` when given), load the
    target (a spec; the embedded default when None), check ``config`` against it and run ``add_exits``."""
    rows = rows_of_domains(read_prompts(data_path), domains)
    spec = target or DEFAULT_TARGET
    loaded = load_target(spec, dtype=dtype)
    config.validate(loaded.num_layers, loaded.vocab_size)
    return add_exits(loaded, spec, rows, out_dir, config, progress=progress, group=group)


def _choose_and_write(target, target_spec, bundle, rows, train_idx, held_idx, train_ex, held_ex, trained: list[Trained],
                      config, data_s, t_start, progress) -> dict:
    """Measure the pool's costs, pick each head's draft length and threshold, and write the bundle (rank 0)."""
    out_dir, info = bundle.path, bundle.info
    # The cost profile of the whole pool the bundle will have (new heads at their longest candidate length).
    candidates = {t.draft.name: t.draft for t in trained}
    kept_arms = [a for a in info["arms"] if a["name"] not in candidates]
    drafts = {a["name"]: build_draft(a, target, out_dir, bundle.shared) for a in kept_arms}
    drafts.update(candidates)
    if progress:
        progress("timing", 0, 1)
    stack = LayerStack(target.model)
    context = context_ids([ex.tp.token_ids[: ex.tp.prompt_len] for ex in held_ex], config.self_distill_tokens,
                          target.max_context, max_positions(drafts))
    profile = measure_profile(stack, drafts, context, target.vocab_size, config.timing_reps, target.content_hash)
    if progress:
        progress("timing", 1, 1)

    max_new = max(config.self_distill_tokens, 1)
    plain = [replay(TeacherForced(), ex.tp.token_ids, ex.tp.prompt_len, max_new, target.eos_ids) for ex in held_ex]
    L = target.num_layers
    target_params = sum(p.numel() for p in target.model.parameters())
    domains = [ex.row["domain"] for ex in held_ex]
    entries, arms = [], []
    for t in trained:
        options = choose_settings(t.draft, held_ex, plain, profile, config, max_new, target.eos_ids, target.vocab_size)
        best = max(options, key=lambda o: o["speedup"])
        arms.append(t.arm(best["draft_len"], best["threshold"]))
        entry = dict(t.entry, params_frac_of_target=t.entry["num_params"] / target_params,
                     cost_ratio=profile.drafts[t.draft.cost_key]["evaluation_s"] / profile.target_step_s[1],
                     draft_len=best["draft_len"], threshold=best["threshold"], acceptance=best["acceptance"],
                     tokens_per_forward=best["tokens_per_forward"], speedup=best["speedup"],
                     by_domain={d: statistics.fmean(s for s, dd in zip(best["speedups"], domains) if dd == d)
                                for d in sorted(set(domains))},
                     all_settings=[{k: v for k, v in o.items() if k != "speedups"} for o in options])
        if entry["kind"] == "exit":  # verification skips layers [0, E) for the K positions the draft already ran
            entry["verify_layer_tokens_saved"] = best["draft_len"] * entry["layer"] / ((best["draft_len"] + 1) * L)
        entries.append(entry)

    # Write: weights, then the report, then bundle.json (the commit point), each atomically.
    out_dir.mkdir(parents=True, exist_ok=True)
    for t in trained:
        t.save(out_dir / EXITS_FILE)
    brief = lambda e: {k: v for k, v in e.items() if k not in ("all_settings", "by_domain", "train", "kind")}  # noqa: E731
    new_exits = [brief(e) for e in entries if e["kind"] == "exit"]
    old_exits = [e for e in info.get("exits") or [] if e.get("layer") not in {e["layer"] for e in new_exits}]
    info["exits"] = sorted(old_exits + new_exits, key=lambda e: e["layer"])
    new_features = [brief(e) for e in entries if e["kind"] == "feature"]
    if new_features:
        old = [e for e in info.get("feature_heads") or [] if e.get("name") not in {e["name"] for e in new_features}]
        info["feature_heads"] = old + new_features
    info["arms"] = kept_arms + arms
    info["cost_profile"] = profile.to_dict()
    record_training_ids(info, "add-exits" if config.head != "feature" else f"add-exits:feature:{config.name}",
                        [rows[i]["id"] for i in train_idx])
    report = {
        "target": {"spec": target_spec, "name": target.name, "hash": target.content_hash, "num_layers": L,
                   "num_params": target_params},
        "config": {k: v for k, v in asdict(config).items() if k != "resume"},
        "data": {"num_prompts": len(rows), "num_train": len(train_idx), "num_heldout": len(held_idx),
                 "num_train_texts": len(train_ex),
                 "heldout_ids": [rows[i]["id"] for i in held_idx],
                 "train_positions": sum(ex.num_positions for ex in train_ex), "train_tokens_budget": config.train_tokens,
                 "heldout_positions": sum(ex.num_positions for ex in held_ex), "build_s": round(data_s, 1)},
        "costs": {"target_step_s": profile.target_step_s[1], "context_tokens": profile.context_tokens},
        "speedup": "mean over held-out prompts of the modelled speed-up over plain decoding (costs.CostProfile.speedup)",
        "exits": entries,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    write_json_atomic(out_dir / (EXITS_REPORT if config.head != "feature" else feature_report(config.name)), report)
    bundle.save()
    return report
