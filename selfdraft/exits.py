"""Early-exit self-drafts: the target's own first E layers plus a small trained exit head.

An *exit head* turns the residual stream after layer E-1 into next-token logits:
- ``linear``: a norm (initialised from the target's final norm), a D x D adapter (initialised to the
  identity) and the target's frozen, shared LM head;
- ``layer``: one decoder layer (initialised from the target's last layer, with its own small KV cache),
  the norm and the shared LM head.
Either may be restricted to a *reduced draft vocabulary*: the N most frequent ids of the training text plus
the special tokens (FR-Spec, Zhao et al. 2025). The head then reads only those rows of the LM head, which
cuts its cost; verification is unchanged, so decoding stays lossless.

Heads are trained by self-distillation (the target is frozen): the text is the training prompts plus the
target's own greedy continuations of them, and the loss is KL(target || exit) on the target's top-k
next-token distribution (plus one bucket for the remaining mass). The target's hidden states at the exit
layers and its top-k logits are computed once, while generating the continuations.

``ExitDraft`` (arm ``exit@E``) drafts with layers [0, E) writing the target's own KV cache, so verification
runs [0, E) only for the last draft token and [E, L) from the saved layer-E states (LayerSkip's KV and
exit-query reuse; Elhoushi et al. 2024, "LayerSkip"). The draft stops early when the head's top
probability falls below the arm's ``threshold``.

Speed-up model (reported per exit, on held-out prompts). Under greedy decoding every accepted token is a
target token, so a draft's whole trajectory follows from one teacher-forced pass: at each drafting
position we know whether the exit's argmax equals the target's and the exit's confidence. Replaying the
draft loop (draft length K, threshold) over the held-out continuations gives, per verification step,
``evals`` exit evaluations and ``drafted``/``accepted`` tokens, and

    speed-up = sum(accepted + 1) / sum(evals * c + v(drafted))

where c is the measured time of one draft token ([0, E) for one token + head) and v(k) the measured time
of verifying k draft tokens ([0, E) for one token, [E, L) for k + 1 tokens, logits), both relative to one
plain target step (timed interleaved, medians). ``none`` has speed-up 1 by definition.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .drafts import DRAFT_FACTORIES, Draft, DraftOutput
from .errors import CtxdraftError
from .fileio import atomic_path, write_json_atomic
from .layers import LayerStack
from .sampling import probs_from_logits

HEAD_KINDS = ("linear", "layer")
WEIGHTS_FILE = "exits.safetensors"
REPORT_FILE = "reports/add_exits.json"
WORK_DIR = ".add_exits_work"

Progress = Callable[[str, int, int], None]  # (stage, done, total)


# ----------------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------------
class ExitHead(nn.Module):
    """norm (+ D x D adapter | + one decoder layer) + the target's shared, frozen LM head."""

    def __init__(self, model: nn.Module, exit_layer: int, kind: str = "linear", vocab_ids: torch.Tensor | None = None):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise CtxdraftError(f"unknown exit head kind {kind!r} (known: {', '.join(HEAD_KINDS)})")
        config = model.config
        D = config.hidden_size
        self.exit_layer = exit_layer
        self.kind = kind
        self.norm = copy.deepcopy(model.model.norm)
        self.norm.requires_grad_(True)
        if kind == "linear":
            self.adapter = nn.Linear(D, D, bias=False)
            with torch.no_grad():
                self.adapter.weight.copy_(torch.eye(D))
        else:
            self.layer = copy.deepcopy(model.model.layers[-1])
            self.layer.requires_grad_(True)
            self.layer.self_attn.layer_idx = 0  # it is layer 0 of its own one-layer cache
            head_config = copy.deepcopy(config)
            head_config.num_hidden_layers = 1
            layer_types = getattr(config, "layer_types", None)
            if layer_types:
                head_config.layer_types = [layer_types[-1]]
            # A one-layer "model" so that the same layer-range forward (masks, rotary, cache) serves the head.
            backbone = SimpleNamespace(layers=[self.layer], rotary_emb=model.model.rotary_emb)
            self._stack = LayerStack(SimpleNamespace(config=head_config, model=backbone))
        lm_weight = model.get_output_embeddings().weight  # [V, D], frozen and shared: never saved with the head
        self.register_buffer("vocab_ids", None if vocab_ids is None else vocab_ids.long(), persistent=False)
        # The reduced head reads only its rows; a gathered copy in memory, never in the file.
        self._lm_weight = lm_weight.detach() if vocab_ids is None else lm_weight.detach()[vocab_ids].contiguous()
        self._softcap = getattr(config, "final_logit_softcapping", None)

    @property
    def draft_vocab(self) -> int | None:
        return None if self.vocab_ids is None else int(self.vocab_ids.numel())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The head's own weights (what goes into exits.safetensors), without the shared LM head."""
        return {k: v for k, v in self.state_dict().items()}

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.trainable_state().values())

    def new_cache(self):
        return self._stack.new_cache() if self.kind == "layer" else None

    def transform(self, hidden: torch.Tensor, cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, D] layer-E residual -> [B, T, D] the LM head's input."""
        if self.kind == "layer":
            T = hidden.shape[1]
            if cache is None:
                cache = self.new_cache()
            if positions is None:
                positions = torch.arange(T)
            hidden = self._stack.run(hidden, 0, 1, cache, positions)
            return self.norm(hidden)
        return self.adapter(self.norm(hidden))

    def project(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., N] logits over the draft vocab
        logits = F.linear(x, self._lm_weight)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def forward(self, hidden, cache=None, positions=None):  # [B, T, D] -> [B, T, N]
        return self.project(self.transform(hidden, cache, positions))

    def to_full_ids(self, local_ids: torch.Tensor) -> torch.Tensor:
        return local_ids if self.vocab_ids is None else self.vocab_ids[local_ids]


