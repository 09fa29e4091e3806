"""The model-free and external drafts: ``none``, ``lookup`` (n-gram prompt lookup) and ``model`` (an external
causal LM with the target's vocabulary). Self-drafts on the target's own layers live in ``exits/``; the
registry that builds any of them from an arm spec is ``pool.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..base import checks
from ..base.errors import CtxdraftError
from ..runtime.layers import LayerStack
from ..runtime.sampling import probs_from_logits
from ..runtime.target import load_target
from .draft import (
    DecodeState,
    Draft,
    DraftOutput,
    DraftRun,
    PredictionTeacherForced,
    TeacherForced,
    TeacherPass,
    draft_loop,
)


class NoneDraft(Draft):
    """Proposes nothing: the speculative loop becomes plain decoding."""

    batches_natively = True  # no model work to batch


@dataclass
class LookupSettings:
    draft_len: int = 5
    ngram_sizes: list[int] = field(default_factory=lambda: [3, 2, 1])  # tried longest first

    def __post_init__(self):
        checks.integer("lookup draft_len", self.draft_len, minimum=1)
        if not isinstance(self.ngram_sizes, (list, tuple)) or not self.ngram_sizes:
            raise CtxdraftError(f"lookup ngram_sizes must be a non-empty list of n-gram sizes, got {self.ngram_sizes!r}")
        for n in self.ngram_sizes:
            checks.integer("lookup ngram_sizes (an n-gram size)", n, minimum=1)
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
    batches_natively = True  # a dictionary look-up per row, no model work to batch

    def __init__(self, name: str = "lookup", settings: LookupSettings | None = None):
        super().__init__(name)
        self.settings = settings or LookupSettings()
        self.draft_len = self.settings.draft_len
        self.index = NgramIndex(self.settings.ngram_sizes)

    def start(self, state):
        self.index = NgramIndex(self.settings.ngram_sizes)

    def propose(self, state, max_len):
        self.index.update(state.tokens)
        return DraftOutput(self.index.lookup(state.tokens, min(max_len, self.settings.draft_len)), evaluations=1, stopped=False)

    def teacher_forced(self, tp, vocab_size):
        return LookupTeacherForced(self.settings)


class LookupTeacherForced(TeacherForced):
    """Prompt lookup over the true prefix (it reads committed tokens only), with ``LookupDraft``'s own index."""

    def __init__(self, settings: LookupSettings):
        self.draft_len = settings.draft_len
        self.index = NgramIndex(settings.ngram_sizes)

    def propose(self, seq, pending, max_len):
        tokens = seq[: pending + 1]
        self.index.update(tokens)
        return DraftRun(self.index.lookup(tokens, min(max_len, self.draft_len)), 1, False)


@dataclass
class ModelDraftSettings:
    path: str = ""
    draft_len: int = 4

    def __post_init__(self):
        checks.integer("model draft_len", self.draft_len, minimum=1)


class ModelDraft(Draft):
    """An external small causal LM with the target's tokenizer, with its own KV cache."""

    kind = "model"

    def __init__(self, name: str, model: torch.nn.Module, settings: ModelDraftSettings):
        super().__init__(name)
        self.model = model
        self.stack = LayerStack(model)
        self.settings = settings
        self.draft_len = settings.draft_len
        self.cache = None
        self.cached_len = 0

    @staticmethod
    def load(path: str | Path, target) -> torch.nn.Module:
        """The draft model at ``path`` (a directory, a .gguf file or a registered name) in the target's dtype,
        refused unless it has the target's vocabulary."""
        draft_target = load_target(path, dtype=getattr(target, "dtype", None) or torch.float32)
        check_same_vocab(target, draft_target)
        return draft_target.model

    @classmethod
    def from_path(cls, path: str | Path, target, draft_len: int = 4, name: str | None = None) -> "ModelDraft":
        return cls(name or f"model:{Path(path).name}", cls.load(path, target), ModelDraftSettings(str(path), draft_len))

    def start(self, state):
        self.cache = self.stack.new_cache()
        self.cached_len = 0

    def propose(self, state: DecodeState, max_len: int) -> DraftOutput:
        V = state.vocab_size
        sampling = state.temperature > 0
        stack = self.stack
        probs: list[torch.Tensor] = []
        current: dict[str, torch.Tensor] = {}
        taken: list[int] = []

        def evaluate(j: int) -> float:
            # The first evaluation catches up on every committed token the draft model has not seen.
            new = state.tokens[self.cached_len :] if j == 0 else taken[-1:]
            positions = torch.arange(self.cached_len, self.cached_len + len(new))
            hidden = stack.run(stack.embed(torch.tensor([new])), 0, stack.num_layers, self.cache, positions)
            self.cached_len += len(new)
            current["logits"] = stack.logits(hidden[:, -1:])[0, -1, :V]
            return 1.0

        def take() -> int:
            logits = current["logits"]
            if sampling:
                q = probs_from_logits(logits, state.temperature, state.top_p)
                probs.append(q)
                token = int(torch.multinomial(q, 1, generator=state.generator))
            else:
                token = int(logits.argmax())
            taken.append(token)
            return token

        # The last drafted token is never fed to the draft model; its cache ends one token earlier.
        run = draft_loop(min(max_len, self.settings.draft_len), 0.0, evaluate, take)
        return DraftOutput(run.ids, torch.stack(probs) if probs else None, evaluations=run.evaluations, stopped=run.stopped)

    def accept(self, state, committed_len):
        if self.cached_len > committed_len:
            self.stack.crop(self.cache, committed_len)
            self.cached_len = committed_len

    @torch.inference_mode()
    def teacher_forced(self, tp: TeacherPass, vocab_size: int, chunk: int = 256) -> TeacherForced:
        """The draft model's greedy token after every prefix: one forward of it over the sequence."""
        stack = self.stack
        cache = stack.new_cache()
        predictions: list[int] = []
        for start in range(0, len(tp.token_ids), chunk):
            ids = tp.token_ids[start : start + chunk]
            hidden = stack.run(stack.embed(torch.tensor([ids])), 0, stack.num_layers, cache, torch.arange(start, start + len(ids)))
            predictions += stack.logits(hidden)[0, :, :vocab_size].argmax(-1).tolist()
        return PredictionTeacherForced(predictions, self.settings.draft_len)


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
