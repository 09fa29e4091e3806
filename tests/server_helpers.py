"""What the server tests share: a real uvicorn server on 127.0.0.1 in a thread and the openai client (the tiny
trained bundle is ``trained_bundle`` / ``bundle_dir`` in conftest.py). Imported by test_server.py (the API) and
test_server_scheduler.py (queueing, batching, reloads, SIGTERM)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402

from ctxdraft.selfdraft.entrypoints.openai_server import build_app  # noqa: E402
from ctxdraft.selfdraft.serving.scheduler import Scheduler  # noqa: E402

PROMPT = "abc abc 3 abc abc"
TIMEOUT = 60  # every wait in the server tests is bounded


@contextmanager
def server(bundle, api_key=None, **scheduler_kw):
    """A real uvicorn server on 127.0.0.1 (a free port) in a background thread; stopped on exit."""
    scheduler = Scheduler(bundle, **scheduler_kw)
    app = build_app(scheduler, "tiny", api_key)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", scheduler
    finally:
        srv.should_exit = True
        thread.join(TIMEOUT)
        scheduler.stop(5.0)
        assert not thread.is_alive()


def client(url, api_key="none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)
