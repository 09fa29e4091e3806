"""``ctxdraft add-arm``: an arm spec from the command's options, added to a bundle's pool."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..base.errors import CtxdraftError
from ..drafting.pool import lookup_arm, model_arm, none_arm
from ..serving.bundle import Bundle, add_arm


def arm_spec(kind: str, draft_len: int, model_path: str | None = None, name: str | None = None,
             ngram_sizes: list[int] | tuple = (3, 2, 1)) -> dict:
    """The pool entry for ``kind`` ("model", "lookup" or "none"); a model path that exists is made absolute, so
    the bundle finds it from any working directory."""
    if draft_len < 1:
        raise CtxdraftError(f"--draft-len must be >= 1, got {draft_len}")
    if kind == "model":
        if not model_path:
            raise CtxdraftError("--kind model needs --path to the draft model")
        path = Path(model_path).expanduser()
        return model_arm(str(path.resolve()) if path.exists() else model_path, draft_len, name)
    if kind == "lookup":
        return lookup_arm(draft_len, ngram_sizes, name)
    if kind == "none":
        return none_arm(name or "none")
    raise CtxdraftError(f"arm kind must be model, lookup or none, got {kind!r}")


@dataclass
class AddedArm:
    bundle: Bundle  # the bundle as saved
    spec: dict  # the arm added


def add_arm_from_options(bundle_dir: str | Path, kind: str, draft_len: int, *, model_path: str | None = None,
                         name: str | None = None, ngram_sizes: list[int] | tuple = (3, 2, 1),
                         target: str | None = None) -> AddedArm:
    """What ``ctxdraft add-arm`` does: build the arm (``arm_spec``) and add it to the bundle (created for
    ``target`` when missing); the draft is checked before anything is written."""
    spec = arm_spec(kind, draft_len, model_path, name, ngram_sizes)
    return AddedArm(add_arm(bundle_dir, spec, target=target), spec)
