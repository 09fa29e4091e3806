"""The feature head: an EAGLE-3 style self-draft that reads the target's states at a few layers.

EAGLE-3 (Li et al. 2025) drafts with ONE decoder layer fed the target's residual states at a few layers
(low, middle, high), which the target computes anyway in every prefill and verification, so a draft token
costs about one layer plus a (reduced-vocabulary) LM head:

    feature_t = fc([h_l1,t; h_l2,t; h_l3,t])                       n*D -> D   (the target's states at position t)
    draft position 1 (base t):  (feature_t, x_{t+1}) -> s1 -> norm -> LM head -> x_{t+2}
    draft position j > 1:       (s_{j-1},   x_{t+j}) -> s_j -> ...                 -> x_{t+j+1}

The token and the feature meet EAGLE-3's way: the layer's q/k/v read [norm(emb(x)); norm(feature)] (2D wide)
and its residual stream is the feature. The layer (GQA attention with the target's rotary embedding, the
target's MLP class) starts as a copy of one of the target's layers; the LM head is the target's own, frozen and
shared, restricted to the draft vocabulary. The head keeps its own KV cache: for every committed position, the
K/V of draft position 1 computed from the TRUE target feature; draft positions 2.. attend to that context and to
their own chain. Training unrolls the same pattern ("training-time test", ``ttt``) so acceptance at draft
positions 2, 3, ... does not collapse; ``ttt`` with the target's own tokens is also the teacher-forced replay
(under greedy decoding the accepted prefix of a chain only ever sees the target's tokens).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import CtxdraftError
from ..base.fileio import display_path
from ..runtime.layers import LayerStack
from ..runtime.sampling import softcap
from .exit_head import check_vocab_ids, read_tensors, save_head


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class FeatureCache:
    """The head's own KV cache: [KV, T, hd] keys and values, one entry per position fed."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)

    def crop(self, length: int) -> None:
        if self.k is not None and self.k.shape[1] > length:
            self.k, self.v = self.k[:, :length], self.v[:, :length]


