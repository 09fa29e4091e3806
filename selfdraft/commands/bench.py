"""Wall-clock benchmark: ctxdraft's arms and policy against Hugging Face ``generate``, in one process.

Every prompt runs every method before the next prompt starts, and the method order rotates from prompt to
prompt (and repeat to repeat), so drift on a shared machine (other jobs, thermal, caches) hits every
method alike. Methods (each one timed by the same wall clock around the whole call, prefill included):

- ``hf-generate``: ``model.generate`` with the same prompt ids (``Target.encode``), greedy. The reference:
  every greedy output is compared with its token ids (EOS-trimmed alike) and speed-ups are relative to it.
- ``hf-lookup``: HF assisted generation with prompt lookup (``prompt_lookup_num_tokens``).
- ``hf-early-exit@E``: HF ``assistant_early_exit=E`` (layers [0, E) + the model's own final norm and LM
  head; HF has no place for a trained exit head), at the bundle's best exit layer.
- every ctxdraft arm (``Bundle.generate(draft=arm)``), and ``auto`` (the bundle's policy) when it has one.
- ``oracle``: per prompt, the fastest ctxdraft arm of that prompt's runs (not a method that can be run:
  the upper bound a perfect policy over this pool would reach on this machine).

Terms (Spec-Bench's): *tokens/s* = new tokens / seconds; *speed-up* = a method's tokens/s over
``hf-generate``'s; *tokens per forward* = new tokens per target forward after the first (the prefill),
i.e. the mean accepted draft tokens + 1. HF methods count target forwards with a forward hook.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..base.data import first_per_domain, read_prompts, rotated
from ..base.errors import CtxdraftError
from ..base.fileio import display_path
from ..drafting.ties import compare_greedy
from ..runtime.machine import dtype_name, machine_fingerprint
from ..serving.bundle import DEFAULT_BUNDLE_DIR, Bundle, load_bundle
from ..serving.bundle_info import trained_ids, versions
from .bench_report import (
    ORACLE,
    OVERALL,
    REFERENCE,
    BenchReport,
    Mismatch,
    PromptResult,
    oracle_results,
    summaries,
    write_bench_outputs,
)
from .bench_runs import BenchConfig, BenchPrompt, RunOutput, hf_generate

SPLITS = ("eval", "all")
WARMUP_TOKENS = 16

Progress = Callable[[str, int, int], None]  # (stage, done, total)


# ----------------------------------------------------------------------------------------------------
# Configuration and results
# ----------------------------------------------------------------------------------------------------


@dataclass
class Method:
    name: str
    family: str  # "hf" | "ctxdraft"
    run: Callable[[BenchPrompt, BenchConfig], RunOutput]


# ----------------------------------------------------------------------------------------------------
# Choosing prompts and methods
# ----------------------------------------------------------------------------------------------------
def select_prompts(rows: list[dict], bundle: Bundle, split: str = "eval", per_domain: int | None = None) -> tuple[list[dict], list[str]]:
    """The rows to bench (split first, then the first ``per_domain`` of each domain) and notes on the choice.

    ``eval``: the prompts no part of the bundle trained on (bundle.json ``trained_on``: add-exits' and
    train-policy's training ids); ``all``: every prompt."""
    if split not in SPLITS:
        raise CtxdraftError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    notes = []
    if split == "eval":
        trained = trained_ids(bundle.info)
        if trained is None:
            notes.append("split: the bundle records no training prompts, so all prompts are used "
                         "(its exits or policy may have trained on some of them)")
        else:
            kept = [r for r in rows if str(r["id"]) not in trained]
            if not kept:
                raise CtxdraftError(f"every prompt of the data file was used to train the bundle ({len(trained)} "
                                    "training ids recorded); bench held-out prompts, or pass --split all")
            notes.append(f"split: the {len(kept)} of {len(rows)} prompts the bundle did not train on")
            rows = kept
    else:
        notes.append(f"split: all {len(rows)} prompts")
    if per_domain is not None:
        rows = first_per_domain(rows, per_domain)
        notes.append(f"per domain: the first {per_domain} prompts of each domain")
    return rows, notes


def best_exit_layer(info: dict) -> int | None:
    """The exit layer with the best recorded speed-up (then agreement), or None without exits."""
    exits = [e for e in info.get("exits") or [] if isinstance(e.get("layer"), int)]
    if not exits:
        return None
    return max(exits, key=lambda e: (e.get("speedup") or 0.0, e.get("agreement") or 0.0))["layer"]


def ctxdraft_generate(bundle: Bundle, prompt: BenchPrompt, config: BenchConfig, arm: str) -> RunOutput:
    t0 = time.perf_counter()
    result = bundle.generate(prompt.prompt, draft=arm, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                             seed=config.seed + prompt.index if not config.greedy else None)
    seconds = time.perf_counter() - t0
    if result.prompt_ids != prompt.prompt_ids:
        raise RuntimeError(f"Bundle.generate encoded prompt {prompt.id!r} differently from Target.encode")
    return RunOutput(result.token_ids, seconds, result.stats.target_forwards, result.arm, result.stats.nodes_verified)


def build_methods(bundle: Bundle, config: BenchConfig) -> tuple[list[Method], list[str]]:
    """The methods to run (reference first) and notes on what was left out and why."""
    notes = []
    methods = [Method(REFERENCE, "hf", lambda p, c: hf_generate(bundle, p, c))]
    if config.baselines in ("hf", "lookup"):
        methods.append(Method("hf-lookup", "hf", lambda p, c: hf_generate(
            bundle, p, c, prompt_lookup_num_tokens=c.hf_lookup_tokens, max_matching_ngram_size=c.hf_lookup_ngram)))
    if config.baselines == "lookup":
        notes.append("HF early exit and assisted generation not run (--baselines lookup)")
    elif config.baselines == "hf":
        layer = best_exit_layer(bundle.info)
        if layer is None:
            notes.append("hf-early-exit: skipped, the bundle has no exits")
        else:
            methods.append(Method(f"hf-early-exit@{layer}", "hf", lambda p, c: hf_generate(bundle, p, c, assistant_early_exit=layer)))
        model_arms = [a["name"] for a in bundle.info["arms"] if a["kind"] == "model"]
        if model_arms:  # HF assisted generation with the pool's (first) draft model: the peer to beat
            draft = model_arms[0]
            methods.append(Method("hf-assisted", "hf", lambda p, c: hf_generate(
                bundle, p, c, assistant_model=bundle.draft(draft).model)))
            notes.append(f"hf-assisted: HF assisted generation with the draft model of {draft} (HF's own draft-length schedule)")
    else:
        notes.append("HF assisted baselines not run (--baselines none)")

    has_policy = bool(bundle.info.get("policy"))
    if config.arms is None:
        arms = list(bundle.arms) + ["auto"]
    else:
        for name in config.arms:
            if name != "auto":
                bundle.arm_spec(name)  # unknown arm: a clear error before any model work
        arms = list(dict.fromkeys(config.arms))
    for arm in arms:
        if arm == "auto" and not has_policy:
            notes.append("auto: skipped, the bundle has no policy (train one with `ctxdraft train-policy`)")
            continue
        methods.append(Method(arm, "ctxdraft", lambda p, c, arm=arm: ctxdraft_generate(bundle, p, c, arm)))
    return methods, notes


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------
def _environment(bundle: Bundle) -> dict:
    target = bundle.target
    fingerprint = machine_fingerprint(target.dtype)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": fingerprint["processor"],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": fingerprint["device"],
        "dtype": dtype_name(target.dtype),
        "machine": fingerprint,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": versions(),
        "target": {"name": target.name, "hash": target.content_hash, "num_layers": target.num_layers},
        "bundle": ("the shipped default bundle" if bundle.path is not None and Path(bundle.path).resolve() == DEFAULT_BUNDLE_DIR.resolve()
                   else display_path(bundle.path)),
        "routing_policy": bundle.calibration_note(),
    }


