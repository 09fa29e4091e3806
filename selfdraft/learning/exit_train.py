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

from ..base import checks
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
    # a training budget in tokens instead of --steps (steps_for_budget), and the data file's own answers (rows with
    # both 'prompt' and 'text', as make-data writes them) as the continuations instead of generating them again
    train_tokens: int | None = None
    use_answers: bool = False
    # feature heads: draft position j's loss only at bases whose positions 1..j-1 the head drafted right (GRIFFIN-style
    # masking of misaligned tokens: a chain is rejected at its first miss, so the rest never reaches the target)
    aligned_loss: bool = False

    def validate(self, num_layers: int, vocab_size: int) -> None:
        """Every field checked through ``base/checks.py`` (bools, NaN and out-of-range values refused)."""
        checks.choice("--head", self.head, (*HEAD_KINDS, "feature"))
        top = num_layers if self.head == "feature" else num_layers - 1  # a feature head may read the last layer's output
        layers = [checks.integer("--layers", x) for x in (self.layers or [])]
        if not layers:
            raise CtxdraftError("--layers is empty; give exit layers such as 10,16,22")
        if len(set(layers)) != len(layers):
            dup = sorted({x for x in layers if layers.count(x) > 1})
            raise CtxdraftError(f"--layers has duplicates: {dup}")
        bad = [x for x in layers if not 0 < x <= top]
        if bad:
            raise CtxdraftError(f"--layers {bad} out of range: a {'feature' if self.head == 'feature' else 'exit'} layer "
                                f"must be in 1..{top} (the target has {num_layers} layers)")
        if self.head == "feature":
            if layers != sorted(layers):
                raise CtxdraftError(f"--layers of a feature head must be increasing, got {layers}")
            if not isinstance(self.name, str) or not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
                raise CtxdraftError(f"--name must be letters, digits, '-', '_' or '.', got {self.name!r}")
            checks.integer("--ttt-steps", self.ttt_steps, minimum=1)
            checks.number("decay", self.decay, above=0.0, maximum=1.0)
            checks.integer("prompt_bases", self.prompt_bases, minimum=0)
            checks.integer("seqs_per_step", self.seqs_per_step, minimum=1)
        if self.draft_vocab is not None:
            checks.integer("--draft-vocab", self.draft_vocab, minimum=1, maximum=vocab_size)
        checks.integer("--steps", self.steps, minimum=0)
        if self.train_tokens is not None:
            checks.integer("--train-tokens", self.train_tokens, minimum=1)
        checks.flag("--use-answers", self.use_answers)
        checks.flag("--aligned-loss", self.aligned_loss)
        checks.integer("batch_size", self.batch_size, minimum=1)
        if self.lr is not None:
            checks.number("lr", self.lr, above=0.0)
        checks.integer("--self-distill-tokens", self.self_distill_tokens, minimum=0)
        checks.integer("max_prompt_tokens", self.max_prompt_tokens, minimum=1)
        checks.number("--eval-frac", self.eval_frac, above=0.0, below=1.0)
        checks.seed("--seed", self.seed)
        checks.integer("teacher_topk", self.teacher_topk, minimum=1)
        checks.number("ridge", self.ridge, minimum=0.0)
        checks.integer("--samples", self.samples, minimum=0)
        checks.number("--sample-temperature", self.sample_temperature, above=0.0, maximum=5.0)
        if self.samples and self.self_distill_tokens < 1:
            raise CtxdraftError("--samples needs --self-distill-tokens >= 1 (the samples are continuations)")
        if self.max_prompts is not None:
            checks.integer("--max-prompts (training and held-out prompts)", self.max_prompts, minimum=2)
        if not self.draft_lens:
            raise CtxdraftError("--draft-lens is empty; give draft lengths such as 1,2,4")
        for k in self.draft_lens:
            checks.integer("--draft-lens (a draft length)", k, minimum=1, maximum=16)
        if not self.thresholds:
            raise CtxdraftError("--thresholds is empty; give confidence stops such as 0,0.5")
        for t in self.thresholds:
            checks.number("--thresholds (a confidence stop)", t, minimum=0.0, below=1.0)
        checks.integer("timing_reps", self.timing_reps, minimum=1)
        checks.flag("--resume", self.resume)