def _prefix(exit_layer: int) -> str:
    return f"exit{exit_layer}."


def save_heads(path: Path, heads: list[ExitHead]) -> None:
    """Write (or extend) exits.safetensors atomically; heads at the same layer are replaced."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path)) if path.is_file() else {}
    for head in heads:
        prefix = _prefix(head.exit_layer)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        for name, value in head.trainable_state().items():
            tensors[prefix + name] = value.detach().contiguous().clone()
        if head.vocab_ids is not None:
            tensors[prefix + "vocab_ids"] = head.vocab_ids.detach().clone()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "ctxdraft-exits"})


def load_head(model: nn.Module, path: Path, exit_layer: int, kind: str) -> ExitHead:
    from safetensors import safe_open

    if not path.is_file():
        raise CtxdraftError(f"exit weights not found: {path} (rebuild the bundle with `ctxdraft add-exits`)")
    prefix = _prefix(exit_layer)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not tensors:
        raise CtxdraftError(f"{path} has no weights for the exit at layer {exit_layer}; rebuild it with `ctxdraft add-exits`")
    vocab_ids = tensors.pop("vocab_ids", None)
    head = ExitHead(model, exit_layer, kind, vocab_ids)
    try:
        head.load_state_dict(tensors)
    except RuntimeError as e:
        raise CtxdraftError(f"{path}: the exit at layer {exit_layer} does not fit this target ({str(e).splitlines()[0]})") from None
    head.eval()
    head.requires_grad_(False)
    return head


# ----------------------------------------------------------------------------------------------------
# The draft
# ----------------------------------------------------------------------------------------------------
@dataclass
class ExitSettings:
    exit_layer: int
    draft_len: int = 4
    threshold: float = 0.0  # stop drafting when the head's top probability is below this
    head: str = "linear"
    draft_vocab: int | None = None  # informational; the ids live in the weights file
    weights: str = WEIGHTS_FILE

    def __post_init__(self):
        if self.draft_len < 1:
            raise CtxdraftError(f"exit draft_len must be >= 1, got {self.draft_len}")
        if not 0 <= self.threshold < 1:
            raise CtxdraftError(f"exit threshold must be in [0, 1), got {self.threshold}")


class ExitDraft(Draft):
    """Draft with the target's layers [0, E) and an exit head, writing the target's own cache."""

    kind = "exit"

    def __init__(self, name: str, head: ExitHead, settings: ExitSettings):
        super().__init__(name)
        self.head = head
        self.settings = settings
        self.head_cache = None
        self.head_len = 0  # positions the layer head's own cache holds

    def start(self, state):
        self.head_cache = self.head.new_cache()
        self.head_len = 0

    @torch.inference_mode()
    def propose(self, state, max_len):
        K = min(max_len, self.settings.draft_len)
        if K <= 0:
            return DraftOutput([])
        stack, cache, E = state.stack, state.cache, self.head.exit_layer
        start = stack.seq_len(cache, 0)
        if self.head_cache is not None and self.head_len < start:
            # The layer head has not seen some committed positions (the prompt, or a last draft token that only
            # the verification ran): recompute their layer-E states, replacing those early cache entries.
            stack.crop(cache, self.head_len, 0, E)
            start = self.head_len
        tokens = state.tokens
        input_ids = torch.tensor([tokens[start:]])
        positions = torch.arange(start, len(tokens))
        sampling = state.temperature > 0
        ids: list[int] = []
        probs: list[torch.Tensor] = []
        exit_states: list[torch.Tensor] = []
        while True:
            hidden = stack.run(stack.embed(input_ids), 0, E, cache, positions)  # [1, T, D]
            if self.head_cache is not None:
                logits = self.head(hidden, self.head_cache, positions)[0, -1]  # [N]
                self.head_len = int(positions[-1]) + 1
            else:
                logits = self.head(hidden[:, -1:])[0, -1]
            exit_states.append(hidden[:, -1:])
            q = probs_from_logits(logits, state.temperature, state.top_p) if sampling else None
            if self.settings.threshold > 0:
                confidence = q.max() if sampling else torch.softmax(logits.float(), dim=-1).max()
                if float(confidence) < self.settings.threshold:
                    break  # exit_states now also covers the last draft token: verification skips its [0, E)
            if sampling:
                local = torch.multinomial(q, 1, generator=state.generator)[0]
                if self.head.vocab_ids is not None:  # q lives on the kept ids; zero elsewhere keeps verification exact
                    q = torch.zeros(state.vocab_size).index_copy_(0, self.head.vocab_ids, q)
                probs.append(q)
            else:
                local = logits.argmax()
            ids.append(int(self.head.to_full_ids(local)))
            if len(ids) == K:
                break
            input_ids = torch.tensor([[ids[-1]]])
            positions = positions[-1:] + 1
        return DraftOutput(
            ids,
            torch.stack(probs) if probs else None,
            exit_hidden=torch.cat(exit_states, dim=1),
            exit_layer=E,
        )

    def accept(self, state, committed_len):
        if self.head_cache is not None and self.head_len > committed_len:
            LayerStack.crop(self.head_cache, committed_len)
            self.head_len = committed_len


def _exit_factory(spec, target, bundle_dir):
    settings = ExitSettings(**spec.get("settings", {}))
    if bundle_dir is None:
        raise CtxdraftError(f"arm {spec['name']!r} needs the bundle directory that holds its weights")
    if not 0 < settings.exit_layer < target.num_layers:
        raise CtxdraftError(f"arm {spec['name']!r}: exit layer {settings.exit_layer} is outside 1..{target.num_layers - 1}")
    head = load_head(target.model, Path(bundle_dir) / settings.weights, settings.exit_layer, settings.head)
    return ExitDraft(spec["name"], head, settings)


DRAFT_FACTORIES["exit"] = _exit_factory


def exit_arm(settings: ExitSettings) -> dict:
    return {"name": f"exit@{settings.exit_layer}", "kind": "exit", "settings": asdict(settings)}


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
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
    gen_batch_size: int = 8
    draft_lens: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6])
    thresholds: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    timing_reps: int = 9
    resume: bool = False

    def validate(self, num_layers: int, vocab_size: int) -> None:
        layers = self.layers
        if not layers:
            raise CtxdraftError("--layers is empty; give exit layers such as 10,16,22")
        if len(set(layers)) != len(layers):
            dup = sorted({x for x in layers if layers.count(x) > 1})
            raise CtxdraftError(f"--layers has duplicates: {dup}")
        bad = [x for x in layers if not 0 < x < num_layers]
        if bad:
            raise CtxdraftError(f"--layers {bad} out of range: an exit layer must be in 1..{num_layers - 1} (the target has {num_layers} layers)")
        if self.head not in HEAD_KINDS:
            raise CtxdraftError(f"--head must be one of {', '.join(HEAD_KINDS)}, got {self.head!r}")
        if self.draft_vocab is not None and not 1 <= self.draft_vocab <= vocab_size:
            raise CtxdraftError(f"--draft-vocab must be in 1..{vocab_size}, got {self.draft_vocab}")
        if self.steps < 0 or self.batch_size < 1:
            raise CtxdraftError("--steps must be >= 0 and the batch size >= 1")
        if self.self_distill_tokens < 0 or self.max_prompt_tokens < 1:
            raise CtxdraftError("--self-distill-tokens must be >= 0 and the prompt length >= 1")
        if not 0 < self.eval_frac < 1:
            raise CtxdraftError(f"--eval-frac must be in (0, 1), got {self.eval_frac}")
        if self.max_prompts is not None and self.max_prompts < 2:
            raise CtxdraftError("--max-prompts must be >= 2 (training and held-out prompts)")


@dataclass
class Example:
    """One training text: the prompt (chat template applied) + the target's greedy continuation."""

    row: dict
    prompt_len: int
    token_ids: list[int]
    exit_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # E -> [T, D] layer-E residual states
    final_hidden: torch.Tensor | None = None  # [T, D] the LM head's input
    teacher_ids: torch.Tensor | None = None  # [T, k] the target's top-k next-token ids
    teacher_logp: torch.Tensor | None = None  # [T, k] their log-probabilities

    @property
    def num_positions(self) -> int:  # positions with a teacher distribution
        return self.teacher_ids.shape[0]