class FeatureHead(nn.Module):
    """fc over n target states + one decoder layer + norm + the target's frozen LM head (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: list[int], vocab_ids: torch.Tensor | None = None, init_layer: int = -1):
        super().__init__()
        config = model.config
        L = config.num_hidden_layers
        layers = [int(x) for x in layers]
        if not layers or sorted(set(layers)) != layers or not all(0 < x <= L for x in layers):
            raise CtxdraftError(f"feature layers must be distinct, sorted and in 1..{L}, got {layers}")
        D = config.hidden_size
        self.layers = layers
        self.num_heads, self.num_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or D // self.num_heads
        src = model.model.layers[init_layer]
        n = len(layers)
        self.fc = nn.Linear(n * D, D, bias=False)
        with torch.no_grad():  # start as "the deepest captured state"
            self.fc.weight.zero_()
            self.fc.weight[:, (n - 1) * D :] = torch.eye(D)
        attn = src.self_attn
        wq, wk, wv = (w.weight.detach().float() for w in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.norm_e = copy.deepcopy(src.input_layernorm)
        self.norm_h = copy.deepcopy(src.input_layernorm)
        self.q = nn.Linear(2 * D, wq.shape[0], bias=False)
        self.k = nn.Linear(2 * D, wk.shape[0], bias=False)
        self.v = nn.Linear(2 * D, wv.shape[0], bias=False)
        with torch.no_grad():  # both halves start as the source layer's projection: W (norm(e) / 2 + norm(h))
            for lin, w in ((self.q, wq), (self.k, wk), (self.v, wv)):
                lin.weight.copy_(torch.cat([0.5 * w, w], dim=1))
        self.o = nn.Linear(wq.shape[0], D, bias=False)
        with torch.no_grad():
            self.o.weight.copy_(attn.o_proj.weight.detach().float())
        self.norm_post = copy.deepcopy(getattr(src, "pre_feedforward_layernorm", None) or src.post_attention_layernorm)
        self.mlp = copy.deepcopy(src.mlp)
        self.norm = copy.deepcopy(model.model.norm)
        for module in (self.norm_e, self.norm_h, self.norm_post, self.mlp, self.norm):
            module.requires_grad_(True)
        # Frozen and shared with the target: never in the file. Buffers, so that .to(dtype) casts them too.
        self.register_buffer("vocab_ids", None if vocab_ids is None else vocab_ids.long(), persistent=False)
        lm = model.get_output_embeddings().weight.detach()
        self.register_buffer("lm_weight", lm if vocab_ids is None else lm[vocab_ids].contiguous(), persistent=False)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        # The target's embedding (it may scale, as Gemma's does) and rotary embedding: called, never copied or cast.
        object.__setattr__(self, "_embed", model.model.embed_tokens)
        object.__setattr__(self, "_stack", LayerStack(model))
        self._layer_type = (getattr(config, "layer_types", None) or ["full_attention"] * L)[init_layer]

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def draft_vocab(self) -> int | None:
        return None if self.vocab_ids is None else int(self.vocab_ids.numel())

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.state_dict().values())

    def to_full_ids(self, local_ids: torch.Tensor) -> torch.Tensor:
        return local_ids if self.vocab_ids is None else self.vocab_ids[local_ids]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, D]
        with torch.no_grad():
            return self._embed(token_ids[None])[0].to(self.dtype)

    def fuse(self, states: torch.Tensor) -> torch.Tensor:  # [T, n*D] target states -> [T, D]
        return self.fc(states.to(self.dtype))

    def _rope(self, positions: torch.Tensor):
        dummy = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
        cos, sin = self._stack.rotary(dummy, positions[None].long(), self._layer_type)
        return cos[0].to(self.dtype), sin[0].to(self.dtype)  # [T, hd]

    def _qkv(self, feature: torch.Tensor, token_emb: torch.Tensor, positions: torch.Tensor):
        """[T, D] feature (or own state), [T, D] token embedding -> q [H, T, hd], k/v [KV, T, hd], residual [T, D]."""
        T = feature.shape[0]
        x = torch.cat([self.norm_e(token_emb), self.norm_h(feature)], dim=-1)
        q = self.q(x).view(T, self.num_heads, self.head_dim).transpose(0, 1)
        k = self.k(x).view(T, self.num_kv, self.head_dim).transpose(0, 1)
        v = self.v(x).view(T, self.num_kv, self.head_dim).transpose(0, 1)
        cos, sin = self._rope(positions)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v, feature

    def _finish(self, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:  # [H, T, hd] -> [T, D]
        T = residual.shape[0]
        h = residual + self.o(attended.transpose(0, 1).reshape(T, self.num_heads * self.head_dim))
        return h + self.mlp(self.norm_post(h))

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:  # [KV, ...] -> [H, ...]
        return x.repeat_interleave(self.num_heads // self.num_kv, dim=0)

    def logits(self, state: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., N] over the draft vocabulary
        return softcap(F.linear(self.norm(state), self.lm_weight), self._softcap)

    # -- training and teacher forcing -----------------------------------------------------------
    def forward(self, states: torch.Tensor, token_ids: torch.Tensor, bases: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test over one sequence: logits [len(bases), N] for draft positions 1..``steps`` at each
        base t in ``bases``, draft position j fed the token ``token_ids[t + j]`` (clamped at the end: rows with
        t + j + 1 >= T must be masked by the caller).

        ``states`` [T, n*D]: the target's states at every position; every position 0..T-2 enters the context as
        draft position 1 (its K/V), so each base attends exactly as at inference: to the context up to itself and
        to its own chain."""
        T = token_ids.shape[0]
        n_ctx = T - 1
        q1, k1, v1, r1 = self._qkv(self.fuse(states[:n_ctx]), self.embed(token_ids[1:T]), torch.arange(1, T))
        K1, V1 = self._repeat(k1), self._repeat(v1)  # [H, n_ctx, hd]
        s1 = self._finish(r1, F.scaled_dot_product_attention(q1[None], K1[None], V1[None], is_causal=True)[0])
        out, prev = [self.logits(s1[bases])], s1[bases]
        ctx_mask = torch.arange(n_ctx)[None, :] <= bases[:, None]  # [B, n_ctx]: base t sees context s <= t
        chain_k, chain_v = [], []
        scale = 1.0 / math.sqrt(self.head_dim)
        for j in range(2, steps + 1):
            index = (bases + j).clamp_max(T - 1)
            q, k, v, r = self._qkv(prev, self.embed(token_ids[index]), bases + j)
            chain_k.append(self._repeat(k))
            chain_v.append(self._repeat(v))
            scores = (torch.einsum("hbd,hsd->hbs", q, K1) * scale).masked_fill(~ctx_mask[None], float("-inf"))
            own = torch.stack([(q * ck).sum(-1) for ck in chain_k], dim=-1) * scale  # [H, B, j-1]
            weights = torch.cat([scores, own], dim=-1).softmax(-1)
            attended = torch.einsum("hbs,hsd->hbd", weights[..., :n_ctx], V1)
            attended = attended + sum(weights[..., n_ctx + i, None] * chain_v[i] for i in range(len(chain_v)))
            prev = self._finish(r, attended)
            out.append(self.logits(prev))
        return out

    # -- drafting -------------------------------------------------------------------------------
    def feed(self, cache: FeatureCache, states: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append committed positions to the cache: [T, n*D] target states, [T] the token after each position, [T]
        those positions; returns their draft-position-1 states [T, D] (the last one drafts the next token)."""
        q, k, v, r = self._qkv(self.fuse(states), self.embed(next_ids), positions + 1)
        cache.append(k, v)
        K, V = self._repeat(cache.k), self._repeat(cache.v)
        Tn, Tc = q.shape[1], K.shape[1]
        mask = torch.ones(Tn, Tc, dtype=torch.bool).tril(Tc - Tn)
        return self._finish(r, F.scaled_dot_product_attention(q[None], K[None], V[None], attn_mask=mask[None, None])[0])

    def step(self, cache: FeatureCache, state: torch.Tensor, token_id: int, position: int) -> torch.Tensor:
        """One chain step: its own previous state [1, D] and the token it drafted -> the next state [1, D]."""
        q, k, v, r = self._qkv(state, self.embed(torch.tensor([token_id])), torch.tensor([position]))
        cache.append(k, v)
        K, V = self._repeat(cache.k), self._repeat(cache.v)
        return self._finish(r, F.scaled_dot_product_attention(q[None], K[None], V[None])[0])

    def expand(self, cache: FeatureCache, states: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """One depth of a token tree in one call (``step`` for F nodes at once): each node's parent state [F, D], its
        token [F] and position [F] are appended to the cache; ``visible`` [F, cache length after appending] (bool) says
        what each node attends to: the context, its ancestors' entries and its own. Returns the nodes' states [F, D]."""
        q, k, v, r = self._qkv(states, self.embed(token_ids), positions)
        cache.append(k, v)
        K, V = self._repeat(cache.k), self._repeat(cache.v)
        return self._finish(r, F.scaled_dot_product_attention(q[None], K[None], V[None], attn_mask=visible[None, None])[0])


def save_feature_head(path, name: str, head: FeatureHead) -> None:
    """Write (or replace) the head ``name`` in the weights file shared with the exit heads (``exit_head.save_head``)."""
    save_head(path, f"feature-{name}.", head)


def load_feature_head(model: nn.Module, path, name: str, layers: list[int]) -> FeatureHead:
    tensors = read_tensors(path, f"feature-{name}.", f"the feature head {name!r}")
    vocab_ids = check_vocab_ids(tensors.pop("vocab_ids", None), model.get_output_embeddings().weight.shape[0], path,
                                f"the feature head {name!r}")
    head = FeatureHead(model, layers, vocab_ids)
    try:
        head.load_state_dict(tensors)
    except RuntimeError as e:
        raise CtxdraftError(f"{display_path(path)}: the feature head {name!r} does not fit this target "
                            f"({str(e).splitlines()[0]})") from None
    return head.to(model.dtype).eval().requires_grad_(False)
