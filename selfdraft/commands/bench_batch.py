"""``ctxdraft bench --batch B``: aggregate throughput of B requests decoded together.

The prompts are cut into groups of B (the last group may be smaller). For every group, interleaved in a rotating
order (so drift on a shared machine hits every method alike), each method decodes the whole group:

- ``hf-generate-batch``: ``model.generate`` on the group as one left-padded batch (greedy), the reference;
- ``<arm> batch``: ``batch.generate_batch`` (one target forward per step for every row, ``batch_decoding.py``);
- ``<arm> one by one``: ``Bundle.generate`` on each prompt of the group, one after another.

*Aggregate tokens/s* = new tokens of all rows / seconds for the whole group (prefills included). Every row of
``<arm> batch`` is compared with the same prompt's ``<arm> one by one`` output (greedy): identical, a *tie* (the
two outputs part where the target's best logits are within rounding of each other, ``drafting/ties.py``, as
``ctxdraft bench`` counts them) or a MISMATCH (a bug; the command exits 1). *Peak resident memory* is the
process's peak RSS while the method ran (Linux: the peak is reset before each run through /proc/self/clear_refs;
None where that is not possible).
"""
from __future__ import annotations

import datetime
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..base.data import read_prompts, rotated
from ..base.errors import CtxdraftError
from ..base.fileio import write_json_atomic
from ..drafting.decoding import num_before_eos
from ..drafting.ties import compare_greedy
from ..runtime.machine import dtype_name
from ..serving.batch import generate_batch
from ..serving.bundle import Bundle, load_bundle
from .bench import Progress, select_prompts
from .bench_runs import BenchConfig

HF_BATCH = "hf-generate-batch"


@dataclass
class GroupRun:
    token_ids: list[list[int]]  # per row, EOS excluded
    seconds: float
    peak_rss_mb: float | None


@dataclass
class BatchMethodResult:
    name: str
    arm: str | None  # None: HF
    mode: str  # "hf-batch" | "batch" | "one-by-one"
    new_tokens: int
    seconds: float  # sum over groups of each group's median time
    peak_rss_mb: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RowCheck:
    prompt_id: str
    arm: str
    kind: str  # identical | tie | mismatch
    position: int | None = None
    gap: float | None = None


@dataclass
class BatchBenchReport:
    batch: int
    config: dict
    methods: list[BatchMethodResult]
    checks: list[RowCheck]
    environment: dict
    notes: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> list[RowCheck]:
        return [c for c in self.checks if c.kind == "mismatch"]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def method(self, name: str) -> BatchMethodResult:
        return next(m for m in self.methods if m.name == name)

    def speedups(self, m: BatchMethodResult) -> dict:
        """A method's aggregate tokens/s over HF's batch and over its arm one request at a time."""
        hf = self.method(HF_BATCH).tokens_per_s
        single = self.method(f"{m.arm} one by one").tokens_per_s if m.arm is not None else 0.0
        return {"vs_hf_batch": m.tokens_per_s / hf if hf else None,
                "vs_one_by_one": m.tokens_per_s / single if m.mode == "batch" and single else None}

    def status_line(self) -> str:
        ties = sum(c.kind == "tie" for c in self.checks)
        if self.mismatches:
            names = ", ".join(f"{c.arm} batch on {c.prompt_id} (token {c.position})" for c in self.mismatches[:5])
            return f"MISMATCH: {len(self.mismatches)} batch row(s) differ from their single-request output: {names}"
        return (f"every batch row equals its single-request output ({len(self.checks)} rows"
                + (f", {ties} diverged at a near-tie)" if ties else ")"))

    def to_dict(self) -> dict:
        return {"batch": self.batch, "config": self.config, "ok": self.ok,
                "methods": [dict(asdict(m), tokens_per_s=m.tokens_per_s, **self.speedups(m)) for m in self.methods],
                "checks": [asdict(c) for c in self.checks], "mismatches": len(self.mismatches),
                "environment": self.environment, "notes": self.notes}


