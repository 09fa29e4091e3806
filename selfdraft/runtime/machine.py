"""What this machine can do: CPU features, the dtype to run in, and a fingerprint of the machine.

Costs (how long a target step or a draft takes) are a property of the machine and the dtype, so
anything measured on one machine is keyed by ``machine_fingerprint``. The dtype rule for ``auto``:
bfloat16 on CUDA and on CPUs with native bf16 arithmetic (x86 ``avx512_bf16`` / ``amx_bf16``, Arm
``bf16``), float32 elsewhere; it is read from the CPU's feature flags, never guessed from its name.
``CTXDRAFT_DTYPE`` (bfloat16, float16 or float32) overrides what ``auto`` means on this machine, for
every command at once (the test suite pins float32 this way).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from ..base.errors import CtxdraftError

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 (AVX-512 / AMX), Arm (FEAT_BF16)
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "asimdhp"})  # x86 (AVX-512 / AMX), Arm (half-precision SIMD)

CPUINFO = Path("/proc/cpuinfo")
DTYPE_ENV = "CTXDRAFT_DTYPE"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (the ``flags`` line on x86, ``Features`` on Arm) from /proc/cpuinfo text.

    ``cpuinfo`` is the text to parse (tests pass their own); None reads /proc/cpuinfo, empty where absent.
    """
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(BF16_FLAGS & (cpu_flags() if flags is None else flags))


def native_fp16(flags: frozenset[str] | None = None) -> bool:
    return bool(FP16_FLAGS & (cpu_flags() if flags is None else flags))


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu", flags: frozenset[str] | None = None) -> torch.dtype:
    """The torch dtype for ``name`` (one of ``DTYPE_CHOICES`` or a torch dtype) on ``device``.

    ``flags`` are the CPU feature flags to decide with (None: this machine's).
    Raises CtxdraftError for an unknown name and for float16 on a CPU without native fp16.
    """
    device_type = torch.device(device).type
    if isinstance(name, torch.dtype):
        dtype = name
        if dtype not in DTYPES.values():
            raise CtxdraftError(f"unsupported dtype {dtype}; choose one of: {', '.join(DTYPE_CHOICES)}")
    elif not isinstance(name, str) or name not in DTYPE_CHOICES:
        raise CtxdraftError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPE_CHOICES)}")
    elif name == "auto":
        forced = os.environ.get(DTYPE_ENV) if flags is None else None
        if forced:
            if forced not in DTYPES:
                raise CtxdraftError(f"{DTYPE_ENV}={forced!r} is not a dtype; set it to one of: {', '.join(DTYPES)}")
            return resolve_dtype(forced, device, flags)
        if device_type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if native_bf16(flags) else torch.float32
    else:
        dtype = DTYPES[name]
    if dtype == torch.float16 and device_type == "cpu" and not native_fp16(flags):
        raise CtxdraftError(
            "float16 needs a CPU with native fp16 arithmetic (avx512_fp16 or amx_fp16), which this one lacks; "
            "use dtype auto, bfloat16 or float32"
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (``model name`` on x86; Arm often has none, then the architecture)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_fingerprint(dtype: torch.dtype, threads: int | None = None, device: str | torch.device = "cpu") -> dict:
    """What a cost measurement depends on, plus a short stable ``hash`` of it (a calibration cache key).

    ``threads`` defaults to torch's current intra-op thread count.
    """
    device = torch.device(device)
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = cpu_model()
    fingerprint = {
        "device": device.type,
        "processor": processor,
        "threads": int(torch.get_num_threads() if threads is None else threads),
        "dtype": dtype_name(dtype),
        "torch": torch.__version__,
    }
    fingerprint["hash"] = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    return fingerprint
