"""``qgraph serve``: an OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events or not),
``GET /v1/models``, ``GET /health`` (503 until the model is loaded), ``GET /metrics`` (Prometheus text). Needs the
``serve`` extra (FastAPI, uvicorn, prometheus-client): nothing in the core imports this module.

Behaviour under load: at most ``max_queue`` requests are admitted at once (running or waiting for a slot); one more
is answered 429 with ``Retry-After``. A client that disconnects cancels its request, which frees its slot. Invalid
requests get the OpenAI error object with status 400 (401 without the API key when one is set), never a 500.
The model loads in a thread after the server starts, so ``/health`` can say when it is ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request  # FastAPI reads handler annotations from this module's globals

from qgraph.errors import QGraphError
from qgraph.openai_protocol import (
    ChatRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    error_body,
    new_id,
)

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1


@dataclass
class Served:
    """What the server runs: a compiled model (with ``full_batch_size``) and its tokenizer, and optionally a compiled
    draft model every request drafts with (``qgraph serve --assistant-model``) unless it asks for prompt lookup."""

    model: Any
    tokenizer: Any
    assistant_model: Any = None

    def options(self, given: dict[str, Any]) -> dict[str, Any]:
        """A request's generate options, with the server's draft model unless the request chose prompt lookup."""
        if self.assistant_model is None or "prompt_lookup_num_tokens" in given:
            return given
        return given | {"assistant_model": self.assistant_model}


class ServerMetrics:
    """Prometheus metrics in a registry of this server's own (no process-wide state)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("qgraph_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)  # fmt: skip
        self.prompt_tokens = Counter("qgraph_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generated_tokens = Counter("qgraph_generation_tokens", "Tokens generated", registry=self.registry)
        self.queue_depth = Gauge("qgraph_queue_depth", "Requests admitted and not finished", registry=self.registry)
        self.ttft = Histogram("qgraph_time_to_first_token_seconds", "Time to first token", registry=self.registry)
        self.inter_token = Histogram(
            "qgraph_inter_token_seconds", "Mean time between a request's tokens", registry=self.registry,
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
        )  # fmt: skip

    def finished(self, prompt_n: int, completion_n: int, stats) -> None:
        self.prompt_tokens.inc(prompt_n)
        self.generated_tokens.inc(completion_n)
        if stats is not None:
            self.ttft.observe(stats.ttft_s)
            if stats.decode_tokens:
                self.inter_token.observe(stats.decode_s / stats.decode_tokens)


class _Admission:
    """At most ``limit`` requests in the server at once; the rest are refused at the door (429), not queued."""

    def __init__(self, limit: int, gauge):
        self.limit, self.count, self.gauge = limit, 0, gauge
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            self.gauge.set(self.count)
            return True

    def leave(self) -> None:
        with self._lock:
            self.count -= 1
            self.gauge.set(self.count)


def create_app(
    load: Callable[[], Served],
    model_name: str,
    max_queue: int = 64,
    api_key: str | None = None,
    instance: str | None = None,
):
    """The ASGI app; ``load()`` (run in a thread at startup) compiles or reuses the model and returns it.

    Every response names the process that answered in ``X-QGraph-Instance`` (``instance``; default host and pid):
    behind a load balancer or Ray Serve's proxy that says which replica served a request."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = ServerMetrics()
    admission = _Admission(max_queue, metrics.queue_depth)
    state: dict[str, Any] = {"served": None, "error": None}

    def load_in_background() -> None:
        try:
            served = load()
            served.model.engine  # noqa: B018 - start the engine (and its session) before the first request
            state["served"] = served
            logger.info("model %s ready", model_name)
        except Exception as exc:  # noqa: BLE001 - reported by /health and every request
            state["error"] = f"{type(exc).__name__}: {exc}"
            logger.error("loading %s failed: %s", model_name, state["error"])

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load_in_background, name="qgraph-load", daemon=True).start()
        yield
        served = state["served"]
        if served is not None and served.model._engine is not None:
            served.model._engine.close()

    app = FastAPI(title="qgraph", lifespan=lifespan)

    def error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
        return JSONResponse(error_body(message, kind), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        metrics.requests.labels(request.url.path, "400").inc()
        return error(400, "; ".join(parts) or "invalid request")

    def unauthorised(path: str) -> JSONResponse:
        metrics.requests.labels(path, "401").inc()
        return error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")

    instance = instance or f"{socket.gethostname()}-{os.getpid()}"
    app.add_middleware(_Gate, api_key=api_key, instance=instance, refuse=unauthorised)

    @app.get("/health")
    async def health():
        if state["served"] is not None:
            return {"status": "ok"}
        return JSONResponse({"status": "failed" if state["error"] else "loading", "error": state["error"]}, 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "qgraph"}]}

    def check(body) -> Served | JSONResponse:
        if body.model != model_name:
            return error(400, f"model {body.model!r} is not served here; this server serves {model_name!r}")
        if state["served"] is None:
            return error(503, f"the model is not loaded yet ({state['error'] or 'loading'})", "server_error")
        return state["served"]

    async def run(request: Request, endpoint: str, body, submit, make_body, make_chunk):
        served = check(body)
        if isinstance(served, JSONResponse):
            metrics.requests.labels(endpoint, str(served.status_code)).inc()
            return served
        if not admission.try_enter():
            metrics.requests.labels(endpoint, "429").inc()
            return error(429, f"the server is at its limit of {max_queue} requests; retry shortly", "rate_limit_error",
                         headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        try:
            handle = submit(served, served.options(body.engine_options()))
        except QGraphError as exc:
            admission.leave()
            metrics.requests.labels(endpoint, "400").inc()
            return error(400, str(exc))
        request_id = new_id("cmpl" if endpoint == "/v1/completions" else "chatcmpl")
        if body.stream:
            # The status line goes out with the first token, not before: until then a failure (a replica lost, the
            # engine stopped) is a 5xx the client may retry, not a broken stream of a request that never started.
            events = _events(handle, request, admission, metrics)
            try:
                first = await _first_or_gone(events, request)
            except Exception as exc:  # noqa: BLE001 - the engine stopped: the client hears it as a server error
                metrics.requests.labels(endpoint, "500").inc()
                return error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
            if first is None:  # the client went away: its request was cancelled
                return JSONResponse({}, 499)
            metrics.requests.labels(endpoint, "200").inc()
            stream = _sse(_chain(first, events), request_id, body.model, make_chunk)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            completion = await _until_done_or_gone(handle, request)
        finally:
            admission.leave()
        if completion is None:  # the client went away: its request was cancelled
            return JSONResponse({}, 499)
        metrics.requests.labels(endpoint, "200").inc()
        prompt_n, completion_n = len(completion.prompt_ids), len(completion.generated_ids)
        metrics.finished(prompt_n, completion_n, completion.stats)
        return make_body(request_id, body.model, completion.text, completion.finish_reason, prompt_n, completion_n)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        def submit(served: Served, options):
            return served.model.submit(served.tokenizer, body.text(), **options)

        return await run(request, "/v1/completions", body, submit, completion_body,
                         lambda rid, model, text, finish: completion_chunk(rid, model, text, finish))  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        def submit(served: Served, options):
            return served.model.submit(served.tokenizer, messages=body.conversation(), **options)

        def chunk(rid, model, text, finish):
            return chat_chunk(rid, model, {"content": text} if text or finish is None else {}, finish)

        return await run(request, "/v1/chat/completions", body, submit, chat_body, chunk)

    return app


async def _until_done_or_gone(handle, request) -> Any:
    """The request's completion, or None after cancelling it when the client disconnects first."""
    result = asyncio.ensure_future(handle)
    while not result.done():
        done, _ = await asyncio.wait({result}, timeout=0.25)
        if not done and await request.is_disconnected():
            handle.cancel()
            result.cancel()
            return None
    return result.result()


async def _events(handle, request, admission: _Admission, metrics: ServerMetrics) -> AsyncIterator:
    """The handle's events as they come; a client that goes away (the response task is cancelled) cancels it."""
    finished = False
    try:
        async for event in handle.stream():
            if event.finish_reason is not None:
                finished = True
                req = handle.request
                metrics.finished(len(req.prompt_ids), len(req.generated), event.stats)
            yield event
            if finished or await request.is_disconnected():
                break
    finally:
        if not finished:
            handle.cancel()
        admission.leave()


async def _first_or_gone(events: AsyncIterator, request) -> Any:
    """The first event, or None after cancelling the request when the client disconnects first."""
    first = asyncio.ensure_future(anext(events))
    while not first.done():
        done, _ = await asyncio.wait({first}, timeout=0.25)
        if not done and await request.is_disconnected():
            first.cancel()  # the generator's cleanup cancels the request and frees its place
            await asyncio.gather(first, return_exceptions=True)
            return None
    return first.result()


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for event in rest:
        yield event


class _Gate:
    """Pure ASGI middleware (``@app.middleware`` would copy every streamed chunk through a memory stream): the API
    key check on ``/v1/`` and the ``X-QGraph-Instance`` header on every response."""

    def __init__(self, app, api_key: str | None, instance: str, refuse: Callable[[str], Any]):
        self.app, self.refuse = app, refuse
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.header = (b"x-qgraph-instance", instance.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.expected and path.startswith("/v1/") and dict(scope["headers"]).get(b"authorization") != self.expected:
            return await self.refuse(path)(scope, receive, self._named(send))
        await self.app(scope, receive, self._named(send))

    def _named(self, send):
        async def named(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        return named


async def _sse(events: AsyncIterator, request_id: str, model: str, make_chunk) -> AsyncIterator[str]:
    """Server-sent events as the OpenAI API sends them: one ``data:`` JSON chunk per event, then ``[DONE]``."""
    async for event in events:
        yield f"data: {json.dumps(make_chunk(request_id, model, event.text, event.finish_reason))}\n\n"
    yield "data: [DONE]\n\n"


def serve(load: Callable[[], Served], model_name: str, host: str, port: int, max_queue: int, api_key: str | None):
    """Run the server until SIGINT/SIGTERM; uvicorn stops accepting and lets in-flight requests finish first."""
    import uvicorn

    app = create_app(load, model_name, max_queue=max_queue, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=60)


def wait_ready(url: str, timeout_s: float = 600.0) -> None:
    """Block until ``GET url/health`` answers 200 (for scripts and tests that start a server)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s")
