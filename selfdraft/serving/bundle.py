"""A bundle: a target identity plus the draft pool, exit heads, cost profile and routing policy, loaded.

``BUNDLE/bundle.json`` (its schema and content helpers are ``bundle_info.py``; the other files are named in
``layout.py``) is what the commands pass to each other. ``load_bundle`` checks it and the files it names;
``Bundle.generate`` routes (with the policy calibrated to this machine, ``calibrate.py``) and decodes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ctxdraft.export.router import OnnxRouter

from ..base import checks
from ..base.errors import CtxdraftError
from ..base.features import features_from_prefill
from ..base.fileio import check_sealed, display_path, read_json, write_json_atomic
from ..base.layout import BUNDLE_FILE, TRAJECTORIES_FILE
from ..drafting.batch_decoding import BatchDecoder
from ..drafting.decoding import GenerationConfig, GenerationStats, prefill, speculative_decode
from ..drafting.draft import Draft
from ..drafting.pool import arm_feature_layers, build_draft, model_arm
from ..learning.costs import set_costs
from ..learning.offpolicy import choose_arm
from ..runtime.layers import LayerStack
from ..runtime.machine import resolve_dtype
from ..runtime.target import DEFAULT_TARGET, Target, load_target
from . import suffix_store, traffic
from .bundle_files import check_files
from .bundle_info import new_bundle_info, validate_info
from .calibration import auto_calibrate_default, calibrate, find_calibration
from .profiles import profile_for

log = logging.getLogger(__name__)

DEFAULT_BUNDLE_DIR = Path(__file__).parents[1] / "default_bundle"


@dataclass
class GenerationResult:
    prompt_ids: list[int]  # the prompt as the target saw it (chat template applied)
    token_ids: list[int]  # new tokens, without EOS
    text: str
    arm: str
    stats: GenerationStats
    routed: bool = False  # the arm was chosen by the policy
    error: str | None = None  # a batch row that failed (``batch.generate_batch``): why; the other fields are empty

    def to_dict(self) -> dict:
        d = {
            "prompt_ids": self.prompt_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "arm": self.arm,
            "routed": self.routed,
            "stats": self.stats.to_dict(),
        }
        return d if self.error is None else {**d, "error": self.error}


@dataclass
class Bundle:
    path: Path | None
    info: dict
    _target: Target | None = None
    _stack: LayerStack | None = None
    _drafts: dict[str, Draft] = field(default_factory=dict)
    _router: object = None
    dtype: str | torch.dtype = "auto"  # what the target (and every draft) runs in; see machine.resolve_dtype
    calibrate: bool | None = None  # route with a policy calibrated to this machine (None: unless CTXDRAFT_NO_CALIBRATE)
    progress: Callable[[str, int, int], None] | None = None  # long work (a first calibration) reports here
    _calibration: object = None
    shared: dict = field(default_factory=dict)  # what several arms share (a loaded draft model)
    # Served traffic (traffic.py): routed requests append one line each to `log`; `explore` is the epsilon of
    # epsilon-greedy routing (0: always the policy's argmax); `explore_rng` (None: fresh OS entropy) draws it.
    log: Path | None = None
    log_features_only: bool = False  # leave the prompt ids out of the log (the features stay)
    explore: float = 0.0
    explore_rng: object = None
    _log_identity: dict | None = None

    # -- identity --------------------------------------------------------------------------------
    @property
    def arms(self) -> list[str]:
        return [a["name"] for a in self.info["arms"]]

    def arm_spec(self, name: str) -> dict:
        """The arm ``name`` of the pool; ``model:<path or registered name>`` outside the pool is an external draft
        model with the default draft length, made on the spot (e.g. ``model:qwen2.5-coder-0.5b-instruct``)."""
        for a in self.info["arms"]:
            if a["name"] == name:
                return a
        if isinstance(name, str) and name.startswith("model:") and len(name) > len("model:"):
            return model_arm(name[len("model:"):], name=name)
        raise CtxdraftError(f"unknown arm {name!r}; this bundle has: {', '.join(self.arms)} (or 'auto', or "
                            "model:<path or registered name> for an external draft model)")

    @property
    def target(self) -> Target:
        if self._target is None:
            target = load_target(self.info["target"]["spec"], dtype=self.dtype)
            self.check_target(target)
            self._target = target
        return self._target

    def check_target(self, target: Target) -> None:
        expected = self.info["target"].get("hash")
        if expected and target.content_hash != expected:
            raise CtxdraftError(
                f"bundle {display_path(self.path)} was made for target {self.info['target'].get('name')} (hash {expected}), "
                f"but {target.name} has hash {target.content_hash}; use the matching target or rebuild the bundle"
            )

    @property
    def stack(self) -> LayerStack:
        if self._stack is None:
            self._stack = LayerStack(self.target.model)
        return self._stack

    def batch_decoder(self, max_batch: int) -> BatchDecoder:
        """A ``BatchDecoder`` of up to ``max_batch`` rows over this bundle's target whose chain rows draft only what
        this machine's cost profile says pays at the batch's width (every row its arm's full length when the bundle
        has no profile here)."""
        profile, _ = profile_for(self)
        longest = max((int(arm.get("settings", {}).get("draft_len") or 0) for arm in self.info["arms"]), default=0)

        def step_curve(rows: int) -> list[float]:  # the decoder asks once per batch width
            return profile.batch_curve(rows, max_batch * (longest + 1))

        return BatchDecoder(self.stack, max_batch=max_batch, max_context=self.target.max_context,
                            step_curve=step_curve if profile is not None else None)

    def draft(self, name: str) -> Draft:
        if name not in self._drafts:
            draft = build_draft(self.arm_spec(name), self.target, self.path, self.shared)
            profile, _ = profile_for(self)  # a tree draft sizes its trees with this machine's costs
            positions, tree = draft.max_verified() + 1, draft.proposes_trees
            if profile is not None and profile.step_seconds(positions, tree) is not None:
                draft.set_costs(profile.step_curve(positions, tree))
            self._drafts[name] = draft
        return self._drafts[name]

    def save(self) -> None:
        if self.path is None:
            raise CtxdraftError("this bundle has no directory; give one to save it")
        write_json_atomic(self.path / BUNDLE_FILE, self.info)

    # -- routing ---------------------------------------------------------------------------------
    @property
    def feature_layer(self) -> int | None:
        features = self.info.get("features") or {}
        return features.get("layer") if features.get("kind") == "hidden" else None

    def router(self):
        """The ONNX policy of this bundle, or None when it has none yet: the one calibrated to this machine when
        the bundle can be calibrated (made now, once, if it does not exist), else the shipped one."""
        if self._router is None and self.info.get("policy") and self.path is not None:
            calibration = self.calibration(create=True)
            if calibration is not None and calibration.router is not None:
                self._router = calibration.router
            else:
                path = calibration.policy_path if calibration is not None else self.path / self.info["policy"]
                self._router = OnnxRouter(path, expected=self.info)
        return self._router

    def calibration(self, create: bool = False):
        """This machine's calibration of the bundle (``calibrate.py``), or None: the bundle cannot be calibrated
        (no policy, no trajectories), calibration is off, or none exists and ``create`` is False."""
        if self._calibration is not None:
            return self._calibration
        enabled = auto_calibrate_default() if self.calibrate is None else self.calibrate
        if not enabled or self.path is None or not self.info.get("policy_model") \
                or not (self.path / TRAJECTORIES_FILE).is_file():
            return None
        found = find_calibration(self)
        if found is None and create:
            t = self.target
            log.warning("calibrating the bundle's policy to this machine (%s, %d threads); once, about a minute "
                        "(--no-calibrate or CTXDRAFT_NO_CALIBRATE=1 keeps the shipped policy)",
                        str(t.dtype).removeprefix("torch."), torch.get_num_threads())
            found = calibrate(self, progress=self.progress)
        self._calibration = found
        if found is not None:  # drafts built before (calibrate builds every arm's, and its profile covers them all)
            set_costs(self._drafts, found.profile)  # size their trees with it from now on
        return found

    def calibration_note(self) -> str:
        """Which policy ``--draft auto`` routes with, in words."""
        if not self.info.get("policy"):
            return "no policy: auto uses the default arm"
        calibration = self.calibration(create=False)
        if calibration is not None:
            return calibration.describe()
        if self.path is None or not self.info.get("policy_model") or not (self.path / TRAJECTORIES_FILE).is_file():
            return "the shipped policy (the bundle carries no trajectories to calibrate from)"
        if not (auto_calibrate_default() if self.calibrate is None else self.calibrate):
            return "the shipped policy (calibration is off)"
        return "the shipped policy until the first `--draft auto` calibrates it to this machine"

    # -- generation ------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        draft: str = "auto",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = True,
        stop: list[str] | None = None,
        on_text=None,
        escape_special: bool = False,
    ) -> GenerationResult:
        """Generate a continuation of ``prompt``; output is identical to the target's alone (greedy).

        ``stop``: a stop string or a list of them (the text is cut before the first one found).
        ``escape_special``: special tokens typed in ``prompt`` (``<|im_end|>``) stay plain text (``Target.encode``)."""
        config = GenerationConfig(max_new_tokens, temperature, top_p, seed, stop)  # checks every value
        checks.text("prompt", prompt)
        checks.text("draft", draft)
        checks.flag("chat", chat)
        checks.flag("escape_special", escape_special)
        if draft != "auto":
            self.arm_spec(draft)  # unknown arm: fail before any model work
        target = self.target
        prompt_ids = target.encode(prompt, chat=chat, escape_special=escape_special)
        if len(prompt_ids) + max_new_tokens > target.max_context:
            raise CtxdraftError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {target.max_context} tokens; shorten the prompt or lower --max-new-tokens"
            )
        router = self.router() if draft == "auto" else None
        if self.log is not None and draft == "auto" and router is None:
            raise CtxdraftError(f"bundle {display_path(self.path)} has no policy, so no request is routed and there is "
                                "nothing to log; train one with `ctxdraft train-policy` first")
        pre = prefill(self.stack, prompt_ids, self.feature_layer if router is not None else None,
                      capture=self._state_layers(draft))
        t0 = time.perf_counter()
        routed = False
        if draft == "auto":
            if router is not None:
                features = features_from_prefill(router.features, prompt_ids, pre.pooled_hidden)
                choice = choose_arm(router.arms, router.probs([features])[0], self.explore, self.explore_rng)
                arm, routed = choice.arm, True
            else:
                arm = self.info.get("default_arm") or "none"
        else:
            arm = draft
        route_s = time.perf_counter() - t0
        tokenizer = target.tokenizer
        stop_check = stop_checker(tokenizer, config.stop) if config.stop else None
        on_tokens = text_streamer(tokenizer, on_text, config.stop) if on_text is not None else None
        recorder = traffic.StepRecorder(self.draft(arm)) if routed and self.log is not None else None
        new_ids, stats = speculative_decode(self.stack, pre, recorder or self.draft(arm), config, target.eos_ids,
                                            on_tokens, stop_check)
        stats.route_s = route_s
        stats.wall_s += route_s
        text = cut_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), config.stop)
        if self.log is not None:  # served outputs grow the suffix datastore
            suffix_store.record_output(self, new_ids)
        if recorder is not None:
            traffic.log_request(self, traffic.RequestLog(
                features, router.features, prompt_ids, choice, self.explore, recorder.trajectory(len(new_ids)),
                max_new_tokens, config.temperature, len(new_ids) < max_new_tokens, stats))
        return GenerationResult(prompt_ids, new_ids, text, arm, stats, routed)

    def _state_layers(self, draft: str) -> set[int]:
        """The target layers the prefill keeps for the arm(s) that may draft: feature heads read them."""
        specs = self.info["arms"] if draft == "auto" else [self.arm_spec(draft)]
        return {layer for spec in specs for layer in arm_feature_layers(spec)}


def stop_checker(tokenizer, stops: list[str]):
    """``stop_check`` of the decoding loop for stop strings ``stops``: the token count at which to cut, or None."""
    def check(new_ids: list[int]) -> int | None:
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        if not any(s in text for s in stops):
            return None
        # Keep the shortest token prefix whose text contains a stop string.
        for n in range(1, len(new_ids) + 1):
            partial = tokenizer.decode(new_ids[:n], skip_special_tokens=True)
            if any(s in partial for s in stops):
                return n
        return len(new_ids)

    return check


def cut_at_stop(text: str, stops) -> str:
    """``text`` cut before the first of ``stops`` it contains (each stop string in turn)."""
    for s in stops:
        if s in text:
            text = text[: text.index(s)]
    return text


def text_streamer(tokenizer, on_text, stops=()):
    """``on_tokens`` of the decoding loop calling ``on_text`` with each new piece of text (decoding the whole so far
    keeps multi-byte tokens whole; the text is cut at ``stops``, so the pieces add up to the result's text)."""
    seen = {"ids": [], "text": ""}

    def on_tokens(ids: list[int]) -> None:
        seen["ids"].extend(ids)
        text = tokenizer.decode(seen["ids"], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        text = cut_at_stop(text, stops)
        on_text(text[len(seen["text"]) :])
        seen["text"] = text

    return on_tokens


def open_or_create_bundle(out_dir: Path, target: Target, spec: str, ignore: tuple[str, ...] = ()) -> Bundle:
    """The bundle in ``out_dir`` (checked against ``target``), or a new one in memory when the directory does not
    exist or holds nothing but ``ignore``d entries. Nothing is written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CtxdraftError(f"--out {display_path(out_dir)} exists and is not a directory")
    if (out_dir / BUNDLE_FILE).is_file():
        bundle = load_bundle(out_dir)
        bundle.check_target(target)
        bundle._target = target
        return bundle
    if out_dir.is_dir() and any(p.name not in ignore for p in out_dir.iterdir()):
        raise CtxdraftError(f"--out {display_path(out_dir)} is a non-empty directory without a {BUNDLE_FILE}; "
                            "give a new or bundle directory")
    return Bundle(out_dir, new_bundle_info(target, spec), _target=target)


def add_arm(bundle_dir: str | Path, spec: dict, target: str | None = None) -> Bundle:
    """Add (or replace) one arm ``{"name", "kind", "settings"}`` in a bundle, creating the bundle if needed.

    The draft is built once before anything is written, so a bad arm (a draft model with another
    vocabulary, bad settings) leaves the bundle as it was. A policy trained on the old pool no longer
    matches, so it is dropped from bundle.json (retrain with ``train-policy``).
    """
    bundle_dir = Path(bundle_dir)
    if (bundle_dir / BUNDLE_FILE).exists():
        bundle = load_bundle(bundle_dir, target=target)
    else:
        spec_target = target or DEFAULT_TARGET
        t = load_target(spec_target)
        bundle = Bundle(bundle_dir, new_bundle_info(t, spec_target), _target=t)
    if not spec.get("name") or "auto" == spec["name"]:
        raise CtxdraftError(f"an arm needs a name other than 'auto', got {spec.get('name')!r}")
    build_draft(spec, bundle.target, bundle_dir)
    arms = [a for a in bundle.info["arms"] if a["name"] != spec["name"]]
    bundle.info["arms"] = arms + [spec]
    if bundle.info.get("policy"):
        bundle.info["policy"] = None
    bundle.save()
    bundle._drafts.clear()
    return bundle


def load_bundle(path: str | Path | None = None, target: str | None = None, dtype: str | torch.dtype = "auto",
                calibrate: bool | None = None, log: str | Path | None = None, log_features_only: bool = False,
                explore: float = 0.0) -> Bundle:
    """Open a bundle directory (None: the default bundle of the embedded default target).

    ``target`` (a spec for ``load_target``) without ``path`` makes an in-memory bundle with the
    model-free arms (``none``, ``lookup``) for any model. ``dtype``: "auto" (bfloat16 where the machine has
    native bf16, else float32), "bfloat16", "float16", "float32" or a torch dtype; the target and every draft
    run in it. ``calibrate``: route with a policy calibrated to this machine, made on first use (default:
    yes, unless CTXDRAFT_NO_CALIBRATE is set); False keeps the shipped policy.

    Served traffic (``traffic.py``, ``online.py``): ``log`` appends one JSON line per routed request (features,
    chosen arm, propensity, realised trajectory; ``log_features_only`` leaves the prompt ids out); ``explore``
    routes epsilon-greedy (a uniformly random arm with that probability) so that ``update-policy`` learns about
    arms the policy does not pick. Both are off by default.
    """
    dtype = resolve_dtype(dtype)  # a bad dtype fails here, before any model work
    serving = {"log": traffic.log_path(log), "log_features_only": checks.flag("log_features_only", log_features_only),
               "explore": checks.number("explore", explore, minimum=0.0, maximum=1.0)}
    if path is None and target is not None and target != DEFAULT_TARGET:
        t = load_target(target, dtype=dtype)
        return Bundle(None, new_bundle_info(t, target), _target=t, dtype=dtype, calibrate=calibrate, **serving)
    path = Path(path) if path is not None else DEFAULT_BUNDLE_DIR
    if not path.is_dir():
        raise CtxdraftError(f"bundle not found: {display_path(path)} (make one with `ctxdraft add-exits ... --out {path}`)")
    check_sealed(path)
    info = validate_info(read_json(path / BUNDLE_FILE, "bundle file"), display_path(path / BUNDLE_FILE))
    check_files(path, info)
    bundle = Bundle(path, info, dtype=dtype, calibrate=calibrate, **serving)
    if target is not None:
        t = load_target(target, dtype=dtype)
        bundle.check_target(t)
        bundle._target = t
    return bundle
