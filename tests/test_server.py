"""The OpenAI-compatible server: the real openai client against a real uvicorn server on 127.0.0.1 (completions,
chat, streaming, errors), httpx for malformed bodies, the scheduler's queue limit and cancellation, policy
reloads (file change, SIGHUP) and the SIGTERM drain of a `ctxdraft serve` subprocess. Tiny random models."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402

from ctxdraft.selfdraft.entrypoints.openai_server import build_app  # noqa: E402
from ctxdraft.selfdraft.serving.bundle import load_bundle  # noqa: E402
from ctxdraft.selfdraft.serving.requests import Cancelled, QueueFull, Request  # noqa: E402
from ctxdraft.selfdraft.serving.scheduler import Scheduler  # noqa: E402
from ctxdraft.selfdraft.serving.traffic import read_traffic  # noqa: E402

PROMPT = "abc abc 3 abc abc"
TIMEOUT = 60  # every wait in this file is bounded


@pytest.fixture(scope="module")
def trained_bundle(tiny_model_dir, tmp_path_factory):
    from test_traffic import train_tiny_bundle

    return train_tiny_bundle(tiny_model_dir, tmp_path_factory.mktemp("serve") / "bundle")


@pytest.fixture()
def bundle_dir(trained_bundle, tmp_path):
    return shutil.copytree(trained_bundle, tmp_path / "bundle")


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


@pytest.fixture()
def served(trained_bundle):
    bundle = load_bundle(trained_bundle, calibrate=False)
    with server(bundle) as (url, scheduler):
        yield url, scheduler, bundle


# --------------------------------------------------------------------------------------------------
# The openai client: completions, chat, streaming
# --------------------------------------------------------------------------------------------------
def test_greedy_completion_over_http_equals_bundle_generate(served):
    url, scheduler, bundle = served
    expected = bundle.generate(PROMPT, max_new_tokens=12, chat=False)
    out = client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected.text
    assert out.usage.prompt_tokens == len(expected.prompt_ids) and out.usage.completion_tokens == len(expected.token_ids)
    assert out.choices[0].finish_reason == ("length" if len(expected.token_ids) == 12 else "stop")
    info = out.model_extra["ctxdraft"]
    assert info["arm"] == expected.arm and info["routed"] is True
    assert info["tokens_per_forward"] == pytest.approx(expected.stats.tokens_per_forward, abs=1e-3)
    assert "token_ids" not in info  # only when asked for
    named = client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                           extra_body={"draft": "lookup", "return_token_ids": True})
    assert named.choices[0].text == expected.text and named.model_extra["ctxdraft"]["arm"] == "lookup"
    assert named.model_extra["ctxdraft"]["token_ids"] == expected.token_ids


def test_chat_uses_the_chat_template_and_equals_bundle_generate(served):
    url, scheduler, bundle = served
    expected = bundle.generate(PROMPT, max_new_tokens=10)  # chat=True: the template around one user turn
    out = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=10, temperature=0)
    assert out.choices[0].message.content == expected.text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(expected.prompt_ids)
    parts = client(url).chat.completions.create(model="tiny", max_tokens=10, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": PROMPT[:5]}, {"type": "text", "text": PROMPT[5:]}]}])
    assert parts.choices[0].message.content == expected.text


def test_streaming_pieces_add_up_to_the_whole_and_end_with_done(served):
    url, _, bundle = served
    expected = bundle.generate(PROMPT, max_new_tokens=16, chat=False).text
    c = client(url)
    pieces = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                                                 temperature=0, stream=True)]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
    chat = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=16,
                                          temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chat if ch.choices) == bundle.generate(PROMPT, max_new_tokens=16).text
    assert chat[-1].usage.completion_tokens > 0
    with httpx.stream("POST", f"{url}/v1/completions", timeout=TIMEOUT,
                      json={"prompt": PROMPT, "max_tokens": 4, "stream": True, "return_token_ids": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    last = json.loads(lines[-2][len("data: "):])["ctxdraft"]
    assert last["token_ids"] == bundle.generate(PROMPT, max_new_tokens=4, chat=False).token_ids


def test_stop_strings_seed_and_sampling_fields(served):
    url, _, bundle = served
    full = bundle.generate(PROMPT, max_new_tokens=16, chat=False).text
    stop = full[3:5]
    out = client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"
    a, b = (client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_models_health_and_metrics(served):
    url, _, _ = served
    assert [m.id for m in client(url).models.list().data] == ["tiny"]
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["status"] == "ok"
    client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    for name in ("ctxdraft_requests_total", "ctxdraft_generated_tokens_total{arm=", "ctxdraft_tokens_per_forward_bucket",
                 "ctxdraft_queue_depth", "ctxdraft_batch_width", "ctxdraft_time_to_first_token_seconds_bucket",
                 "ctxdraft_request_latency_seconds_count"):
        assert name in text, name
    assert 'ctxdraft_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text


# --------------------------------------------------------------------------------------------------
# Bad input: 400 naming the field, 401
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 10_000}, "max_tokens"),  # beyond the tiny model's 256-token context
    ({"prompt": PROMPT, "max_tokens": "5"}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": True}, "temperature"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "draft": "nope"}, "draft"),
    ({"prompt": PROMPT, "draft": "model:/etc"}, "draft"),  # a client cannot make the server load a model
    ({"prompt": PROMPT, "n": 2}, "n"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": PROMPT, "stop": [1]}, "stop"),
])
def test_bad_completion_fields_are_400_naming_the_field(served, body, param):
    url, scheduler, _ = served
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", "{\"prompt\": \"\xff\"}".encode("latin-1")])
def test_malformed_bodies_are_400(served, raw):
    url, _, _ = served
    r = httpx.post(f"{url}/v1/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "error" in r.json()


def test_chat_errors_through_the_openai_client(served):
    url, _, _ = served
    c = client(url)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}], max_tokens=4)
    assert e.value.body["param"].startswith("messages")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, extra_body={"draft": "exit@99"})
    assert e.value.body["param"] == "draft"


def test_api_key_is_required_when_set(trained_bundle):
    bundle = load_bundle(trained_bundle, calibrate=False)
    with server(bundle, api_key="sekrit") as (url, _):
        for key in ("wrong", "none"):
            with pytest.raises(openai.AuthenticationError):
                client(url, key).completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT}, timeout=TIMEOUT).status_code == 401
        assert client(url, "sekrit").completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200


def test_cli_serve_refuses_bad_options_before_loading_anything(tmp_path):
    from cli_helpers import assert_clean_error
    from click.testing import CliRunner

    from ctxdraft.cli.main import main

    runner = CliRunner()
    assert_clean_error(runner.invoke(main, ["serve", "--max-batch", "0"]), "max_batch (--max-batch) must be >= 1")
    assert_clean_error(runner.invoke(main, ["serve", "--max-queue", "-1"]), "max_queue (--max-queue) must be >= 0")
    assert_clean_error(runner.invoke(main, ["serve", "--explore", "0.1"]), "go with --log FILE")
    assert_clean_error(runner.invoke(main, ["serve", "--port", "70000"]), "port must be <= 65535")
    assert_clean_error(runner.invoke(main, ["serve", "--log", str(tmp_path / "no" / "t.jsonl")]), "does not exist")


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


@pytest.mark.integration
def test_real_model_greedy_chat_over_http_equals_bundle_generate():
    bundle = load_bundle(calibrate=False)  # the shipped bundle of SmolLM2-135M-Instruct
    prompt = "What is 17*23? Answer with the number and one sentence."
    with server(bundle) as (url, _):
        out = client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=24, temperature=0)
    expected = bundle.generate(prompt, max_new_tokens=24)
    assert out.choices[0].message.content == expected.text and out.usage.prompt_tokens == len(expected.prompt_ids)
