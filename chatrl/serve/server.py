"""`chatrl serve --path <model>`: an OpenAI-compatible HTTP API over a trained model.

Endpoints (the shapes of https://platform.openai.com/docs/api-reference/chat):
  POST /v1/chat/completions   one answer, or server-sent "chat.completion.chunk" events with stream=true
  GET  /v1/models             the one model served;  GET /v1/models/{id}
  GET  /health                liveness and queue depth (no API key needed)

So the `openai` client, or any chat front end that speaks OpenAI's API, can use the model:
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<--api-key or anything>")

Concurrency: the model is not thread-safe, so ONE worker thread runs every generation, taking
requests in arrival order from a bounded queue. When the queue is full a request is answered at
once with 503 rather than left waiting. Requests are not batched together: each is decoded on
its own, so a concurrent answer is exactly the one a lone request would get.

Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import secrets
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ChatRLError
from .chat import add_generation_args, has_surrogates
from .generation import ChatModel, Completion

log = logging.getLogger("chatrl.serve")
API_DOCS = "https://platform.openai.com/docs/api-reference/chat/create"


# ---------------------------------------------------------------------------------------------
# Request bodies. Strict: "0.5" is not a number and 1.0 is not an integer, as with OpenAI.
# Unknown fields (presence_penalty, user, ...) are accepted and ignored.

class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for the system role.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = None


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape.

class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _loc_name(loc: tuple) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not part.isidentifier() or part[:1].isupper() or part in ("str", "int", "float", "bool"):
            continue  # pydantic's name for a union branch ("list[str]", "StreamOptions"), not a field
        else:
            name += f".{part}" if name else str(part)
    return name


def describe_validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """One readable sentence (what was received, why it is wrong, how to fix) and the param."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return (f"the request body is not valid JSON ({detail}); send a JSON object such as "
                '{"model": "...", "messages": [{"role": "user", "content": "Hello"}]}', None)
    seen, parts = set(), []
    for err in errors:
        param = _loc_name(tuple(err.get("loc", ())))
        if param in seen:
            continue  # a union reports one error per branch; the first says enough
        seen.add(param)
        if err.get("type") == "missing":
            parts.append(f"'{param}' is missing; it is required")
        else:
            received = json.dumps(err.get("input"), default=str)
            if len(received) > 80:
                received = received[:77] + "..."
            where = f"'{param}'" if param else "the body"
            parts.append(f"{where} is {received}: {err.get('msg', 'invalid')}")
    params = [_loc_name(tuple(e.get("loc", ()))) for e in errors]
    return "; ".join(parts[:3]) + f". Fix the request (see {API_DOCS})", (params[0] or None)


# ---------------------------------------------------------------------------------------------
# The generation worker: one thread, one bounded queue.

