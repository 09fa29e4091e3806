"""The scheduler a server talks to: admission, a bounded queue, one worker thread driving a continuous batch,
streamed deltas, cancellation, a graceful stop and policy reloads. No HTTP here (``entrypoints/`` parses requests
and speaks the protocol).

The worker owns one ``BatchDecoder`` (``drafting/batch_decoding.py``, up to ``max_batch`` rows): at each step
boundary it admits queued requests into free rows (FIFO; each row built by ``batch.prepare_row``, so routed,
encoded and stop-checked as ``Bundle.generate`` does), runs one ``step()`` (one target forward for every row),
streams each row's new tokens to its ``Handle`` as text deltas, and turns finished rows into
``GenerationResult``s (``batch.row_result``: stop strings cut, routed rows appended to the traffic log).

Requests, handles and admission errors are ``requests.py``. Terms. *Queued*: admitted, waiting for a row (at most
``max_queue`` beyond the free rows; one more is ``QueueFull``). *In flight*: a row of the batch. *Cancelled*: the
client went away; a queued request is dropped, a row in flight is cancelled at the next step boundary
(``BatchDecoder.cancel`` frees its slot and cache) and is not logged.

Policy reloads: ``reload_policy()`` (a server calls it on SIGHUP) and a changed ``bundle.json`` or policy file on
disk (polled between steps, e.g. after ``ctxdraft update-policy --in-place``) open the bundle anew, sharing the
loaded model and drafts, and swap it in between steps: a row keeps the bundle (and so the policy) it was admitted
with, new rows get the new one.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass
from itertools import count
from typing import Callable

from ..base import checks
from ..base.errors import CtxdraftError
from ..base.layout import BUNDLE_FILE
from ..drafting.batch_decoding import BatchDecoder
from ..drafting.decoding import GenerationConfig
from . import traffic
from .batch import BatchRow, prepare_row, row_result
from .bundle import Bundle, load_bundle, text_streamer
from .requests import Cancelled, Event, Handle, NotAdmitting, QueueFull, Request, RequestError

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A request decoded as a row of the batch: its handle, row and text streamer."""

    handle: Handle
    row: BatchRow
    on_tokens: Callable[[list[int]], None]
    cancelling: bool = False


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


def pin_log_identity(bundle: Bundle) -> None:
    """Hash a logging bundle's files now, while they are the ones it loaded: computed at its first log line, the
    hash would name an in-place update written meanwhile (rows in flight are logged with the bundle they started
    on)."""
    if bundle.log is not None:
        traffic.log_identity(bundle)


