"""The scheduler a server talks to: admission, a bounded queue, a worker thread, streamed deltas, cancellation,
a graceful stop and policy reloads. No HTTP here (``entrypoints/`` parses requests and speaks the protocol).

It does **not batch yet**: the worker runs admitted requests one at a time through ``Bundle.generate``, so the
batch width is at most 1 whatever ``max_batch`` says. The interface (``submit -> Handle``, ``Handle.cancel``,
``result``, ``stop``, ``reload_policy``) is what a continuous-batching loop (``add(request) -> row``,
``cancel(row)``, ``step()``) needs too: only ``Scheduler._execute`` is meant to change when it replaces the
one-at-a-time execution.

Requests, handles and admission errors are ``requests.py``. Terms. *Queued*: admitted, waiting for the worker (at most ``max_queue``; one more is ``QueueFull``). *In flight*:
being decoded. *Cancelled*: the client went away; a queued request is dropped, one in flight stops at the next
token boundary (its cache is local to the decoding call and freed with it) and is not logged.

Policy reloads: ``reload_policy()`` (a server calls it on SIGHUP) and a changed ``bundle.json`` or policy file on
disk (polled between requests, e.g. after ``ctxdraft update-policy --in-place``) open the bundle anew, sharing the
loaded model and drafts, and swap it in between requests: a request keeps the bundle (and so the policy) it
started with.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import queue
import threading
import time
from itertools import count
from typing import Callable

from ..base import checks
from ..base.errors import CtxdraftError
from ..base.layout import BUNDLE_FILE
from ..drafting.decoding import GenerationConfig
from .bundle import Bundle, load_bundle
from .requests import Cancelled, Event, Handle, NotAdmitting, QueueFull, Request, RequestError

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised inside the decoding loop (from the text callback) to end a cancelled request at a token boundary."""


def policy_stamp(bundle: Bundle) -> tuple:
    """What changes on disk when a bundle's policy is replaced: bundle.json (the commit point of an in-place
    update) and the policy file it names, by modification time and size."""
    if bundle.path is None:
        return ()
    names = [BUNDLE_FILE] + ([bundle.info["policy"]] if bundle.info.get("policy") else [])
    stamp = []
    for name in names:
        try:
            st = (bundle.path / name).stat()
            stamp.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append((name, None, None))
    return tuple(stamp)


def reopen_bundle(bundle: Bundle) -> Bundle:
    """``bundle`` read again from its directory (a new policy, a new content hash for the log), sharing the loaded
    target, layer stack and, when the pool is unchanged, the drafts: no model is loaded twice."""
    fresh = load_bundle(bundle.path, dtype=bundle.dtype, calibrate=bundle.calibrate, log=bundle.log,
                        log_features_only=bundle.log_features_only, explore=bundle.explore)
    fresh.check_target(bundle.target)
    fresh._target, fresh._stack, fresh.shared = bundle._target, bundle._stack, bundle.shared
    if fresh.info["arms"] == bundle.info["arms"]:
        fresh._drafts = bundle._drafts
    fresh.explore_rng, fresh.progress = bundle.explore_rng, bundle.progress
    return fresh


