"""Training a feature head (the target frozen): self-distillation with training-time test.

Each step takes a few sequences (prompt + the target's own continuation, ``exits.data``), unrolls draft
positions 1..``ttt_steps`` at a set of bases of each, and minimises KL(target || head) on the target's top-k
(renormalised on the draft vocabulary) summed over the positions with weights ``decay**(j-1)`` (EAGLE-3). Bases
are every continuation position (where the head drafts at inference) plus up to ``prompt_bases`` sampled prompt
positions. AdamW (betas 0.9/0.95), 5% warm-up then cosine decay, gradient clipping at 1. Under torchrun the head
trains under DistributedDataParallel, each rank taking its share of every step's sequences. Resumable exactly
(weights, optimizer, schedule and random generator in a safetensors checkpoint).
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from ..drafting.feature_head import FeatureHead
from ..runtime.distributed import Group, wrap
from .exit_train import ExitTrainConfig, StepTail, distill_loss, last_tenth, local_vocab_index
from .head_data import Example

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _known(ex: Example) -> int:
    """How many tokens of an example are known and usable: the teacher's positions (0..num_positions-1) and the
    token after the last of them when the pass has it (generation ended on EOS)."""
    return min(len(ex.token_ids), ex.num_positions + 1)


def _sequence(ex: Example, layers: list[int]):
    """What training reads of one example: [T, n*D] states, [T] tokens, the teacher's top-k at positions < T - 1."""
    T = _known(ex)
    ex = ex.loaded()  # one read of a stored example's work file
    states = torch.cat([ex.tp.states[layer][:T] for layer in layers], dim=-1)
    return states, torch.tensor(ex.token_ids[:T]), ex.teacher_ids, ex.teacher_logp


def _bases(ex: Example, T: int, prompt_bases: int, gen: torch.Generator) -> torch.Tensor:
    continuation = torch.arange(max(ex.prompt_len - 1, 0), T - 1)
    prompt = torch.arange(0, max(ex.prompt_len - 1, 0))
    if prompt_bases and prompt.numel():
        prompt = prompt[torch.randperm(prompt.numel(), generator=gen)[:prompt_bases]]
    else:
        prompt = prompt[:0]
    return torch.cat([prompt, continuation]).sort().values


def sequence_loss(model, head: FeatureHead, ex: Example, config: ExitTrainConfig, local_of, gen) -> tuple[torch.Tensor, list]:
    """The weighted TTT loss of one sequence, and the head's top-1 accuracy per draft position (for the log)."""
    states, tokens, teacher_ids, teacher_logp = _sequence(ex, head.layers)
    T = tokens.shape[0]
    bases = _bases(ex, T, config.prompt_bases, gen)
    if bases.numel() == 0:
        return None, []
    logits = model(states, tokens, bases, config.ttt_steps)
    total, accuracy = 0.0, []
    aligned = torch.ones_like(bases, dtype=torch.bool)  # the head's draft positions 1..j-1 were all right
    for j, lg in enumerate(logits, start=1):
        valid = bases + j <= T - 2  # the teacher knows position b + j (it predicts token b + j + 1)
        if not valid.any():
            break
        with torch.no_grad():
            hit = head.to_full_ids(lg.argmax(-1)) == tokens[(bases + j + 1).clamp_max(T - 1)]
        accuracy.append(float(hit[valid].float().mean()))
        counted = valid & aligned if config.aligned_loss else valid
        if counted.any():
            rows = bases[counted] + j
            loss = distill_loss(lg[counted], teacher_ids[rows], teacher_logp[rows], local_of)
            # a mean over the valid bases, the misaligned ones counting 0: a position few bases reach weighs little
            share = counted.sum() / valid.sum()
            total = total + config.decay ** (j - 1) * share * loss
        aligned &= hit & valid
    return (None if isinstance(total, float) else total), accuracy