def batch_markdown(report: BatchBenchReport) -> str:
    lines = [f"# Batch bench: B = {report.batch}, {report.config['num_prompts']} prompts x "
             f"{report.config['max_new_tokens']} new tokens ({report.environment['dtype']})", "",
             "| method | new tokens | seconds | tokens/s | x HF batch | x one by one | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in report.methods:
        s = report.speedups(m)
        cells = [m.name, str(m.new_tokens), f"{m.seconds:.2f}", f"{m.tokens_per_s:.1f}", _x(s["vs_hf_batch"]),
                 _x(s["vs_one_by_one"]), "" if m.peak_rss_mb is None else f"{m.peak_rss_mb:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    env = report.environment
    lines += ["", report.status_line(),
              f"torch threads {env['torch_threads']}, load average {env.get('load_average_start')} -> "
              f"{env.get('load_average_end')}"]
    lines += [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


# ----------------------------------------------------------------------------------------------------
# Peak resident memory
# ----------------------------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _timed(run) -> GroupRun:
    can_reset = _reset_peak_rss()
    t0 = time.perf_counter()
    token_ids = run()
    seconds = time.perf_counter() - t0
    return GroupRun(token_ids, seconds, _peak_rss_mb() if can_reset else None)


# ----------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------
def hf_generate_batch(bundle: Bundle, group: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """``model.generate`` on the group as one left-padded batch (greedy); each row's new tokens, EOS excluded."""
    target = bundle.target
    eos = sorted(target.eos_ids)
    pad = eos[0] if eos else 0
    width = max(map(len, group))
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in group])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in group])
    out = target.model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=eos or None, pad_token_id=pad)
    rows = out[:, width:].tolist()
    return [row[: num_before_eos(row, target.eos_ids)] for row in rows]


def _arm_methods(bundle: Bundle, arm: str, prompts: list[str], config: BenchConfig, batch: int):
    def batched(group: list[int]):
        results = generate_batch(bundle, [prompts[i] for i in group], draft=arm, max_new_tokens=config.max_new_tokens,
                                 max_batch=batch)
        errors = [r.error for r in results if r.error]
        if errors:
            raise CtxdraftError(f"{arm} batch: a row failed: {errors[0]}")
        return [r.token_ids for r in results]

    def one_by_one(group: list[int]):
        return [bundle.generate(prompts[i], draft=arm, max_new_tokens=config.max_new_tokens).token_ids for i in group]

    return {f"{arm} batch": (arm, "batch", batched), f"{arm} one by one": (arm, "one-by-one", one_by_one)}


def run_batch_bench(bundle: Bundle, rows: list[dict], config: BenchConfig, batch: int,
                    progress: Progress | None = None) -> BatchBenchReport:
    """Bench ``batch`` rows at a time (see the module docstring). ``config.arms``: the arms to run (default: ``auto``
    with a policy, else ``none``); greedy only."""
    _check(config, batch)
    if not rows:
        raise CtxdraftError("no prompts to bench")
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(bundle, rows, config, batch, progress)
    finally:
        torch.set_num_threads(threads)


def _check(config: BenchConfig, batch: int) -> None:
    config.validate()
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise CtxdraftError(f"--batch must be an integer >= 1, got {batch!r}")
    if not config.greedy:
        raise CtxdraftError("bench --batch compares greedy rows with their single-request output; drop --temperature")


