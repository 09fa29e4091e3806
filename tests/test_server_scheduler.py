"""The server's scheduler: the queue limit (429), cancellation and disconnects, continuous batching (each row equal
to its own request), policy reloads (file change, SIGHUP) and the SIGTERM drain of a `ctxdraft serve` subprocess.
Tiny random models."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from server_helpers import PROMPT, TIMEOUT, client, server  # noqa: E402

from ctxdraft.selfdraft.serving.bundle import load_bundle  # noqa: E402
from ctxdraft.selfdraft.serving.requests import Cancelled, QueueFull, Request  # noqa: E402
from ctxdraft.selfdraft.serving.scheduler import Scheduler  # noqa: E402
from ctxdraft.selfdraft.serving.traffic import read_traffic  # noqa: E402


# --------------------------------------------------------------------------------------------------
# The scheduler: queue limit (429), cancellation, reloads
# --------------------------------------------------------------------------------------------------
def _long_request() -> Request:
    return Request(prompt="ab", chat=False, draft="none", max_new_tokens=240, temperature=1.0, seed=1)


def test_queue_limit_is_429_with_retry_after_and_a_disconnect_drops_the_queued_request(bundle_dir, tmp_path):
    log = tmp_path / "traffic.jsonl"
    bundle = load_bundle(bundle_dir, calibrate=False, log=log)
    gate = threading.Event()
    with server(bundle, max_queue=1, max_batch=1) as (url, scheduler):
        # The worker hears this request's first piece of text and waits at the gate: the batch (one row) is full.
        blocker = scheduler.submit(Request(prompt=PROMPT, chat=False, max_new_tokens=4),
                                   on_event=lambda event: gate.wait(TIMEOUT))
        with httpx.stream("POST", f"{url}/v1/completions", timeout=TIMEOUT,
                          json={"prompt": PROMPT, "max_tokens": 4, "stream": True}) as r:
            assert r.status_code == 200 and scheduler.queue_depth == 1
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=TIMEOUT)
            assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["error"]["type"] == "rate_limit_error"
        time.sleep(0.5)  # the client went away while its request was queued
        gate.set()
        assert blocker.result(timeout=TIMEOUT).routed
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=TIMEOUT)
        assert ok.status_code == 200
    assert len(read_traffic([log]).rows) == 2  # the blocker and the last one; the dropped request was never decoded


def test_a_client_that_gives_up_on_a_plain_request_cancels_it(bundle_dir, tmp_path):
    log = tmp_path / "traffic.jsonl"
    bundle = load_bundle(bundle_dir, calibrate=False, log=log)
    gate = threading.Event()
    with server(bundle) as (url, scheduler):
        blocker = scheduler.submit(Request(prompt=PROMPT, chat=False, max_new_tokens=4),
                                   on_event=lambda event: gate.wait(TIMEOUT))
        with pytest.raises(httpx.ReadTimeout):  # queued behind the blocker; the client stops waiting
            httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=1.0)
        time.sleep(1.0)  # the server looks for a disconnect every 0.5 s
        gate.set()
        blocker.result(timeout=TIMEOUT)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=TIMEOUT).is_success
    assert len(read_traffic([log]).rows) == 2  # the given-up request was dropped, never decoded nor logged


def test_cancel_stops_a_request_in_flight_and_drops_a_queued_one(trained_bundle):
    scheduler = Scheduler(load_bundle(trained_bundle, calibrate=False), max_queue=1, max_batch=1)
    try:
        running = scheduler.submit(_long_request())
        queued = scheduler.submit(_long_request())
        with pytest.raises(QueueFull):
            scheduler.submit(_long_request())
        first = next(running.events(timeout=TIMEOUT))
        assert first.kind == "text"
        queued.cancel()
        running.cancel()
        for handle in (running, queued):
            with pytest.raises(Cancelled):
                handle.result(timeout=TIMEOUT)
        assert queued.started_at is None  # never decoded
    finally:
        assert scheduler.stop(TIMEOUT)


def test_concurrent_requests_are_decoded_in_one_batch_each_equal_to_bundle_generate(trained_bundle):
    """Catches a scheduler that decodes one request at a time (width 1), rows whose tokens or text reach another
    row's handle, and a batched row that differs from its own single request."""
    from test_traffic import PROMPTS

    bundle = load_bundle(trained_bundle, calibrate=False)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(4)] + [PROMPT]
    expected = [bundle.generate(p, max_new_tokens=12, chat=False) for p in prompts]  # before the worker shares it
    gate = threading.Event()
    with server(bundle, max_batch=8) as (url, scheduler):
        # The worker waits at the gate on the blocker's first text, so the clients' requests queue up together.
        blocker = scheduler.submit(Request(prompt=PROMPT, chat=False, max_new_tokens=4),
                                   on_event=lambda event: gate.wait(TIMEOUT))
        outputs: dict[int, object] = {}

        def ask(i):
            outputs[i] = client(url).completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + TIMEOUT
        while scheduler.queue_depth < len(prompts):
            assert time.monotonic() < deadline, "the requests did not queue"
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(TIMEOUT)
        blocker.result(timeout=TIMEOUT)
        assert scheduler.max_width >= len(prompts)
        metrics = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
        assert "ctxdraft_batch_width 0.0" in metrics  # every row finished and freed
    for i, want in enumerate(expected):
        got = outputs[i]
        assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
        assert got.model_extra["ctxdraft"]["arm"] == want.arm


