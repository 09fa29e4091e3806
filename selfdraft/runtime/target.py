"""Loading a target model: a registered name, a Hugging Face directory, or a .gguf file.

Registered names (``registry.py``; the default is SmolLM2-135M-Instruct) are fetched, checked and
converted once into a float32 safetensors checkpoint under the cache directory (``cache.py``);
every dtype is a cast of that checkpoint at load time.

A target's *content hash* identifies the stored checkpoint, not the loaded tensors: config plus, for
every tensor in its safetensors files, the name, shape, stored dtype and a fixed sample of its
stored bytes. So loads in float32, bfloat16 or float16 of one checkpoint share a hash (a bundle
built in one dtype runs in another), while retrained or different weights do not. Only safetensors
weights are ever read: ctxdraft never unpickles a file it is handed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..base.errors import CtxdraftError
from ..base.fileio import file_fingerprint, file_sha256, write_json_atomic
from ..base.registry import DEFAULT_TARGET, REGISTRY
from .cache import cache_dir, discard, gguf_checkpoint, progress_bars, registered_checkpoint
from .machine import resolve_dtype

__all__ = ["DEFAULT_TARGET", "Target", "cache_dir", "checkpoint_hash", "load_target"]

log = logging.getLogger(__name__)

HASH_FILE = "ctxdraft_hash.json"  # the content hash of a cached checkpoint, stored beside its weights
HASH_VERSION = 1
VERIFY_ENV = "CTXDRAFT_VERIFY_CACHE"  # "full": check every byte of a cached checkpoint at load, not sampled blocks
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "_commit_hash", "architectures")
SAMPLED_SLICES = 8  # per tensor: this many evenly spaced slices along dim 0 (first and last included) ...
SAMPLED_VALUES = 64  # ... each at least this many values long; tensors this small or smaller are hashed whole


@dataclass
class Target:
    """A loaded target model with what the decoding loop needs to know about it."""

    model: torch.nn.Module  # a transformers causal LM whose blocks are model.model.layers
    tokenizer: object
    name: str
    path: Path  # the directory the weights were read from
    content_hash: str = ""  # of the stored checkpoint (see checkpoint_hash): the same in every dtype
    eos_ids: set[int] = field(default_factory=set)
    dtype: torch.dtype = torch.float32  # what the model's weights were cast to at load

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 20))

    def encode(self, prompt: str, chat: bool = True, escape_special: bool = False) -> list[int]:
        """Token ids of ``prompt`` as the model sees it (with the chat template when it has one).

        ``escape_special``: a special token's text typed in ``prompt`` (``<|im_end|>``) stays plain text instead of
        becoming the control token (as plain HF tokenizers do); for services that take untrusted prompts. The
        template's own control tokens are unchanged."""
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            if escape_special:
                return self._encode_chat_escaped(prompt)
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        if escape_special:
            return list(tok(prompt, split_special_tokens=True)["input_ids"])
        return list(tok(prompt)["input_ids"])

    def _encode_chat_escaped(self, prompt: str) -> list[int]:
        """The chat template rendered around a placeholder; the template's text is tokenized with special tokens,
        the user's text without (``split_special_tokens``)."""
        tok = self.tokenizer
        marker = "CTXDRAFTUSERTEXT"
        rendered = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                           tokenize=False)
        if rendered.count(marker) != 1:
            raise CtxdraftError(f"{self.name}: cannot escape special tokens, the chat template changes its content")
        before, after = rendered.split(marker)

        def ids(text: str, split: bool) -> list[int]:
            return list(tok(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]) if text else []

        return ids(before, False) + ids(prompt, True) + ids(after, False)


def load_target(spec: str | os.PathLike | None = None, dtype: str | torch.dtype = "float32") -> Target:
    """Load a target from a registered name (default ``smollm2-135m-instruct``), an HF directory or a .gguf file.

    ``dtype``: "auto" (bfloat16 where the CPU has native bf16, else float32), "bfloat16", "float16",
    "float32", or a torch dtype. The weights are cast while they load (no float32 copy first).
    """
    torch_dtype = resolve_dtype(dtype)
    spec = str(spec) if spec is not None else DEFAULT_TARGET
    path, name = _checkpoint_dir(spec)
    if _in_cache(path):
        content_hash = _cached_checkpoint_hash(path)
        if content_hash is None:  # the cached files changed since they were written: convert them again
            log.warning("the cached checkpoint %s is damaged (its files differ from what was recorded); "
                        "rebuilding it", path)
            discard(path)
            path, name = _checkpoint_dir(spec)
            content_hash = _cached_checkpoint_hash(path)
            if content_hash is None:
                raise CtxdraftError(f"the cached checkpoint {path} fails its check right after it was rebuilt; "
                                    "check the disk, or delete the cache directory")
    else:
        content_hash = checkpoint_hash(path)
    model, tokenizer = _load_hf_dir(path, torch_dtype)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return Target(model, tokenizer, name, Path(path), content_hash, eos_ids, torch_dtype)


