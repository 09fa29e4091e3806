"""``ctxdraft add-arm``: an arm spec from the command's options, added to a bundle's pool."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..base import checks
from ..base.data import read_prompts
from ..base.errors import CtxdraftError
from ..drafting.pool import lookup_arm, model_arm, none_arm, suffix_arm
from ..learning.trajectories import greedy_continuation
from ..serving.bundle import Bundle, add_arm
from ..serving.suffix_store import merge_bundle_datastore


def arm_spec(kind: str, draft_len: int, model_path: str | None = None, name: str | None = None,
             ngram_sizes: list[int] | tuple = (3, 2, 1)) -> dict:
    """The pool entry for ``kind`` ("model", "lookup", "suffix" or "none"); a model path that exists is made absolute, so
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
    if kind == "suffix":
        return suffix_arm(draft_len, name=name)
    if kind == "none":
        return none_arm(name or "none")
    raise CtxdraftError(f"arm kind must be model, lookup, suffix or none, got {kind!r}")


@dataclass
class AddedArm:
    bundle: Bundle  # the bundle as saved
    spec: dict  # the arm added
    datastore: dict | None = None  # kind suffix with data: what the datastore holds now


def add_arm_from_options(bundle_dir: str | Path, kind: str, draft_len: int, *, model_path: str | None = None,
                         name: str | None = None, ngram_sizes: list[int] | tuple = (3, 2, 1),
                         target: str | None = None, data: str | Path | None = None, max_new_tokens: int = 128,
                         progress=None) -> AddedArm:
    """What ``ctxdraft add-arm`` does: build the arm (``arm_spec``) and add it to the bundle (created for
    ``target`` when missing); the draft is checked before anything is written. Kind suffix with ``data`` (prompt
    rows, ``data.read_prompts``): the target's greedy continuations of those prompts join the bundle's datastore."""
    spec = arm_spec(kind, draft_len, model_path, name, ngram_sizes)
    if data is not None and kind != "suffix":
        raise CtxdraftError("--data builds the suffix draft's datastore; it goes with --kind suffix only")
    rows = read_prompts(data) if data is not None else []  # a bad data file fails before anything is written
    checks.integer("max_new_tokens", max_new_tokens, minimum=1)
    bundle = add_arm(bundle_dir, spec, target=target)
    if data is None:
        return AddedArm(bundle, spec)
    store = build_datastore(bundle, rows, max_new_tokens, progress)
    return AddedArm(bundle, spec, {"tokens": store.num_tokens, "documents": len(store.documents()), "prompts": len(rows)})


def build_datastore(bundle: Bundle, rows: list[dict], max_new_tokens: int = 128, progress=None):
    """The target's greedy continuations of ``rows``' prompts (chat template, as collect encodes them), merged into
    the bundle's datastore file (with the outputs logged since)."""
    target = bundle.target
    outputs = []
    for i, row in enumerate(rows):
        if progress:
            progress("datastore: continuations", i, len(rows))
        prompt_ids = target.encode(row["prompt"], chat=True)
        outputs.append(greedy_continuation(bundle.stack, prompt_ids, max_new_tokens, target.eos_ids).new_ids)
    return merge_bundle_datastore(bundle, outputs)