def split_rows(rows: list[dict], eval_frac: float, seed: int, max_prompts: int | None = None) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) row indices; held-out prompts are spread over the domains."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if max_prompts is not None:
        order = order[:max_prompts]
    by_domain: dict[str, list[int]] = {}
    for i in order:
        by_domain.setdefault(str(rows[i].get("domain", "all")), []).append(i)
    held = []
    for idx in by_domain.values():
        held += idx[: max(1, round(len(idx) * eval_frac))] if len(idx) > 1 else []
    if not held:
        held = order[:1]
    held_set = set(held)
    train = [i for i in order if i not in held_set]
    if not train:
        raise CtxdraftError("too few prompts: need at least one training and one held-out prompt")
    return sorted(train), sorted(held)


def encode_prompt(target, prompt: str, max_prompt_tokens: int) -> list[int]:
    raw = target.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(raw) > max_prompt_tokens:
        prompt = target.tokenizer.decode(raw[:max_prompt_tokens])
    return target.encode(prompt, chat=True)


@torch.no_grad()
def build_examples(target, rows: list[dict], indices: list[int], layers: list[int], config: ExitTrainConfig,
                   work: Path | None, progress: Progress | None) -> list[Example]:
    """Generate the target's greedy continuations (batched) and keep its states and top-k logits on the way.

    Each finished batch is saved under ``work`` so that ``--resume`` skips it.
    """
    model, tok = target.model, target.tokenizer
    eos = sorted(target.eos_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    prompts = {i: encode_prompt(target, rows[i]["prompt"], config.max_prompt_tokens) for i in indices}
    order = sorted(indices, key=lambda i: (len(prompts[i]), i))  # similar lengths share a batch: little padding
    L = target.num_layers
    k = min(config.teacher_topk, target.vocab_size)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    examples: dict[int, Example] = {}
    for b0 in range(0, len(order), config.gen_batch_size):
        batch = order[b0 : b0 + config.gen_batch_size]
        saved = work / f"examples_{b0}.pt" if work is not None else None
        if saved is not None and saved.is_file():
            for i, ex in torch.load(saved, weights_only=False).items():
                ex.row = rows[i]
                examples[i] = ex
            if progress:
                progress("generate", min(b0 + config.gen_batch_size, len(order)), len(order))
            continue
        P = max(len(prompts[i]) for i in batch)
        input_ids = torch.tensor([[pad] * (P - len(prompts[i])) + prompts[i] for i in batch])
        attention = torch.ones_like(input_ids)
        for r, i in enumerate(batch):
            attention[r, : P - len(prompts[i])] = 0
        if config.self_distill_tokens > 0:
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=config.self_distill_tokens,
                                 do_sample=False, output_hidden_states=True, return_dict_in_generate=True,
                                 pad_token_id=pad, eos_token_id=eos or None, temperature=None, top_p=None, top_k=None)
            # Per step a tuple of (L + 1) [B, T_step, D]: entry E is the residual after layer E-1, entry L the
            # LM head's input. The last generated token is never fed, so it has no states.
            states = [torch.cat([step[j] for step in out.hidden_states], dim=1) for j in range(L + 1)]
            generated = out.sequences[:, P:].tolist()
        else:
            states = list(model(input_ids=input_ids, attention_mask=attention, output_hidden_states=True).hidden_states)
            generated = [[] for _ in batch]
        new = {}
        for r, i in enumerate(batch):
            cont = generated[r]
            cut = next((j for j, t in enumerate(cont) if t in target.eos_ids), None)
            cont = cont[: cut + 1] if cut is not None else cont  # EOS stays: drafting it is part of the job
            text = prompts[i] + cont
            lo = P - len(prompts[i])
            # Positions whose next token is known: every text position but the last; with no continuation the
            # last prompt position too (it predicts the first new token).
            hi = lo + len(text) - 1 if cont else P
            final = states[L][r, lo:hi].clone()
            logits = model.lm_head(final)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            top_logp, top_ids = logits.float().log_softmax(-1).topk(k, dim=-1)
            ex = Example(rows[i], len(prompts[i]), text)
            ex.exit_hidden = {E: states[E][r, lo:hi].clone() for E in layers}
            ex.final_hidden = final
            ex.teacher_ids, ex.teacher_logp = top_ids.int(), top_logp
            new[i] = ex
        if saved is not None:
            with atomic_path(saved) as tmp:
                torch.save({i: Example(None, ex.prompt_len, ex.token_ids, ex.exit_hidden, ex.final_hidden,
                                       ex.teacher_ids, ex.teacher_logp) for i, ex in new.items()}, tmp)
        examples.update(new)
        if progress:
            progress("generate", min(b0 + config.gen_batch_size, len(order)), len(order))
    return [examples[i] for i in indices]


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def reduced_vocab(target, examples: list[Example], size: int) -> torch.Tensor:
    """The ``size`` most frequent ids of the training text (and of the teacher's top-1) plus special tokens."""
    counts: Counter = Counter()
    for ex in examples:
        counts.update(ex.token_ids)
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
        X = torch.cat([head.norm(ex.exit_hidden[head.exit_layer]) for ex in examples]).double()  # [N, D]
        Y = torch.cat([ex.final_hidden for ex in examples]).double()
        D = X.shape[1]
        lam = ridge * X.shape[0] / D * X.pow(2).mean() if ridge > 0 else 0.0
        eye = torch.eye(D, dtype=torch.float64)
        A = torch.linalg.solve(X.T @ X + lam * eye, X.T @ Y + lam * eye)  # X A ~ Y
        head.adapter.weight.copy_(A.T.float())


