"""The OpenAI wire format: request models (checked strictly, so that a wrong type is a 400 naming its field),
their translation into the scheduler's ``Request``, response bodies and OpenAI-shaped errors.

Extensions: the request fields ``draft`` (an arm of the bundle, or ``auto`` for the policy) and
``return_token_ids`` (as vLLM names it) and the response object ``ctxdraft`` (``arm``, ``routed``,
``tokens_per_forward``, ``accepted_per_position``, and with ``return_token_ids`` the completion's ``token_ids``).
"""
from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..serving.bundle import GenerationResult
from ..serving.requests import Request

# The library's names for the fields the API calls otherwise.
API_FIELD = {"max_new_tokens": "max_tokens", "prompt": "prompt", "messages": "messages"}


class ProtocolError(Exception):
    """A request the server answers with an OpenAI-shaped error: ``status``, ``message``, ``param`` (the field)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Strict(BaseModel):
    # strict: "5" is not an int and true is not a number; unknown fields (user, logprobs=null, ...) are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    draft: str = "auto"
    return_token_ids: bool = False

    def request(self, default_max_tokens: int, **prompt) -> Request:
        if self.n != 1:
            raise ProtocolError(400, f"n must be 1 (this server returns one choice), got {self.n}", "n")
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        if max_tokens < 1:
            raise ProtocolError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Request(**prompt, draft=self.draft, max_new_tokens=max_tokens, temperature=self.temperature,
                       top_p=self.top_p, seed=self.seed, stop=stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions

    def to_request(self) -> Request:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ProtocolError(400, f"prompt must be one string (a list of {len(prompt)} is a batch; send them "
                                    "as separate requests)", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise ProtocolError(400, "prompt must be a non-empty string", "prompt")
        return self.request(16, prompt=prompt, chat=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]  # a string, or text parts (joined); images and audio are not understood

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage]

    def to_request(self) -> Request:
        if not self.messages:
            raise ProtocolError(400, "messages must hold at least one message", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        return self.request(128, messages=messages)


def parse(model: type[_Strict], raw: bytes) -> _Strict:
    """``raw`` as a ``model``; malformed JSON, a body that is not an object or a field of the wrong type or
    missing is a 400 ``ProtocolError`` naming the field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ProtocolError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"] if not _is_union_branch(p)]
        param = ".".join(loc) if loc else None
        what = "is required" if first["type"] == "missing" else first["msg"].lower()
        raise ProtocolError(400, f"{param or 'body'}: {what}", param) from None


def _is_union_branch(part) -> bool:
    """Pydantic names the union member it tried (``str``, ``list[str]``) in the error location; the field is enough."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list[str]"} or part.startswith(
        ("list[", "function-", "literal[")))


def request_error(e, param: str | None) -> ProtocolError:
    """A scheduler ``RequestError`` as a 400 naming the API's field."""
    return ProtocolError(400, str(e).replace("max_new_tokens", "max_tokens"), API_FIELD.get(param, param))


# ----------------------------------------------------------------------------------------------
# Responses


def finish_reason(result: GenerationResult, request: Request) -> str:
    return "length" if len(result.token_ids) >= request.max_new_tokens else "stop"


def usage(result: GenerationResult) -> dict:
    prompt, completion = len(result.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def ctxdraft_info(result: GenerationResult, token_ids: bool = False) -> dict:
    """The response's ``ctxdraft`` object; ``token_ids``: with the completion's token ids (EOS excluded)."""
    s = result.stats
    info = {"arm": result.arm, "routed": result.routed, "tokens_per_forward": round(s.tokens_per_forward, 4),
            "accepted_per_position": list(s.accepted_per_position), "target_forwards": s.target_forwards}
    return {**info, "token_ids": list(result.token_ids)} if token_ids else info


def completion_body(rid: str, model: str, result: GenerationResult, request: Request, chat: bool,
                    token_ids: bool = False) -> dict:
    reason = finish_reason(result, request)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(result), "ctxdraft": ctxdraft_info(result, token_ids)}


def chunk_body(rid: str, model: str, chat: bool, text: str | None = None, role: bool = False,
               reason: str | None = None, extra: dict | None = None) -> dict:
    """One streamed chunk: a text piece (``text``), the chat's opening role, or the last one (``reason``)."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], **(extra or {})}


def sse(data) -> str:
    """One server-sent event: ``data: <json>`` (or the closing ``[DONE]``) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
