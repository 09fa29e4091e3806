"""Argument checks shared by the API and the CLI: each names the argument, says what it must be and what it got.

The CLI passes its options straight to the library, so a bad ``--temperature nan`` and a bad
``temperature=float("nan")`` meet the same check and the same message. Every failure is a ``CtxdraftError``.
"""
from __future__ import annotations

import math

from .errors import CtxdraftError

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 64-bit seeds


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int (bools, floats and strings refused), within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CtxdraftError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise CtxdraftError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise CtxdraftError(f"{name} must be <= {maximum}, got {value}")
    return value


def number(name: str, value, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, below: float | None = None) -> float:
    """``value`` as a finite float (ints accepted; nan, inf, bools and strings refused), >= minimum (or > above)
    and <= maximum (or < below)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CtxdraftError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise CtxdraftError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise CtxdraftError(f"{name} must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise CtxdraftError(f"{name} must be > {above}, got {value}")
    if maximum is not None and value > maximum:
        raise CtxdraftError(f"{name} must be <= {maximum}, got {value}")
    if below is not None and value >= below:
        raise CtxdraftError(f"{name} must be < {below}, got {value}")
    return value


def seed(name: str, value) -> int | None:
    """None, or an integer that fits the random generator (0 <= seed < 2**64)."""
    if value is None:
        return None
    return integer(name, value, 0, SEED_LIMIT - 1)


def strings(name: str, value) -> list[str]:
    """A list of non-empty strings; one string is a list of one (never split into characters); None is empty."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise CtxdraftError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise CtxdraftError(f"{name} must hold strings, got {item!r} ({type(item).__name__})")
        if not item:
            raise CtxdraftError(f"{name} must not hold an empty string (it would stop at once)")
        out.append(item)
    return out


def text(name: str, value) -> str:
    """A string with something in it besides whitespace."""
    if not isinstance(value, str):
        raise CtxdraftError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise CtxdraftError(f"the {name} is empty")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise CtxdraftError(f"{name} must be True or False, got {value!r}")
    return value


def choice(name: str, value, options) -> str:
    """One of ``options`` (strings)."""
    if not isinstance(value, str) or value not in options:
        raise CtxdraftError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value
