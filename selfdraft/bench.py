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

import contextlib
import datetime
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .bundle import Bundle, versions
from .errors import CtxdraftError
from .fileio import atomic_path, read_json, write_json_atomic, write_text_atomic

REFERENCE = "hf-generate"
ORACLE = "oracle"
BASELINES = ("hf", "none")
SPLITS = ("eval", "all")
OVERALL = "overall"
WARMUP_TOKENS = 16

Progress = Callable[[str, int, int], None]  # (stage, done, total)


# ----------------------------------------------------------------------------------------------------
# Configuration and results
# ----------------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    max_new_tokens: int = 128
    arms: list[str] | None = None  # None: every arm of the bundle, plus `auto` when it has a policy
    baselines: str = "hf"  # "hf": plain + prompt lookup + early exit; "none": plain HF generate only (the reference)
    repeats: int = 1  # each (prompt, method) is timed this many times; the median counts
    temperature: float = 0.0  # > 0: seeded sampling runs (speed and acceptance only, no equality check)
    seed: int = 0
    hf_lookup_tokens: int = 10  # HF's prompt_lookup_num_tokens (the value HF's docs use)
    hf_lookup_ngram: int = 2  # HF's max_matching_ngram_size (its default)
    warmup: bool = True
    threads: int | None = None  # torch intra-op threads during the bench (None: leave torch's setting)

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise CtxdraftError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.repeats < 1:
            raise CtxdraftError(f"repeats must be >= 1, got {self.repeats}")
        if self.temperature < 0:
            raise CtxdraftError(f"temperature must be >= 0, got {self.temperature}")
        if self.baselines not in BASELINES:
            raise CtxdraftError(f"baselines must be one of {', '.join(BASELINES)}, got {self.baselines!r}")
        if self.threads is not None and self.threads < 1:
            raise CtxdraftError(f"threads must be >= 1, got {self.threads}")
        if self.arms is not None and not self.arms:
            raise CtxdraftError("arms is empty; name arms such as none,lookup or use 'all'")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class BenchPrompt:
    id: object
    domain: str
    prompt: str
    prompt_ids: list[int]
    index: int  # position in the bench (seeds and method order derive from it)


@dataclass
class RunOutput:
    """One timed call of one method on one prompt."""

    token_ids: list[int]  # new tokens, EOS-trimmed
    seconds: float
    target_forwards: int | None = None  # including the first (prefill) one; None: unknown
    arm: str | None = None  # the arm that drafted (auto: the policy's choice)


@dataclass
class Method:
    name: str
    family: str  # "hf" | "ctxdraft"
    run: Callable[[BenchPrompt, BenchConfig], RunOutput]


@dataclass
class PromptResult:
    """One method on one prompt: the median over repeats of the time, the tokens of the first run."""

    prompt_id: object
    domain: str
    method: str
    new_tokens: int
    seconds: float
    seconds_all: list[float]
    target_forwards: int | None
    arm: str | None
    matches: bool | None  # greedy: every repeat equals hf-generate's output; sampling: None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Mismatch:
    prompt_id: object
    domain: str
    method: str
    repeat: int
    first_diff: int  # first differing position (the shorter length when one output is a prefix of the other)
    expected_tokens: int
    got_tokens: int


@dataclass
class MethodSummary:
    method: str
    family: str
    num_prompts: int
    new_tokens: int
    seconds: float
    tokens_per_s: float  # total tokens / total seconds
    median_tokens_per_s: float  # median over prompts
    speedup: float | None  # tokens_per_s / hf-generate's tokens_per_s
    median_speedup: float | None  # median over prompts of the per-prompt speed-up
    tokens_per_forward: float | None  # total tokens / total target forwards after the prefill
    mismatches: int
    arms_chosen: dict[str, int] = field(default_factory=dict)  # auto and oracle: how often each arm