@dataclass
class Job:
    """One request's generation; its events go back to the request's event loop."""

    messages: list[dict]
    settings: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value: Any = None) -> None:
        """Called from the worker thread: ("start"), ("delta", text), ("done", Completion), ("error", exc)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the request's loop is closed (server shutting down): nobody listens
            self.cancelled.set()


class GenerationWorker:
    def __init__(self, chat_model, max_queue: int):
        self.chat_model = chat_model
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        """Queue a job; raises queue.Full when max_queue jobs are already waiting."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chatrl-generation", daemon=True)
                self._thread.start()
        self.jobs.put_nowait(job)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:  # tell anyone still queued
            try:
                self.jobs.get_nowait().send("error", APIError(503, "the server is shutting down",
                                                              "server_error", code="shutting_down"))
            except queue.Empty:
                break

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if not job.cancelled.is_set():
                self._generate(job)

    def _generate(self, job: Job) -> None:
        try:
            pieces = self.chat_model.stream(job.messages, **job.settings)  # checks, encodes
        except ChatRLError as e:
            job.send("error", APIError(400, str(e)))
            return
        except Exception as e:  # noqa: BLE001 - a model failure must reach the client, not kill the worker
            log.exception("generation failed before the first token")
            job.send("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))
            return
        job.send("start")
        try:
            while True:
                if job.cancelled.is_set() or self._stop.is_set():
                    pieces.close()  # the client went away: free the worker for the next one
                    return
                try:
                    job.send("delta", next(pieces))
                except StopIteration as done:
                    job.send("done", done.value)
                    return
        except Exception as e:  # noqa: BLE001 - same reason as above
            log.exception("generation failed")
            job.send("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))


# ---------------------------------------------------------------------------------------------
# Authentication: a pure ASGI middleware, so it runs before the body is read or validated.

class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(got, self.expected):
                why = "no Authorization header was sent" if not got else "the API key is not valid"
                response = error_response(
                    401, f"{why}; send the server's key (chatrl serve --api-key) as "
                         "'Authorization: Bearer <key>' (the openai client's api_key=...)",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# Request size: a pure ASGI middleware, so an oversized body is refused before it is parsed (a
# 20 MB body would otherwise hold the event loop and then the one generation worker).

class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, got: str) -> JSONResponse:
        return error_response(413, f"the request body is {got} bytes; this server accepts at most "
                                   f"{self.max_bytes} (chatrl serve --max-request-bytes)",
                              code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(length.decode())(scope, receive, send)
            return
        # No (or a smaller) Content-Length: read the body here, counting, then hand it on.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(f"more than {size - len(chunks[-1])}")(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------------------
# The app.

def _check_text(req: ChatCompletionRequest) -> None:
    """JSON may escape lone surrogates ("\\ud800"), which are not text: no tokenizer encodes
    them. Refuse them as a bad request, naming the field, instead of failing in the model."""
    fields = [(f"messages[{i}].content", m.content if isinstance(m.content, str)
               else "".join(p.text for p in m.content)) for i, m in enumerate(req.messages)]
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    fields += [("stop", s) for s in stops]
    for param, text in fields:
        if has_surrogates(text):
            raise APIError(400, f"'{param}' holds a lone surrogate (an unpaired \\ud800-\\udfff "
                                "escape), which is not valid Unicode text; send UTF-8 text",
                           param=param)


def _settings(req: ChatCompletionRequest, defaults: dict) -> dict:
    if req.n != 1:
        raise APIError(400, f"'n' is {req.n}: this server returns one choice per request; send n=1 "
                            "(or leave it out) and repeat the request for more answers", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and len(stop) > 4:
        raise APIError(400, f"'stop' has {len(stop)} strings; send at most 4", param="stop")
    temperature = defaults["temperature"] if req.temperature is None else req.temperature
    top_p = defaults["top_p"] if req.top_p is None else req.top_p
    if top_p == 0:  # only the most likely token is left: greedy
        temperature, top_p = 0.0, 1.0
    max_tokens = req.max_completion_tokens or req.max_tokens or defaults["max_tokens"]
    return dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                seed=req.seed, stop=stop)


DEFAULT_MAX_REQUEST_BYTES = 2 * 1024 * 1024


def create_app(chat_model, model_name: str, api_key: str | None = None, max_queue: int = 16, *,
               max_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app serving `chat_model` (a ChatModel, or anything with its `stream`).

    Several models: pass {name: model} as `chat_model` and the default one's name as
    `model_name`. Each model has its own worker (so two models answer at the same time), and a
    request picks one by its 'model' field (none: the default; unknown: 404). With one model the
    'model' field is not checked, as before.

    max_queue: requests that may wait for the worker; one more gets 503.
    max_tokens / temperature / top_p: used when a request does not set them.
    max_request_bytes: larger request bodies get 413 before they are read in full.
    """
    if max_queue < 1:
        raise ChatRLError(f"--max-queue is {max_queue}; it must be at least 1")
    if max_request_bytes < 1:
        raise ChatRLError(f"--max-request-bytes is {max_request_bytes}; it must be at least 1")
    models = dict(chat_model) if isinstance(chat_model, dict) else {model_name: chat_model}
    if model_name not in models:
        raise ChatRLError(f"the default model {model_name!r} is not among the models served "
                          f"({', '.join(models)})")
    workers = {name: GenerationWorker(m, max_queue) for name, m in models.items()}
    worker = workers[model_name]
    defaults = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        for w in workers.values():
            await asyncio.to_thread(w.stop)

    app = FastAPI(title="chatrl", description="OpenAI-compatible chat API", lifespan=lifespan)
    app.state.workers = workers
    app.state.worker = worker
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    if api_key:  # added last, so it runs first: no body is read for a request without the key
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = describe_validation_error(list(exc.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"{request.method} {request.url.path} does not exist; this server offers "
                       "POST /v1/chat/completions, GET /v1/models and GET /health")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, code=str(exc.status_code))

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "models": list(workers),
                "queued": sum(w.jobs.qsize() for w in workers.values()), "max_queue": worker.max_queue}

    def model_card(name: str = model_name) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "chatrl"}

    def unknown_model(model_id: str) -> APIError:
        return APIError(404, f"model {model_id!r} is not served here; this server serves "
                             f"{', '.join(repr(n) for n in workers)}", param="model",
                        code="model_not_found")

    def pick(requested: str | None) -> tuple[str, GenerationWorker]:
        """The model a request asks for (see the docstring)."""
        if len(workers) == 1 or requested is None:
            return model_name, worker
        if requested not in workers:
            raise unknown_model(requested)
        return requested, workers[requested]

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in workers]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in workers:
            raise unknown_model(model_id)
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        _check_text(req)
        settings = _settings(req, defaults)
        job = Job(messages=[m.plain() for m in req.messages], settings=settings,
                  loop=asyncio.get_running_loop())
        name, target = pick(req.model)
        try:
            target.submit(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {target.max_queue} requests are already "
                                "waiting; retry in a moment (or start it with a larger --max-queue)",
                           "server_error", code="queue_full") from None
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            kind, value = await job.events.get()  # "start", or an error before any token
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if kind == "error":
            raise value
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, cid, now, name, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text, completion = [], None
            while completion is None:
                kind, value = await job.events.get()
                if kind == "delta":
                    text.append(value)
                elif kind == "done":
                    completion = value
                else:
                    raise value
        finally:
            job.cancelled.set()  # a no-op when done; stops the worker if the request was dropped
        return {
            "id": cid, "object": "chat.completion", "created": now, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "logprobs": None, "finish_reason": completion.finish_reason}],
            "usage": _usage(completion),
        }

    return app


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


async def _sse(job: Job, cid: str, created: int, model_name: str, include_usage: bool):
    """Server-sent events: a role chunk, content chunks, a finish_reason chunk, [DONE]."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield chunk({"content": value})
            elif kind == "done":
                yield chunk({}, value.finish_reason)
                if include_usage:
                    yield chunk({}, None, choices=[], usage=_usage(value))
                break
            else:  # an error after the headers went out: report it in-band, as OpenAI does
                err = value if isinstance(value, APIError) else APIError(500, str(value), "server_error")
                body = {"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}}
                yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client disconnected, or we are done: either way, stop generating


# ---------------------------------------------------------------------------------------------
# Running it.

def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or a ChatRLError saying why the address cannot be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ChatRLError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                          "or stop the program using it") from e
    sock.listen(2048)
    return sock


def serve(path: str | list[str] | None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, *, web: dict | None = None,
          max_queue: int = 16, model_name: str | None = None, dtype: str = "fp32",
          device: str | None = None, template: str = "auto", max_tokens: int = 256,
          temperature: float = 0.7, top_p: float = 0.9, log_level: str = "info",
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """Load the model at `path` and serve it until Ctrl-C (or SIGTERM). port 0: any free port
    (the address is printed).

    path: one model, several (a list: served side by side), or None for the newest model
    `chatrl train` left here (see choose.py). web: `add_web_ui` options for the page at /
    (None: API only)."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise ChatRLError(f"--port {port} is not a TCP port; use 1-65535, e.g. 8000")
    sock = bind_socket(host, port)  # fail before spending time on the model
    try:
        from .choose import load_models

        chat_model = load_models([path] if isinstance(path, str) else path, model_name, dtype=dtype,
                                 template=template, device=device)
        name = model_name or chat_model.name
        app = create_app(chat_model, name, api_key=api_key, max_queue=max_queue, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, max_request_bytes=max_request_bytes)
        bound = sock.getsockname()[1]
        print(f"Serving {', '.join(map(repr, chat_model))} ({chat_model.template} format) at "
              f"http://{host}:{bound}/v1 (OpenAI-compatible{', API key required' if api_key else ''})",
              flush=True)
        if web is not None:
            from .web import add_web_ui

            if web.get("compare"):  # paths -> the names they are served under
                web = {**web, "compare": [chat_model.names[str(p)] for p in web["compare"]]}
            add_web_ui(app, api_key=api_key, **web)
            print(f"Web page: http://{host}:{bound}/ (chat, compare, label; votes go to "
                  f"{app.state.labels.path})", flush=True)
        if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {host} without --api-key: anyone who can reach this "
                  "machine can use the model", file=sys.stderr, flush=True)
        try:
            uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then re-raises it
            pass
        print("Server stopped.", flush=True)
    finally:
        sock.close()


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `chatrl serve`'s flags to `parser` (a subcommand parser); returns it."""
    add_generation_args(parser, max_new_tokens=256, several=True)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000,
                        help="TCP port (default 8000; 0 = any free port, printed at start)")
    parser.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("CHATRL_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on /v1 "
                             "(default: $CHATRL_API_KEY, else none)")
    parser.add_argument("--model-name", "--served-model-name", dest="model_name", default=None,
                        help="the model id clients see and send (default: the folder's name)")
    parser.add_argument("--max-queue", "--max_queue", dest="max_queue", type=int, default=16,
                        help="requests that may wait for the model; more get 503 (default 16)")
    parser.add_argument("--max-request-bytes", "--max_request_bytes", dest="max_request_bytes", type=int,
                        default=DEFAULT_MAX_REQUEST_BYTES,
                        help=f"larger request bodies get 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    parser.add_argument("--log-level", dest="log_level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"))
    from .web import add_web_args

    add_web_args(parser)
    return parser


def serve_main(args: argparse.Namespace) -> int:
    """Run `chatrl serve` from parsed `add_serve_args` flags; returns the exit code."""
    from .web import web_options

    paths = (args.path or []) + (args.compare or [])
    serve(paths or None, web=web_options(args), host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue,
          model_name=args.model_name, dtype=args.dtype, device=args.device, template=args.template,
          max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
          log_level=args.log_level, max_request_bytes=args.max_request_bytes)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m chatrl.serve.server` = `chatrl serve` (one parser, one error format)."""
    from ..cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
