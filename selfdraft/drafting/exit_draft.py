"""The ``exit@E`` arm: draft with the target's layers [0, E) and an exit head, writing the target's own cache."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..base import checks
from ..base.layout import EXITS_FILE
from ..runtime.layers import LayerStack
from ..runtime.sampling import probs_from_logits
from .draft import DecodeState, Draft, DraftOutput, PredictionTeacherForced, TeacherPass, draft_loop
from .exit_head import ExitHead


@dataclass
class ExitSettings:
    exit_layer: int
    draft_len: int = 4
    threshold: float = 0.0  # stop drafting when the head's top probability is below this
    head: str = "linear"
    draft_vocab: int | None = None  # informational; the ids live in the weights file
    weights: str = EXITS_FILE

    def __post_init__(self):
        checks.integer("exit_layer", self.exit_layer, minimum=1)
        check_stop_settings("exit", self.draft_len, self.threshold)


def check_stop_settings(kind: str, draft_len, threshold) -> None:
    """A head's draft length (an integer >= 1) and confidence stop (in [0, 1)), for exit and feature arms."""
    checks.integer(f"{kind} draft_len", draft_len, minimum=1)
    checks.number(f"{kind} threshold", threshold, minimum=0.0, below=1.0)


def exit_arm(settings: ExitSettings) -> dict:
    """The arm spec of an exit (bundle.json ``arms`` entry)."""
    return {"name": f"exit@{settings.exit_layer}", "kind": "exit", "settings": asdict(settings)}


class HeadChoice:
    """What exit and feature drafts do at each draft position: the head's logits over its (reduced) vocabulary
    give the confidence for the stop, then the token: the argmax, or (sampling) a draw from q, with q scattered back
    to the full vocabulary (zero off the kept ids) so that verification stays exact."""

    def __init__(self, head, state: DecodeState, threshold: float):
        self.head, self.state, self.threshold = head, state, threshold
        self.sampling = state.temperature > 0
        self.ids: list[int] = []
        self.probs: list[torch.Tensor] = []
        self.logits = self.q = None

    def confidence(self, logits: torch.Tensor) -> float:
        self.logits = logits
        self.q = probs_from_logits(logits, self.state.temperature, self.state.top_p) if self.sampling else None
        if self.threshold <= 0:
            return 1.0
        return float(self.q.max() if self.sampling else torch.softmax(logits.float(), dim=-1).max())

    def take(self) -> int:
        if self.sampling:
            local = torch.multinomial(self.q, 1, generator=self.state.generator)[0]
            q = self.q
            if self.head.vocab_ids is not None:
                q = torch.zeros(self.state.vocab_size).index_copy_(0, self.head.vocab_ids, q)
            self.probs.append(q)
        else:
            local = self.logits.argmax()
        self.ids.append(int(self.head.to_full_ids(local)))
        return self.ids[-1]

    def stacked_probs(self) -> torch.Tensor | None:
        return torch.stack(self.probs) if self.probs else None


class ExitDraft(Draft):
    """Draft with the target's layers [0, E) and an exit head, writing the target's own cache."""

    kind = "exit"

    def __init__(self, name: str, head: ExitHead, settings: ExitSettings):
        super().__init__(name)
        self.head = head
        self.settings = settings
        self.draft_len = settings.draft_len
        self.state_layers = (head.exit_layer,)
        self.head_cache = None
        self.head_len = 0  # positions the layer head's own cache holds

    def start(self, state):
        self.head_cache = self.head.new_cache()
        self.head_len = 0

    @torch.inference_mode()
    def propose(self, state: DecodeState, max_len: int) -> DraftOutput:
        stack, cache, E = state.stack, state.cache, self.head.exit_layer
        start = stack.seq_len(cache, 0)
        if self.head_cache is not None and self.head_len < start:
            # The layer head has not seen some committed positions (the prompt, or a last draft token that only
            # the verification ran): recompute their layer-E states, replacing those early cache entries.
            stack.crop(cache, self.head_len, 0, E)
            start = self.head_len
        choice = HeadChoice(self.head, state, self.settings.threshold)
        exit_states: list[torch.Tensor] = []

        def evaluate(j: int) -> float:
            if j == 0:
                input_ids, positions = state.tokens[start:], torch.arange(start, len(state.tokens))
            else:
                input_ids, positions = choice.ids[-1:], torch.tensor([len(state.tokens) - 1 + j])
            hidden = stack.run(stack.embed(torch.tensor([input_ids])), 0, E, cache, positions)  # [1, T, D]
            if self.head_cache is not None:
                logits = self.head(hidden, self.head_cache, positions)[0, -1]  # [N]
                self.head_len = int(positions[-1]) + 1
            else:
                logits = self.head(hidden[:, -1:])[0, -1]
            exit_states.append(hidden[:, -1:])
            return choice.confidence(logits)

        run = draft_loop(min(max_len, self.settings.draft_len), self.settings.threshold, evaluate, choice.take)
        if not run.evaluations:
            return DraftOutput([], evaluations=0, stopped=False)
        # After a confidence stop the states also cover the last draft token: verification skips its [0, E).
        return DraftOutput(run.ids, choice.stacked_probs(), exit_hidden=torch.cat(exit_states, dim=1),
                           exit_layer=E, evaluations=run.evaluations, stopped=run.stopped)

    def accept(self, state, committed_len):
        if self.head_cache is not None and self.head_len > committed_len:
            LayerStack.crop(self.head_cache, committed_len)
            self.head_len = committed_len

    @torch.inference_mode()
    def teacher_forced(self, tp: TeacherPass, vocab_size: int, chunk: int = 256) -> PredictionTeacherForced:
        """The head's greedy token and top probability after every prefix, from the target's layer-E states."""
        head = self.head
        states = tp.states[head.exit_layer]  # [T, D]
        cache = head.new_cache()  # the layer head attends over the sequence; the linear head has no cache
        predictions: list[int] = []
        confidence: list[float] = []
        for start in range(0, states.shape[0], chunk):
            hidden = states[None, start : start + chunk]
            logits = head(hidden, cache, torch.arange(start, start + hidden.shape[1]))[0]  # [t, N]
            top_p, top_local = torch.softmax(logits.float(), dim=-1).max(dim=-1)
            predictions += head.to_full_ids(top_local).tolist()
            confidence += top_p.tolist()
        return PredictionTeacherForced(predictions, self.settings.draft_len, confidence, self.settings.threshold)
