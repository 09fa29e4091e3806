"""What a server hands the scheduler and gets back: a ``Request`` (in the library's terms, no HTTP), the ``Handle``
of a submitted one (streamed ``Event``s, ``cancel``, ``result``) and the errors of admission.

*Cancelled*: the client went away; ``Handle.cancel`` marks the request and whoever decodes it stops at the next
token boundary (``scheduler.py``).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..base.errors import CtxdraftError
from .bundle import GenerationResult

log = logging.getLogger(__name__)


class RequestError(CtxdraftError):
    """A request the bundle cannot serve; ``field`` names the request field at fault (library names:
    ``prompt``, ``messages``, ``draft``, ``max_new_tokens``, ...)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class QueueFull(CtxdraftError):
    """The queue holds ``max_queue`` requests already; try again after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotAdmitting(CtxdraftError):
    """The scheduler is stopping (or stopped) and admits nothing new."""


class Cancelled(CtxdraftError):
    """The request was cancelled before it finished."""


@dataclass
class Request:
    """One generation request, in the library's terms. ``messages`` (chat turns ``{"role", "content"}``) are
    rendered with the tokenizer's chat template; otherwise ``prompt`` is the text (``chat``: apply the template to
    it as one user turn, as ``ctxdraft generate`` does)."""

    prompt: str | None = None
    messages: list[dict] | None = None
    chat: bool = True
    draft: str = "auto"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Event:
    """What a handle reports: ``kind`` "text" (``text`` is the new piece), "done" (``result``) or "error"
    (``error``: a ``Cancelled``, a ``CtxdraftError`` or an unexpected exception)."""

    kind: str
    text: str = ""
    result: GenerationResult | None = None
    error: BaseException | None = None


class Handle:
    """A submitted request: its streamed events (``events()`` blocks; ``on_event``, given at submit, hears each one
    from the worker thread, e.g. ``loop.call_soon_threadsafe``), ``cancel()`` and ``result()``."""

    def __init__(self, request_id: int, request: Request, on_event: Callable[[Event], None] | None = None):
        self.id = request_id
        self.request = request
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.first_text_at: float | None = None
        self.finished_at: float | None = None
        self._events: queue.Queue[Event] = queue.Queue()
        self._on_event = on_event
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._final: Event | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop this request: dropped if still queued, stopped at the next token boundary if in flight."""
        self._cancelled.set()

    def events(self, timeout: float | None = None):
        """Yield events until the final "done" or "error" one; ``timeout`` bounds each wait (``queue.Empty``)."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.kind != "text":
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The finished generation; raises the request's error (``Cancelled``, ``RequestError``, ...)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._final.error is not None:
            raise self._final.error
        return self._final.result

    # -- the worker's side -------------------------------------------------------------------------
    def _emit(self, event: Event) -> None:
        if event.kind == "text" and self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        if event.kind != "text":
            self.finished_at = time.perf_counter()
            self._final = event
        self._events.put(event)
        if event.kind != "text":
            self._done.set()
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a listener that went away (a closed event loop) must not stop the worker
                log.debug("request %d: event listener failed", self.id, exc_info=True)
