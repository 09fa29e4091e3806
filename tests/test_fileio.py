"""Atomic writes (all or nothing, no temp files left), JSON/JSONL errors that name the file, display paths."""
from __future__ import annotations

import os
import stat

import pytest

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.base.fileio import (
    atomic_path,
    display_path,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_text_atomic,
)


def test_atomic_write_creates_parents_and_leaves_only_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    write_json_atomic(path, {"x": [1, 2], "y": "é"})
    assert read_json(path) == {"x": [1, 2], "y": "é"}
    assert os.listdir(path.parent) == ["out.json"]
    # mkstemp makes 0600 files; the result has what a plain open() gives under the umask.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_writer_that_raises_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"version": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"version": 2, "bad": object()})  # not JSON: json.dumps raises mid-write
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_text('{"version": 3, "trunc')  # half a file, then the writer dies
            raise RuntimeError("disk full")
    assert read_json(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    path = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_write_text_replaces_the_whole_file(tmp_path):
    path = tmp_path / "notes.md"
    write_text_atomic(path, "a much longer first version\n")
    write_text_atomic(path, "short\n")
    assert path.read_text() == "short\n"


def test_read_json_errors_name_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CtxdraftError, match="bundle file not found: missing.json"):
        read_json(tmp_path / "missing.json", what="bundle file")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CtxdraftError, match="file bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(CtxdraftError, match="latin1.json is not valid JSON"):
        read_json(tmp_path / "latin1.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(CtxdraftError, match="dir.json is a directory"):
        read_json(tmp_path / "dir.json")


def test_read_jsonl_skips_blank_lines_and_keeps_order(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\n\n   \n{"id": 2, "p": "x"}\n')
    assert read_jsonl(path) == [{"id": 1}, {"id": 2, "p": "x"}]


@pytest.mark.parametrize("content, message", [
    (b'{"id": 1}\n{"id": 2\n', "prompts.jsonl, line 2: not valid JSON"),
    (b'{"id": 1}\n\n[1, 2]\n', "prompts.jsonl, line 3: expected a JSON object, got list"),
    (b"\n  \n", "prompts.jsonl is empty"),
    (b'{"p": "\xff"}\n', "prompts.jsonl is not UTF-8 text"),
])
def test_read_jsonl_errors_name_the_path_and_line(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_bytes(content)
    with pytest.raises(CtxdraftError, match=f"^prompts file {message}"):
        read_jsonl(tmp_path / "prompts.jsonl", what="prompts file")


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(CtxdraftError, match="data file not found: .*nothing.jsonl"):
        read_jsonl(tmp_path / "nothing.jsonl")


def test_display_path_is_relative_below_the_working_directory_or_home(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert display_path(None) is None
    assert display_path(work / "sub" / "f.json") == os.path.join("sub", "f.json")
    assert display_path("sub/../sub/f.json") == os.path.join("sub", "f.json")
    assert display_path(work) == "."
    outside = tmp_path / "elsewhere" / "f.json"
    assert display_path(outside) == str(outside)  # not "../elsewhere/f.json": only paths below cwd are shortened
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert display_path(tmp_path / "home" / ".cache" / "c") == os.path.join("~", ".cache", "c")
