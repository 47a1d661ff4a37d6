"""The HTTP side of `lorakit serve`: OpenAI's completions and chat endpoints, vLLM's adapter endpoints,
health and Prometheus metrics, on FastAPI. Requests go to the engine thread; their tokens come back
through an asyncio queue per request, streamed as server-sent events or collected into one response."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LorakitError
from .engine import Delta, Engine, Failed, Finished, QueueFull, Request
from .protocol import ApiError, ParsedRequest, parse
from .registry import AdapterInUse

DISCONNECT_POLL_S = 0.5


def create_app(engine: Engine, base_name: str, api_key: str | None = None) -> FastAPI:
    """The ASGI app; the engine thread starts and stops with the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    registry, metrics = engine.registry, engine.metrics
    created = int(time.time())

    @app.middleware("http")
    async def check_key(request: HttpRequest, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                       "authentication_error", "invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(ApiError(exc.status_code, str(exc.detail), kind))

    @app.get("/health")
    async def health() -> Response:
        if not engine.thread.is_alive():
            return _error(ApiError(503, "the engine is not running", "server_error"))
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.adapters_loaded.set(len(registry.loaded))
        metrics.adapters_registered.set(len(registry.names()))
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        base = {"id": base_name, "object": "model", "created": created, "owned_by": "lorakit", "root": base_name,
                "parent": None, "max_model_len": engine.context}
        adapters = [{"id": name, "object": "model", "created": created, "owned_by": "lorakit",
                     "root": str(registry.paths.get(name, "")), "parent": base_name, "max_model_len": engine.context}
                    for name in registry.names()]
        return {"object": "list", "data": [base, *adapters]}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: HttpRequest) -> Response:
        body = await _json(request)
        name, path = _string(body, "lora_name"), _string(body, "lora_path")
        extra = set(body) - {"lora_name", "lora_path", "load_inplace"}
        if extra:
            raise ApiError(400, f"unknown fields {sorted(extra)}; expected lora_name and lora_path")
        try:
            await asyncio.wrap_future(engine.call(lambda: registry.load_now(name, path)))
        except LorakitError as exc:
            raise ApiError(400, f"cannot load adapter {name!r}: {exc}", code="invalid_adapter") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: HttpRequest) -> Response:
        body = await _json(request)
        name = _string(body, "lora_name")
        extra = set(body) - {"lora_name", "lora_int_id"}
        if extra:
            raise ApiError(400, f"unknown fields {sorted(extra)}; expected lora_name")
        try:
            await asyncio.wrap_future(engine.call(lambda: registry.unregister(name)))
        except KeyError:
            raise ApiError(404, f"no adapter named {name!r} is loaded", "not_found_error", "model_not_found") from None
        except AdapterInUse as exc:
            raise ApiError(409, str(exc), "conflict_error", "adapter_in_use") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Response:
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: HttpRequest, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            parsed = parse(await _json(request), chat, engine.context)
            adapter = _adapter_of(parsed.model)
            prompt = _tokenize(parsed, chat)
            _fit_context(parsed, len(prompt))
        except ApiError as exc:
            metrics.requests.labels(endpoint, "-", str(exc.status)).inc()
            raise
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Request(prompt, adapter, parsed.params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                      model_name=parsed.model)
        try:
            engine.submit(job)
        except QueueFull as exc:
            metrics.requests.labels(endpoint, parsed.model, "503").inc()
            raise ApiError(503, str(exc), "server_overloaded", "queue_full") from None
        except KeyError:
            raise ApiError(404, f"model {parsed.model!r} was unloaded", "not_found_error", "model_not_found") from None
        answer = _Answer(chat, parsed, job, engine.tokenizer)
        if parsed.stream:
            return StreamingResponse(_stream(answer, events, metrics, endpoint), media_type="text/event-stream")
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return Response(status_code=499)
                    continue
                if isinstance(event, Failed):
                    metrics.requests.labels(endpoint, parsed.model, str(event.status)).inc()
                    raise ApiError(event.status, event.message, event.kind)
                answer.add(event)
                if isinstance(event, Finished):
                    metrics.requests.labels(endpoint, parsed.model, "200").inc()
                    return JSONResponse(answer.whole())
        finally:
            if answer.finished is None:
                job.cancel()

    def _adapter_of(model: str) -> str | None:
        if model == base_name:
            return None
        if registry.known(model):
            return model
        raise ApiError(404, f"the model {model!r} does not exist; served: {[base_name, *registry.names()]}",
                       "not_found_error", "model_not_found", "model")

    def _tokenize(parsed: ParsedRequest, chat: bool) -> list[int]:
        tokenizer = engine.tokenizer
        if not chat:
            if isinstance(parsed.prompt, list):
                bad = [t for t in parsed.prompt if not 0 <= t < len(tokenizer)]
                if bad:
                    raise ApiError(400, f"prompt token ids {bad[:5]} are outside the vocabulary (0..{len(tokenizer) - 1})",
                                   param="prompt")
                return list(parsed.prompt)
            return tokenizer(parsed.prompt)["input_ids"]
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(parsed.messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (e.g. roles it does not accept)
            raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def _fit_context(parsed: ParsedRequest, prompt_tokens: int) -> None:
        room = engine.context - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens but the model's context is {engine.context} "
                                "tokens; shorten the prompt", param="prompt", code="context_length_exceeded")
        if parsed.params.max_tokens > room:
            if parsed.explicit_max:
                raise ApiError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({parsed.params.max_tokens}) "
                                    f"exceeds the context of {engine.context} tokens; lower max_tokens to at most {room}",
                               param="max_tokens", code="context_length_exceeded")
            parsed.params = dataclasses.replace(parsed.params, max_tokens=room)

    return app