def test_a_batched_row_is_logged_as_bundle_generate_logs_it_and_streams_its_stop_cut_text(bundle_dir, tmp_path):
    """Catches a served row left out of the log or logged with other features, arm, trajectory or prompt than
    ``Bundle.generate`` writes, and streamed pieces that run past a stop string."""
    alone_log, served_log = tmp_path / "alone.jsonl", tmp_path / "served.jsonl"
    full = load_bundle(bundle_dir, calibrate=False, log=alone_log).generate(PROMPT, max_new_tokens=12, chat=False)
    with server(load_bundle(bundle_dir, calibrate=False, log=served_log)) as (url, _):
        client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
        stop = full.text[4:6]
        pieces = [ch.choices[0].text for ch in client(url).completions.create(
            model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], stream=True)]
    assert "".join(pieces) == full.text[: full.text.index(stop)]
    [alone], served = read_traffic([alone_log]).rows, read_traffic([served_log]).rows
    assert len(served) == 2
    same = ("format", "version", "bundle", "target", "pool", "prompt_len", "prompt_ids", "arm", "propensity",
            "greedy_arm", "explore")
    assert {k: served[0][k] for k in same} == {k: alone[k] for k in same}
    features, expected = served[0]["features"], alone["features"]  # hidden states of a batched forward: rounding
    assert features.keys() == expected.keys() and all(
        features[k] == (pytest.approx(v, abs=1e-4) if k == "hidden" else v) for k, v in expected.items())
    for key in ("new_tokens", "max_new_tokens", "temperature", "target_forwards", "trajectory", "accepted_per_position"):
        assert served[0]["measurement"][key] == alone["measurement"][key], key
    assert set(served[0]) == set(alone) and set(served[0]["measurement"]) == set(alone["measurement"])


def test_a_cancelled_row_frees_its_slot_while_the_others_finish(trained_bundle):
    """Catches a cancel that does not free the row (the queued request would wait for the other row to end) and
    one that stops the other rows of the batch."""
    scheduler = Scheduler(load_bundle(trained_bundle, calibrate=False), max_batch=2, max_queue=4)
    try:
        cancelled = scheduler.submit(_long_request())
        other = scheduler.submit(Request(prompt="ab", chat=False, draft="none", max_new_tokens=200, temperature=0))
        waiting = scheduler.submit(Request(prompt=PROMPT, chat=False, draft="lookup", max_new_tokens=4))
        for handle in (cancelled, other):
            assert next(handle.events(timeout=TIMEOUT)).kind == "text"
        assert scheduler.batch_width == 2 and scheduler.queue_depth == 1 and waiting.started_at is None
        cancelled.cancel()
        with pytest.raises(Cancelled):
            cancelled.result(timeout=TIMEOUT)
        assert len(waiting.result(timeout=TIMEOUT).token_ids) > 0
        assert len(other.result(timeout=TIMEOUT).token_ids) == 200
        assert waiting.finished_at < other.finished_at  # it took the cancelled row's slot, not the finished one's
    finally:
        assert scheduler.stop(TIMEOUT)


