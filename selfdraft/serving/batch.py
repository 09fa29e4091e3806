"""Prompts through one bundle, decoded together: each row checked, routed (``draft="auto"``: the policy, per row)
and decoded with a fresh draft of its arm by one ``BatchDecoder`` (``drafting/batch_decoding.py``).

``generate_batch`` decodes a list of prompts to the end; the server's scheduler (``scheduler.py``) builds rows one
request at a time with ``prepare_row`` and finishes them with ``row_result``, so both route, encode, cut stop
strings and log exactly alike, and as ``Bundle.generate`` does: a routed row of a bundle opened with ``log`` is
appended to the traffic log (``traffic.py``) when it finishes (a cancelled or failed row is not).

A prompt is a string, or a dict ``{"prompt": ..., "draft", "max_new_tokens", "temperature", "top_p", "seed",
"stop", "chat"}`` whose keys override the batch's settings for that row. A row with bad input (an empty prompt, a
bad setting, an unknown arm, a prompt too long for the model) gets its error; the other rows are unaffected.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..base import checks
from ..base.errors import CtxdraftError
from ..base.features import features_from_prefill
from ..base.fileio import display_path
from ..drafting.batch_decoding import BatchRequest, RowOutcome
from ..drafting.decoding import GenerationConfig, GenerationStats, Prefill
from ..drafting.pool import build_draft
from ..learning.offpolicy import Choice, choose_arm
from . import suffix_store, traffic
from .bundle import Bundle, GenerationResult, cut_at_stop, stop_checker

ROW_KEYS = ("prompt", "draft", "max_new_tokens", "temperature", "top_p", "seed", "stop", "chat", "escape_special")


@dataclass
class BatchRow:
    """One row: its bundle (a served row keeps the bundle, so the policy, it was admitted with), prompt, settings,
    the arm chosen after its prefill and, for a routed row that is logged, what its log line needs."""

    bundle: Bundle | None = None
    prompt_ids: list[int] = field(default_factory=list)
    config: GenerationConfig | None = None
    arm: str | None = None
    routed: bool = False
    route_s: float = 0.0
    outcome: RowOutcome | None = None
    error: str | None = None
    router: object = None
    features: object = None
    choice: Choice | None = None
    recorder: traffic.StepRecorder | None = None


def row_settings(prompt, defaults: dict) -> dict:
    """The row's settings: the batch's ``defaults`` overridden by a dict prompt's own keys."""
    if isinstance(prompt, str):
        return {**defaults, "prompt": prompt}
    if not isinstance(prompt, dict) or "prompt" not in prompt:
        raise CtxdraftError(f"a batch row must be a prompt string or an object with a \"prompt\" key, got {prompt!r:.80}")
    unknown = sorted(set(prompt) - set(ROW_KEYS) - {"id"})
    if unknown:
        raise CtxdraftError(f"a batch row has unknown keys {unknown} (known: {', '.join(ROW_KEYS)}, id)")
    return {**defaults, **{k: v for k, v in prompt.items() if k != "id"}}


def prepare_row(bundle: Bundle, settings: dict) -> tuple[BatchRow, BatchRequest | None]:
    """The row of one prompt (``settings``: ``Bundle.generate``'s keywords and ``prompt``) and the request to add
    to a ``BatchDecoder``; no request when the row's input is bad (``row.error`` says why)."""
    row = BatchRow(bundle)
    try:
        row.config = GenerationConfig(settings["max_new_tokens"], settings["temperature"], settings["top_p"],
                                      settings["seed"], settings["stop"])
        checks.text("prompt", settings["prompt"])
        draft = checks.text("draft", settings["draft"])
        if draft != "auto":
            bundle.arm_spec(draft)  # unknown arm: this row fails before any model work
        target = bundle.target
        row.prompt_ids = target.encode(settings["prompt"], chat=checks.flag("chat", settings["chat"]),
                                       escape_special=checks.flag("escape_special", settings.get("escape_special", False)))
        row.router = bundle.router() if draft == "auto" else None
        if bundle.log is not None and draft == "auto" and row.router is None:
            raise CtxdraftError(f"bundle {display_path(bundle.path)} has no policy, so no request is routed and there "
                                "is nothing to log; train one with `ctxdraft train-policy` first")
    except CtxdraftError as e:
        row.error = str(e)
        return row, None
    tokenizer = target.tokenizer
    request = BatchRequest(row.prompt_ids, _chooser(row, draft), row.config, target.eos_ids,
                           stop_checker(tokenizer, row.config.stop) if row.config.stop else None,
                           bundle.feature_layer if row.router is not None else None, tuple(bundle._state_layers(draft)))
    return row, request


