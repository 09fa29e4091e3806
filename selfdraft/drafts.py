"""The draft pool: things that propose tokens for the target to verify.

A ``Draft`` proposes up to ``max_len`` tokens that continue ``state.tokens`` (the committed sequence;
its last token is the one the target has not consumed yet). It may return its distribution q for
each proposed token (needed for exact speculative sampling; without it q is one-hot). After the
target has verified, ``accept(state, committed_len)`` tells the draft how many tokens of the sequence
are final so it can roll back whatever state it keeps.

Kinds: ``none`` (never proposes: plain decoding), ``lookup`` (n-gram prompt lookup, model-free),
``model`` (an external causal LM with the target's vocabulary) and ``exit`` (see ``exits.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .errors import CtxdraftError
from .layers import LayerStack
from .sampling import probs_from_logits

if TYPE_CHECKING:
    from .decoding import DecodeState


@dataclass
class DraftOutput:
    ids: list[int]  # the K proposed tokens (K may be 0)
    probs: torch.Tensor | None = None  # [K, V] q for each proposed token; None: one-hot (greedy or model-free)
    # Exit drafts: layer-E residual states of the first K input positions (pending token, d1..d_{K-1}),
    # so verification only runs layers [E, L) for them; K+1 positions (d_K too) when the draft already ran them.
    exit_hidden: torch.Tensor | None = None  # [1, K, D] or [1, K+1, D]
    exit_layer: int = 0


class Draft:
    """Base class: proposes nothing (the ``none`` arm)."""

    kind = "none"

    def __init__(self, name: str = "none"):
        self.name = name

    def start(self, state: "DecodeState") -> None:
        """Called once per generation, after the target's prefill."""

    def propose(self, state: "DecodeState", max_len: int) -> DraftOutput:
        return DraftOutput([])

    def accept(self, state: "DecodeState", committed_len: int) -> None:
        """The first ``committed_len`` tokens of ``state.tokens`` are final; drop state beyond them."""


class NoneDraft(Draft):
    pass


@dataclass
class LookupSettings:
    draft_len: int = 5
    ngram_sizes: list[int] = field(default_factory=lambda: [3, 2, 1])  # tried longest first

    def __post_init__(self):
        if self.draft_len < 1:
            raise CtxdraftError(f"lookup draft_len must be >= 1, got {self.draft_len}")
        if not self.ngram_sizes or min(self.ngram_sizes) < 1:
            raise CtxdraftError(f"lookup ngram_sizes must be positive integers, got {self.ngram_sizes}")
        self.ngram_sizes = sorted(set(self.ngram_sizes), reverse=True)


