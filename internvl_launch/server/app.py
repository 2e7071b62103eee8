"""The OpenAI-compatible HTTP server for the Transformers engine.

`create_app(service, config)` builds the FastAPI app: `POST
/v1/chat/completions` (plain and streamed), `GET /v1/models`, `GET /health`
(ready only after a warm-up request with an image succeeded) and `GET
/metrics`. Every error leaves in OpenAI's shape, `{"error": {"message",
"type", "param", "code"}}`: 4xx for the client's fault, never a traceback,
a path or a secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from internvl_launch.engines.transformers_engine import Completion, SamplingParams
from internvl_launch.errors import ConversationError, InternVLError, MediaError
from internvl_launch.prompt.thinking import ReasoningStream, split_reasoning, supports_thinking, thinking_unsupported
from internvl_launch.server.fetch import RefusedMedia
from internvl_launch.server.metrics import Metrics
from internvl_launch.server.schemas import ChatCompletionRequest
from internvl_launch.server.service import ChatService, EngineFault, Job, Overloaded, TooLong, warmup_image

log = logging.getLogger("internvl_launch.server")

MAX_BODY_BYTES = 64 * 2**20  # a 32 MiB image as base64, with room for the rest


@dataclass
class ServerConfig:
    served_model_name: str
    aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    allowed_origins: tuple[str, ...] = ()
    retry_after_s: int = 1
    warmup: bool = True


@dataclass
class ServerState:
    ready: bool = False
    status: str = "warming up"
    started: float = field(default_factory=time.time)
    warmup_s: float | None = None


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None, headers: Any = None
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param=param, code=code), status_code=status, headers=headers)


def _client_message(err: InternVLError) -> str:
    return err.message + (f" {err.hint}" if err.hint else "")


def create_app(service: ChatService, config: ServerConfig, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    state = ServerState()
    service.batcher.observe = metrics
    names = {config.served_model_name, *config.aliases}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        task = asyncio.get_running_loop().create_task(_warm_up()) if config.warmup else None
        if task is None:
            state.ready, state.status = True, "ok"
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            await service.batcher.close()

    async def _warm_up() -> None:
        started = time.perf_counter()
        data = "data:image/png;base64," + base64.b64encode(warmup_image()).decode()
        messages = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data}}, {"type": "text", "text": "Hi"}],
            }
        ]
        try:
            prepared, _ = await service.prepare(messages, max_tiles=2)
            job = service.submit(prepared, SamplingParams(max_tokens=2), None)
            await job.future
        except Exception as err:
            state.status = "unhealthy"
            log.error("warm-up request failed: %s", type(err).__name__)
            return
        state.warmup_s = time.perf_counter() - started
        state.ready, state.status = True, "ok"
        log.info("ready: warm-up with an image took %.2f s", state.warmup_s)

    app = FastAPI(
        title="internvl-launch",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.internvl = state
    app.state.metrics = metrics
    app.state.service = service

    # -- middleware (outermost last) --------------------------------------------

    if config.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if config.api_key:
        app.add_middleware(_ApiKeyMiddleware, key=config.api_key)
    app.add_middleware(_BodyLimitMiddleware, limit=config.max_body_bytes)

    # -- errors -------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "The request body is not valid JSON.", "invalid_request_error")
        msg = str(first.get("msg", "invalid value"))
        where = f"`{param}`: " if param else ""
        return error_response(400, f"Invalid request: {where}{msg}.", "invalid_request_error", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = "Not found." if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message, kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error: %s", type(exc).__name__)
        return error_response(500, "Internal server error.", "server_error")

    # -- routes -------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.ready and service.batcher.fault is None:
            return JSONResponse({"status": "ok"})
        status = "unhealthy" if service.batcher.fault else state.status
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card() -> dict[str, Any]:
        return {
            "id": config.served_model_name,
            "object": "model",
            "created": int(state.started),
            "owned_by": "internvl-launch",
            "max_model_len": service.limits.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        if model_id not in names:
            return error_response(
                404,
                f"The model {model_id!r} does not exist.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return _model_card()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        t0 = time.perf_counter()
        try:
            return await _chat(body, request, t0)
        except (TooLong, ConversationError, RefusedMedia, MediaError) as err:
            metrics.requests.labels("bad_request").inc()
            return error_response(400, _client_message(err), "invalid_request_error", code=_code(err))
        except Overloaded as err:
            metrics.requests.labels("overloaded").inc()
            return error_response(
                429,
                _client_message(err),
                "rate_limit_error",
                code="server_overloaded",
                headers={"Retry-After": str(config.retry_after_s)},
            )
        except EngineFault as err:
            metrics.requests.labels("engine_error").inc()
            return error_response(503, err.message, "server_error", code="engine_unavailable")
        except ValueError as err:  # sampling parameters out of range
            metrics.requests.labels("bad_request").inc()
            return error_response(400, f"Invalid request: {err}.", "invalid_request_error")

    async def _chat(body: ChatCompletionRequest, request: Request, t0: float) -> Any:
        if body.model not in names:
            return error_response(
                404,
                f"The model {body.model!r} does not exist; this server serves {config.served_model_name!r}.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        _refuse_unsupported(body)
        asked = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else None
        thinking = service.thinking if asked is None else asked
        if thinking and not supports_thinking(service.spec):
            metrics.requests.labels("bad_request").inc()
            return error_response(
                400,
                thinking_unsupported(repr(config.served_model_name)),
                "invalid_request_error",
                param="chat_template_kwargs.enable_thinking",
                code="thinking_not_supported",
            )
        if not state.ready:
            raise EngineFault(
                "The server is still warming up." if state.status != "unhealthy" else "The server is unhealthy."
            )
        prepared, _ = await service.prepare(
            body.raw_messages(), max_tiles=body.max_tiles, num_frames=body.num_frames, thinking=thinking
        )
        params = SamplingParams(
            max_tokens=service.budget(prepared, body.requested_max_tokens),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            repetition_penalty=body.repetition_penalty or 1.0,
            seed=body.seed,
            stop=tuple(body.stop or ()),
        )
        metrics.media.observe(prepared.media_s)
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            return _stream(body, request, prepared, params, completion_id, created, t0, thinking)
        job = service.submit(prepared, params, None)
        result = await _await_job(job, request)
        if result is None:
            metrics.requests.labels("cancelled").inc()
            return Response(status_code=499)
        _observe(result, job, t0)
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if thinking:
            reasoning, message["content"] = split_reasoning(result.text)
            message.update(_reasoning(reasoning))
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": config.served_model_name,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": _finish(result.finish_reason),
                    "logprobs": None,
                }
            ],
            "usage": _usage(result),
        }

    async def _await_job(job: Job, request: Request) -> Completion | None:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=0.25)
            if done:
                return job.future.result()
            if await request.is_disconnected():
                job.cancel.set()
                return None

    def _observe(result: Completion, job: Job, t0: float) -> None:
        end = time.perf_counter()
        started = job.started or t0
        metrics.ttft.observe((started - t0) + result.timings.get("first_token_s", end - started))
        metrics.completed(result.prompt_tokens, job.prepared.image_tokens, result.completion_tokens, end - t0)

    def _stream(
        body: ChatCompletionRequest,
        request: Request,
        prepared: Any,
        params: SamplingParams,
        completion_id: str,
        created: int,
        t0: float,
        thinking: bool,
    ) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(deltas.put_nowait, text)

        # Submitted before the response starts, so an overload is a 429, not a broken stream.
        job = service.submit(prepared, params, on_text)
        job.future.add_done_callback(lambda _f: deltas.put_nowait(None))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> str:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": config.served_model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if usage is not None:
                data["choices"] = []
                data["usage"] = usage
            elif include_usage:
                data["usage"] = None
            return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"

        split = ReasoningStream() if thinking else None

        def pieces(reasoning: str, answer: str) -> Iterator[str]:
            if reasoning:
                yield chunk(_reasoning(reasoning))
            if answer:
                yield chunk({"content": answer})

        async def events() -> AsyncIterator[str]:
            first = True
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (text := await deltas.get()) is not None:
                    if first:
                        metrics.ttft.observe(time.perf_counter() - t0)
                        first = False
                    if split is None:
                        yield chunk({"content": text})
                    else:
                        for event in pieces(*split.feed(text)):
                            yield event
                if split is not None:
                    for event in pieces(*split.finish()):
                        yield event
                try:
                    result = job.future.result()
                except (InternVLError, asyncio.CancelledError) as err:
                    message = err.message if isinstance(err, InternVLError) else "The request was cancelled."
                    metrics.requests.labels("engine_error").inc()
                    yield "data: " + json.dumps(error_body(message, "server_error", code="engine_unavailable")) + "\n\n"
                    return
                metrics.completed(
                    result.prompt_tokens, prepared.image_tokens, result.completion_tokens, time.perf_counter() - t0
                )
                yield chunk({}, _finish(result.finish_reason))
                if include_usage:
                    yield chunk({}, usage=_usage(result))
                yield "data: [DONE]\n\n"
            finally:
                if not job.future.done():
                    job.cancel.set()
                    metrics.requests.labels("cancelled").inc()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.n not in (None, 1):
        raise ConversationError("n > 1 is not supported; send separate requests.")
    asked = body.requested_max_tokens
    if body.min_tokens and asked is not None and body.min_tokens > asked:
        raise ConversationError(f"min_tokens ({body.min_tokens}) is larger than max_tokens ({asked}).")
    if body.min_tokens:
        raise ConversationError("min_tokens is not supported by this server; leave it at 0.")
    if body.logprobs:
        raise ConversationError("logprobs are not supported by this server.")
    if body.presence_penalty or body.frequency_penalty:
        raise ConversationError(
            "presence_penalty and frequency_penalty are not supported; use repetition_penalty (extension)."
        )


def _reasoning(text: str) -> dict[str, str]:
    """A reply's reasoning under both names clients read it by: `reasoning_content`
    (DeepSeek's API, older vLLM) and `reasoning` (vLLM's current name)."""
    return {"reasoning_content": text, "reasoning": text}


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, "stop")


def _usage(result: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _code(err: InternVLError) -> str:
    if isinstance(err, TooLong):
        return "context_length_exceeded"
    if isinstance(err, RefusedMedia):
        return "media_refused"
    if isinstance(err, MediaError):
        return "invalid_media"
    return "invalid_messages"


def _version() -> str:
    from internvl_launch import __version__

    return __version__


class _BodyLimitMiddleware:
    """413 for a body over the limit: by its Content-Length before anything is
    read, or as soon as a chunked body passes it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _send_error(send, 413, f"The request body is over the {self.limit // 2**20} MiB limit.")
            return
        seen = 0
        started = False  # the app began its response
        refused = False  # we answered 413 ourselves

        async def limited_receive() -> Any:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not started:
                    # Answer now and tell the app the client is gone, so it stops reading.
                    refused = True
                    await _send_error(send, 413, f"The request body is over the {self.limit // 2**20} MiB limit.")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise


class _ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every route but the health check."""

    OPEN = frozenset({"/health"})

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in self.OPEN or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            await _send_error(
                send, 401, "Missing or wrong API key.", type_="authentication_error", code="invalid_api_key"
            )
            return
        await self.app(scope, receive, send)


async def _send_error(
    send: Any, status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None
) -> None:
    body = json.dumps(error_body(message, type_, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
