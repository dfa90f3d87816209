"""The OpenAI-compatible HTTP API: ``create_app(backend)`` builds it, ``serve`` runs it with uvicorn.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
streamed as server-sent events or not), and ``GET /health`` (the scheduler's counters).
Every error, including FastAPI's own validation errors, is answered with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request, 401 for a missing
or wrong API key, 404 for an unknown model or path, 429 when the queue is full, 500 (with a
message) for a bug of ours.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.errors import PosttrainError
from posttrain.serve.engine import Backend, Sampling, Sequence
from posttrain.serve.scheduler import Job, QueueFull, Scheduler
from posttrain.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger("posttrain.serve")

# How often a non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.5


def create_app(backend: Backend, *, api_key: str | None = None, max_batch: int = 8, max_queue: int = 256) -> FastAPI:
    """The API over an already loaded ``backend``; ``app.state.scheduler`` holds the queue and its counters."""
    scheduler = Scheduler(backend, max_batch=max_batch, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await scheduler.start()
        try:
            yield
        finally:
            await scheduler.stop()

    app = FastAPI(title="posttrain", summary="OpenAI-compatible API over a posttrain model", lifespan=lifespan)
    app.state.backend = backend
    app.state.scheduler = scheduler
    created = int(time.time())
    if api_key:
        app.add_middleware(_ApiKeyCheck, api_key=api_key)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **scheduler.snapshot()}

    @app.get("/v1/models")
    async def list_models() -> dict:
        models = backend.models
        data = []
        for model_id in backend.model_ids:
            adapter = models.adapters.get(model_id)
            data.append({"id": model_id, "object": "model", "created": created, "owned_by": "posttrain",
                         "root": adapter or models.base_path, "parent": models.base_id if adapter else None})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model_id = backend.resolve(body.model)
        prompt = backend.chat_prompt([m.as_template_input() for m in body.messages])
        sampling = _sampling(body, backend.fit(len(prompt), body.completion_budget, param="messages"))
        seqs = [Sequence(prompt, sampling, backend.adapter_of(model_id), i) for i in range(body.n or 1)]
        reply = _Reply("chatcmpl", model_id, [len(prompt)], chat=True)
        return await _answer(scheduler, _submit(scheduler, seqs), reply, body.stream, body.include_usage, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model_id = backend.resolve(body.model)
        prompts = [backend.text_prompt(p) for p in body.prompt]
        n = body.n or 1
        seqs = []
        for i, prompt in enumerate(prompts):
            sampling = _sampling(body, backend.fit(len(prompt), body.completion_budget, param="prompt"))
            seqs += [Sequence(prompt, sampling, backend.adapter_of(model_id), i * n + j) for j in range(n)]
        reply = _Reply("cmpl", model_id, [len(p) for p in prompts], chat=False)
        return await _answer(scheduler, _submit(scheduler, seqs), reply, body.stream, body.include_usage, request)

    return app


def _sampling(body, max_tokens: int) -> Sampling:
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=tuple(body.stop or ()),
    )


def _submit(scheduler: Scheduler, seqs: list[Sequence]) -> Job:
    try:
        return scheduler.submit(seqs)
    except QueueFull as exc:
        raise ApiError(429, f"The server is busy: {exc}. Retry later.", type="rate_limit_error",
                       code="queue_full") from None


class _Reply:
    """Builds the response bodies of one request (chat or text completion)."""

    def __init__(self, prefix: str, model: str, prompt_lengths: list[int], *, chat: bool):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.chat = chat
        self.prompt_tokens = sum(prompt_lengths)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, seqs: list[Sequence]) -> dict:
        completion = sum(s.completion_tokens for s in seqs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def full(self, seqs: list[Sequence]) -> dict:
        if self.chat:
            choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text}, "logprobs": None,
                        "finish_reason": s.finish_reason} for s in seqs]
            return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(seqs)}
        choices = [{"index": s.index, "text": s.text, "logprobs": None, "finish_reason": s.finish_reason}
                   for s in seqs]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage(seqs)}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, seqs: list[Sequence]) -> dict:
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return {**head, "choices": [], "usage": self.usage(seqs)}


async def _answer(scheduler: Scheduler, job: Job, reply: _Reply, stream: bool | None, include_usage: bool,
                  request: Request) -> Response:
    if stream:
        return StreamingResponse(_stream(scheduler, job, reply, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        gone, errors = await _wait(job, request)
    finally:
        scheduler.cancel(job)  # nothing happens when the job has ended; frees the worker when the handler is cancelled
    if gone:
        return Response(status_code=499)  # nobody will read it
    if errors:
        raise ApiError(500, errors[0], type="server_error")
    return JSONResponse(reply.full(job.seqs))


async def _wait(job: Job, request: Request) -> tuple[bool, list[str]]:
    """Wait until every choice has ended: (whether the client disconnected first, generation errors)."""
    errors: list[str] = []
    pending = len(job.seqs)
    loop = asyncio.get_running_loop()
    next_check = loop.time() + _DISCONNECT_POLL_S
    while pending:
        try:
            event = await asyncio.wait_for(job.events.get(), max(0.0, next_check - loop.time()))
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            event = None
        # Checked on a clock, not only when idle: a long generation sends events all the time.
        if loop.time() >= next_check:
            if await request.is_disconnected():
                return True, errors
            next_check = loop.time() + _DISCONNECT_POLL_S
        if event is None:
            continue
        if event.error is not None:
            errors.append(event.error)
        if event.finish_reason is not None or event.error is not None:
            pending -= 1
    return False, errors


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(scheduler: Scheduler, job: Job, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a first chunk per choice (chat: the role), text as it comes, a last chunk with the
    finish reason, the usage when asked for, then ``[DONE]``. A client that leaves cancels the job."""
    try:
        if reply.chat:
            for seq in job.seqs:
                yield _sse(reply.chunk(seq.index, None, first=True))
        pending = len(job.seqs)
        while pending:
            event = await job.events.get()
            if event.error is not None:
                yield _sse(error_body(event.error, type="server_error"))
                break
            if event.text:
                yield _sse(reply.chunk(event.index, event.text))
            if event.finish_reason is not None:
                yield _sse(reply.chunk(event.index, None, event.finish_reason))
                pending -= 1
        else:
            if include_usage:
                yield _sse(reply.usage_chunk(job.seqs))
        yield _sse("[DONE]")
    finally:
        scheduler.cancel(job)


