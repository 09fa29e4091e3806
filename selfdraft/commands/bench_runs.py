"""One timed run of the bench: its settings (``BenchConfig``), a prompt, what a run returns, and the Hugging Face
``generate`` runs (plain and assisted) that every ctxdraft method is compared with."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers.utils import logging as hf_logging

from ..base import checks
from ..base.errors import CtxdraftError
from ..drafting.decoding import num_before_eos
from ..serving.bundle import Bundle

BASELINES = ("hf", "lookup", "none")


@dataclass
class BenchConfig:
    max_new_tokens: int = 128
    arms: list[str] | None = None  # None: every arm of the bundle, plus `auto` when it has a policy
    baselines: str = "hf"  # "hf": plain + prompt lookup + early exit (+ assisted with a model arm's draft);
    # "lookup": plain + prompt lookup; "none": plain HF generate only (the reference)
    repeats: int = 1  # each (prompt, method) is timed this many times; the median counts
    temperature: float = 0.0  # > 0: seeded sampling runs (speed and acceptance only, no equality check)
    seed: int = 0
    hf_lookup_tokens: int = 10  # HF's prompt_lookup_num_tokens (the value HF's docs use)
    hf_lookup_ngram: int = 2  # HF's max_matching_ngram_size (its default)
    warmup: bool = True
    threads: int | None = None  # torch intra-op threads during the bench (None: leave torch's setting)
    tie_tolerance: float | None = None  # logit gap of a legitimate tie (None: ties.TIE_TOLERANCE of the dtype)

    def validate(self) -> None:
        checks.integer("max_new_tokens", self.max_new_tokens, minimum=1)
        checks.integer("repeats", self.repeats, minimum=1)
        checks.number("temperature", self.temperature, minimum=0.0)
        checks.seed("seed", self.seed)
        if self.tie_tolerance is not None:
            checks.number("tie_tolerance", self.tie_tolerance, minimum=0.0)
        if self.baselines not in BASELINES:
            raise CtxdraftError(f"baselines must be one of {', '.join(BASELINES)}, got {self.baselines!r}")
        if self.threads is not None:
            checks.integer("threads", self.threads, minimum=1)
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
    nodes_verified: int | None = None  # draft positions the target verified (a chain's tokens, a tree's nodes)


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
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def hf_generate(bundle: Bundle, prompt: BenchPrompt, config: BenchConfig, **assist) -> RunOutput:
    """One ``model.generate`` call (greedy, or seeded sampling), timed; ``assist``: HF assisted-generation options
    (``assistant_model`` goes to ``generate``, the rest to its GenerationConfig)."""
    assistant = {"assistant_model": assist.pop("assistant_model")} if "assistant_model" in assist else {}
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
        out = target.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen_config,
                                    **assistant)
        seconds = time.perf_counter() - t0
    new_ids = out[0, len(prompt.prompt_ids):].tolist()
    new_ids = new_ids[: num_before_eos(new_ids, target.eos_ids)]
    return RunOutput(new_ids, seconds, forwards["n"])
