"""The FastAPI application: ``/v1/chat/completions`` (streaming and not), ``/v1/models`` and ``/health``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Completion, Engine, Job
from .errors import APIError, bad_request
from .images import ImageLimits
from .messages import convert
from .protocol import ChatRequest, parse_request
from .specs import Spec, Validator, parse

log = logging.getLogger("mitigate.serve")


@dataclass
class Settings:
    model_name: str  # the name clients send as "model"
    default_spec: Spec = field(default_factory=Spec)
    limits: ImageLimits = field(default_factory=ImageLimits)
    max_tokens_limit: int = 1024  # the most new tokens one request may ask for
    context_length: int | None = None  # prompt + new tokens may not exceed it
    max_request_bytes: int = 64 * 1024 * 1024


def context_length(model: Any) -> int | None:
    """The language model's context window, from its config (``None`` when the config does not say)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    processor = engine.processor
    validator = Validator(engine.model, processor)
    if not settings.default_spec.vanilla:
        validator.validate(settings.default_spec)  # a bad default fails at start, not per request

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="mitigate", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            APIError(exc.status_code, str(exc.detail), code="http_error").body(), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(
            APIError(500, f"internal error: {exc}", code="internal_error").body(), status_code=500
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_name,
            "default_mitigation": settings.default_spec.describe(),
            "mitigation_supported": validator.supported,
            "queued": engine.queued,
            "batches": engine.batches,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "mitigate"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        started = time.perf_counter()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        label = "?"
        try:
            data = _decode_json(await _read_body(request, settings.max_request_bytes))
            body = parse_request(data)
            if body.model != settings.model_name:
                raise APIError(
                    404,
                    f"model {body.model!r} is not served here; this server serves {settings.model_name!r}",
                    code="model_not_found",
                    param="model",
                )
            spec = parse(data["mitigation"]) if "mitigation" in data else settings.default_spec
            label = spec.label()
            await run_in_threadpool(validator.validate, spec)
            job = await run_in_threadpool(_prepare, body, spec, rid)
            job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
            engine.submit(job)
        except APIError as exc:
            _log(rid, label, exc.status, started)
            return JSONResponse(exc.body(), status_code=exc.status)
        try:
            kind, value = await job.events.get()  # start, or an error raised before generating
            if kind == "error":
                _log(rid, label, value.status, started)
                return JSONResponse(value.body(), status_code=value.status)
        except BaseException:
            job.cancelled = True
            raise
        if body.stream:
            return StreamingResponse(
                _stream(job, body, rid, label, started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            completion = await _wait(job)
        except APIError as exc:
            _log(rid, label, exc.status, started)
            return JSONResponse(exc.body(), status_code=exc.status)
        finally:
            job.cancelled = True  # a no-op once done; stops the row if the client went away
        _log(rid, label, 200, started, job, completion)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": settings.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(job, completion),
            "mitigation": spec.describe(),
        }

    def _prepare(body: ChatRequest, spec: Spec, rid: str) -> Job:
        """Decode the images, apply the chat template, count the prompt's tokens and check the limits."""
        messages, images = convert(body.messages, settings.limits)
        try:
            with engine.processor_lock:
                prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                encoded = processor(images=[images] if images else None, text=[prompt], return_tensors="pt")
        except Exception as exc:  # the model's template or processor refused these messages
            raise bad_request(
                f"the model's processor refused the messages: {exc}",
                code="invalid_messages",
                param="messages",
            ) from exc
        prompt_tokens = int(encoded["input_ids"].shape[-1])
        window = settings.context_length
        room = (
            settings.max_tokens_limit
            if window is None
            else min(settings.max_tokens_limit, window - prompt_tokens)
        )
        max_tokens = body.new_tokens if body.new_tokens is not None else room
        if max_tokens > settings.max_tokens_limit:
            raise bad_request(
                f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                code="max_tokens_exceeded",
                param="max_tokens",
            )
        if window is not None and prompt_tokens + max_tokens > window:
            raise bad_request(
                f"this model's context is {window} tokens; the prompt has {prompt_tokens} and max_tokens "
                f"asks for {max_tokens}",
                code="context_length_exceeded",
                param="messages",
            )
        if max_tokens < 1:
            raise bad_request(
                f"the prompt ({prompt_tokens} tokens) fills the model's context of {window}",
                code="context_length_exceeded",
                param="messages",
            )
        sampling = None
        if body.sampling:
            sampling = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
        return Job(
            id=rid,
            spec=spec,
            prompt=prompt,
            images=images,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            stops=body.stops,
            stream=body.stream,
            sampling=sampling,
        )

    async def _stream(
        job: Job, body: ChatRequest, rid: str, label: str, started: float
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            payload = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": settings.model_name,
                "choices": [choice],
            }
            return f"data: {json.dumps(payload)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield chunk({"content": value})
                elif kind == "done":
                    yield chunk({}, value.finish_reason)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        payload = {
                            "id": rid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": settings.model_name,
                            "choices": [],
                            "usage": _usage(job, value),
                        }
                        yield f"data: {json.dumps(payload)}\n\n"
                    yield "data: [DONE]\n\n"
                    _log(rid, label, 200, started, job, value)
                    return
                elif kind == "error":
                    yield f"data: {json.dumps(value.body())}\n\n"
                    yield "data: [DONE]\n\n"
                    _log(rid, label, value.status, started, job)
                    return
        finally:
            job.cancelled = True

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413, f"the request body is over the server's limit of {limit} bytes", code="request_too_large"
        )
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise APIError(
                413, f"the request body is over the server's limit of {limit} bytes", code="request_too_large"
            )
        chunks.append(piece)
    return b"".join(chunks)


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


async def _wait(job: Job) -> Completion:
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise value


def _usage(job: Job, completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": job.prompt_tokens + completion.completion_tokens,
    }


def _log(
    rid: str, label: str, status: int, started: float, job: Job | None = None, done: Completion | None = None
) -> None:
    """One line per request: latency, tokens, method."""
    ms = (time.perf_counter() - started) * 1000
    prompt = job.prompt_tokens if job is not None else 0
    completion = done.completion_tokens if done is not None else 0
    extra = f" finish={done.finish_reason} batch={done.batch_size}" if done is not None else ""
    log.info(
        "%s status=%d method=%s latency_ms=%.0f prompt_tokens=%d completion_tokens=%d%s",
        rid,
        status,
        label,
        ms,
        prompt,
        completion,
        extra,
    )
