"""Exact greedy replay of a draft by running the draft itself along a teacher pass.

A tree draft whose proposals depend on its whole history (the feature head's EAGLE-2 tree reads the head's cache of
committed positions; the merged arm's per-source hit rates and its sources' own state) is replayed by driving the real
draft object with what the decoding loop would have handed it: the committed tokens, the target's states at the
draft's ``state_layers`` and its top-k next tokens for the committed positions (the root and the accepted path). Those
are the target's own greedy sequence, which the teacher pass holds, so the proposals (nodes, evaluations) and the
tokens greedy verification accepts equal a real decode's (up to rounding ties between the two forwards).
"""
from __future__ import annotations

import torch

from ..base.errors import CtxdraftError
from .draft import DecodeState, Draft, DraftRun, TeacherForced, TeacherPass


class LiveReplay(TeacherForced):
    """``draft`` replayed along ``tp`` (see the module docstring); starts the draft as the loop does after prefill."""

    def __init__(self, draft: Draft, tp: TeacherPass, vocab_size: int):
        k = draft.observe_top_k
        if k and (tp.topk_ids is None or tp.topk_ids.shape[1] < min(k, vocab_size)):
            raise CtxdraftError(f"internal: replaying {draft.name!r} needs the teacher pass's top-{k} ids (teacher_pass topk)")
        missing = [layer for layer in draft.state_layers if layer not in tp.states]
        if missing:
            raise CtxdraftError(f"internal: replaying {draft.name!r} needs the teacher pass's states at layers {missing}")
        self.draft, self.tp = draft, tp
        P = tp.prompt_len
        self.state = DecodeState(None, None, list(tp.token_ids[: P + 1]), vocab_size, 0.0, 1.0, None,
                                 target_states=self._states(0, P), states_start=0)
        draft.start(self.state)
        self._observe(P - 1, P)
        self.pending = P  # the position of the pending token the draft last saw

    def _states(self, start: int, stop: int) -> dict[int, torch.Tensor]:  # l -> [1, stop - start, D]
        return {layer: self.tp.states[layer][None, start:stop] for layer in self.draft.state_layers}

    def _observe(self, start: int, stop: int) -> None:
        k = self.draft.observe_top_k
        if k:
            self.draft.observe(self.state, self.tp.token_ids[start:stop], self.tp.topk_ids[start:stop, :k])

    def propose(self, seq: list[int], pending: int, max_len: int) -> DraftRun:
        if pending < self.pending:
            raise CtxdraftError("internal: a live replay only moves forward along the sequence")
        if pending > self.pending:  # the last step committed positions self.pending .. pending - 1
            self._observe(self.pending, pending)
            self.state.target_states, self.state.states_start = self._states(self.pending, pending), self.pending
            self.draft.accept(self.state, pending)
            self.state.tokens.extend(seq[self.pending + 1 : pending + 1])
            self.pending = pending
        out = self.draft.propose(self.state, max_len)
        return DraftRun(list(out.ids), out.evaluations if out.evaluations is not None else 1, bool(out.stopped),
                        list(out.parents) if out.parents is not None else None)