def train_head(head: ExitHead, examples: list[Example], config: ExitTrainConfig, ckpt: Path | None,
               progress: Progress | None) -> dict:
    """Distil one head; checkpoints to ``ckpt`` so an interrupted run resumes."""
    E = head.exit_layer
    gen = torch.Generator().manual_seed(config.seed * 1000 + E)
    lr = config.lr if config.lr is not None else 1e-3
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / max(1, config.steps))))
    step, losses = 0, []
    if ckpt is not None and config.resume and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        head.load_state_dict(saved["head"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        step, losses = saved["step"], saved["losses"]
    elif head.kind == "linear" and config.ridge >= 0:
        _ridge_init(head, examples, config.ridge)
    local_of = None
    if head.vocab_ids is not None:
        local_of = torch.full((max(int(head.vocab_ids.max()) + 1, _max_teacher_id(examples) + 1),), -1, dtype=torch.long)
        local_of[head.vocab_ids] = torch.arange(head.vocab_ids.numel())
    flat_hidden = flat_ids = flat_logp = None
    if head.kind == "linear":
        flat_hidden = torch.cat([ex.exit_hidden[E] for ex in examples])
        flat_ids = torch.cat([ex.teacher_ids for ex in examples])
        flat_logp = torch.cat([ex.teacher_logp for ex in examples])
    head.train()
    t0 = time.perf_counter()
    while step < config.steps:
        if head.kind == "linear":
            rows = torch.randint(0, flat_hidden.shape[0], (config.batch_size,), generator=gen)
            loss = distill_loss(head(flat_hidden[rows]), flat_ids[rows], flat_logp[rows], local_of)
        else:
            loss = _layer_head_loss(head, examples, config.batch_size, gen, local_of)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        if progress:
            progress(f"train exit@{E}", step, config.steps)
        if ckpt is not None and (step % 25 == 0 or step == config.steps):
            with atomic_path(ckpt) as tmp:
                torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "step": step, "losses": losses}, tmp)
    head.eval()
    head.requires_grad_(False)
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {"steps": step, "lr": lr, "final_kl": statistics.fmean(tail) if tail else None,
            "first_kl": losses[0] if losses else None, "train_s": round(time.perf_counter() - t0, 1)}


