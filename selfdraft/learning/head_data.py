"""Training text for exit heads: each prompt plus the target's own greedy continuation, with the target's
states at the exit layers, its LM head input and its top-k next-token distribution, from one teacher pass
(``trajectories.teacher_pass``: the same pass collect replays drafts on). Cached per prompt in safetensors,
so an interrupted ``add-exits --resume`` skips what is done (never pickle: the work directory is a user's file).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..base.errors import CtxdraftError
from ..drafting.decoding import GenerationConfig, prefill, speculative_decode
from ..drafting.draft import TeacherPass
from ..drafting.drafts import LookupDraft
from ..runtime.checkpoint import damaged, load_container, save_container
from ..runtime.distributed import Group
from ..runtime.layers import LayerStack
from .trajectories import greedy_continuation, teacher_pass, teacher_passes

Progress = Callable[[str, int, int], None]  # (stage, done, total)
BATCH_ROWS = 64  # rows whose teacher passes are batched together (and saved together)


@dataclass
class Example:
    """One training text: the prompt (chat template applied) + the target's greedy continuation."""

    row: dict
    tp: TeacherPass
    num_positions: int  # positions with a known next token: the prompt and the returned continuation

    def loaded(self) -> "Example":
        """This example with its tensors in memory (a ``StoredExample`` reads its work file once): read several of
        its tensors through one ``loaded()``."""
        return self

    @property
    def token_ids(self) -> list[int]:
        return self.tp.token_ids

    @property
    def prompt_len(self) -> int:
        return self.tp.prompt_len

    def states(self, layer: int) -> torch.Tensor:  # [T, D]
        return self.tp.states[layer][: self.num_positions]

    @property
    def lm_input(self) -> torch.Tensor:  # [T, D]
        return self.tp.lm_input[: self.num_positions]

    @property
    def teacher_ids(self) -> torch.Tensor:  # [T, k]
        return self.tp.topk_ids[: self.num_positions]

    @property
    def teacher_logp(self) -> torch.Tensor:  # [T, k]
        return self.tp.topk_logp[: self.num_positions]


class StoredExample(Example):
    """An example whose tensors stay in its work file and are read each time ``tp`` is used: a corpus's states
    (layers x positions x D) need not fit in memory, only its token ids do."""

    def __init__(self, row: dict, path: Path, token_ids: list[int], prompt_len: int, num_positions: int):
        self.row, self.path, self.num_positions = row, path, num_positions
        self._token_ids, self._prompt_len = token_ids, prompt_len

    def loaded(self) -> Example:
        return _load(self.path, self.row)

    @property
    def tp(self) -> TeacherPass:
        return self.loaded().tp

    @property
    def token_ids(self) -> list[int]:
        return self._token_ids

    @property
    def prompt_len(self) -> int:
        return self._prompt_len


def encode_prompt(target, prompt: str, max_prompt_tokens: int) -> list[int]:
    """The prompt cut to ``max_prompt_tokens`` (before the chat template), as the target sees it."""
    raw = target.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(raw) > max_prompt_tokens:
        prompt = target.tokenizer.decode(raw[:max_prompt_tokens])
    return target.encode(prompt, chat=True)


def _save(path: Path, ex: Example) -> None:
    tp = ex.tp
    tensors = {"token_ids": torch.tensor(tp.token_ids, dtype=torch.int64)}
    tensors.update({k: v.contiguous() for k, v in (("lm_input", tp.lm_input), ("topk_ids", tp.topk_ids),
                                                   ("topk_logp", tp.topk_logp)) if v is not None})
    tensors.update({f"states.{E}": s.contiguous() for E, s in tp.states.items()})
    meta = {"prompt_len": tp.prompt_len, "num_new": tp.num_new, "num_positions": ex.num_positions}
    save_container(path, tensors, meta)


def _load(path: Path, row: dict) -> Example:
    remedy = "run again without --resume to start over"
    tensors, meta = load_container(path, "work file", remedy)
    try:
        states = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("states.")}
        tp = TeacherPass(tensors["token_ids"].tolist(), int(meta["prompt_len"]), int(meta["num_new"]), states,
                         tensors.get("lm_input"), tensors.get("topk_ids"), tensors.get("topk_logp"))
        return Example(row, tp, int(meta["num_positions"]))
    except (KeyError, ValueError, TypeError) as e:
        raise damaged(path, "work file", remedy, e) from None


def _stored(path: Path, row: dict) -> StoredExample:
    ex = _load(path, row)
    return StoredExample(row, path, ex.token_ids, ex.prompt_len, ex.num_positions)


