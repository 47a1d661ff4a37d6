"""Checking OpenAI request bodies field by field: every field is known, of the right type and in range,
or the request is refused with a message naming it (nothing is ignored silently)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .sampling import SamplingParams


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code or str(self.status)}}


# fields accepted and used, shared by both endpoints
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n", "user"}
COMPLETION_ONLY = {"prompt", "logprobs", "echo", "presence_penalty", "frequency_penalty"}
CHAT_ONLY = {"messages", "max_completion_tokens", "logprobs", "presence_penalty", "frequency_penalty"}
# fields OpenAI defines that lorakit serve does not implement: a clear 400 rather than silence
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias", "best_of",
               "suffix", "top_logprobs", "parallel_tool_calls", "audio", "modalities", "prediction", "store",
               "metadata", "reasoning_effort", "service_tier"}


@dataclass
class ParsedRequest:
    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    explicit_max: bool = False  # max_tokens given (checked against the context) or a default (clamped)
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None


def parse(body: Any, chat: bool, context: int) -> ParsedRequest:
    """The request's fields, checked; `context` bounds max_tokens when it is not given."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    allowed = COMMON | (CHAT_ONLY if chat else COMPLETION_ONLY)
    for key in body:
        if key in UNSUPPORTED or (key in COMMON | COMPLETION_ONLY | CHAT_ONLY and key not in allowed):
            if body[key] not in (None, False, [], {}):
                raise ApiError(400, f"{key!r} is not supported by lorakit serve", param=key, code="unsupported_field")
        elif key not in allowed:
            raise ApiError(400, f"unknown field {key!r}; known fields: {sorted(allowed)}", param=key,
                           code="unknown_field")
    model = _get(body, "model", str, required=True)
    if _get(body, "n", int, default=1) != 1:
        raise ApiError(400, "'n' other than 1 is not supported: send one request per completion", param="n",
                       code="unsupported_field")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _get(body, penalty, (int, float), default=0) != 0:
            raise ApiError(400, f"{penalty!r} other than 0 is not supported", param=penalty, code="unsupported_field")
    if _get(body, "echo", bool, default=False):
        raise ApiError(400, "'echo' is not supported", param="echo", code="unsupported_field")
    max_tokens = _get(body, "max_tokens", int, default=None)
    if chat and max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", int, default=None)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = float(_get(body, "temperature", (int, float), default=1.0))
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"temperature must be within [0, 2], got {temperature}", param="temperature")
    top_p = float(_get(body, "top_p", (int, float), default=1.0))
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be within (0, 1], got {top_p}", param="top_p")
    seed = _get(body, "seed", int, default=None)
    stop = _stop(body.get("stop"))
    logprobs = None
    if chat:
        if _get(body, "logprobs", bool, default=False):
            raise ApiError(400, "'logprobs' is supported on /v1/completions only", param="logprobs",
                           code="unsupported_field")
    else:
        logprobs = _get(body, "logprobs", int, default=None)
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise ApiError(400, f"logprobs must be within [0, 20], got {logprobs}", param="logprobs")
    stream = _get(body, "stream", bool, default=False)
    options = _get(body, "stream_options", dict, default={}) or {}
    unknown = set(options) - {"include_usage"}
    if unknown:
        raise ApiError(400, f"stream_options: unknown keys {sorted(unknown)}", param="stream_options")
    include_usage = bool(options.get("include_usage", False))
    default_max = context if chat else 16  # OpenAI's defaults: 16 for completions, up to the context for chat
    params = SamplingParams(max_tokens=max_tokens or default_max, temperature=temperature, top_p=top_p,
                            seed=seed, stop=stop, logprobs=logprobs)
    parsed = ParsedRequest(model, params, stream, include_usage, explicit_max=max_tokens is not None)
    if chat:
        parsed.messages = _messages(body.get("messages"))
    else:
        parsed.prompt = _prompt(body.get("prompt"))
    return parsed


def _get(body: dict, key: str, kind: type | tuple, required: bool = False, default: Any = None) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(400, f"{key!r} is required", param=key)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"{key!r} must be {names}, got {type(value).__name__}", param=key)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    return tuple(stops)


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise ApiError(400, "several prompts in one request are not supported: send one request per prompt",
                       param="prompt", code="unsupported_field")
    raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids", param="prompt")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's list of parts: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise ApiError(400, f"messages[{i}]: fields {sorted(extra)} are not supported", param="messages",
                           code="unsupported_field")
        out.append({"role": message["role"], "content": content})
    return out