class _Answer:
    """One request's OpenAI-shaped output, built as events arrive (for whole responses and stream chunks)."""

    def __init__(self, chat: bool, parsed: ParsedRequest, job: Request, tokenizer: Any) -> None:
        self.chat, self.parsed, self.job, self.tokenizer = chat, parsed, job, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text = ""
        self.logprobs: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.finished: Finished | None = None

    def add(self, event: Delta | Finished) -> dict[str, Any] | None:
        """Record an event; returns the logprobs of a delta (completions with logprobs) for its chunk."""
        if isinstance(event, Finished):
            self.finished = event
            return None
        part = None
        if self.parsed.params.logprobs is not None:
            part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = len(self.text)
            for choice in event.tokens:
                piece = self.tokenizer.decode([choice.token])
                part["tokens"].append(piece)
                part["token_logprobs"].append(choice.logprob)
                part["top_logprobs"].append({self.tokenizer.decode([t]): lp for t, lp in choice.top} or None)
                part["text_offset"].append(offset)
                offset += len(piece)
            for key in part:
                self.logprobs[key].extend(part[key])
        self.text += event.text
        return part

    def usage(self) -> dict[str, int]:
        f = self.finished
        return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                "total_tokens": f.prompt_tokens + f.completion_tokens}

    def _head(self) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.parsed.model}

    def whole(self) -> dict[str, Any]:
        reason = self.finished.reason
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            lp = self.logprobs if self.parsed.params.logprobs is not None else None
            choice = {"index": 0, "text": self.text, "logprobs": lp, "finish_reason": reason}
        return {**self._head(), "choices": [choice], "usage": self.usage()}

    def chunk(self, text: str | None, reason: str | None, logprobs: dict | None = None, first: bool = False
              ) -> dict[str, Any]:
        head = self._head()
        if self.chat:
            head["object"] = "chat.completion.chunk"
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        return {**head, "choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        head = self._head()
        if self.chat:
            head["object"] = "chat.completion.chunk"
        return {**head, "choices": [], "usage": self.usage()}


async def _stream(answer: _Answer, events: asyncio.Queue, metrics: Any, endpoint: str) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; a client that goes away
    cancels this generator, and with it the request's row in the engine."""
    try:
        if answer.chat:
            yield _sse(answer.chunk(None, None, first=True))
        while True:
            event = await events.get()
            if isinstance(event, Failed):
                metrics.requests.labels(endpoint, answer.parsed.model, str(event.status)).inc()
                yield _sse(ApiError(event.status, event.message, event.kind).body())
                break
            logprobs = answer.add(event)
            if isinstance(event, Delta) and event.text:
                yield _sse(answer.chunk(event.text, None, logprobs))
            if isinstance(event, Finished):
                metrics.requests.labels(endpoint, answer.parsed.model, "200").inc()
                yield _sse(answer.chunk(None, event.reason))
                if answer.parsed.include_usage:
                    yield _sse(answer.usage_chunk())
                break
        yield "data: [DONE]\n\n"
    finally:
        if answer.finished is None:
            answer.job.cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _json(request: HttpRequest) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _string(body: Any, key: str) -> str:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{key!r} must be a non-empty string", param=key)
    return value


def _error(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
