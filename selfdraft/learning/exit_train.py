"""Training exit heads by self-distillation (the target is frozen), and their agreement with the target.

The loss is KL(target || exit) on the target's top-k next-token distribution plus one bucket for the
remaining mass; with a reduced draft vocabulary the target's top-k is renormalised on the kept ids.
``linear`` heads get a least-squares warm start (from the normed layer-E states to the LM head's input,
ridge-regularised towards the identity) before AdamW with a cosine schedule.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..base.errors import CtxdraftError
from ..drafting.exit_head import HEAD_KINDS, ExitHead
from ..runtime.checkpoint import load_training_state, save_training_state
from ..runtime.distributed import Group, wrap
from .head_data import Example

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class ExitTrainConfig:
    layers: list[int]
    head: str = "linear"
    draft_vocab: int | None = None  # None: the full vocabulary
    steps: int = 200
    batch_size: int = 256  # positions per step
    lr: float | None = None  # None: 1e-3
    self_distill_tokens: int = 64
    max_prompt_tokens: int = 192  # prompts are cut to this many tokens (before the chat template)
    max_prompts: int | None = None  # use only this many prompts (a deterministic sample)
    eval_frac: float = 0.2
    seed: int = 0
    teacher_topk: int = 64
    ridge: float = 1.0  # linear heads: least-squares warm start, regularised towards the identity
    draft_lens: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6])
    thresholds: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    timing_reps: int = 9
    resume: bool = False
    # feature heads (--head feature): the head's name, training-time-test depth, loss decay per draft position,
    # prompt positions sampled as extra bases per sequence, sequences per optimizer step
    name: str = "general"
    ttt_steps: int = 5
    decay: float = 0.8
    prompt_bases: int = 64
    seqs_per_step: int = 4
    # more training text: this many sampled continuations of every training prompt (at sample_temperature)
    samples: int = 0
    sample_temperature: float = 0.8

    def validate(self, num_layers: int, vocab_size: int) -> None:
        layers = self.layers
        if not layers:
            raise CtxdraftError("--layers is empty; give exit layers such as 10,16,22")
        if len(set(layers)) != len(layers):
            dup = sorted({x for x in layers if layers.count(x) > 1})
            raise CtxdraftError(f"--layers has duplicates: {dup}")
        if self.head not in (*HEAD_KINDS, "feature"):
            raise CtxdraftError(f"--head must be one of {', '.join((*HEAD_KINDS, 'feature'))}, got {self.head!r}")
        top = num_layers if self.head == "feature" else num_layers - 1  # a feature head may read the last layer's output
        bad = [x for x in layers if not 0 < x <= top]
        if bad:
            raise CtxdraftError(f"--layers {bad} out of range: a {'feature' if self.head == 'feature' else 'exit'} layer "
                                f"must be in 1..{top} (the target has {num_layers} layers)")
        if self.head == "feature":
            if layers != sorted(layers):
                raise CtxdraftError(f"--layers of a feature head must be increasing, got {layers}")
            if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
                raise CtxdraftError(f"--name must be letters, digits, '-', '_' or '.', got {self.name!r}")
            if self.ttt_steps < 1 or not 0 < self.decay <= 1 or self.prompt_bases < 0 or self.seqs_per_step < 1:
                raise CtxdraftError("feature training needs ttt_steps >= 1, decay in (0, 1], prompt_bases >= 0 and "
                                    "seqs_per_step >= 1")
        if self.draft_vocab is not None and not 1 <= self.draft_vocab <= vocab_size:
            raise CtxdraftError(f"--draft-vocab must be in 1..{vocab_size}, got {self.draft_vocab}")
        if self.steps < 0 or self.batch_size < 1:
            raise CtxdraftError("--steps must be >= 0 and the batch size >= 1")
        if self.self_distill_tokens < 0 or self.max_prompt_tokens < 1:
            raise CtxdraftError("--self-distill-tokens must be >= 0 and the prompt length >= 1")
        if not 0 < self.eval_frac < 1:
            raise CtxdraftError(f"--eval-frac must be in (0, 1), got {self.eval_frac}")
        if self.samples < 0 or not 0 < self.sample_temperature <= 5 or self.samples and self.self_distill_tokens < 1:
            raise CtxdraftError("--samples must be >= 0 (with --self-distill-tokens >= 1) and --sample-temperature "
                                "in (0, 5]")
        if self.max_prompts is not None and self.max_prompts < 2:
            raise CtxdraftError("--max-prompts must be >= 2 (training and held-out prompts)")
        if not self.draft_lens or min(self.draft_lens) < 1 or max(self.draft_lens) > 16:
            raise CtxdraftError(f"--draft-lens must be draft lengths in 1..16, got {self.draft_lens}")
        if not self.thresholds or not all(0 <= t < 1 for t in self.thresholds):  # also false for nan
            raise CtxdraftError(f"--thresholds must be confidence stops in [0, 1), got {self.thresholds}")


def distill_loss(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
                 local_of: torch.Tensor | None = None) -> torch.Tensor:
    """KL(target || exit) on the target's top-k plus one bucket for the rest of the vocabulary, mean over rows.

    logits: [B, N] exit logits; teacher_ids/teacher_logp: [B, k]. With a reduced vocabulary (``local_of``
    maps a full id to its index in the draft vocabulary, or -1) the target's top-k is renormalised on the
    kept ids and the bucket is dropped.
    """
    log_q = logits.float().log_softmax(dim=-1)  # [B, N]
    p = teacher_logp.exp()
    ids = teacher_ids.long()
    if local_of is None:
        log_q_top = log_q.gather(1, ids)
        rest_p = (1 - p.sum(dim=1)).clamp_min(0)
        log_q_rest = log_q.scatter(1, ids, float("-inf")).logsumexp(dim=1)
        kl = (p * (teacher_logp - log_q_top)).sum(1) + rest_p * (rest_p.clamp_min(1e-12).log() - log_q_rest)
        return kl.mean()
    local = local_of[ids]
    kept = local >= 0
    p = torch.where(kept, p, torch.zeros_like(p))
    p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
    log_q_top = log_q.gather(1, local.clamp_min(0))
    kl = torch.where(kept, p * (p.clamp_min(1e-12).log() - log_q_top), torch.zeros_like(p)).sum(1)
    return kl.mean()


def _ridge_init(head: ExitHead, examples: list[Example], ridge: float) -> None:
    """Least-squares fit of the adapter from the normed layer-E states to the LM head's input, pulled to I."""
    with torch.no_grad():
        X = torch.cat([head.norm(ex.states(head.exit_layer).to(head.dtype)) for ex in examples]).double()  # [N, D]
        Y = torch.cat([ex.lm_input for ex in examples]).double()
        D = X.shape[1]
        lam = ridge * X.shape[0] / D * X.pow(2).mean() if ridge > 0 else 0.0
        eye = torch.eye(D, dtype=torch.float64)
        A = torch.linalg.solve(X.T @ X + lam * eye, X.T @ Y + lam * eye)  # X A ~ Y
        head.adapter.weight.copy_(A.T.to(head.adapter.weight.dtype))


