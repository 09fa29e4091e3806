"""The README and docs/ name files of this repository; a file moved or renamed must take its mentions along."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_PATH = re.compile(r"\b(?:selfdraft|triton_kernels|export|cli|benchmarks|scripts|tests)/[\w/]+\.(?:py|sh)\b")


def source_paths(text: str) -> set[str]:
    return set(SOURCE_PATH.findall(text))


def test_every_source_file_the_docs_name_exists():
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        missing += [f"{doc.relative_to(ROOT)}: {p}" for p in sorted(source_paths(doc.read_text()))
                    if not (ROOT / p).exists()]
    assert not missing, "docs name files that do not exist:\n" + "\n".join(missing)


def test_the_pattern_finds_paths_in_prose_and_code():
    text = "see `selfdraft/drafting/ties.py` and scripts/split_data.py, not selfdraft.drafting or docs/x.md"
    assert source_paths(text) == {"selfdraft/drafting/ties.py", "scripts/split_data.py"}