def _run(bundle: Bundle, rows: list[dict], config: BenchConfig, batch: int, progress: Progress | None) -> BatchBenchReport:
    target = bundle.target
    notes = []
    arms = config.arms or (["auto"] if bundle.info.get("policy") else ["none"])
    for arm in arms:
        if arm != "auto":
            bundle.arm_spec(arm)  # unknown arm: a clear error before any model work
        elif not bundle.info.get("policy"):
            raise CtxdraftError("auto needs a bundle with a policy (train one with `ctxdraft train-policy`)")
    prompts, ids, kept = [], [], []
    for row in rows:
        prompt_ids = target.encode(row["prompt"])
        if len(prompt_ids) + config.max_new_tokens > target.max_context:
            notes.append(f"skipped prompt {row['id']}: longer than the context allows")
            continue
        prompts.append(row["prompt"])
        ids.append(prompt_ids)
        kept.append(str(row["id"]))
    if not prompts:
        raise CtxdraftError("every prompt is too long for the model's context with this --max-new-tokens")
    groups = [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    methods = {HF_BATCH: (None, "hf-batch", lambda g: hf_generate_batch(bundle, [ids[i] for i in g], config.max_new_tokens))}
    for arm in dict.fromkeys(arms):
        methods.update(_arm_methods(bundle, arm, prompts, config, batch))
    environment = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "dtype": dtype_name(target.dtype), "torch_threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count(), "target": target.name,
                   "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if config.warmup:  # first calls pay for lazy setup (kernels, auto's calibration): not timed
        warm = BenchConfig(**{**asdict(config), "max_new_tokens": min(config.max_new_tokens, 4)})
        for name, (arm, mode, _) in methods.items():
            run = (lambda g: hf_generate_batch(bundle, [ids[i] for i in g], 4)) if arm is None else \
                _arm_methods(bundle, arm, prompts, warm, batch)[name][2]
            run(groups[0])

    runs: dict[tuple[int, str], list[GroupRun]] = {}
    total = len(groups) * config.repeats
    for g, group in enumerate(groups):
        for repeat in range(config.repeats):
            if progress:
                progress("bench --batch", g * config.repeats + repeat, total)
            for name in rotated(list(methods), g * config.repeats + repeat):
                runs.setdefault((g, name), []).append(_timed(lambda: methods[name][2](group)))
    if progress:
        progress("bench --batch", total, total)

    checks = []
    for g, group in enumerate(groups):
        for arm in dict.fromkeys(arms):
            for repeat in runs[(g, f"{arm} batch")]:
                for row, i in enumerate(group):
                    expected = runs[(g, f"{arm} one by one")][0].token_ids[row]
                    d = compare_greedy(bundle.stack, ids[i], expected, repeat.token_ids[row], target.eos_ids,
                                       config.tie_tolerance)
                    checks.append(RowCheck(kept[i], arm, d.kind, d.position, d.gap))
    results = []
    for name, (arm, mode, _) in methods.items():
        group_runs = [runs[(g, name)] for g in range(len(groups))]
        peaks = [r.peak_rss_mb for rs in group_runs for r in rs if r.peak_rss_mb is not None]
        results.append(BatchMethodResult(
            name, arm, mode, sum(len(t) for rs in group_runs for t in rs[0].token_ids),
            sum(statistics.median(r.seconds for r in rs) for rs in group_runs), max(peaks) if peaks else None))
    if environment["load_average_start"] is not None:
        environment["load_average_end"] = list(os.getloadavg())
    config_dict = dict(asdict(config), num_prompts=len(prompts), arms=list(dict.fromkeys(arms)))
    return BatchBenchReport(batch, config_dict, results, checks, environment, notes)


def bench_batch(data: str | Path, config: BenchConfig, batch: int, *, bundle_dir: str | Path | None = None,
                split: str = "eval", per_domain: int | None = None, out_dir: str | Path = "bench_out",
                dtype: str = "auto", calibrate: bool | None = None,
                progress: Progress | None = None) -> tuple[BatchBenchReport, dict[str, Path]]:
    """What ``ctxdraft bench --batch B`` does: read and choose the prompts as ``bench`` does, run
    ``run_batch_bench`` and write bench_batch.json and bench_batch.md into ``out_dir``."""
    _check(config, batch)
    rows = read_prompts(data)
    bundle = load_bundle(bundle_dir, dtype=dtype, calibrate=calibrate)
    rows, notes = select_prompts(rows, bundle, split, per_domain)
    bundle.progress = progress
    report = run_batch_bench(bundle, rows, config, batch, progress)
    report.notes[:0] = notes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "bench_batch.json", "md": out / "bench_batch.md"}
    write_json_atomic(written["json"], report.to_dict())
    written["md"].write_text(batch_markdown(report))
    return report, written