@dataclass
class BenchReport:
    config: dict
    prompts: list[dict]  # id, domain, prompt_tokens
    methods: list[dict]  # name, family
    domains: list[str]
    results: list[PromptResult]  # oracle included
    summary: dict[str, list[MethodSummary]]  # domain (and "overall") -> one summary per method
    mismatches: list[Mismatch]
    notes: list[str]
    environment: dict
    total_s: float

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def overall(self, method: str) -> MethodSummary:
        return next(s for s in self.summary[OVERALL] if s.method == method)

    def to_dict(self) -> dict:
        return {
            "format": "ctxdraft-bench",
            "version": 1,
            "ok": self.ok,
            "num_mismatches": len(self.mismatches),
            "mismatches": [asdict(m) for m in self.mismatches],
            "config": self.config,
            "environment": self.environment,
            "notes": self.notes,
            "methods": self.methods,
            "domains": self.domains,
            "summary": {d: [asdict(s) for s in rows] for d, rows in self.summary.items()},
            "prompts": self.prompts,
            "results": [dict(asdict(r), tokens_per_s=r.tokens_per_s) for r in self.results],
            "total_s": round(self.total_s, 1),
        }

    def status_line(self) -> str:
        if not self.config["greedy"]:
            return "Sampling run: outputs are not compared (they differ by design); speed and acceptance only."
        n = sum(1 for r in self.results if r.method != ORACLE)
        if self.ok:
            return f"All {n} greedy outputs are identical to HF generate's."
        where = ", ".join(f"{m.method} on {m.prompt_id}" for m in self.mismatches[:8])
        more = f" and {len(self.mismatches) - 8} more" if len(self.mismatches) > 8 else ""
        return f"MISMATCH: {len(self.mismatches)} greedy outputs differ from HF generate ({where}{more})."

    def markdown(self) -> str:
        return bench_markdown(self)


# ----------------------------------------------------------------------------------------------------
# Choosing prompts and methods
# ----------------------------------------------------------------------------------------------------
def eval_ids(bundle: Bundle) -> list | None:
    """The held-out prompt ids recorded by the bundle (the policy's evaluation split), or None."""
    split = bundle.info.get("policy_split") or {}
    if isinstance(split, dict) and split.get("eval_ids"):
        return list(split["eval_ids"])
    if bundle.path is not None and (bundle.path / "reports" / "train_policy.json").is_file():
        report = read_json(bundle.path / "reports" / "train_policy.json", "policy report")
        if report.get("eval_ids"):
            return list(report["eval_ids"])
    return None


def select_prompts(rows: list[dict], bundle: Bundle, split: str = "eval", per_domain: int | None = None) -> tuple[list[dict], list[str]]:
    """The rows to bench (split first, then the first ``per_domain`` of each domain) and notes on the choice."""
    if split not in SPLITS:
        raise CtxdraftError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if per_domain is not None and per_domain < 1:
        raise CtxdraftError(f"--per-domain must be >= 1, got {per_domain}")
    notes = []
    if split == "eval":
        held = eval_ids(bundle)
        if held is None:
            notes.append("split: the bundle records no held-out split, so all prompts are used "
                         "(a policy, if any, may have trained on some of them)")
        else:
            wanted = {str(i) for i in held}
            kept = [r for r in rows if str(r["id"]) in wanted]
            if not kept:
                raise CtxdraftError(f"none of the bundle's {len(wanted)} held-out prompt ids are in the data file; "
                                    "bench the data the policy was trained on, or pass --split all")
            notes.append(f"split: the bundle's held-out split ({len(kept)} of {len(rows)} prompts)")
            rows = kept
    else:
        notes.append(f"split: all {len(rows)} prompts")
    if per_domain is not None:
        seen: dict[str, int] = {}
        picked = []
        for r in rows:
            if seen.get(r["domain"], 0) < per_domain:
                seen[r["domain"]] = seen.get(r["domain"], 0) + 1
                picked.append(r)
        rows = picked
        notes.append(f"per domain: the first {per_domain} prompts of each domain")
    return rows, notes


def best_exit_layer(info: dict) -> int | None:
    """The exit layer with the best recorded speed-up (then agreement), or None without exits."""
    exits = [e for e in info.get("exits") or [] if isinstance(e.get("layer"), int)]
    if not exits:
        return None
    return max(exits, key=lambda e: (e.get("speedup") or 0.0, e.get("agreement") or 0.0))["layer"]


def _trim_eos(token_ids: list[int], eos_ids) -> list[int]:
    for i, t in enumerate(token_ids):
        if t in eos_ids:
            return token_ids[:i]
    return token_ids