@torch.inference_mode()
def build_examples(target, rows: list[dict], layers: list[int], *, max_prompt_tokens: int, new_tokens: int,
                   topk: int, extend: int, work: Path | None = None, progress: Progress | None = None,
                   group: Group | None = None, sample: int | None = None, temperature: float = 0.8,
                   seed: int = 0, use_answers: bool = False, name: str = "example",
                   max_batch_tokens: int = 8192) -> list[Example]:
    """The target's greedy continuation of each row (``new_tokens``) and one teacher pass over it, keeping the
    states after ``layers``, the LM head's input and the top-``topk`` log-probabilities. Each finished example is
    saved under ``work`` as ``NAME_i.safetensors``, read back from there when present, and then stays there: the
    examples returned are ``StoredExample``s that read their tensors when used (without ``work``, in memory).

    ``extend`` 0 (training text: nothing past EOS is read) runs the teacher passes of ``BATCH_ROWS`` rows at a time
    in right-padded batches of at most ``max_batch_tokens`` positions (``trajectories.teacher_passes``); otherwise
    one pass per row.

    ``sample``: build the ``sample``-th *sampled* continuation of each row instead (at ``temperature``, seeded by
    ``seed``, the row and the sample number): more training text of the target's own, for diversity. The teacher
    is still the target's distribution at every position.

    ``use_answers``: a row's own ``answer`` (make-data's rows), cut to ``new_tokens``, is the continuation instead of
    a new greedy one (rows without one are generated as before); an answer shorter than ``new_tokens`` that its
    writer cut (not ended by EOS) is continued greedily, so replays never run past the known tokens.

    Under torchrun each rank builds its share of the prompts (``group.shard``) and then reads the others' from
    ``work``, which must be a directory every rank sees."""
    group = group or Group.single()
    if group.active and work is None:
        raise CtxdraftError("several ranks share their examples through a work directory; give one")
    stack = LayerStack(target.model)
    examples: list[Example | None] = [None] * len(rows)
    mine = group.shard(range(len(rows)))
    saved_path = lambda i: work / f"{name}_{i}{'' if sample is None else f'_s{sample}'}.safetensors"  # noqa: E731

    def continuation(row: dict, i: int) -> tuple[list[int], list[int], bool]:
        prompt_ids = encode_prompt(target, row["prompt"], max_prompt_tokens)
        if new_tokens <= 0:
            return prompt_ids, [], False
        if use_answers and sample is None and isinstance(row.get("answer"), str):
            new_ids = target.tokenizer(row["answer"], add_special_tokens=False)["input_ids"][:new_tokens]
            ended = row.get("answer_ended") is True and len(new_ids) < new_tokens
            if not ended and len(new_ids) < new_tokens:  # a shorter answer cut by its writer: go on greedily
                run = greedy_continuation(stack, prompt_ids + new_ids, new_tokens - len(new_ids), target.eos_ids)
                new_ids, ended = new_ids + run.new_ids, run.ended_on_eos
            return prompt_ids, new_ids, ended
        if sample is None:
            run = greedy_continuation(stack, prompt_ids, new_tokens, target.eos_ids)
            return prompt_ids, run.new_ids, run.ended_on_eos
        config = GenerationConfig(max_new_tokens=new_tokens, temperature=temperature,
                                  seed=(seed * 1_000_003 + i * 101 + sample) % (2**63))
        new_ids, _ = speculative_decode(stack, prefill(stack, prompt_ids), LookupDraft("lookup"), config, target.eos_ids)
        return prompt_ids, new_ids, len(new_ids) < new_tokens

    def passes(items: list[tuple[list[int], list[int], bool]]) -> list[TeacherPass]:
        options = dict(layers=layers, topk=topk, lm_input=True)
        if extend == 0:
            return teacher_passes(stack, items, target.eos_ids, max_batch_tokens=max_batch_tokens, **options)
        return [teacher_pass(stack, p, n, target.eos_ids, ended_on_eos=e, extend=extend, **options) for p, n, e in items]

    def build_mine() -> None:
        # Fixed chunks of ``mine``, each batched the same way on every run, so a resumed run computes exactly what an
        # uninterrupted one does. A chunk's files are written in order: it is complete when its last file exists.
        step = BATCH_ROWS if extend == 0 else 1
        chunks = [mine[c : c + step] for c in range(0, len(mine), step)]
        done = 0
        for chunk in chunks:
            if work is not None and saved_path(chunk[-1]).is_file():
                for i in chunk:
                    examples[i] = _stored(saved_path(i), rows[i])
            else:
                items = [continuation(rows[i], i) for i in chunk]
                for i, (prompt_ids, new_ids, _), tp in zip(chunk, items, passes(items)):
                    ex = Example(rows[i], tp, len(prompt_ids) + len(new_ids))
                    if work is not None:
                        _save(saved_path(i), ex)
                        ex = StoredExample(rows[i], saved_path(i), tp.token_ids, tp.prompt_len, ex.num_positions)
                    examples[i] = ex
            done += len(chunk)
            if progress:
                progress("generate", done, len(mine))

    group.run(build_mine)
    for i, row in enumerate(rows):  # the other ranks' share
        if examples[i] is None:
            examples[i] = _stored(saved_path(i), row)
    return examples


def reduced_vocab(target, examples: list[Example], size: int) -> torch.Tensor:
    """The ``size`` most frequent ids of the training text (and of the teacher's top-1) plus special tokens."""
    counts: Counter = Counter()
    for ex in examples:
        counts.update(ex.token_ids[: ex.num_positions + 1])
        counts.update(ex.teacher_ids[:, 0].tolist())
    special = set(getattr(target.tokenizer, "all_special_ids", []) or []) | set(target.eos_ids)
    special = {i for i in special if 0 <= i < target.vocab_size}
    keep = list(special)
    for token, _ in counts.most_common():
        if len(keep) >= size:
            break
        if token not in special:
            keep.append(token)
    for token in range(target.vocab_size):  # tiny data: fill up with the lowest ids
        if len(keep) >= size:
            break
        if token not in special and token not in counts:
            keep.append(token)
    return torch.tensor(sorted(keep[:max(size, len(special))]), dtype=torch.long)
