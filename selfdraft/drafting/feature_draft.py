"""The ``feature`` arm: draft with a feature head (``feature_head.py``) from the target states every forward leaves.

The decoding loop captures the target's residual states at the head's layers in the prefill and in every
verification (``DecodeState.target_states``; no extra target compute). After a verification, the states of the
committed positions wait in a buffer; when the draft is next asked to propose, the tokens that follow them are
known, so it feeds them into its own KV cache (``FeatureHead.feed``) and drafts a chain from the last one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..base.errors import CtxdraftError
from ..base.layout import EXITS_FILE
from .draft import ChainTeacherForced, DecodeState, Draft, DraftOutput, TeacherPass, draft_loop
from .exit_draft import HeadChoice, check_stop_settings
from .feature_head import FeatureCache, FeatureHead


@dataclass
class FeatureSettings:
    name: str = "general"  # the head's name in the weights file (several heads can coexist, e.g. one per domain)
    layers: list[int] = field(default_factory=list)  # target layer counts whose entering states the head reads
    draft_len: int = 4
    threshold: float = 0.0  # stop drafting when the head's top probability is below this
    draft_vocab: int | None = None  # informational; the ids live in the weights file
    weights: str = EXITS_FILE

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise CtxdraftError(f"a feature head needs a name, got {self.name!r}")
        if not isinstance(self.layers, list) or not self.layers or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in self.layers):
            raise CtxdraftError(f"feature layers must be positive integers, got {self.layers!r}")
        check_stop_settings("feature", self.draft_len, self.threshold)


def feature_arm(settings: FeatureSettings) -> dict:
    """The arm spec of a feature head: ``feature`` for the head named general, else ``feature:<name>``."""
    name = "feature" if settings.name == "general" else f"feature:{settings.name}"
    return {"name": name, "kind": "feature", "settings": asdict(settings)}


class FeatureDraft(Draft):
    kind = "feature"

    def __init__(self, name: str, head: FeatureHead, settings: FeatureSettings):
        super().__init__(name)
        if list(head.layers) != list(settings.layers):
            raise CtxdraftError(f"arm {name!r}: its head reads layers {head.layers}, its settings say {settings.layers}")
        self.head = head
        self.settings = settings
        self.draft_len = settings.draft_len
        self.state_layers = tuple(settings.layers)
        self._reset()

    def _reset(self) -> None:
        self.cache = FeatureCache()
        self.fed = 0  # positions in the head's cache (0..fed-1), all committed
        self.last = None  # [1, D] the state of position fed-1: it drafts the next token
        self.buffer: list[tuple[int, torch.Tensor]] = []  # (first position, [n, n_layers*D] target states) not yet fed

    def _states(self, state: DecodeState, count: int) -> torch.Tensor:  # [count, n*D] from the last forward
        missing = [l for l in self.settings.layers if state.target_states.get(l) is None]
        if missing:
            raise CtxdraftError(f"arm {self.name!r} needs the target's states at layers {missing}, which the last "
                                "forward did not keep (the loop captures a draft's state_layers)")
        return torch.cat([state.target_states[l][0, :count] for l in self.settings.layers], dim=-1)

    def start(self, state: DecodeState) -> None:
        self._reset()
        if any(state.target_states.get(l) is None for l in self.settings.layers):
            self._capture_prompt(state)
        self.buffer.append((0, self._states(state, len(state.tokens) - 1)))

    @torch.inference_mode()
    def _capture_prompt(self, state: DecodeState) -> None:
        """The prefill ran without keeping our layers (the arm was chosen after it): run the prompt once more."""
        stack, prompt = state.stack, state.tokens[:-1]
        captured = dict.fromkeys(self.settings.layers)
        stack.run(stack.embed(torch.tensor([prompt])), 0, max(self.settings.layers), stack.new_cache(),
                  torch.arange(len(prompt)), captured)
        state.target_states, state.states_start = captured, 0

    def _absorb(self, tokens: list[int]) -> None:
        """Feed every buffered position whose next token is now known."""
        for first, states in self.buffer:
            stop = min(first + states.shape[0], len(tokens) - 1)
            if stop > self.fed:
                positions = torch.arange(self.fed, stop)
                new = self.head.feed(self.cache, states[self.fed - first : stop - first], torch.tensor(tokens[self.fed + 1 : stop + 1]),
                                     positions)
                self.fed, self.last = stop, new[-1:]
        self.buffer = [(f, s) for f, s in self.buffer if f + s.shape[0] > self.fed]

    def _catch_up(self, state: DecodeState) -> int:
        """Feed what is committed; the base (the last position in the head's cache: ``self.last`` is its state)."""
        self._absorb(state.tokens)
        base = self.fed - 1
        if base != len(state.tokens) - 2 or self.last is None:
            raise CtxdraftError(f"arm {self.name!r}: the head's cache ({self.fed} positions) is out of step with the "
                                f"sequence ({len(state.tokens) - 1} committed)")
        return base

    @torch.inference_mode()
    def propose(self, state: DecodeState, max_len: int) -> DraftOutput:
        base = self._catch_up(state)
        head = self.head
        choice = HeadChoice(head, state, self.settings.threshold)
        current = self.last

        def evaluate(j: int) -> float:
            nonlocal current
            if j > 0:
                current = head.step(self.cache, current, choice.ids[-1], base + 1 + j)
            return choice.confidence(head.logits(current)[0])

        run = draft_loop(min(max_len, self.settings.draft_len), self.settings.threshold, evaluate, choice.take)
        self.cache.crop(self.fed)  # the chain's own entries were for this proposal only
        return DraftOutput(run.ids, choice.stacked_probs(), evaluations=run.evaluations, stopped=run.stopped)

    def accept(self, state: DecodeState, committed_len: int) -> None:
        count = committed_len - state.states_start  # the verified positions that are final
        if count > 0 and state.target_states:
            self.buffer.append((state.states_start, self._states(state, count)))

    @torch.inference_mode()
    def teacher_forced(self, tp: TeacherPass, vocab_size: int) -> ChainTeacherForced:
        """Every base's greedy chain along the target's own tokens, in one training-time-test forward."""
        head = self.head
        states = torch.cat([tp.states[l] for l in self.settings.layers], dim=-1)
        T = states.shape[0]
        if T < 2:
            return ChainTeacherForced(torch.zeros(max(T - 1, 0), self.draft_len, dtype=torch.long), self.draft_len)
        logits = head(states, torch.tensor(tp.token_ids[:T]), torch.arange(T - 1), self.draft_len)  # K x [T-1, N]
        probs = torch.stack([torch.softmax(lg.float(), dim=-1) for lg in logits], dim=1)  # [T-1, K, N]
        confidence, local = probs.max(dim=-1)
        return ChainTeacherForced(head.to_full_ids(local), self.draft_len, confidence, self.settings.threshold)
