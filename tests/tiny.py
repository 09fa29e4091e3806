"""Tiny random-initialised models and a character tokenizer, built from configs (no downloads)."""
from __future__ import annotations

import math
import string
from pathlib import Path

import torch

CHARS = list(string.ascii_letters + string.digits + " .,:;!?'\"-+*/=()\n")
SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


def char_tokenizer(extra: list[str] | None = None):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS + list(extra or []))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 4, hidden: int = 32, max_positions: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives near-uniform logits; scale up so greedy choices are well separated.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    return model


def save_model_dir(path: Path, model, tokenizer) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


ARCHS = ("llama", "gemma3", "qwen2")  # the architectures the lossless tests run on


def tiny_random(arch: str = "llama", vocab_size: int = 61, seed: int = 0, layers: int = 4):
    """A tiny random Llama, Gemma 3 or Qwen2 with a wide weight init (varied logits) and no EOS, frozen.

    The Gemma 3 stack mixes sliding-window (window 4, shorter than prompt + draft) and full-attention layers,
    so rolled-back drafts cross the window. Qwen2 has biases on q, k and v (Llama has none) and, like the
    real Qwen2.5 checkpoints of small size, ties its LM head to the embeddings."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    elif arch == "gemma3":
        types = (["sliding_attention", "full_attention"] + ["sliding_attention"] * layers)[:layers]
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=8, sliding_window=4, layer_types=types, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, use_sliding_window=False, **common))
        with torch.no_grad():  # biases are initialised to zero: give them values, or a dropped bias goes unseen
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    return model.eval().requires_grad_(False)


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer: <unk>=0, <eos>=1, then ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree sun moon and or is was".split()


def save_word_target(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama over a whitespace word vocabulary (no EOS), saved as an HF directory."""
    tok = word_tokenizer(WORDS)
    model = tiny_random(vocab_size=len(tok), seed=seed)
    model.generation_config.eos_token_id = None
    return save_model_dir(path, model, tok)


def write_word_prompts(path: Path, n: int = 8) -> Path:
    """``n`` prompts of 6, 7, ... random words from ``WORDS``, alternating domains "a" and "b"."""
    import json

    rng = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (6 + i,), generator=rng)]
        lines.append(json.dumps({"id": i, "domain": "ab"[i % 2], "prompt": " ".join(words)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_follows(counts: torch.Tensor, exact: torch.Tensor, num: int) -> None:
    """Chi-square goodness of fit of ``num`` sampled outcomes (``counts``) to their exact probabilities, over the
    cells expecting at least 5; P(chi2 > dof + 5 sqrt(2 dof)) is far below 1e-4 when the sampler is exact."""
    expected = exact * num
    keep = expected >= 5
    chi2 = float((((counts - expected) ** 2) / expected)[keep].sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)