def steps_for_budget(config: ExitTrainConfig, examples: list[Example]) -> int:
    """The optimizer steps that train on about ``config.train_tokens`` tokens: an exit head's step takes
    ``batch_size`` positions, a feature head's ``seqs_per_step`` whole sequences (of the training texts' mean
    length). A function of the data and the settings only, so a resumed run trains the same number of steps."""
    if config.head != "feature":
        return math.ceil(config.train_tokens / config.batch_size)
    mean_len = sum(ex.num_positions for ex in examples) / max(len(examples), 1)
    return max(1, math.ceil(config.train_tokens / (config.seqs_per_step * max(mean_len, 1.0))))


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
        examples = [ex.loaded() for ex in examples]
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
        ex = ex.loaded()
        logits = model(ex.states(E)[None], rows=rows)
        total = total + distill_loss(logits, ex.teacher_ids[rows], ex.teacher_logp[rows], local_of)
    return total / len(mine)


@dataclass
class StepTail:
    """How every head-training step ends (exit and feature heads): clip the gradients, step the optimizer and the
    schedule, count the step, report progress, and checkpoint ``log`` (the step, the losses, ...) every 25 steps
    and at the last, on rank 0, so that a resumed run continues exactly."""

    head: torch.nn.Module
    params: list
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    ckpt: Path | None
    group: Group
    progress: Progress | None
    label: str
    total_steps: int

    def resume(self, log: dict) -> dict:
        """``log`` as the checkpoint left it when resuming from one (else unchanged)."""
        if self.ckpt is not None and self.ckpt.is_file():
            meta = load_training_state(self.ckpt, self.head, self.opt, self.sched, self.gen)
            log = {key: int(meta[key]) if key == "step" else list(meta[key]) for key in log}
        return log

    def end_step(self, log: dict) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        log["step"] += 1
        if self.progress:
            self.progress(self.label, log["step"], self.total_steps)
        if self.ckpt is not None and self.group.main and (log["step"] % 25 == 0 or log["step"] == self.total_steps):
            save_training_state(self.ckpt, self.head, self.opt, self.sched, self.gen, log)

    def finish(self) -> None:
        self.head.eval()
        self.head.requires_grad_(False)


def last_tenth(values: list) -> list:
    """The values of the last tenth of the steps (at least one): what a training report averages."""
    return values[-max(1, len(values) // 10):] if values else []


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
    tail = StepTail(head, params, opt, sched, gen, ckpt, group, progress, f"train exit@{E}", config.steps)
    log = {"step": 0, "losses": []}
    if ckpt is not None and config.resume and ckpt.is_file():
        log = tail.resume(log)
    elif head.kind == "linear" and config.ridge >= 0:
        _ridge_init(head, examples, config.ridge)
    local_of = local_vocab_index(head, examples)
    if head.kind == "linear":
        examples = [ex.loaded() for ex in examples]
        flat_hidden = torch.cat([ex.states(E) for ex in examples])
        flat_ids = torch.cat([ex.teacher_ids for ex in examples])
        flat_logp = torch.cat([ex.teacher_logp for ex in examples])
    head.train()
    model = wrap(head, group)
    t0 = time.perf_counter()
    while log["step"] < config.steps:
        if head.kind == "linear":
            rows = torch.randint(0, flat_hidden.shape[0], (config.batch_size,), generator=gen)[group.rank :: group.size]
            loss = distill_loss(model(flat_hidden[rows]), flat_ids[rows], flat_logp[rows], local_of)
        else:
            loss = _layer_head_loss(model, E, examples, config.batch_size, gen, local_of, group)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        log["losses"].append(group.mean(loss.item()))
        tail.end_step(log)
    tail.finish()
    losses = log["losses"]
    final = last_tenth(losses)
    return {"steps": log["step"], "lr": lr, "final_kl": statistics.fmean(final) if final else None,
            "first_kl": losses[0] if losses else None, "train_s": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def agreement(head: ExitHead, examples: list[Example]) -> dict:
    """Top-1 agreement with the target on held-out positions: all of them, and the drafting positions
    (the continuation after its first token, which the prefill emits)."""
    agree_all = total_all = agree_cont = total_cont = 0
    for ex in examples:
        ex = ex.loaded()
        logits = head(ex.states(head.exit_layer)[None])[0]  # [T, N]
        match = head.to_full_ids(logits.argmax(-1)) == ex.teacher_ids[:, 0].long()
        agree_all += int(match.sum())
        total_all += match.numel()
        cont = match[ex.prompt_len:]
        agree_cont += int(cont.sum())
        total_cont += cont.numel()
    return {"agreement": agree_all / total_all if total_all else 0.0,
            "agreement_continuation": agree_cont / total_cont if total_cont else None,
            "num_positions": total_all, "num_continuation_positions": total_cont}