class Scheduler:
    """Admits requests into a bounded queue and decodes them as rows of one continuous batch on one worker thread
    (see the module docstring). ``max_batch``: the most requests decoded together; ``max_queue``: the most waiting
    beyond the free rows; ``watch_s``: how often the worker checks the bundle's policy on disk (None: never;
    ``reload_policy`` still works)."""

    def __init__(self, bundle: Bundle, max_batch: int = 8, max_queue: int = 64, watch_s: float | None = 1.0):
        self.max_batch = checks.integer("max_batch", max_batch, minimum=1)
        self.max_queue = checks.integer("max_queue", max_queue, minimum=0)
        if watch_s is not None:
            checks.number("watch_s", watch_s, above=0.0)
        self.watch_s = watch_s
        self.bundle = bundle
        pin_log_identity(bundle)
        # Admission checks tokenize on the server's thread while the worker decodes: a fast tokenizer used from two
        # threads at once can fail ("Already borrowed"), so they get a copy of their own (the model is shared).
        self._admission = dataclasses.replace(bundle.target, tokenizer=copy.deepcopy(bundle.target.tokenizer))
        self._stamp = policy_stamp(bundle)
        self._queue: queue.Queue[Handle | None] = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0
        self._in_flight: list[Handle] = []
        self._ids = count(1)
        self.max_width = 0  # the most rows decoded together so far
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
        """Requests being decoded now: the rows of the batch."""
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
            if self._queued >= self.max_queue + self.max_batch - len(self._in_flight):
                raise QueueFull(f"{self._queued} requests are queued (the limit is {self.max_queue}); retry later",
                                retry_after_s=max(1.0, self.mean_request_s * (self._queued + 1) / self.max_batch))
            handle = Handle(next(self._ids), request, on_event)
            self._queued += 1
            self._queue.put(handle)  # under the lock: never behind the sentinel stop() puts
        return handle

    # -- policy ------------------------------------------------------------------------------------
    def reload_policy(self, wait: bool = True, timeout: float | None = 60.0) -> bool:
        """Re-open the bundle between steps (the worker does it; rows in flight keep the old one). ``wait``: block
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
            pin_log_identity(fresh)
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
        bundle = self.bundle
        decoder = bundle.batch_decoder(self.max_batch)
        rows: dict[int, _InFlight] = {}
        last_watch = 0.0
        while True:
            if self._reload.is_set() or self.watch_s is not None and time.monotonic() - last_watch >= self.watch_s:
                last_watch = time.monotonic()
                self._maybe_reload()
            self._admit(decoder, rows, wait=not rows)
            if not rows:
                if not self._admitting and self._queue.empty():
                    return
                continue
            try:
                self._step(decoder, rows)
            except Exception as e:  # a bug must fail its requests, not the server; the batch starts afresh
                log.exception("a decoding step failed; failing its %d request(s)", len(rows))
                for entry in rows.values():
                    self._end(entry, Event("error", error=e))
                rows.clear()
                decoder = bundle.batch_decoder(self.max_batch)

    def _admit(self, decoder: BatchDecoder, rows: dict[int, _InFlight], wait: bool) -> None:
        """Move queued requests into free rows (FIFO), each routed by the bundle in use now; ``wait``: block for the
        first one (up to ``watch_s``)."""
        while len(rows) < self.max_batch:
            try:
                handle = self._queue.get(timeout=self.watch_s) if wait else self._queue.get_nowait()
            except queue.Empty:
                return
            wait = False
            if handle is None:  # a wake-up (a reload, a stop)
                continue
            with self._lock:  # queued -> in flight at once: admission never sees a free slot that is being filled
                self._queued -= 1
                self._in_flight.append(handle)
            if handle.cancelled:
                self._fail(handle, Cancelled(f"request {handle.id} was cancelled"))
                continue
            handle.started_at = time.perf_counter()
            bundle, request = self.bundle, handle.request  # this row keeps this bundle's policy to its end
            try:
                settings = dict(prompt=self.prompt_text(request, bundle.target), draft=request.draft,
                                max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                                top_p=request.top_p, seed=request.seed, stop=list(request.stop),
                                chat=request.chat and request.messages is None)
                row, batch_request = prepare_row(bundle, settings)
            except CtxdraftError as e:
                self._fail(handle, e)
                continue
            if batch_request is None:
                self._fail(handle, RequestError(row.error))
                continue
            on_tokens = text_streamer(bundle.target.tokenizer, lambda piece, h=handle: self._text(h, piece),
                                      row.config.stop)
            rows[decoder.add(batch_request)] = _InFlight(handle, row, on_tokens)

    @staticmethod
    def _text(handle: Handle, piece: str) -> None:
        if piece and not handle.cancelled:
            handle._emit(Event("text", text=piece))

    def _step(self, decoder: BatchDecoder, rows: dict[int, _InFlight]) -> None:
        """Cancel the rows whose client went away, run one step, stream its tokens, finish the rows that ended."""
        for row_id, entry in rows.items():
            if entry.handle.cancelled and not entry.cancelling:
                entry.cancelling = True
                decoder.cancel(row_id)
        self.max_width = max(self.max_width, sum(not entry.cancelling for entry in rows.values()))
        out = decoder.step()
        for row_id, new_ids in out.new_tokens.items():
            rows[row_id].on_tokens(new_ids)
        for row_id, outcome in out.finished.items():
            entry = rows.pop(row_id)
            if outcome.cancelled or entry.handle.cancelled:
                self._end(entry, Event("error", error=Cancelled(f"request {entry.handle.id} was cancelled")))
                continue
            entry.row.outcome, entry.row.error = outcome, outcome.error
            if outcome.error is not None:
                self._end(entry, Event("error", error=RequestError(outcome.error)))
                continue
            try:
                result = row_result(entry.row)
            except Exception as e:  # a bug must fail its request, not the others
                log.exception("request %d failed", entry.handle.id)
                self._end(entry, Event("error", error=e))
                continue
            self.mean_request_s = 0.8 * self.mean_request_s + 0.2 * (time.perf_counter() - entry.handle.started_at)
            self._end(entry, Event("done", result=result))

    def _end(self, entry: _InFlight, event: Event) -> None:
        with self._lock:
            self._in_flight.remove(entry.handle)
        entry.handle._emit(event)

    def _fail(self, handle: Handle, error: Exception) -> None:
        """End a request taken from the queue before it became a row."""
        with self._lock:
            self._in_flight.remove(handle)
        handle._emit(Event("error", error=error))

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