class _ApiKeyCheck:
    """ASGI middleware: every /v1 path needs ``Authorization: Bearer <key>`` (checked before the body is read)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization")
            if given is None or not secrets.compare_digest(given, self.expected):
                message = ("Missing API key: send it as 'Authorization: Bearer KEY'." if given is None
                           else "Incorrect API key provided.")
                response = JSONResponse(error_body(message, code="invalid_api_key"), status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _param(loc: tuple) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation_message(error: dict) -> tuple[str, str | None]:
    if error.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {error.get('ctx', {}).get('error', 'decode error')}", None
    param = _param(tuple(error.get("loc", ())))
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if error.get("type") == "missing":
        return f"Missing required parameter: {param}", param
    if error.get("type") == "model_attributes_type" and param is None:
        return "The request body must be a JSON object", None
    return (f"Invalid value for {param}: {msg}" if param else msg), param


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message, param = _validation_message(errors[0]) if errors else ("Invalid request", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(message), type=kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_body(f"Internal server error: {type(exc).__name__}: {exc}", type="server_error"),
                            status_code=500)


def serve(backend: Backend, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 256, say: Callable[[str], None] = print) -> None:
    """Run the API with uvicorn until interrupted; prints the URL, the model ids and a curl example first."""
    import uvicorn

    if max_batch < 1 or max_queue < 1:
        raise PosttrainError(f"--max-batch and --max-queue must be at least 1; got {max_batch} and {max_queue}")
    app = create_app(backend, api_key=api_key, max_batch=max_batch, max_queue=max_queue)
    base = f"http://{_host_for_url(host)}:{port}/v1"
    say(f"serving on {base} (backend: {backend.name}, batches of up to {max_batch}, queue of {max_queue})")
    say(f"models: {', '.join(backend.model_ids)}")
    auth = " -H \"Authorization: Bearer $API_KEY\"" if api_key else ""
    example = json.dumps({"model": backend.models.default, "messages": [{"role": "user", "content": "Hello!"}],
                          "max_tokens": 32})
    say(f"try: curl {base}/chat/completions -H 'Content-Type: application/json'{auth} -d '{example}'")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model")
    uvicorn.run(app, host=host, port=port, log_level="info")


def _host_for_url(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
