"""The OpenAI-compatible server's API: the real openai client against a real uvicorn server on 127.0.0.1
(completions, chat, streaming, metrics), httpx for malformed bodies, 400s naming the field, the API key, and the real
model once. Tiny random models; the scheduler's side is test_server_scheduler.py."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from server_helpers import PROMPT, TIMEOUT, client, server  # noqa: E402

from ctxdraft.selfdraft.serving.bundle import load_bundle  # noqa: E402


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
                      json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True, "return_token_ids": True}) as r:
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


@pytest.mark.integration
def test_real_model_greedy_chat_over_http_equals_bundle_generate():
    bundle = load_bundle(calibrate=False)  # the shipped bundle of SmolLM2-135M-Instruct
    prompt = "What is 17*23? Answer with the number and one sentence."
    with server(bundle) as (url, _):
        out = client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=24, temperature=0)
    expected = bundle.generate(prompt, max_new_tokens=24)
    assert out.choices[0].message.content == expected.text and out.usage.prompt_tokens == len(expected.prompt_ids)