def test_a_streaming_client_that_disconnects_cancels_its_row(bundle_dir, tmp_path):
    """Catches a disconnect that leaves the row decoding to its end: it would hold its slot and be logged."""
    log = tmp_path / "traffic.jsonl"
    with server(load_bundle(bundle_dir, calibrate=False, log=log), max_batch=2) as (url, scheduler):
        # A plain (unlogged) row that slows every step down, so the streamed row cannot end before it is cancelled.
        pacer = scheduler.submit(_long_request(), on_event=lambda event: time.sleep(0.05))
        with httpx.stream("POST", f"{url}/v1/completions", timeout=TIMEOUT,
                          json={"prompt": "ab", "max_tokens": 240, "temperature": 1.0, "seed": 1, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
            assert scheduler.batch_width == 2
        deadline = time.monotonic() + TIMEOUT
        while scheduler.batch_width > 1:
            assert time.monotonic() < deadline, "the disconnected client's row is still decoding"
            time.sleep(0.02)
        assert not pacer.done
        pacer.cancel()
        with pytest.raises(Cancelled):
            pacer.result(timeout=TIMEOUT)
    assert not log.exists() or read_traffic([log]).rows == []  # cancelled rows are not logged


def test_a_row_in_flight_finishes_on_the_policy_it_started_with(bundle_dir, tmp_path):
    """Catches a reload that swaps the policy (and so the bundle its log line names) under a row already decoding,
    and one that never reaches the rows admitted after it."""
    log = tmp_path / "traffic.jsonl"
    scheduler = Scheduler(load_bundle(bundle_dir, calibrate=False, log=log), watch_s=None)
    try:
        old = scheduler.bundle
        info = json.loads((bundle_dir / "bundle.json").read_text())
        info["online"] = {"lineage": [], "updates": []}  # a new bundle hash, read at the reload below
        (bundle_dir / "bundle.json").write_text(json.dumps(info))
        reloads_seen: list[int] = []

        def on_event(event):  # on the worker: ask for a reload at the row's first text, then watch it land
            if event.kind == "text":
                if not reloads_seen:
                    scheduler.reload_policy(wait=False)
                reloads_seen.append(scheduler.reloads)

        first = scheduler.submit(Request(prompt=PROMPT, chat=False, draft="auto", max_new_tokens=40), on_event)
        assert first.result(timeout=TIMEOUT).routed
        assert reloads_seen[0] == 0 and reloads_seen[-1] == 1  # the new bundle came in while this row decoded
        assert scheduler.bundle is not old
        assert scheduler.submit(Request(prompt=PROMPT, chat=False, max_new_tokens=4)).result(timeout=TIMEOUT).routed
    finally:
        assert scheduler.stop(TIMEOUT)
    rows = read_traffic([log]).rows
    assert len(rows) == 2
    assert rows[0]["bundle"] == old._log_identity["bundle"] != rows[1]["bundle"]


def test_stop_drains_what_is_in_flight_then_admits_nothing(trained_bundle):
    from ctxdraft.selfdraft.serving.requests import NotAdmitting

    scheduler = Scheduler(load_bundle(trained_bundle, calibrate=False))
    handles = [scheduler.submit(Request(prompt=PROMPT, chat=False, max_new_tokens=6)) for _ in range(3)]
    assert scheduler.stop(TIMEOUT) is True
    assert all(len(h.result(timeout=0).token_ids) > 0 for h in handles)  # every admitted request finished
    with pytest.raises(NotAdmitting):
        scheduler.submit(Request(prompt=PROMPT, chat=False, max_new_tokens=2))


def test_stop_past_its_grace_cancels_the_request_in_flight(trained_bundle):
    scheduler = Scheduler(load_bundle(trained_bundle, calibrate=False))
    gate = threading.Event()
    handle = scheduler.submit(_long_request(), on_event=lambda event: gate.wait(TIMEOUT))
    while handle.first_text_at is None:  # the worker waits at the gate, mid-request
        time.sleep(0.01)
    threading.Timer(0.5, gate.set).start()
    assert scheduler.stop(0.1) is False
    with pytest.raises(Cancelled):
        handle.result(timeout=TIMEOUT)


def test_served_log_feeds_update_policy_and_the_server_routes_with_the_new_policy(bundle_dir, tmp_path):
    """The online loop: serve with --log, update-policy in place, the server picks the new bundle up."""
    import numpy as np
    from test_traffic import PROMPTS

    from ctxdraft.selfdraft.commands.update_policy import update_policy
    from ctxdraft.selfdraft.serving.bundle_info import bundle_hash

    log = tmp_path / "traffic.jsonl"
    bundle = load_bundle(bundle_dir, calibrate=False, log=log, explore=0.5)
    bundle.explore_rng = np.random.default_rng(0)
    with server(bundle, watch_s=0.05) as (url, scheduler):
        c = client(url)
        for i in range(12):
            c.completions.create(model="tiny", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=8, temperature=0)
        served = read_traffic([log]).rows
        assert len(served) == 12 and {r["bundle"] for r in served} == {bundle_hash(bundle)}
        result = update_policy(load_bundle(bundle_dir, calibrate=False), [log], force=True)
        assert result.replaced and result.path == bundle_dir
        deadline = time.monotonic() + TIMEOUT
        while scheduler.bundle.info.get("online") is None:
            assert time.monotonic() < deadline, "the updated policy was not picked up"
            time.sleep(0.02)
        c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    rows = read_traffic([log]).rows
    assert len(rows) == 13 and rows[-1]["bundle"] == bundle_hash(load_bundle(bundle_dir)) != rows[0]["bundle"]


def _drop_policy(bundle_dir):
    info = json.loads((bundle_dir / "bundle.json").read_text())
    info["policy"], info["default_arm"] = None, "lookup"
    (bundle_dir / "bundle.json").write_text(json.dumps(info))


def test_a_changed_policy_on_disk_is_reloaded_between_requests(bundle_dir, tmp_path):
    log = tmp_path / "traffic.jsonl"
    bundle = load_bundle(bundle_dir, calibrate=False, log=log)
    with server(bundle, watch_s=0.05) as (url, scheduler):
        c = client(url)
        before = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
        assert before.model_extra["ctxdraft"]["routed"]
        info = json.loads((bundle_dir / "bundle.json").read_text())
        info["online"] = {"lineage": [], "updates": []}  # what `update-policy --in-place` changes besides the policy
        (bundle_dir / "bundle.json").write_text(json.dumps(info))
        deadline = time.monotonic() + TIMEOUT
        while scheduler.reloads < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
        rows = read_traffic([log]).rows
        assert len(rows) == 2 and rows[0]["bundle"] != rows[1]["bundle"]  # the second request ran on the new bundle
        assert scheduler.bundle.info["online"] == {"lineage": [], "updates": []}


def test_reload_keeps_the_old_policy_when_the_new_one_cannot_be_read(bundle_dir):
    scheduler = Scheduler(load_bundle(bundle_dir, calibrate=False), watch_s=None)
    try:
        old = scheduler.bundle
        (bundle_dir / "bundle.json").write_text("{torn")
        assert scheduler.reload_policy() is False and scheduler.bundle is old and scheduler.reload_errors
        handle = scheduler.submit(Request(prompt=PROMPT, chat=False, max_new_tokens=3))
        assert handle.result(timeout=TIMEOUT).routed
    finally:
        scheduler.stop(TIMEOUT)


# --------------------------------------------------------------------------------------------------
# `ctxdraft serve` as a process: SIGHUP reloads, SIGTERM drains and exits 0
# --------------------------------------------------------------------------------------------------
def test_serve_process_reloads_on_sighup_and_drains_on_sigterm(bundle_dir, tmp_path):
    env = dict(os.environ, CTXDRAFT_NO_CALIBRATE="1", CTXDRAFT_DTYPE="float32", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", "from ctxdraft.cli.main import main; main()", "serve", "--bundle",
                             str(bundle_dir), "--port", "0", "--grace", "60"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "serve exited before listening"
            if "serving on " in line:
                url = line.split("serving on ")[1].split()[0].removesuffix("/v1")
        assert url and url.startswith("http://127.0.0.1:")
        c = client(url)
        assert c.completions.create(model="t", prompt=PROMPT, max_tokens=4, temperature=0).model_extra["ctxdraft"]["routed"]
        _drop_policy(bundle_dir)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while c.completions.create(model="t", prompt=PROMPT, max_tokens=2, temperature=0).model_extra["ctxdraft"]["routed"]:
            assert time.monotonic() < deadline, "the policy was not reloaded"
            time.sleep(0.1)
        # SIGTERM while a request is being streamed: it finishes, then the process exits 0.
        with httpx.stream("POST", f"{url}/v1/completions", timeout=TIMEOUT,
                          json={"prompt": "ab", "max_tokens": 200, "draft": "none", "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
