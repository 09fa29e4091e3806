"""``ctxdraft serve``: an OpenAI-compatible HTTP server on FastAPI + uvicorn over ``serving.scheduler``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending
in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Request parsing and the
wire format are ``protocol.py``; admission, queueing, decoding, cancellation and policy reloads are the
scheduler's (continuous batching: one ``BatchDecoder`` of up to ``--max-batch`` rows).

Signals: SIGHUP reloads the bundle's policy (so does a change of its files on disk); SIGTERM or SIGINT stop
admitting (new connections are refused, new requests get 503), let requests in flight finish within the grace
period, and exit 0.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..base import checks
from ..base.errors import CtxdraftError
from ..commands.generate import check_log_options
from ..serving.bundle import GenerationResult, load_bundle
from ..serving.requests import Cancelled, NotAdmitting, QueueFull, RequestError
from ..serving.scheduler import Scheduler
from . import protocol
from .protocol import ChatRequest, CompletionRequest, ProtocolError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class ServeConfig:
    bundle_dir: str | None = None  # None: the shipped default bundle
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    dtype: str = "auto"
    calibrate: bool | None = None
    log: str | None = None  # traffic log of routed requests (update-policy's input)
    explore: float = 0.0
    api_key: str | None = None
    grace_s: float = 30.0  # how long SIGTERM waits for requests in flight
    watch_s: float | None = 1.0  # how often the bundle's policy files are checked for a change (None: SIGHUP only)

    def validate(self) -> None:
        checks.text("host", self.host)
        checks.integer("port", self.port, minimum=0, maximum=65535)
        checks.number("grace_s", self.grace_s, minimum=0.0)
        checks.integer("max_batch (--max-batch)", self.max_batch, minimum=1)
        checks.integer("max_queue (--max-queue)", self.max_queue, minimum=0)
        checks.number("explore (--explore)", self.explore, minimum=0.0, maximum=1.0)
        if self.api_key is not None:
            checks.text("api_key", self.api_key)
        check_log_options("auto", self.log, False, self.explore)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers can live in one process)."""

    def __init__(self, scheduler: Scheduler):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ctxdraft_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("ctxdraft_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.tokens = Counter("ctxdraft_generated_tokens", "Generated tokens, by arm", ["arm"], registry=r)
        self.forwards = Counter("ctxdraft_target_forwards", "Target forwards, by arm", ["arm"], registry=r)
        self.drafted = Counter("ctxdraft_drafted_tokens", "Draft tokens proposed, by arm", ["arm"], registry=r)
        self.accepted = Counter("ctxdraft_accepted_tokens", "Draft tokens accepted, by arm", ["arm"], registry=r)
        self.tokens_per_forward = Histogram("ctxdraft_tokens_per_forward", "Tokens per target forward of a request, "
                                            "by arm", ["arm"], buckets=(1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8), registry=r)
        self.acceptance = Histogram("ctxdraft_acceptance", "Accepted / drafted tokens of a request, by arm", ["arm"],
                                    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.ttft = Histogram("ctxdraft_time_to_first_token_seconds", "From admission to the first text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("ctxdraft_request_latency_seconds", "From admission to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        Gauge("ctxdraft_queue_depth", "Requests waiting", registry=r).set_function(lambda: scheduler.queue_depth)
        Gauge("ctxdraft_batch_width", "Requests decoded now", registry=r).set_function(lambda: scheduler.batch_width)
        Gauge("ctxdraft_policy_reloads", "Policies swapped in", registry=r).set_function(lambda: scheduler.reloads)

    def finished(self, handle, result: GenerationResult) -> None:
        s, arm = result.stats, result.arm
        self.prompt_tokens.inc(len(result.prompt_ids))
        self.tokens.labels(arm).inc(len(result.token_ids))
        self.forwards.labels(arm).inc(s.target_forwards)
        self.drafted.labels(arm).inc(s.drafted_tokens)
        self.accepted.labels(arm).inc(s.accepted_tokens)
        self.tokens_per_forward.labels(arm).observe(s.tokens_per_forward)
        if s.drafted_tokens:
            self.acceptance.labels(arm).observe(s.acceptance_rate)
        if handle.first_text_at is not None:
            self.ttft.observe(handle.first_text_at - handle.submitted_at)
        self.latency.observe(handle.finished_at - handle.submitted_at)


class _CountRequests:
    """ASGI middleware counting answered requests by endpoint and status (499: the client went away first)."""

    ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        status = {}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = scope["path"] if scope["path"] in self.ENDPOINTS else "other"
            self.counter.labels(endpoint, str(status.get("code", 499))).inc()


def _error_response(e: ProtocolError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(scheduler: Scheduler, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over ``scheduler``; ``api_key``: the bearer token every /v1 request must carry."""
    metrics = Metrics(scheduler)
    app = FastAPI(title="ctxdraft", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    app.add_middleware(_CountRequests, counter=metrics.requests)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ProtocolError(401, "missing or wrong API key (send it as 'Authorization: Bearer KEY')",
                                kind="authentication_error")

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, e: ProtocolError):
        return _error_response(e)

    @app.get("/health")
    async def health():
        if not scheduler.admitting:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok", "queue_depth": scheduler.queue_depth, "batch_width": scheduler.batch_width}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "ctxdraft"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        return await _generate(request, protocol.parse(CompletionRequest, await request.body()), chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        return await _generate(request, protocol.parse(ChatRequest, await request.body()), chat=True)

    async def _generate(http: Request, body, chat: bool):
        request = body.to_request()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            handle = scheduler.submit(request, on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except RequestError as e:
            raise protocol.request_error(e, e.field) from None
        except QueueFull as e:
            raise ProtocolError(429, str(e), kind="rate_limit_error",
                                headers={"Retry-After": str(int(e.retry_after_s + 0.999))}) from None
        except NotAdmitting as e:
            raise ProtocolError(503, str(e), kind="server_error") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        model = body.model or model_name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(handle, events, rid, model, chat, include_usage, body.return_token_ids),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        handle.cancel()
                    continue
                if event.kind != "text":
                    break
        except asyncio.CancelledError:
            handle.cancel()
            raise
        if event.kind == "error":
            raise _failure(event.error)
        metrics.finished(handle, event.result)
        return protocol.completion_body(rid, model, event.result, request, chat, body.return_token_ids)

    async def _stream(handle, events: asyncio.Queue, rid: str, model: str, chat: bool, include_usage: bool,
                      token_ids: bool):
        try:
            if chat:
                yield protocol.sse(protocol.chunk_body(rid, model, chat, role=True))
            while True:
                event = await events.get()
                if event.kind == "text":
                    yield protocol.sse(protocol.chunk_body(rid, model, chat, text=event.text))
                    continue
                if event.kind == "error":
                    failure = _failure(event.error)
                    yield protocol.sse(failure.body())
                else:
                    result = event.result
                    metrics.finished(handle, result)
                    yield protocol.sse(protocol.chunk_body(rid, model, chat, reason=protocol.finish_reason(
                        result, handle.request), extra={"ctxdraft": protocol.ctxdraft_info(result, token_ids)}))
                    if include_usage:
                        yield protocol.sse({**protocol.chunk_body(rid, model, chat), "choices": [],
                                            "usage": protocol.usage(result)})
                yield protocol.sse("[DONE]")
                return
        finally:  # the client went away (the response task is cancelled) or the stream ended: free the row
            if not handle.done:
                handle.cancel()

    return app


def _failure(error: BaseException) -> ProtocolError:
    if isinstance(error, Cancelled):
        return ProtocolError(499, str(error), kind="cancelled")
    if isinstance(error, RequestError):
        return protocol.request_error(error, error.field)
    if isinstance(error, CtxdraftError):
        return ProtocolError(400, str(error))
    return ProtocolError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")


class _Server(uvicorn.Server):
    """uvicorn's server with ctxdraft's signals: SIGTERM/SIGINT drain and exit 0 (uvicorn would re-raise the
    signal after its graceful shutdown), SIGHUP reloads the policy."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    @contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_exit(self, sig, frame) -> None:
        log.warning("signal %d: admitting nothing more, finishing requests in flight", sig)
        self.force_exit = self.should_exit and sig == signal.SIGINT  # a second Ctrl+C: stop now
        self.should_exit = True

    def _on_hup(self, sig, frame) -> None:
        self.scheduler.reload_policy(wait=False)


def serve(config: ServeConfig, ready=None) -> None:
    """What ``ctxdraft serve`` does: open the bundle, load the model (and policy) before listening, serve until
    SIGTERM/SIGINT, then drain within ``config.grace_s``. ``ready(host, port)`` hears when it listens."""
    config.validate()
    bundle = load_bundle(config.bundle_dir, dtype=config.dtype, calibrate=config.calibrate, log=config.log,
                         explore=config.explore)
    bundle.check_target(bundle.target)  # load the model and the policy now: the first request should not wait for them
    bundle.router()
    scheduler = Scheduler(bundle, max_batch=config.max_batch, max_queue=config.max_queue, watch_s=config.watch_s)
    name = bundle.info["target"].get("name") or "ctxdraft"
    app = build_app(scheduler, name, config.api_key)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(scheduler.stop, config.grace_s)

    app.router.lifespan_context = lifespan
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", lifespan="on",
                        timeout_graceful_shutdown=config.grace_s)
    server = _Server(uv, scheduler)
    if ready is not None:
        threading.Thread(target=_announce, args=(server, ready), daemon=True).start()
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind; say so in one line instead
        if server.started:
            raise
    finally:
        scheduler.stop(0.0 if not scheduler.admitting else config.grace_s)
    if not server.started:
        raise CtxdraftError(f"could not listen on {config.host}:{config.port} (the port is in use, or the address is "
                            "not one of this machine's)")


def _announce(server: uvicorn.Server, ready) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        sockets = [s for srv in server.servers for s in srv.sockets]
        host, port = sockets[0].getsockname()[:2] if sockets else (server.config.host, server.config.port)
        ready(host, port)