def train_feature_head(head: FeatureHead, examples: list[Example], config: ExitTrainConfig, ckpt: Path | None = None,
                       progress: Progress | None = None, group: Group | None = None) -> dict:
    """Train ``head`` (in float32) on ``examples``; checkpoints to ``ckpt`` so ``config.resume`` continues exactly."""
    group = group or Group.single()
    gen = torch.Generator().manual_seed(config.seed * 1000 + 999)
    lr = config.lr if config.lr is not None else 1e-3
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(max(s - warm, 0), config.steps) / max(1, config.steps - warm))))
    tail = StepTail(head, params, opt, sched, gen, ckpt, group, progress, f"train feature:{config.name}", config.steps)
    log = {"step": 0, "losses": [], "accuracy": []}
    if config.resume:
        log = tail.resume(log)
    local_of = local_vocab_index(head, examples)
    model = wrap(head, group)
    head.train()
    t0 = time.perf_counter()
    while log["step"] < config.steps:
        picks = [examples[int(i)] for i in torch.randint(0, len(examples), (max(config.seqs_per_step, group.size),),
                                                             generator=gen)]
        seeds = torch.randint(0, 2**62, (len(picks),), generator=gen).tolist()  # per-sequence base sampling
        mine = group.shard(list(zip(picks, seeds)))
        opt.zero_grad(set_to_none=True)
        total, accs = 0.0, []
        for i, (ex, seed) in enumerate(mine):
            # One backward per sequence (the graphs differ in length); DDP averages the gradients on the last one.
            last = i == len(mine) - 1
            with (nullcontext() if last or not group.active else model.no_sync()):
                loss, acc = sequence_loss(model, head, ex, config, local_of, torch.Generator().manual_seed(seed))
                if loss is not None:
                    (loss / len(mine)).backward()
                    total += float(loss.detach()) / len(mine)
                    accs.append(acc)
        log["losses"].append(group.mean(total))
        log["accuracy"].append([statistics.fmean(a) for a in zip(*accs)] if accs else [])
        tail.end_step(log)
    tail.finish()
    losses = log["losses"]
    final = last_tenth(losses)
    last = [a for a in last_tenth(log["accuracy"]) if a]
    return {"steps": log["step"], "lr": lr, "final_loss": statistics.fmean(final) if final else None,
            "first_loss": losses[0] if losses else None,
            "train_accuracy_per_position": [round(statistics.fmean(col), 4) for col in zip(*last)] if last else [],
            "train_s": round(time.perf_counter() - t0, 1)}


def acceptance_per_position(chains: list, examples: list[Example], depth: int) -> dict:
    """Held-out acceptance of a feature head per draft position, overall and per domain: the share of drafting
    bases (the continuation) whose first j draft tokens are all the target's (``prefix``), and P(draft j accepted |
    1..j-1 accepted) (``conditional``). ``chains``: one ``ChainTeacherForced`` per example."""
    by_domain: dict[str, list[list[bool]]] = {}
    for tf, ex in zip(chains, examples):
        tokens = ex.token_ids
        T = _known(ex)
        for base in range(max(ex.prompt_len - 1, 0), T - 2):
            chain = tf.chains[base][:depth]
            ok, row = True, []
            for j, token in enumerate(chain):
                ok = ok and base + j + 2 < T and token == tokens[base + j + 2]
                row.append(ok)
            row += [False] * (depth - len(row))  # a shorter chain drafted nothing there
            by_domain.setdefault(str(ex.row.get("domain", "all")), []).append(row)

    def summary(rows: list[list[bool]]) -> dict:
        prefix = [statistics.fmean(r[j] for r in rows) if rows else 0.0 for j in range(depth)]
        conditional = [prefix[0]] + [prefix[j] / prefix[j - 1] if prefix[j - 1] > 0 else 0.0 for j in range(1, depth)]
        return {"bases": len(rows), "prefix": [round(x, 4) for x in prefix], "conditional": [round(x, 4) for x in conditional]}

    out = {d: summary(rows) for d, rows in sorted(by_domain.items())}
    out["overall"] = summary([r for rows in by_domain.values() for r in rows])
    return out