@contextlib.contextmanager
def _count_target_forwards(model):
    """Count the model's full-depth forwards (HF's early exit runs the same model with fewer layers)."""
    base = getattr(model, model.base_model_prefix)
    full = base.config.num_hidden_layers
    counter = {"n": 0}

    def hook(module, args, kwargs):
        if base.config.num_hidden_layers == full:
            counter["n"] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def hf_generate(bundle: Bundle, prompt: BenchPrompt, config: BenchConfig, **assist) -> RunOutput:
    """One ``model.generate`` call (greedy, or seeded sampling), timed; ``assist``: HF assisted-generation kwargs."""
    from transformers import GenerationConfig as HFGenerationConfig

    target = bundle.target
    eos = sorted(target.eos_ids)
    sampling = {"do_sample": True, "temperature": config.temperature, "top_k": 0, "top_p": 1.0} if not config.greedy else {"do_sample": False}
    gen_config = HFGenerationConfig(max_new_tokens=config.max_new_tokens, eos_token_id=eos,
                                    pad_token_id=eos[0] if eos else None, **sampling, **assist)
    input_ids = torch.tensor([prompt.prompt_ids])
    with _quiet_transformers(), _count_target_forwards(target.model) as forwards:
        if not config.greedy:
            torch.manual_seed(config.seed + prompt.index)
        t0 = time.perf_counter()
        out = target.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen_config)
        seconds = time.perf_counter() - t0
    new_ids = _trim_eos(out[0, len(prompt.prompt_ids):].tolist(), target.eos_ids)
    return RunOutput(new_ids, seconds, forwards["n"])


def ctxdraft_generate(bundle: Bundle, prompt: BenchPrompt, config: BenchConfig, arm: str) -> RunOutput:
    t0 = time.perf_counter()
    result = bundle.generate(prompt.prompt, draft=arm, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                             seed=config.seed + prompt.index if not config.greedy else None)
    seconds = time.perf_counter() - t0
    if result.prompt_ids != prompt.prompt_ids:
        raise RuntimeError(f"Bundle.generate encoded prompt {prompt.id!r} differently from Target.encode")
    return RunOutput(result.token_ids, seconds, result.stats.target_forwards, result.arm)


def build_methods(bundle: Bundle, config: BenchConfig) -> tuple[list[Method], list[str]]:
    """The methods to run (reference first) and notes on what was left out and why."""
    notes = []
    methods = [Method(REFERENCE, "hf", lambda p, c: hf_generate(bundle, p, c))]
    if config.baselines == "hf":
        methods.append(Method("hf-lookup", "hf", lambda p, c: hf_generate(
            bundle, p, c, prompt_lookup_num_tokens=c.hf_lookup_tokens, max_matching_ngram_size=c.hf_lookup_ngram)))
        layer = best_exit_layer(bundle.info)
        if layer is None:
            notes.append("hf-early-exit: skipped, the bundle has no exits")
        else:
            methods.append(Method(f"hf-early-exit@{layer}", "hf", lambda p, c: hf_generate(bundle, p, c, assistant_early_exit=layer)))
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
def _rotated(methods: list[Method], shift: int) -> list[Method]:
    shift %= len(methods)
    return methods[shift:] + methods[:shift]