def run_bench(bundle: Bundle, rows: list[dict], config: BenchConfig, progress: Progress | None = None,
              extra_methods: list[Method] | tuple = ()) -> BenchReport:
    """Run every method on every row (``{"id", "domain", "prompt"}``), interleaved; see the module docstring.

    ``extra_methods`` are timed and checked like the others (a method of your own, or a test's).
    """
    config.validate()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_bench(bundle, rows, config, progress, list(extra_methods))
    finally:
        torch.set_num_threads(threads)


def _run_bench(bundle: Bundle, rows: list[dict], config: BenchConfig, progress: Progress | None,
               extra_methods: list[Method]) -> BenchReport:
    if not rows:
        raise CtxdraftError("no prompts to bench")
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise CtxdraftError(f"prompt ids must be unique (results are keyed by them); repeated: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    t_start = time.perf_counter()
    methods, notes = build_methods(bundle, config)
    methods += list(extra_methods)
    names = [m.name for m in methods]
    if len(set(names)) != len(names) or ORACLE in names:
        raise CtxdraftError(f"method names must be unique and not {ORACLE!r}: {names}")
    environment = _environment(bundle)
    target = bundle.target

    prompts: list[BenchPrompt] = []
    too_long = []
    for row in rows:
        ids = target.encode(row["prompt"])
        if len(ids) + config.max_new_tokens > target.max_context:
            too_long.append(row["id"])
            continue
        prompts.append(BenchPrompt(row["id"], str(row.get("domain", "all")), row["prompt"], ids, len(prompts)))
    if too_long:
        notes.append(f"skipped {len(too_long)} prompts longer than the context allows: {too_long}")
    if not prompts:
        raise CtxdraftError("every prompt is too long for the model's context with this --max-new-tokens")

    if config.warmup:
        warm = BenchConfig(**{**asdict(config), "max_new_tokens": min(config.max_new_tokens, WARMUP_TOKENS)})
        kept = []
        for i, method in enumerate(methods):
            if progress:
                progress("warm-up", i, len(methods))
            try:
                method.run(prompts[0], warm)
            except Exception as e:  # an HF mode this model or transformers version cannot do: say so, go on
                if method.family != "hf" or method.name == REFERENCE:
                    raise
                notes.append(f"{method.name}: skipped, it failed on warm-up ({type(e).__name__}: {str(e).splitlines()[0]})")
                continue
            kept.append(method)
        methods = kept

    runs: dict[tuple[int, str], list[RunOutput]] = {}
    mismatches: list[Mismatch] = []
    bad: set[tuple[int, str]] = set()  # (prompt index, method) with any differing repeat
    total = len(prompts) * config.repeats
    for prompt in prompts:
        for repeat in range(config.repeats):
            if progress:
                progress("bench", prompt.index * config.repeats + repeat, total)
            for method in rotated(methods, prompt.index * config.repeats + repeat):
                runs.setdefault((prompt.index, method.name), []).append(method.run(prompt, config))
        if config.greedy:
            expected = runs[(prompt.index, REFERENCE)][0].token_ids
            for method in methods:
                for repeat, out in enumerate(runs[(prompt.index, method.name)]):
                    if out.token_ids != expected:
                        bad.add((prompt.index, method.name))
                        d = compare_greedy(bundle.stack, prompt.prompt_ids, expected, out.token_ids, target.eos_ids,
                                           config.tie_tolerance)
                        mismatches.append(Mismatch(prompt.id, prompt.domain, method.name, repeat, d.position,
                                                   len(expected), len(out.token_ids), d.kind, d.gap))
    if progress:
        progress("bench", total, total)

    results = []
    for prompt in prompts:
        for method in methods:
            outs = runs[(prompt.index, method.name)]
            seconds_all = [o.seconds for o in outs]
            results.append(PromptResult(prompt.id, prompt.domain, method.name, len(outs[0].token_ids),
                                        statistics.median(seconds_all), seconds_all, outs[0].target_forwards, outs[0].arm,
                                        ((prompt.index, method.name) not in bad) if config.greedy else None,
                                        outs[0].nodes_verified))
    arm_methods = [m.name for m in methods if m.family == "ctxdraft" and m.name != "auto"]
    if arm_methods:
        results += oracle_results(results, arm_methods)
        method_rows = [{"name": m.name, "family": m.family} for m in methods] + [{"name": ORACLE, "family": "oracle"}]
    else:
        method_rows = [{"name": m.name, "family": m.family} for m in methods]
        notes.append("oracle: skipped, no ctxdraft arm was run")

    domains = list(dict.fromkeys(p.domain for p in prompts))
    summary = {d: summaries(results, method_rows, mismatches, d) for d in domains}
    summary[OVERALL] = summaries(results, method_rows, mismatches, None)
    if environment.get("load_average_start") is not None:
        environment["load_average_end"] = list(os.getloadavg())
    environment["routing_policy"] = bundle.calibration_note()  # after the runs: auto may have calibrated on its first
    config_dict = dict(asdict(config), greedy=config.greedy, num_prompts=len(prompts))
    return BenchReport(
        config=config_dict,
        prompts=[{"id": p.id, "domain": p.domain, "prompt_tokens": len(p.prompt_ids)} for p in prompts],
        methods=method_rows,
        domains=domains,
        results=results,
        summary=summary,
        mismatches=mismatches,
        notes=notes,
        environment=environment,
        total_s=time.perf_counter() - t_start,
    )


@dataclass
class BenchRun:
    """What ``bench`` produced: the report (``report.ok`` is False on a real greedy mismatch) and the files written."""

    report: BenchReport
    written: dict[str, Path]


def bench(data: str | Path, config: BenchConfig, *, bundle_dir: str | Path | None = None, split: str = "eval",
          per_domain: int | None = None, out_dir: str | Path = "bench_out", dtype: str = "auto",
          calibrate: bool | None = None, progress: Progress | None = None) -> BenchRun:
    """What ``ctxdraft bench`` does: read the prompt file, load the bundle, choose the prompts (``select_prompts``),
    run every method (``run_bench``) and write bench.json, bench.md and bench.png into ``out_dir``."""
    config.validate()
    rows = read_prompts(data)
    bundle = load_bundle(bundle_dir, dtype=dtype, calibrate=calibrate)
    rows, notes = select_prompts(rows, bundle, split, per_domain)
    bundle.progress = progress  # a first calibration (auto), on a terminal
    report = run_bench(bundle, rows, config, progress=progress)
    report.notes[:0] = notes
    return BenchRun(report, write_bench_outputs(report, out_dir))
