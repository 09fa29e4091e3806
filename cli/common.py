"""Small helpers shared by the CLI commands (output, progress)."""
from __future__ import annotations

import json
import os
import shutil
import sys

import click

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.runtime.distributed import Group
from ctxdraft.selfdraft.runtime.machine import DTYPE_CHOICES

# What the file system or a crafted file can throw: one `Error: <path>: <reason>` line, exit 2, no traceback.
FAULTS = (OSError, RecursionError, shutil.Error)


def fault_message(e: BaseException) -> str:
    """``<path>: <reason>`` for an error the operating system (or a crafted file) raised."""
    if isinstance(e, shutil.Error):
        first = e.args[0][0] if e.args and isinstance(e.args[0], list) and e.args[0] else None
        return f"{first[0]}: {first[2]}" if isinstance(first, tuple) and len(first) == 3 else f"copy failed: {e}"
    if isinstance(e, RecursionError):
        return "input nested too deeply to read (a crafted or damaged file)"
    if isinstance(e, OSError):
        where = os.fsdecode(e.filename) if e.filename is not None else "file system"
        return f"{where}: {e.strerror or e}"
    return str(e)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


class StageBar:
    """A progress callback ``(stage, done, total)``: one tqdm bar per stage on a terminal (stderr), silent otherwise."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, leave=False)
            self.stage = stage
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "StageBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(as_json: bool = False, main: bool = True) -> StageBar:
    """Progress on a terminal; none with --json, when stderr is not a terminal, or on a torchrun rank other than 0."""
    return StageBar(enabled=sys.stderr.isatty() and not as_json and main)


class ranks:
    """The torchrun group of a command (one rank without torchrun): ``with ranks() as group: ...``; only rank 0
    prints. The group is closed when the command ends."""

    def __enter__(self):

        self.group = Group()
        return self.group

    def __exit__(self, *exc) -> None:
        self.group.close()


def parse_ints(value: str, option: str, example: str) -> list[int]:
    return _parse_list(value, option, example, int, "integers")


def parse_floats(value: str, option: str, example: str) -> list[float]:
    return _parse_list(value, option, example, float, "numbers")


def parse_names(value: str, option: str, example: str) -> list[str]:
    """A comma-separated list of names, each stripped, empty ones dropped."""
    return _parse_list(value, option, example, str.strip, "names")


def _parse_list(value: str, option: str, example: str, kind, what: str) -> list:

    try:
        return [kind(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise CtxdraftError(f"{option} must be comma-separated {what} such as {example}, got {value!r}") from None


def dtype_option(fn):
    """--dtype, shared by every command that loads a target."""

    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
                        help="What the target and every draft run in. auto: bfloat16 on CUDA and on CPUs with native "
                             "bf16 (avx512_bf16 / AMX), else float32 (CTXDRAFT_DTYPE overrides auto).")(fn)


def no_calibrate_option(fn):
    return click.option("--no-calibrate", is_flag=True,
                        help="Route with the bundle's shipped policy instead of one calibrated to this machine "
                             "(which is made once, on first use; also CTXDRAFT_NO_CALIBRATE=1).")(fn)


def with_options(options):
    """Apply a list of click options (shared between commands) to a command function."""
    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return wrap