def _max_teacher_id(examples: list[Example]) -> int:
    return max(int(ex.teacher_ids.max()) for ex in examples)


def _layer_head_loss(head: ExitHead, examples: list[Example], batch_size: int, gen, local_of) -> torch.Tensor:
    """A layer head sees whole sequences (it attends); the loss is taken on sampled positions."""
    E = head.exit_layer
    per_seq = 64
    num_seqs = max(1, batch_size // per_seq)
    total = 0.0
    for _ in range(num_seqs):
        ex = examples[int(torch.randint(0, len(examples), (1,), generator=gen))]
        hidden = ex.exit_hidden[E][None]  # [1, T, D]
        T = hidden.shape[1]
        x = head.transform(hidden)[0]  # [T, D]
        rows = torch.randperm(T, generator=gen)[:per_seq]
        total = total + distill_loss(head.project(x[rows]), ex.teacher_ids[rows], ex.teacher_logp[rows], local_of)
    return total / num_seqs


@torch.no_grad()
def evaluate_head(head: ExitHead, examples: list[Example]) -> dict:
    """Top-1 agreement with the target on held-out positions, and per-example drafting traces."""
    E = head.exit_layer
    agree_all = total_all = agree_cont = total_cont = 0
    traces = []
    for ex in examples:
        logits = head(ex.exit_hidden[E][None])[0]  # [T, N]
        top_p, top_local = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        match = head.to_full_ids(top_local) == ex.teacher_ids[:, 0].long()
        agree_all += int(match.sum())
        total_all += match.numel()
        # Drafting positions: the first continuation token is pending, so drafting starts at position prompt_len.
        lo = ex.prompt_len
        cont_match, cont_conf = match[lo:], top_p[lo:]
        agree_cont += int(cont_match.sum())
        total_cont += cont_match.numel()
        traces.append({"domain": str(ex.row.get("domain", "all")), "match": cont_match.tolist(), "conf": cont_conf.tolist()})
    return {
        "agreement": agree_all / total_all if total_all else 0.0,
        "agreement_continuation": agree_cont / total_cont if total_cont else None,
        "num_positions": total_all,
        "num_continuation_positions": total_cont,
        "traces": traces,
    }


def simulate(traces: list[dict], draft_len: int, threshold: float, cost_ratio: float, verify_ratio: dict[int, float],
             stopped_ratio: dict[int, float] | None = None) -> dict:
    """Replay the greedy draft loop on teacher-forced traces (see the module docstring).

    ``verify_ratio[k]``: verifying k drafted tokens after the draft reached its length ([0, E) runs for d_k);
    ``stopped_ratio[k]``: after a confidence stop with k drafted tokens (only [E, L) runs). Both relative to
    one target step.
    """
    stopped_ratio = stopped_ratio if stopped_ratio is not None else verify_ratio
    tokens = cost = drafted = accepted = 0.0
    for tr in traces:
        match, conf = tr["match"], tr["conf"]
        n, t = len(match), 0
        while t < n:
            k = evals = 0
            while k < draft_len and t + k < n:
                evals += 1
                if threshold > 0 and conf[t + k] < threshold:
                    break
                k += 1
            a = 0
            while a < k and match[t + a]:
                a += 1
            tokens += a + 1
            drafted += k
            accepted += a
            if evals > k:  # stopped on confidence: the draft already ran [0, E) for every verified position
                cost += evals * cost_ratio + stopped_ratio.get(k, 1.0)
            else:
                cost += evals * cost_ratio + verify_ratio.get(k, 1.0)
            t += a + 1
    return {
        "draft_len": draft_len,
        "threshold": threshold,
        "speedup": tokens / cost if cost else 1.0,
        "acceptance": accepted / drafted if drafted else 0.0,
        "tokens_per_step": tokens / max(1.0, tokens - accepted),
    }


@torch.inference_mode()
def measure_costs(stack: LayerStack, heads: list[ExitHead], context_ids: list[int], draft_lens: list[int], reps: int) -> dict:
    """Time one draft token per exit and verification per K, relative to one target step (interleaved, medians)."""
    L = stack.num_layers
    cache = stack.new_cache()
    n = len(context_ids)
    positions = torch.arange(n)
    stack.run(stack.embed(torch.tensor([context_ids])), 0, L, cache, positions)
    head_caches = {}
    for head in heads:
        if head.kind == "layer":
            scratch = stack.new_cache()
            early = stack.run(stack.embed(torch.tensor([context_ids])), 0, head.exit_layer, scratch, positions)
            head_caches[head.exit_layer] = head.new_cache()
            head(early, head_caches[head.exit_layer], positions)
    token = torch.tensor([[context_ids[-1]]])
    pos = torch.tensor([n])
    D = stack.config.hidden_size
    ks = sorted(set(draft_lens) | {0})

    def target_step():
        int(stack.logits(stack.run(stack.embed(token), 0, L, cache, pos)).argmax())
        stack.crop(cache, n)

    def draft_step(head):
        def run():
            hidden = stack.run(stack.embed(token), 0, head.exit_layer, cache, pos)
            hc = head_caches.get(head.exit_layer)
            int(head(hidden, hc, pos).argmax())
            stack.crop(cache, n)
            if hc is not None:
                LayerStack.crop(hc, n)
        return run

    def verify_step(head, k, stopped=False):
        from .decoding import target_forward

        num_early = k + 1 if stopped else k
        early = torch.zeros(1, num_early, D)
        out = DraftOutput([int(token)] * k, exit_hidden=early if num_early else None, exit_layer=head.exit_layer)

        def run():
            int(target_forward(stack, cache, [int(token)] * (k + 1), n, out).argmax())
            stack.crop(cache, n)
        return run

    jobs = {"target": target_step}
    for head in heads:
        jobs[f"draft{head.exit_layer}"] = draft_step(head)
        for k in ks:
            jobs[f"verify{head.exit_layer}_{k}"] = verify_step(head, k)
            if k < max(ks):
                jobs[f"stopped{head.exit_layer}_{k}"] = verify_step(head, k, stopped=True)
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for name, fn in jobs.items():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    step_s = statistics.median(times["target"])
    out = {"target_step_s": step_s, "context_tokens": n, "exits": {}}
    for head in heads:
        E = head.exit_layer
        out["exits"][E] = {
            "draft_step_s": statistics.median(times[f"draft{E}"]),
            "cost_ratio": statistics.median(times[f"draft{E}"]) / step_s,
            "verify_ratio": {k: statistics.median(times[f"verify{E}_{k}"]) / step_s for k in ks},
            "stopped_ratio": {k: statistics.median(times[f"stopped{E}_{k}"]) / step_s for k in ks if k < max(ks)},
        }
    return out


# ----------------------------------------------------------------------------------------------------
# add-exits: the library function behind `ctxdraft add-exits`
# ----------------------------------------------------------------------------------------------------
def _data_key(target, rows: list[dict], config: ExitTrainConfig) -> str:
    """What the cached training text and states depend on (head checkpoints carry their own settings)."""
    h = hashlib.sha256()
    h.update(target.content_hash.encode())
    h.update(json.dumps([r["prompt"] for r in rows]).encode())
    relevant = {k: getattr(config, k) for k in ("self_distill_tokens", "max_prompt_tokens", "max_prompts",
                                                "eval_frac", "seed", "teacher_topk", "gen_batch_size")}
    relevant["layers"] = sorted(config.layers)
    h.update(json.dumps(relevant, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _head_ckpt_name(E: int, config: ExitTrainConfig) -> str:
    tag = hashlib.sha256(json.dumps([config.head, config.draft_vocab, config.steps, config.batch_size, config.lr,
                                     config.ridge]).encode()).hexdigest()[:8]
    return f"exit{E}-{tag}.pt"


def add_exits(target, target_spec: str, rows: list[dict], out_dir: str | Path, config: ExitTrainConfig,
              progress: Progress | None = None) -> dict:
    """Train exit heads at ``config.layers`` and add them (weights, arms ``exit@E``, report) to the bundle.

    ``rows``: prompt rows as ``fileio.read_prompts`` returns them. ``out_dir`` may hold an existing bundle
    for the same target (the exits are added to it; an exit at a layer it already has is replaced).
    Returns the report (also written to ``BUNDLE/reports/add_exits.json``).
    """
    from .bundle import load_bundle, new_bundle_info

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    config.layers = [int(x) for x in config.layers]
    config.validate(target.num_layers, target.vocab_size)
    if out_dir.exists() and not out_dir.is_dir():
        raise CtxdraftError(f"--out {out_dir} exists and is not a directory")
    if (out_dir / "bundle.json").is_file():
        bundle = load_bundle(out_dir)
        bundle.check_target(target)
        info = bundle.info
    elif out_dir.is_dir() and any(p.name != WORK_DIR for p in out_dir.iterdir()):
        raise CtxdraftError(f"--out {out_dir} is a non-empty directory without a bundle.json; give a new or bundle directory")
    else:
        info = new_bundle_info(target, target_spec)
    if len(rows) < 2:
        raise CtxdraftError(f"need at least 2 prompts (training + held-out), the data has {len(rows)}")
    train_idx, held_idx = split_rows(rows, config.eval_frac, config.seed, config.max_prompts)

    work = out_dir / WORK_DIR
    key = _data_key(target, rows, config)
    if config.resume and work.is_dir() and _load_json(work / "key.json").get("key") != key:
        raise CtxdraftError(f"the checkpoint in {work} was made with other data or settings; run without --resume to start over")
    if work.is_dir() and not config.resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "key.json", {"key": key})

    layers = sorted(config.layers)
    t0 = time.perf_counter()
    examples = build_examples(target, rows, train_idx + held_idx, layers, config, work, progress)
    data_s = time.perf_counter() - t0
    train_ex, held_ex = examples[: len(train_idx)], examples[len(train_idx):]

    vocab_ids = reduced_vocab(target, train_ex, config.draft_vocab) if config.draft_vocab else None
    heads, results = [], []
    for E in layers:
        head = ExitHead(target.model, E, config.head, vocab_ids)
        train_info = train_head(head, train_ex, config, work / _head_ckpt_name(E, config), progress)
        ev = evaluate_head(head, held_ex)
        heads.append(head)
        results.append((head, train_info, ev))

    stack = LayerStack(target.model)
    context = max(held_ex, key=lambda ex: len(ex.token_ids)).token_ids
    context = context[: max(1, min(len(context), 256))]
    if progress:
        progress("timing", 0, 1)
    costs = measure_costs(stack, heads, context, config.draft_lens, config.timing_reps)
    if progress:
        progress("timing", 1, 1)

    L = target.num_layers
    target_params = sum(p.numel() for p in target.model.parameters())
    exit_entries, arms = [], []
    for head, train_info, ev in results:
        E = head.exit_layer
        c = costs["exits"][E]
        options = [simulate(ev["traces"], K, thr, c["cost_ratio"], c["verify_ratio"], c["stopped_ratio"])
                   for K in config.draft_lens for thr in config.thresholds]
        best = max(options, key=lambda o: o["speedup"])
        by_domain = {}
        for domain in sorted({tr["domain"] for tr in ev["traces"]}):
            traces = [tr for tr in ev["traces"] if tr["domain"] == domain]
            by_domain[domain] = simulate(traces, best["draft_len"], best["threshold"], c["cost_ratio"], c["verify_ratio"],
                                         c["stopped_ratio"])
        K = best["draft_len"]
        settings = ExitSettings(E, K, best["threshold"], head.kind, head.draft_vocab)
        arms.append(exit_arm(settings))
        exit_entries.append({
            "layer": E,
            "arm": f"exit@{E}",
            "head": head.kind,
            "draft_vocab": head.draft_vocab,
            "num_params": head.num_params,
            "params_frac_of_target": head.num_params / target_params,
            "agreement": ev["agreement"],
            "agreement_continuation": ev["agreement_continuation"],
            "cost_ratio": c["cost_ratio"],
            "verify_ratio": {str(k): v for k, v in c["verify_ratio"].items()},
            "stopped_ratio": {str(k): v for k, v in c["stopped_ratio"].items()},
            "draft_len": K,
            "threshold": best["threshold"],
            "acceptance": best["acceptance"],
            "speedup": best["speedup"],
            # Verification skips layers [0, E) for the K positions the draft already ran.
            "verify_layer_tokens_saved": K * E / ((K + 1) * L),
            "by_domain": by_domain,
            "all_settings": options,
            "train": train_info,
        })

    # Write: weights, then the report, then bundle.json (the commit point), each atomically.
    out_dir.mkdir(parents=True, exist_ok=True)
    save_heads(out_dir / WEIGHTS_FILE, heads)
    new_layers = {e["layer"] for e in exit_entries}
    old_exits = [e for e in info.get("exits") or [] if e.get("layer") not in new_layers]
    info["exits"] = sorted(old_exits + [{k: v for k, v in e.items() if k not in ("all_settings", "by_domain", "train")}
                                        for e in exit_entries], key=lambda e: e["layer"])
    new_arms = {a["name"] for a in arms}
    info["arms"] = [a for a in info["arms"] if a["name"] not in new_arms] + arms
    report = {
        "target": {"spec": target_spec, "name": target.name, "hash": target.content_hash, "num_layers": L,
                   "num_params": target_params},
        "config": {k: v for k, v in asdict(config).items() if k != "resume"},
        "data": {"num_prompts": len(train_idx) + len(held_idx), "num_train": len(train_idx), "num_heldout": len(held_idx),
                 "heldout_ids": [rows[i].get("id", i) for i in held_idx],
                 "train_positions": sum(ex.num_positions for ex in train_ex),
                 "heldout_positions": sum(ex.num_positions for ex in held_ex), "build_s": round(data_s, 1)},
        "costs": {"target_step_s": costs["target_step_s"], "context_tokens": costs["context_tokens"]},
        "speedup_formula": "sum(accepted+1) / sum(evals*cost_ratio + verify_ratio[drafted]) over replayed greedy drafts",
        "exits": exit_entries,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    write_json_atomic(out_dir / REPORT_FILE, report)
    write_json_atomic(out_dir / "bundle.json", info)
    shutil.rmtree(work, ignore_errors=True)
    return report