def local_vocab_index(head, examples: list[Example]) -> torch.Tensor | None:
    if head.vocab_ids is None:
        return None
    size = max(int(head.vocab_ids.max()), max(int(ex.teacher_ids.max()) for ex in examples)) + 1
    local_of = torch.full((size,), -1, dtype=torch.long)
    local_of[head.vocab_ids] = torch.arange(head.vocab_ids.numel())
    return local_of


def _layer_head_loss(model, E: int, examples: list[Example], batch_size: int, gen, local_of, group: Group) -> torch.Tensor:
    """A layer head sees whole sequences (it attends); the loss is taken on sampled positions. Every rank draws
    the same sequences and positions; each computes the loss of its share of them (``group.shard``)."""
    per_seq = 64
    num_seqs = max(group.size, batch_size // per_seq)
    picks = []
    for _ in range(num_seqs):
        ex = examples[int(torch.randint(0, len(examples), (1,), generator=gen))]
        picks.append((ex, torch.randperm(ex.num_positions, generator=gen)[:per_seq]))
    mine = group.shard(picks)
    total = 0.0
    for ex, rows in mine:
        logits = model(ex.states(E)[None], rows=rows)
        total = total + distill_loss(logits, ex.teacher_ids[rows], ex.teacher_logp[rows], local_of)
    return total / len(mine)


def train_head(head: ExitHead, examples: list[Example], config: ExitTrainConfig, ckpt: Path | None = None,
               progress: Progress | None = None, group: Group | None = None) -> dict:
    """Distil one head; checkpoints to ``ckpt`` so that ``config.resume`` continues exactly where it stopped.

    Under torchrun (``group`` with several ranks) the head trains under DistributedDataParallel: every rank draws
    the same global batch, computes the loss of its share, and the gradients are averaged, so the steps are those
    of one process up to the order of float sums. Rank 0 writes the checkpoints."""
    group = group or Group.single()
    E = head.exit_layer
    gen = torch.Generator().manual_seed(config.seed * 1000 + E)
    lr = config.lr if config.lr is not None else 1e-3
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / max(1, config.steps))))
    step, losses = 0, []
    if ckpt is not None and config.resume and ckpt.is_file():
        meta = load_training_state(ckpt, head, opt, sched, gen)
        step, losses = int(meta["step"]), list(meta["losses"])
    elif head.kind == "linear" and config.ridge >= 0:
        _ridge_init(head, examples, config.ridge)
    local_of = local_vocab_index(head, examples)
    if head.kind == "linear":
        flat_hidden = torch.cat([ex.states(E) for ex in examples])
        flat_ids = torch.cat([ex.teacher_ids for ex in examples])
        flat_logp = torch.cat([ex.teacher_logp for ex in examples])
    head.train()
    model = wrap(head, group)
    t0 = time.perf_counter()
    while step < config.steps:
        if head.kind == "linear":
            rows = torch.randint(0, flat_hidden.shape[0], (config.batch_size,), generator=gen)[group.rank :: group.size]
            loss = distill_loss(model(flat_hidden[rows]), flat_ids[rows], flat_logp[rows], local_of)
        else:
            loss = _layer_head_loss(model, E, examples, config.batch_size, gen, local_of, group)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(group.mean(loss.item()))
        if progress:
            progress(f"train exit@{E}", step, config.steps)
        if ckpt is not None and group.main and (step % 25 == 0 or step == config.steps):
            save_training_state(ckpt, head, opt, sched, gen, {"step": step, "losses": losses})
    head.eval()
    head.requires_grad_(False)
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {"steps": step, "lr": lr, "final_kl": statistics.fmean(tail) if tail else None,
            "first_kl": losses[0] if losses else None, "train_s": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def agreement(head: ExitHead, examples: list[Example]) -> dict:
    """Top-1 agreement with the target on held-out positions: all of them, and the drafting positions
    (the continuation after its first token, which the prefill emits)."""
    agree_all = total_all = agree_cont = total_cont = 0
    for ex in examples:
        logits = head(ex.states(head.exit_layer)[None])[0]  # [T, N]
        match = head.to_full_ids(logits.argmax(-1)) == ex.teacher_ids[:, 0].long()
        agree_all += int(match.sum())
        total_all += match.numel()
        cont = match[ex.tp.prompt_len:]
        agree_cont += int(cont.sum())
        total_cont += cont.numel()
    return {"agreement": agree_all / total_all if total_all else 0.0,
            "agreement_continuation": agree_cont / total_cont if total_cont else None,
            "num_positions": total_all, "num_continuation_positions": total_cont}