def _first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _environment(bundle: Bundle) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    target = bundle.target
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": versions(),
        "target": {"name": target.name, "hash": target.content_hash, "num_layers": target.num_layers},
        "bundle": str(bundle.path) if bundle.path is not None else None,
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
            for method in _rotated(methods, prompt.index * config.repeats + repeat):
                runs.setdefault((prompt.index, method.name), []).append(method.run(prompt, config))
        if config.greedy:
            expected = runs[(prompt.index, REFERENCE)][0].token_ids
            for method in methods:
                for repeat, out in enumerate(runs[(prompt.index, method.name)]):
                    if out.token_ids != expected:
                        bad.add((prompt.index, method.name))
                        mismatches.append(Mismatch(prompt.id, prompt.domain, method.name, repeat,
                                                   _first_diff(expected, out.token_ids), len(expected), len(out.token_ids)))
    if progress:
        progress("bench", total, total)

    results = []
    for prompt in prompts:
        for method in methods:
            outs = runs[(prompt.index, method.name)]
            seconds_all = [o.seconds for o in outs]
            results.append(PromptResult(prompt.id, prompt.domain, method.name, len(outs[0].token_ids),
                                        statistics.median(seconds_all), seconds_all, outs[0].target_forwards, outs[0].arm,
                                        ((prompt.index, method.name) not in bad) if config.greedy else None))
    arm_methods = [m.name for m in methods if m.family == "ctxdraft" and m.name != "auto"]
    if arm_methods:
        results += _oracle(results, arm_methods)
        method_rows = [{"name": m.name, "family": m.family} for m in methods] + [{"name": ORACLE, "family": "oracle"}]
    else:
        method_rows = [{"name": m.name, "family": m.family} for m in methods]
        notes.append("oracle: skipped, no ctxdraft arm was run")

    domains = list(dict.fromkeys(p.domain for p in prompts))
    summary = {d: _summaries(results, method_rows, mismatches, d) for d in domains}
    summary[OVERALL] = _summaries(results, method_rows, mismatches, None)
    if environment.get("load_average_start") is not None:
        environment["load_average_end"] = list(os.getloadavg())
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


def _oracle(results: list[PromptResult], arm_methods: list[str]) -> list[PromptResult]:
    """Per prompt, the ctxdraft arm with the highest tokens/s (ties: the first arm)."""
    by_prompt: dict[object, list[PromptResult]] = {}
    for r in results:
        if r.method in arm_methods:
            by_prompt.setdefault((r.domain, r.prompt_id), []).append(r)
    out = []
    for rs in by_prompt.values():
        best = max(rs, key=lambda r: r.tokens_per_s)
        out.append(PromptResult(best.prompt_id, best.domain, ORACLE, best.new_tokens, best.seconds, best.seconds_all,
                                best.target_forwards, best.method, best.matches))
    return out


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _summaries(results: list[PromptResult], method_rows: list[dict], mismatches: list[Mismatch], domain: str | None) -> list[MethodSummary]:
    scoped = [r for r in results if domain is None or r.domain == domain]
    reference = {(r.domain, r.prompt_id): r for r in scoped if r.method == REFERENCE}
    ref_tps = _total_rate(reference.values())
    out = []
    for row in method_rows:
        rs = [r for r in scoped if r.method == row["name"]]
        tokens = sum(r.new_tokens for r in rs)
        seconds = sum(r.seconds for r in rs)
        speedups = [r.tokens_per_s / reference[(r.domain, r.prompt_id)].tokens_per_s for r in rs
                    if reference[(r.domain, r.prompt_id)].tokens_per_s > 0 and r.tokens_per_s > 0]
        forwards = [r for r in rs if r.target_forwards is not None]
        steps = sum(r.target_forwards - 1 for r in forwards)
        tps = tokens / seconds if seconds > 0 else 0.0
        arms_chosen: dict[str, int] = {}
        if row["name"] in ("auto", ORACLE):
            for r in rs:
                arms_chosen[r.arm] = arms_chosen.get(r.arm, 0) + 1
        out.append(MethodSummary(
            method=row["name"],
            family=row["family"],
            num_prompts=len(rs),
            new_tokens=tokens,
            seconds=seconds,
            tokens_per_s=tps,
            median_tokens_per_s=_median_or_none([r.tokens_per_s for r in rs]) or 0.0,
            speedup=tps / ref_tps if ref_tps > 0 else None,
            median_speedup=_median_or_none(speedups),
            tokens_per_forward=(sum(r.new_tokens for r in forwards) / steps) if forwards and len(forwards) == len(rs) and steps > 0 else None,
            mismatches=sum(1 for m in mismatches if m.method == row["name"] and (domain is None or m.domain == domain)),
            arms_chosen=dict(sorted(arms_chosen.items(), key=lambda kv: -kv[1])),
        ))
    return out


