"""A batch of prompts through one bundle: each row checked, routed (``draft="auto"``: the policy, per row) and decoded
with a fresh draft of its arm by one ``BatchDecoder`` (``drafting/batch_decoding.py``). ``Bundle.generate_batch``
turns the rows into ``GenerationResult``s.

A prompt is a string, or a dict ``{"prompt": ..., "draft", "max_new_tokens", "temperature", "top_p", "seed",
"stop", "chat"}`` whose keys override the batch's settings for that row. A row with bad input (an empty prompt, a
bad setting, an unknown arm, a prompt too long for the model) gets its error; the other rows are unaffected.
Batched requests are not written to the traffic log.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..base import checks
from ..base.errors import CtxdraftError
from ..base.features import features_from_prefill
from ..drafting.batch_decoding import BatchDecoder, BatchRequest, RowOutcome
from ..drafting.decoding import GenerationConfig, Prefill
from ..drafting.pool import build_draft
from ..learning.offpolicy import choose_arm

ROW_KEYS = ("prompt", "draft", "max_new_tokens", "temperature", "top_p", "seed", "stop", "chat")


@dataclass
class BatchRow:
    prompt_ids: list[int] = field(default_factory=list)
    config: GenerationConfig | None = None
    arm: str | None = None
    routed: bool = False
    route_s: float = 0.0
    outcome: RowOutcome | None = None
    error: str | None = None


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


def decode_batch(bundle, prompts: list, defaults: dict, stop_checker, max_batch: int = 8) -> list[BatchRow]:
    """One ``BatchRow`` per prompt, in order. ``defaults``: ``Bundle.generate``'s keywords for every row;
    ``stop_checker(stops)``: the stop-string check of a row."""
    if not isinstance(prompts, (list, tuple)):
        raise CtxdraftError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    max_batch = checks.integer("max_batch", max_batch, minimum=1)
    target = bundle.target
    decoder = BatchDecoder(bundle.stack, max_batch=max_batch, max_context=target.max_context)
    rows = [BatchRow() for _ in prompts]
    row_of: dict[int, BatchRow] = {}
    for row, prompt in zip(rows, prompts):
        try:
            settings = row_settings(prompt, defaults)
            row.config = GenerationConfig(settings["max_new_tokens"], settings["temperature"], settings["top_p"],
                                          settings["seed"], settings["stop"])
            checks.text("prompt", settings["prompt"])
            draft = checks.text("draft", settings["draft"])
            if draft != "auto":
                bundle.arm_spec(draft)  # unknown arm: this row fails before any model work
            row.prompt_ids = target.encode(settings["prompt"], chat=checks.flag("chat", settings["chat"]))
            router = bundle.router() if draft == "auto" else None
        except CtxdraftError as e:
            row.error = str(e)
            continue
        request = BatchRequest(row.prompt_ids, _chooser(bundle, row, draft, router), row.config, target.eos_ids,
                               stop_checker(row.config.stop) if row.config.stop else None,
                               bundle.feature_layer if router is not None else None, tuple(bundle._state_layers(draft)))
        row_of[decoder.add(request)] = row
    for row_id, outcome in decoder.run().items():
        row = row_of[row_id]
        row.outcome, row.error = outcome, outcome.error
    return rows


def _chooser(bundle, row: BatchRow, draft: str, router):
    """The function that picks the row's arm once its prefill is done (the policy reads the prefill's features)
    and builds a fresh draft of it (drafts keep per-request state, so rows never share one)."""

    def choose(pre: Prefill):
        t0 = time.perf_counter()
        if draft != "auto":
            row.arm = draft
        elif router is not None:
            features = features_from_prefill(router.features, row.prompt_ids, pre.pooled_hidden)
            row.arm = choose_arm(router.arms, router.probs([features])[0], bundle.explore, bundle.explore_rng).arm
            row.routed = True
        else:
            row.arm = bundle.info.get("default_arm") or "none"
        row.route_s = time.perf_counter() - t0
        return build_draft(bundle.arm_spec(row.arm), bundle.target, bundle.path, bundle.shared)

    return choose
