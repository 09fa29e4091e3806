"""Small helpers shared by the CLI commands (output, progress)."""
from __future__ import annotations

import json
import sys

import click


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def progress(iterable=None, total=None, desc: str = ""):
    """A tqdm progress bar on stderr when it is a terminal; silent otherwise (CI, pipes)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False, file=sys.stderr)