class NgramIndex:
    """Most recent continuation of every n-gram in a growing token list (prompt lookup decoding)."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.next_pos: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are indexed

    def update(self, tokens: list[int]) -> None:
        # An n-gram ending at position e-1 is indexed once its continuation tokens[e] exists.
        for end in range(max(self.indexed, 1), len(tokens)):
            for n in self.sizes:
                if end >= n:
                    self.next_pos[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, len(tokens))

    def lookup(self, tokens: list[int], max_len: int) -> list[int]:
        for n in self.sizes:
            if len(tokens) <= n:
                continue
            pos = self.next_pos.get(tuple(tokens[-n:]))
            if pos is not None:
                return tokens[pos : pos + max_len]
        return []


class LookupDraft(Draft):
    """Prompt lookup: continue the latest earlier occurrence of the last n tokens (no model, ~0 cost)."""

    kind = "lookup"

    def __init__(self, name: str = "lookup", settings: LookupSettings | None = None):
        super().__init__(name)
        self.settings = settings or LookupSettings()
        self.index = NgramIndex(self.settings.ngram_sizes)

    def start(self, state):
        self.index = NgramIndex(self.settings.ngram_sizes)

    def propose(self, state, max_len):
        self.index.update(state.tokens)
        return DraftOutput(self.index.lookup(state.tokens, min(max_len, self.settings.draft_len)))


@dataclass
class ModelDraftSettings:
    path: str = ""
    draft_len: int = 4


class ModelDraft(Draft):
    """An external small causal LM with the target's tokenizer, with its own KV cache."""

    kind = "model"

    def __init__(self, name: str, model: torch.nn.Module, settings: ModelDraftSettings):
        super().__init__(name)
        self.model = model
        self.stack = LayerStack(model)
        self.settings = settings
        self.cache = None
        self.cached_len = 0

    @classmethod
    def from_path(cls, path: str | Path, target, draft_len: int = 4, name: str | None = None) -> "ModelDraft":
        from .target import load_target

        draft_target = load_target(path)
        check_same_vocab(target, draft_target)
        settings = ModelDraftSettings(str(path), draft_len)
        return cls(name or f"model:{Path(path).name}", draft_target.model, settings)

    def start(self, state):
        self.cache = self.stack.new_cache()
        self.cached_len = 0

    def propose(self, state, max_len):
        K = min(max_len, self.settings.draft_len)
        if K <= 0:
            return DraftOutput([])
        V = state.vocab_size
        tokens = state.tokens
        new = torch.tensor([tokens[self.cached_len :]])
        positions = torch.arange(self.cached_len, len(tokens))
        ids, probs = [], []
        for _ in range(K):
            logits = self.stack.logits(self.stack.run(self.stack.embed(new), 0, self.stack.num_layers, self.cache, positions)[:, -1:])
            self.cached_len = positions[-1].item() + 1
            logits = logits[0, -1, :V]
            if state.temperature > 0:
                q = probs_from_logits(logits, state.temperature, state.top_p)
                token = int(torch.multinomial(q, 1, generator=state.generator))
                probs.append(q)
            else:
                token = int(logits.argmax())
            ids.append(token)
            new = torch.tensor([[token]])
            positions = torch.tensor([self.cached_len])
        # The last drafted token was never fed to the draft model; its cache ends one token earlier.
        return DraftOutput(ids, torch.stack(probs) if probs else None)

    def accept(self, state, committed_len):
        if self.cached_len > committed_len:
            self.stack.crop(self.cache, committed_len)
            self.cached_len = committed_len


def check_same_vocab(target, draft_target) -> None:
    tv, dv = target.tokenizer.get_vocab(), draft_target.tokenizer.get_vocab()
    if tv != dv:
        raise CtxdraftError(
            f"draft model {draft_target.path} has another vocabulary than the target {target.name} "
            f"({len(dv)} vs {len(tv)} tokens, {len(set(dv.items()) ^ set(tv.items()))} entries differ); "
            "a draft must share the target's tokenizer"
        )
    if draft_target.vocab_size < target.vocab_size:
        raise CtxdraftError(
            f"draft model {draft_target.path} has {draft_target.vocab_size} output logits, fewer than the target's {target.vocab_size}"
        )


# Arm kinds -> factory(arm_spec, target, bundle_dir) -> Draft. exits.py registers "exit".
DRAFT_FACTORIES: dict[str, Callable] = {}


def _lookup_factory(spec, target, bundle_dir):
    settings = spec.get("settings", {})
    return LookupDraft(spec["name"], LookupSettings(**settings))


def _model_factory(spec, target, bundle_dir):
    settings = dict(spec.get("settings", {}))
    path = Path(settings.get("path", ""))
    if not path.is_absolute() and bundle_dir is not None and (Path(bundle_dir) / path).exists():
        path = Path(bundle_dir) / path
    return ModelDraft.from_path(path, target, settings.get("draft_len", 4), spec["name"])


DRAFT_FACTORIES.update(
    none=lambda spec, target, bundle_dir: NoneDraft(spec["name"]),
    lookup=_lookup_factory,
    model=_model_factory,
)


def build_draft(spec: dict, target, bundle_dir: Path | None = None) -> Draft:
    """Instantiate the draft for one arm spec ``{"name", "kind", "settings"}``."""
    kind = spec.get("kind")
    if kind == "exit":
        from . import exits  # noqa: F401  (registers the factory)
    if kind not in DRAFT_FACTORIES:
        raise CtxdraftError(f"arm {spec.get('name')!r} has unknown kind {kind!r} (known: {sorted(DRAFT_FACTORIES)})")
    try:
        return DRAFT_FACTORIES[kind](spec, target, bundle_dir)
    except TypeError as e:
        raise CtxdraftError(f"arm {spec.get('name')!r}: bad settings ({e})") from None