def _checkpoint_dir(spec: str) -> tuple[Path, str]:
    """The checkpoint directory of ``spec`` (built into the cache first for a registered name or a .gguf) and its name."""
    if spec in REGISTRY:
        return registered_checkpoint(REGISTRY[spec]), spec
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return gguf_checkpoint(p), p.stem
    if p.is_dir():
        return p, p.name
    known = ", ".join(sorted(REGISTRY))
    raise CtxdraftError(f"cannot load target {spec!r}: not a registered name ({known}), a model directory or a .gguf file")


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with progress_bars(False):
            tokenizer = AutoTokenizer.from_pretrained(path)
            # use_safetensors=True: never fall back to a pickled pytorch_model.bin
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError) as e:
        raise CtxdraftError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.requires_grad_(False)
    if not hasattr(getattr(model, "model", None), "layers"):
        raise CtxdraftError(f"{path}: unsupported architecture {type(model).__name__} (needs model.model.layers)")
    return model, tokenizer


def checkpoint_hash(path: str | os.PathLike) -> str:
    """The content hash of the checkpoint directory ``path``, read from its files without loading the model.

    config.json (minus keys that change with the writer, not the model) + for each tensor of its
    ``*.safetensors`` files, by name: name, shape, stored dtype and a fixed sample of its stored bytes.
    """
    path = Path(path)
    config_path = path / "config.json"
    weight_files = sorted(path.glob("*.safetensors"))
    if not config_path.is_file():
        raise CtxdraftError(f"{path} is not a model directory (no config.json)")
    if not weight_files:
        raise CtxdraftError(
            f"{path} has no *.safetensors weights; ctxdraft never loads pickled (.bin/.pt) weights. "
            f"Re-save the model with save_pretrained(..., safe_serialization=True)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CtxdraftError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CtxdraftError(f"{config_path} is not a JSON object")
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    try:
        with ExitStack() as stack:
            handle_of = {}
            for weight_file in weight_files:
                handle = stack.enter_context(safe_open(weight_file, framework="pt"))
                handle_of.update((name, handle) for name in handle.keys())
            for name in sorted(handle_of):
                _hash_tensor(h, name, handle_of[name].get_slice(name))
    except SafetensorError as e:
        raise CtxdraftError(f"cannot read the weights in {path}: {str(e).splitlines()[0]}") from None
    return h.hexdigest()[:16]


def _hash_tensor(h, name: str, tensor_slice) -> None:
    """Feed one stored tensor into ``h``: name, shape, dtype, then its bytes (whole if small, else sampled slices)."""
    shape = list(tensor_slice.get_shape())
    h.update(f"{name}|{shape}|{tensor_slice.get_dtype()}|".encode())
    numel = math.prod(shape)
    if numel <= SAMPLED_SLICES * SAMPLED_VALUES:
        pieces = [tensor_slice[...]]
    else:
        rows = shape[0]
        row_numel = numel // rows
        span = max(1, math.ceil(SAMPLED_VALUES / row_numel))  # rows per slice: >= SAMPLED_VALUES values
        starts = sorted({round(i * (rows - span) / (SAMPLED_SLICES - 1)) for i in range(SAMPLED_SLICES)})
        pieces = [tensor_slice[start:start + span] for start in starts]
    for piece in pieces:
        h.update(piece.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _in_cache(path: Path) -> bool:
    return path.resolve().parent == (cache_dir() / "checkpoints").resolve()


def _checkpoint_files(path: Path) -> list[Path]:
    """The files a cached checkpoint's record covers (the record itself and hidden temporaries aside)."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.name != HASH_FILE and not p.name.startswith("."))


def _cached_checkpoint_hash(path: Path) -> str | None:
    """The content hash of a checkpoint in the cache, computed once and stored beside it (written atomically) with
    a fingerprint of each file (size + sampled blocks, ``fileio.file_fingerprint``). Every load checks the files
    against it (``CTXDRAFT_VERIFY_CACHE=full``: every byte); None when they differ (the cache is damaged)."""
    stored = path / HASH_FILE
    full = os.environ.get(VERIFY_ENV, "").strip().lower() == "full"
    content_hash = None
    try:
        record = json.loads(stored.read_text())
        if record.get("version") == HASH_VERSION and isinstance(record.get("content_hash"), str):
            content_hash = record["content_hash"]
            if isinstance(record.get("files"), dict):
                files = {p.name: p for p in _checkpoint_files(path)}
                if set(files) != set(record["files"]):
                    return None
                for file_name, recorded in record["files"].items():
                    seen = file_fingerprint(files[file_name], full=full)
                    if any(recorded.get(k) != v for k, v in seen.items()):
                        return None
                return content_hash
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        pass  # absent or damaged: compute it again
    # First load (or a record from an older ctxdraft, whose hash is kept): record the files as they are now.
    content_hash = content_hash or checkpoint_hash(path)
    files = {p.name: {**file_fingerprint(p), "sha256": file_sha256(p, 64)} for p in _checkpoint_files(path)}
    try:
        write_json_atomic(stored, {"version": HASH_VERSION, "content_hash": content_hash, "files": files})
    except OSError as e:  # a read-only cache still loads; it is checked again next time
        log.warning("cannot record the checkpoint check in %s (%s)", stored, e.strerror)
    return content_hash