class Scheduler:
    """Admits requests into a bounded queue and runs them on one worker thread (see the module docstring: no
    batching yet). ``max_batch``: the most requests decoded together (1 today, whatever is asked);
    ``max_queue``: the most waiting; ``watch_s``: how often an idle worker checks the bundle's policy on disk
    (None: never; ``reload_policy`` still works)."""

    def __init__(self, bundle: Bundle, max_batch: int = 8, max_queue: int = 64, watch_s: float | None = 1.0):
        self.max_batch = checks.integer("max_batch", max_batch, minimum=1)
        self.max_queue = checks.integer("max_queue", max_queue, minimum=0)
        if watch_s is not None:
            checks.number("watch_s", watch_s, above=0.0)
        self.watch_s = watch_s
        self.bundle = bundle
        # Admission checks tokenize on the server's thread while the worker decodes: a fast tokenizer used from two
        # threads at once can fail ("Already borrowed"), so they get a copy of their own (the model is shared).
        self._admission = dataclasses.replace(bundle.target, tokenizer=copy.deepcopy(bundle.target.tokenizer))
        self._stamp = policy_stamp(bundle)
        self._queue: queue.Queue[Handle | None] = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0
        self._in_flight: list[Handle] = []
        self._ids = count(1)
        self._width = 1  # requests decoded together today (no batching yet); a batched loop makes it max_batch
        self._admitting = True
        self._reload = threading.Event()
        self._reloaded = threading.Condition()
        self._reloads = 0
        self.reload_errors: list[str] = []
        self.mean_request_s = 1.0  # a running mean, for Retry-After
        self._worker = threading.Thread(target=self._run, name="ctxdraft-scheduler", daemon=True)
        self._worker.start()

    # -- what the server reads ---------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def batch_width(self) -> int:
        """Requests being decoded now (at most 1 until a batched loop replaces ``_execute``)."""
        return len(self._in_flight)

    @property
    def admitting(self) -> bool:
        return self._admitting

    @property
    def reloads(self) -> int:
        """How many times a new policy was swapped in."""
        return self._reloads

    # -- admission ---------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Everything about ``request`` that can fail before decoding, as a ``RequestError`` naming the field."""
        try:
            GenerationConfig(request.max_new_tokens, request.temperature, request.top_p, request.seed, request.stop)
        except CtxdraftError as e:
            raise RequestError(str(e), str(e).split(" ", 1)[0]) from None
        if not isinstance(request.draft, str) or not request.draft:
            raise RequestError(f"draft must be an arm name or 'auto', got {request.draft!r}", "draft")
        if request.draft != "auto" and request.draft not in self.bundle.arms:  # no model:<path> from a client
            raise RequestError(f"unknown draft {request.draft!r}; this server has: auto, {', '.join(self.bundle.arms)}",
                               "draft")
        elif self.bundle.log is not None and not self.bundle.info.get("policy"):
            raise RequestError("this server logs routed requests but its bundle has no policy; name an arm", "draft")
        target = self._admission
        prompt_ids = target.encode(self.prompt_text(request, target), chat=request.chat and request.messages is None)
        limit = target.max_context
        if len(prompt_ids) + request.max_new_tokens > limit:
            raise RequestError(f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                               f"exceeds the model's context of {limit} tokens", "max_new_tokens")

    def prompt_text(self, request: Request, target) -> str:
        """The text ``Bundle.generate`` receives: the prompt, or the messages rendered by ``target``'s chat
        template."""
        if request.messages is None:
            if not isinstance(request.prompt, str) or not request.prompt:
                raise RequestError("prompt must be a non-empty string", "prompt")
            return request.prompt
        if not request.messages:
            raise RequestError("messages must hold at least one message", "messages")
        tokenizer = target.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions", "messages")
        return tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Check and admit ``request``; raises ``RequestError``, ``QueueFull`` or ``NotAdmitting``."""
        self.check(request)
        with self._lock:
            if not self._admitting:
                raise NotAdmitting("the server is shutting down and admits no new requests")
            if self._queued >= self.max_queue + self._width - len(self._in_flight):
                raise QueueFull(f"{self._queued} requests are queued (the limit is {self.max_queue}); retry later",
                                retry_after_s=max(1.0, self.mean_request_s * (self._queued + 1) / self._width))
            handle = Handle(next(self._ids), request, on_event)
            self._queued += 1
            self._queue.put(handle)  # under the lock: never behind the sentinel stop() puts
        return handle

    # -- policy ------------------------------------------------------------------------------------
    def reload_policy(self, wait: bool = True, timeout: float | None = 60.0) -> bool:
        """Re-open the bundle between requests (the worker does it, after the request in flight). ``wait``: block
        until done and return whether a new bundle was swapped in (False: it could not be read; the old one
        stays, and ``reload_errors`` says why)."""
        with self._reloaded:
            before = (self._reloads, len(self.reload_errors))
            self._reload.set()
            self._queue.put(None)  # wake an idle worker
            if not wait:
                return True
            self._reloaded.wait_for(lambda: (self._reloads, len(self.reload_errors)) != before or
                                    not self._worker.is_alive(), timeout)
            return self._reloads > before[0]

    def _maybe_reload(self) -> None:
        changed = self.watch_s is not None and policy_stamp(self.bundle) != self._stamp
        if not (self._reload.is_set() or changed):
            return
        self._reload.clear()
        self._stamp = policy_stamp(self.bundle)
        try:
            fresh = reopen_bundle(self.bundle)
            fresh.router()  # load the new policy now, not in the next request
        except Exception as e:  # a half-written update: keep serving on the old policy, try again on the next change
            log.warning("could not reload the bundle's policy (%s); still routing with the previous one", e)
            with self._reloaded:
                self.reload_errors.append(str(e))
                self._reloaded.notify_all()
            return
        with self._reloaded:
            self.bundle = fresh
            self._reloads += 1
            self._reloaded.notify_all()
        log.warning("reloaded the bundle's policy from %s", fresh.path)

    # -- the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._maybe_reload()
            try:
                handle = self._queue.get(timeout=self.watch_s)
            except queue.Empty:
                continue
            if handle is None:
                if not self._admitting and self._queue.empty():
                    return
                continue
            with self._lock:
                self._queued -= 1
                self._in_flight.append(handle)
            try:
                self._execute(handle)
            finally:
                with self._lock:
                    self._in_flight.remove(handle)

    def _execute(self, handle: Handle) -> None:
        """Run one request to its end on the bundle in use now (the seam a batched loop replaces)."""
        if handle.cancelled:
            handle._emit(Event("error", error=Cancelled(f"request {handle.id} was cancelled")))
            return
        handle.started_at = time.perf_counter()
        bundle, request = self.bundle, handle.request  # this request keeps this bundle's policy to its end

        def on_text(piece: str) -> None:
            if handle.cancelled:
                raise _Stop
            if piece:
                handle._emit(Event("text", text=piece))

        try:
            result = bundle.generate(self.prompt_text(request, bundle.target), draft=request.draft,
                                     max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                                     top_p=request.top_p, seed=request.seed, chat=request.chat and request.messages is None,
                                     stop=list(request.stop), on_text=on_text)
        except _Stop:
            handle._emit(Event("error", error=Cancelled(f"request {handle.id} was cancelled")))
            return
        except CtxdraftError as e:
            handle._emit(Event("error", error=e))
            return
        except Exception as e:  # a bug must fail its request, not the server
            log.exception("request %d failed", handle.id)
            handle._emit(Event("error", error=e))
            return
        elapsed = time.perf_counter() - handle.started_at
        self.mean_request_s = 0.8 * self.mean_request_s + 0.2 * elapsed
        handle._emit(Event("done", result=result))

    # -- stopping ----------------------------------------------------------------------------------
    def stop(self, grace_s: float = 30.0) -> bool:
        """Admit nothing more, let queued and in-flight requests finish for up to ``grace_s`` seconds, cancel what
        is left, and end the worker. Log lines are written whole as each request ends, so nothing is left to
        flush. Returns whether everything finished within the grace period."""
        with self._lock:
            self._admitting = False
        self._queue.put(None)
        self._worker.join(timeout=grace_s)
        if not self._worker.is_alive():
            return True
        log.warning("stopping: cancelling %d request(s) still running after %.0f s",
                    self._queued + len(self._in_flight), grace_s)
        with self._lock:
            for handle in list(self._queue.queue) + self._in_flight:
                if handle is not None:
                    handle.cancel()
        self._queue.put(None)
        self._worker.join(timeout=10.0)
        return False