def _total_rate(rs) -> float:
    rs = list(rs)
    seconds = sum(r.seconds for r in rs)
    return sum(r.new_tokens for r in rs) / seconds if seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def bench_markdown(report: BenchReport) -> str:
    cfg, env = report.config, report.environment
    load = env.get("load_average_start")
    mode = "greedy" if cfg["greedy"] else f"sampling at temperature {cfg['temperature']} (seed {cfg['seed']})"
    lines = [
        "# ctxdraft bench",
        "",
        f"{env['date']} on {env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads"
        + (f", load average {load[0]:.2f} at start" if load else "") + f"); target {env['target']['name']}"
        + (f", bundle `{env['bundle']}`" if env.get("bundle") else "") + ".",
        f"{cfg['num_prompts']} prompts, {mode}, max_new_tokens {cfg['max_new_tokens']}, {cfg['repeats']} repeat(s) "
        "(median time), methods interleaved prompt by prompt.",
        "",
        f"**{report.status_line()}**",
        "",
        "| method | tok/s | median tok/s | speed-up | median speed-up | tokens/forward | mismatches |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in report.summary[OVERALL]:
        lines.append(f"| {s.method} | {s.tokens_per_s:.1f} | {s.median_tokens_per_s:.1f} | {_fmt(s.speedup, '.2f', 'x')} | "
                     f"{_fmt(s.median_speedup, '.2f', 'x')} | {_fmt(s.tokens_per_forward)} | "
                     f"{s.mismatches if cfg['greedy'] else ''} |")
    columns = report.domains + [OVERALL]
    for title, attr in (("Speed-up over hf-generate (tokens/s ratio) per domain", "speedup"),
                        ("Tokens per target forward per domain", "tokens_per_forward")):
        lines += ["", f"### {title}", "", "| method | " + " | ".join(columns) + " |",
                  "| --- |" + " ---: |" * len(columns)]
        for i, row in enumerate(report.methods):
            cells = [getattr(report.summary[c][i], attr) for c in columns]
            lines.append(f"| {row['name']} | " + " | ".join(_fmt(v, '.2f', 'x' if attr == 'speedup' else '') for v in cells) + " |")
    chosen = [s for s in report.summary[OVERALL] if s.arms_chosen]
    if chosen or report.notes or report.mismatches:
        lines += ["", "### Notes", ""]
    for s in chosen:
        lines.append(f"- {s.method} chose: " + ", ".join(f"{arm} x{n}" for arm, n in s.arms_chosen.items()))
    for m in report.mismatches:
        lines.append(f"- MISMATCH: {m.method} on prompt {m.prompt_id} ({m.domain}), repeat {m.repeat}: first differs at "
                     f"token {m.first_diff} ({m.got_tokens} tokens vs {m.expected_tokens} from hf-generate)")
    lines += [f"- {n}" for n in report.notes]
    lines += ["", "tok/s: new tokens / wall seconds (prefill included), total and median over prompts. Speed-up: over "
              "hf-generate, total tokens/s ratio and median of per-prompt ratios. Tokens/forward: new tokens per target "
              "forward after the prefill (mean accepted draft tokens + 1). oracle: the fastest ctxdraft arm per prompt.", ""]
    return "\n".join(lines)


def write_bench_chart(report: BenchReport, path: Path) -> bool:
    """A grouped bar chart of the speed-ups per domain; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    columns = report.domains + [OVERALL]
    names = [m["name"] for m in report.methods]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(min(14, max(8, 1.2 * len(columns) + 0.15 * len(names) * len(columns))), 5))
    for i, name in enumerate(names):
        values = [report.summary[c][i].speedup or 0.0 for c in columns]
        ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(columns))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(columns)), columns, rotation=20)
    ax.set_ylabel("speed-up over hf-generate (tokens/s)")
    mode = "greedy" if report.config["greedy"] else f"T={report.config['temperature']}"
    ax.set_title(f"ctxdraft bench: {report.environment['target']['name']}, {report.config['num_prompts']} prompts, {mode}"
                 + ("" if report.ok else " - MISMATCH"))
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def write_bench_outputs(report: BenchReport, out_dir: str | Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png (when matplotlib is installed) atomically; returns what was written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CtxdraftError(f"--out {out_dir} is a file, not a directory")
    written = {}
    if not write_bench_chart(report, out_dir / "bench.png"):
        report.notes.append("bench.png not written: matplotlib is not installed (pip install 'ctxdraft[plot]')")
    else:
        written["png"] = out_dir / "bench.png"
    write_json_atomic(out_dir / "bench.json", report.to_dict())
    write_text_atomic(out_dir / "bench.md", report.markdown())
    written = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", **written}
    return written
