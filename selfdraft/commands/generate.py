"""``ctxdraft generate`` end to end: the rules the traffic-log options follow, opening the bundle, one generation."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..base.errors import CtxdraftError
from ..base.fileio import read_jsonl
from ..serving import batch
from ..serving.bundle import GenerationResult, load_bundle

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def check_log_options(draft: str, log: str | Path | None, log_features_only: bool, explore: float) -> None:
    """The traffic log records what the policy routes: its options need ``log``, and ``log`` needs ``draft="auto"``."""
    if (log_features_only or explore) and log is None:
        raise CtxdraftError("--log-features-only and --explore go with --log FILE (the traffic log update-policy learns from)")
    if log is not None and draft != "auto":
        raise CtxdraftError(f"--log records requests the policy routes; --draft {draft} names its arm, so use --draft auto")


def generate(text: str, *, bundle_dir: str | Path | None = None, target: str | None = None, dtype: str = "auto",
             calibrate: bool | None = None, log: str | Path | None = None, log_features_only: bool = False,
             explore: float = 0.0, progress: Progress | None = None, **generation) -> GenerationResult:
    """What ``ctxdraft generate`` does: check the log options, open the bundle (``load_bundle``'s arguments) and
    generate ``text`` with ``Bundle.generate``'s keywords (``draft``, ``max_new_tokens``, ``temperature``, ...).
    ``progress`` hears of a first calibration."""
    check_log_options(generation.get("draft", "auto"), log, log_features_only, explore)
    bundle = load_bundle(bundle_dir, target=target, dtype=dtype, calibrate=calibrate, log=log,
                         log_features_only=log_features_only, explore=explore)
    bundle.progress = progress
    return bundle.generate(text, **generation)


def generate_batch(path: str | Path, *, bundle_dir: str | Path | None = None, target: str | None = None,
                   dtype: str = "auto", calibrate: bool | None = None, progress: Progress | None = None,
                   max_batch: int = 8, **generation) -> list[dict]:
    """What ``ctxdraft generate --batch FILE.jsonl`` does: every line of the file (``{"prompt": ..., "id"?}`` plus
    optional per-row settings, see ``serving/batch.py``) decoded together by ``batch.generate_batch``; one dict per
    line, in order (its ``id`` first when the line has one; ``error`` for a row that failed)."""
    rows = read_jsonl(path, "batch file")
    bundle = load_bundle(bundle_dir, target=target, dtype=dtype, calibrate=calibrate)
    bundle.progress = progress
    results = batch.generate_batch(bundle, rows, max_batch=max_batch, **generation)
    return [({"id": row["id"]} if "id" in row else {}) | result.to_dict() for row, result in zip(rows, results)]


def generation_line(result: GenerationResult, draft: str) -> str:
    """One line on how the output was made: the arm and why, speed, target forwards, accepted draft tokens."""
    s = result.stats
    how = "chosen by the policy" if result.routed else ("the bundle's default arm; no policy yet" if draft == "auto" else "as asked")
    return (f"[arm {result.arm} ({how}) | {s.new_tokens} tokens in {s.wall_s:.2f}s = {s.tokens_per_s:.1f} tok/s | "
            f"{s.target_forwards} target forwards, {s.accepted_tokens}/{s.drafted_tokens} drafted tokens accepted]")