def _chooser(row: BatchRow, draft: str):
    """The function that picks the row's arm once its prefill is done (the policy reads the prefill's features)
    and builds a fresh draft of it (drafts keep per-request state, so rows never share one)."""
    bundle, router = row.bundle, row.router

    def choose(pre: Prefill):
        t0 = time.perf_counter()
        if draft != "auto":
            row.arm = draft
        elif router is not None:
            row.features = features_from_prefill(router.features, row.prompt_ids, pre.pooled_hidden)
            row.choice = choose_arm(router.arms, router.probs([row.features])[0], bundle.explore, bundle.explore_rng)
            row.arm, row.routed = row.choice.arm, True
        else:
            row.arm = bundle.info.get("default_arm") or "none"
        row.route_s = time.perf_counter() - t0
        made = build_draft(bundle.arm_spec(row.arm), bundle.target, bundle.path, bundle.shared)
        if row.routed and bundle.log is not None:
            row.recorder = made = traffic.StepRecorder(made)
        return made

    return choose


def row_result(row: BatchRow) -> GenerationResult:
    """The ``GenerationResult`` of a finished row (its ``error`` when it failed); a routed row of a logging bundle
    is appended to the traffic log, with the line ``Bundle.generate`` writes."""
    if row.error is not None:
        return GenerationResult(row.prompt_ids, [], "", row.arm or "", GenerationStats(), error=row.error)
    new_ids, stats, config = row.outcome.token_ids, row.outcome.stats, row.config
    text = cut_at_stop(row.bundle.target.tokenizer.decode(new_ids, skip_special_tokens=True), config.stop)
    stats.route_s = row.route_s
    if row.bundle.log is not None:  # served outputs grow the suffix datastore, as in ``Bundle.generate``
        suffix_store.record_output(row.bundle, new_ids)
    if row.recorder is not None:
        traffic.log_request(row.bundle, traffic.RequestLog(
            row.features, row.router.features, row.prompt_ids, row.choice, row.bundle.explore,
            row.recorder.trajectory(len(new_ids)), config.max_new_tokens, config.temperature,
            len(new_ids) < config.max_new_tokens, stats))
    return GenerationResult(row.prompt_ids, new_ids, text, row.arm, stats, row.routed)


def decode_batch(bundle: Bundle, prompts: list, defaults: dict, max_batch: int = 8) -> list[BatchRow]:
    """One finished ``BatchRow`` per prompt, in order. ``defaults``: ``Bundle.generate``'s keywords for every
    row."""
    if not isinstance(prompts, (list, tuple)):
        raise CtxdraftError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    max_batch = checks.integer("max_batch", max_batch, minimum=1)
    decoder = bundle.batch_decoder(max_batch)
    rows, row_of = [], {}
    for prompt in prompts:
        try:
            row, request = prepare_row(bundle, row_settings(prompt, defaults))
        except CtxdraftError as e:
            row, request = BatchRow(bundle, error=str(e)), None
        rows.append(row)
        if request is not None:
            row_of[decoder.add(request)] = row
    for row_id, outcome in decoder.run().items():
        row = row_of[row_id]
        row.outcome, row.error = outcome, outcome.error
    return rows


def generate_batch(bundle: Bundle, prompts: list, draft: str = "auto", max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, chat: bool = True,
                   stop: list[str] | None = None, escape_special: bool = False,
                   max_batch: int = 8) -> list[GenerationResult]:
    """``Bundle.generate`` for several prompts decoded together (one target forward per step for all rows, up to
    ``max_batch`` at once): one result per prompt, in order, each row routed on its own. A prompt may be a dict
    overriding these settings for its row; a row with bad input gets its ``error``."""
    defaults = dict(draft=draft, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    chat=chat, stop=stop, escape_special=escape_special)
    return [row_result(row) for row in decode_batch(bundle, prompts, defaults, max_batch)]
