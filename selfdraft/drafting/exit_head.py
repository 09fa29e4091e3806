"""The exit head (``linear`` or ``layer``, optionally over a reduced draft vocabulary) and its weights file."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import CtxdraftError
from ..base.fileio import display_path
from ..runtime.checkpoint import load_container, save_container
from ..runtime.layers import LayerStack
from ..runtime.sampling import softcap

HEAD_KINDS = ("linear", "layer")


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
            self.adapter = nn.Linear(D, D, bias=False, dtype=self.norm.weight.dtype)
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
        # The reduced head reads only its rows (a gathered copy). A buffer, so that .to(dtype) casts it along
        # with the head (heads train in float32 on a bfloat16 target), but never part of the file.
        self.register_buffer("lm_weight", lm_weight.detach() if vocab_ids is None else lm_weight.detach()[vocab_ids].contiguous(),
                             persistent=False)
        self._softcap = getattr(config, "final_logit_softcapping", None)

    @property
    def draft_vocab(self) -> int | None:
        return None if self.vocab_ids is None else int(self.vocab_ids.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.state_dict().values())

    def new_cache(self):
        return self._stack.new_cache() if self.kind == "layer" else None

    def transform(self, hidden: torch.Tensor, cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, D] layer-E residual (any float dtype: cast to the head's) -> [B, T, D] the LM head's input."""
        hidden = hidden.to(self.dtype)
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
        return softcap(F.linear(x, self.lm_weight), self._softcap)

    def forward(self, hidden, cache=None, positions=None, rows: torch.Tensor | None = None):
        """[B, T, D] -> [B, T, N] logits; with ``rows`` (training a layer head on sampled positions of one
        sequence, B = 1) only those positions are projected: [len(rows), N]."""
        x = self.transform(hidden, cache, positions)
        return self.project(x if rows is None else x[0, rows])

    def to_full_ids(self, local_ids: torch.Tensor) -> torch.Tensor:
        return local_ids if self.vocab_ids is None else self.vocab_ids[local_ids]


HEADS_FORMAT = "ctxdraft-exits"
REBUILD = "rebuild them with `ctxdraft add-exits`"


def _prefix(exit_layer: int) -> str:
    return f"exit{exit_layer}."


def save_head(path: Path, prefix: str, head: nn.Module) -> None:
    """Write (or extend) the self-draft weights file (exit and feature heads share one) atomically; the head under
    ``prefix`` is replaced. Weights are stored in the head's dtype: a head built for a bfloat16 target is stored in
    bfloat16 (half the bytes, nothing lost: it drafts in that dtype), and loading casts to whatever dtype the target
    then runs in. The reduced draft vocabulary is stored as its ids."""
    tensors = load_container(path, "self-draft weights", REBUILD)[0] if path.is_file() else {}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    for name, value in head.state_dict().items():
        tensors[prefix + name] = value.detach().contiguous().clone()
    if head.vocab_ids is not None:
        tensors[prefix + "vocab_ids"] = head.vocab_ids.detach().clone()
    save_container(path, tensors, file_format=HEADS_FORMAT)


def save_heads(path: Path, heads: list[ExitHead]) -> None:
    """Write (or extend) the exit weights file atomically; heads at the same layer are replaced."""
    for head in heads:
        save_head(path, _prefix(head.exit_layer), head)


def check_vocab_ids(vocab_ids: torch.Tensor | None, vocab_size: int, path: Path, what: str) -> torch.Tensor | None:
    """A stored reduced draft vocabulary: a non-empty 1-D list of ids of the target's vocabulary (or None)."""
    if vocab_ids is not None and (vocab_ids.dim() != 1 or vocab_ids.dtype.is_floating_point or vocab_ids.numel() == 0
                                  or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab_size):
        raise CtxdraftError(f"{display_path(path)}: the draft vocabulary of {what} holds ids outside "
                            f"0..{vocab_size - 1} (or is not a list of ids); {REBUILD}")
    return vocab_ids


def read_tensors(path: Path, prefix: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` in a self-draft weights file (exit and feature heads share one file); a missing,
    damaged or foreign file is one clear error."""
    tensors, _ = load_container(path, "self-draft weights", REBUILD, prefix)
    if not tensors:
        raise CtxdraftError(f"{display_path(path)} has no weights for {what}; rebuild it with `ctxdraft add-exits`")
    return tensors


def read_head_tensors(path: Path, exit_layer: int) -> dict[str, torch.Tensor]:
    return read_tensors(path, _prefix(exit_layer), f"the exit at layer {exit_layer}")


def load_head(model: nn.Module, path: Path, exit_layer: int, kind: str) -> ExitHead:
    tensors = read_head_tensors(path, exit_layer)
    vocab_ids = check_vocab_ids(tensors.pop("vocab_ids", None), model.get_output_embeddings().weight.shape[0], path,
                                f"the exit at layer {exit_layer}")
    head = ExitHead(model, exit_layer, kind, vocab_ids)
    try:
        head.load_state_dict(tensors)
    except RuntimeError as e:
        raise CtxdraftError(f"{display_path(path)}: the exit at layer {exit_layer} does not fit this target "
                            f"({str(e).splitlines()[0]})") from None
    head.eval()
    head.requires_grad_(False)
    return head
