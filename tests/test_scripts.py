"""The shell scripts that rebuild the shipped artifacts call the CLI with options that exist: a renamed or removed
option would otherwise surface only hours into a rebuild."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import click
import pytest

from ctxdraft.cli.main import main

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "scripts").glob("*.sh"))


def ctxdraft_calls(text: str) -> list[list[str]]:
    """Every `ctxdraft COMMAND ...` invocation of a script as its words (continuation lines joined, comments and
    quotes dropped; a word is kept as written, so `"$x"` stays one word)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    calls = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("#"):
            continue
        words = line.split()
        for i, word in enumerate(words):
            if word == "ctxdraft" and i + 1 < len(words) and not words[i + 1].startswith("-"):
                calls.append(words[i + 1:])
                break
    return calls


def known_options(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_uses_existing_options(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    calls = ctxdraft_calls(script.read_text())
    for words in calls:
        command = main.commands.get(words[0])
        assert command is not None, f"{script.name}: no command `ctxdraft {words[0]}`"
        options = known_options(command)
        for word in words[1:]:
            if word.startswith("--"):
                name = word.split("=", 1)[0]
                assert name in options, f"{script.name}: `ctxdraft {words[0]}` has no option {name}"


def test_the_default_bundle_script_runs_every_step():
    """The rebuild script of the shipped bundle writes its corpus and trains the head on it, then adds the tree arms,
    collects and trains the policy (a step dropped from it would leave the shipped bundle unreproducible)."""
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    text = (scripts / "build_default_bundle.sh").read_text()
    calls = ctxdraft_calls(text)
    assert [c[0] for c in calls] == ["add-exits", "make-data", "add-exits"]
    feature = calls[2]
    assert "feature" in feature and feature[feature.index("--data") + 1] == '"$corpus"'
    assert 'scripts/add_tree_arms.sh" "$bundle"' in text
    trees = [c[0] for c in ctxdraft_calls((scripts / "add_tree_arms.sh").read_text())]
    assert trees.count("add-arm") == 7 and trees[-2:] == ["collect", "train-policy"]


def test_the_parser_sees_joined_lines_and_skips_comments():
    text = "# ctxdraft bench --nope\nctxdraft collect b \\\n    --data x --out y  # ctxdraft info\n"
    assert ctxdraft_calls(text) == [["collect", "b", "--data", "x", "--out", "y"]]
