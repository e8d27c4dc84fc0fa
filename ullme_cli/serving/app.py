"""`ullme serve`: an OpenAI-compatible embeddings API, and search over ullme indexes, on FastAPI/uvicorn.

Endpoints (docs/guide.md "Serve"):
- POST /v1/embeddings: OpenAI's request and response, plus `input_type: query|document` (ullme's
  instruction for that side; document by default). `model` picks one of the served models: the base, or
  an adapter served beside it (`--adapter NAME=PATH`); absent, the base.
- POST /v1/search: `{"query": str | [str], "k": int}` over the loaded indexes, merged as `ullme search`
  merges them; the model must agree with the indexes' queries (the one agreement check).
- GET /health, GET /v1/models, GET /metrics (Prometheus text).

Every error has OpenAI's shape, `{"error": {"message", "type", "code"}}`, with a 4xx status for bad input;
an unexpected failure is a 500 whose body holds no traceback (it goes to the server's log).

Bounded under any request (serving/limits.py): `BodyLimit` counts a body's bytes as they arrive, whatever
the framing, and holds at most `max_buffered_bytes` over all requests; texts are counted and checked before
they are tokenized, and tokenized off the event loop, one request at a time, with at most
`max_tokenizing_chars` waiting, so /health answers while a large request is cut into tokens. A request
that has entered the app before SIGTERM finishes: shutdown waits for it before the batcher closes.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Literal, Union

import numpy as np

from ullme_cli.artifacts import truncate
from ullme_cli.errors import UllmeError
from ullme_cli.io.rows import lone_surrogate
from ullme_cli.models.chunking import chunk_texts, pool_mean
from ullme_cli.retrieval.search import as_index_queries, hit_json, search_opened
from ullme_cli.serving.batcher import Batcher, Closed, Overloaded
from ullme_cli.serving.limits import Limits

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise UllmeError("ullme serve needs its extra: pip install 'ullme[serve]'") from e

log = logging.getLogger(__name__)

INPUT_TYPES = {"query": "query", "document": "passage"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type, code, headers


def error_response(status: int, message: str, type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "code": code, "param": None}}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: reads each request's body as it arrives and counts its bytes, so a chunked body is
    bounded exactly as one with a Content-Length. Past `limit` bytes it answers 413 and reads no more; when
    the bodies held over all requests would pass `budget` bytes, 503. The app reads the body from memory."""

    def __init__(self, app, limit: int, budget: int, retry_after: int):
        self.app, self.limit, self.budget, self.retry_after = app, limit, budget, retry_after
        self.held = 0  # bytes of bodies being read or handled now, over all requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(scope, receive, send, 413, f"request body of {int(declared)} bytes is over the limit of {self.limit}", "request_too_large")
        chunks, size = [], 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                if size + len(body) > self.limit:
                    return await self.refuse(scope, receive, send, 413, f"request body is over the limit of {self.limit} bytes", "request_too_large")
                if self.held + len(body) > self.budget:
                    return await self.refuse(scope, receive, send, 503, "too many request bodies in memory at once; retry later", "overloaded",
                                             {"Retry-After": str(self.retry_after)})  # fmt: skip
                self.held += len(body)
                size += len(body)
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            whole, chunks = b"".join(chunks), None
            delivered = False

            async def replay():
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": whole, "more_body": False}
                return await receive()  # then the disconnect, when the client goes away

            await self.app(scope, replay, send)
        finally:
            self.held -= size

    @staticmethod
    async def refuse(scope, receive, send, status: int, message: str, code: str, headers: dict | None = None) -> None:
        await error_response(status, message, "server_error" if status >= 500 else "invalid_request_error", code, headers)(scope, receive, send)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: Union[StrictStr, list[StrictStr]]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)
    input_type: Literal["query", "document"] = "document"
    user: StrictStr | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    query: Union[StrictStr, list[StrictStr]]
    k: StrictInt = Field(10, ge=1, le=1000)
    model: StrictStr | None = None


class Metrics:
    """Prometheus metrics on a registry of their own (not the process-global one)."""

    def __init__(self, depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("ullme_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("ullme_request_seconds", "Request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))  # fmt: skip
        self.batch_texts = Histogram("ullme_batch_texts", "Texts per model batch", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_tokens = Histogram("ullme_batch_tokens", "Padded tokens per model batch", registry=self.registry,
                                      buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536))  # fmt: skip
        self.texts = Counter("ullme_embedded_texts", "Texts embedded", registry=self.registry)
        Gauge("ullme_queue_texts", "Texts waiting for a batch", registry=self.registry).set_function(depth)

    def batch(self, texts: int, tokens: int) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.observe(tokens)
        self.texts.inc(texts)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def build_app(served, indexes: list | None = None, limits: Limits = Limits(), api_key: str | None = None,
              token_budget: int | None = None) -> FastAPI:  # fmt: skip
    """The ASGI app around the served models (`models.adapters.Adapters`: a base, and adapters on it) and the
    open indexes the base must agree with. A batch holds one model's texts, at most `token_budget` padded
    tokens (default: ullme's, as `ullme encode` uses)."""
    indexes = indexes or []
    name = served.base_name
    state: dict = {"in_flight": 0, "tokenizing_chars": 0}
    # One thread tokenizes: a fast tokenizer's truncation settings are shared state, and the event loop stays free.
    tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ullme-tokenize")
    # An upper bound of the characters one token covers: a text longer than max_length times this (with room
    # for normalizers that compose characters) is over max_length without being tokenized.
    surely_over = {model: served[model].setup.max_length * max((len(t) for t in served[model].tokenizer.get_vocab()), default=1) * 4
                   for model in served.names}  # fmt: skip

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(served.encode_batch, token_budget or served[name].default_token_budget, limits.max_queue, limits.max_wait,
                                   on_batch=lambda texts, tokens: metrics.batch(texts, tokens))  # fmt: skip
        try:
            yield
        finally:
            # Every request that entered the app before the signal finishes first (bounded by the timeout),
            # whatever uvicorn's own wait covered; then the batcher takes no more and drains.
            deadline = time.monotonic() + limits.timeout
            while state["in_flight"] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.get_running_loop().run_in_executor(None, state["batcher"].close)
            tokenizer_thread.shutdown(wait=False)

    metrics = Metrics(lambda: state["batcher"].depth if "batcher" in state else 0)
    app = FastAPI(title="ullme", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    open_paths = {"/health"}

    # Added first, so it runs inside `guard`: a request is keyed before its body is read, and counted.
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes, budget=limits.max_buffered_bytes, retry_after=limits.retry_after)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started, endpoint = time.perf_counter(), request.url.path
        if api_key is not None and endpoint not in open_paths and not _key_matches(request.headers.get("authorization"), api_key):
            response = error_response(401, "missing or incorrect API key (send Authorization: Bearer KEY)", code="invalid_api_key")
        else:
            state["in_flight"] += 1
            try:
                response = await call_next(request)
            finally:
                state["in_flight"] -= 1
        known = endpoint if endpoint in ("/v1/embeddings", "/v1/search", "/v1/models", "/health", "/metrics") else "other"
        metrics.requests.labels(known, str(response.status_code)).inc()
        metrics.latency.labels(known).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error_response(error.status, error.message, error.type, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        problem = error.errors()[0] if error.errors() else {}
        if problem.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON ({problem.get('ctx', {}).get('error', 'parse error')})", code="invalid_json")
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        return error_response(400, f"field '{where}': {problem.get('msg', 'invalid value')}", code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):
        log.error(f"{request.url.path}: {type(error).__name__}: {error}", exc_info=error)
        return error_response(500, "internal error; the server log has the details", type="server_error")

    def check_model(requested: str | None) -> str:
        """The served model a request names (the base when it names none)."""
        if requested is None:
            return name
        if requested not in served.names:
            raise ApiError(404, f"model '{requested}' is not served here; this server serves {', '.join(repr(m) for m in served.names)}",
                           code="model_not_found")  # fmt: skip
        return requested

    async def vectors(request: Request, texts: list[str], kind: str, model: str) -> tuple[np.ndarray, int]:
        """Vectors for `texts` from the shared batches, and the tokens they took; waits no longer than the
        timeout, and withdraws the texts when the client goes away."""
        if not texts:
            raise ApiError(400, "field 'input': the list is empty")
        if len(texts) > limits.max_inputs:
            raise ApiError(413, f"{len(texts)} inputs in one request; at most {limits.max_inputs}", code="too_many_inputs")
        for i, text in enumerate(texts):
            if (where := lone_surrogate(text)) is not None:
                raise ApiError(400, f"field 'input'[{i}] holds a lone surrogate ({where}), which is not Unicode text", code="invalid_value")
            if limits.on_long == "error" and len(text) > surely_over[model]:
                raise too_long(served[model], i)
        items, long_inputs = await tokenized(texts, kind, served[model])
        task = asyncio.ensure_future(state["batcher"].embed(items, model))
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, timeout=limits.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task not in done:
            task.cancel()
            if watcher in done:
                raise ApiError(499, "client closed the request", code="client_closed")
            raise ApiError(504, f"no vectors within the request timeout of {limits.timeout:g} s", type="server_error", code="timeout")
        try:
            matrix = task.result()
        except Overloaded as e:
            raise ApiError(503, f"server overloaded ({e}); retry later", type="server_error", code="overloaded",
                           headers={"Retry-After": str(limits.retry_after)}) from None  # fmt: skip
        except Closed as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down", headers={"Retry-After": str(limits.retry_after)}) from None
        usage = {"prompt_tokens": sum(len(item.ids) for item in items)}
        if limits.on_long == "mean" and len(items) > len(texts):  # windows of over-long inputs: one vector per input again
            matrix = pool_mean(matrix, long_inputs, len(texts), served[model].setup.normalize)
            usage.update(chunked_inputs=len({c.doc for c in long_inputs if c.number > 0}), chunks=len(items))
        elif long_inputs:
            usage["truncated_inputs"] = len(long_inputs)
        return matrix, usage

    async def tokenized(texts: list[str], kind: str, embedder) -> tuple[list, list]:
        """The texts' tokens, computed on the tokenizer thread, as `tokenize_within_limits` gives them."""
        size = sum(len(t) for t in texts)
        if state["tokenizing_chars"] + size > limits.max_tokenizing_chars:
            raise ApiError(503, "too much text waiting to be tokenized; retry later", type="server_error", code="overloaded",
                           headers={"Retry-After": str(limits.retry_after)})  # fmt: skip
        state["tokenizing_chars"] += size
        try:
            return await asyncio.get_running_loop().run_in_executor(tokenizer_thread, tokenize_within_limits, texts, kind, embedder)
        finally:
            state["tokenizing_chars"] -= size

    def too_long(embedder, first: int, count: int | None = None) -> ApiError:
        over = f"{count} input(s) over; " if count else ""
        return ApiError(413, f"input {first} is longer than the model's {embedder.setup.max_length} tokens "
                             f"({over}the server was started with --on-long error)", code="input_too_long")  # fmt: skip

    def tokenize_within_limits(texts: list[str], kind: str, embedder) -> tuple[list, list]:
        """The items to embed and what the --on-long policy did: `error` answers 413 for an over-long input;
        `truncate` cuts it (the positions cut come back); `mean` cuts every input into windows of max_length
        when one is over (the windows come back, to pool: models/chunking.py)."""
        items, over = embedder.tokenize_past_limit(texts, kind)
        if over and limits.on_long == "error":
            raise too_long(embedder, over[0], len(over))
        if over and limits.on_long == "mean":
            windows = chunk_texts(embedder, texts, kind, None, size=None)
            return [w.tokens for w in windows], windows
        if over:
            for i, item in zip(over, embedder.tokenize([texts[i] for i in over], kind)):
                items[i] = item
        return items, over

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        model = check_model(body.model)
        embedder = served[model]
        texts = [body.input] if isinstance(body.input, str) else body.input
        if body.dimensions is not None and body.dimensions > embedder.dim:
            raise ApiError(400, f"field 'dimensions': {body.dimensions} is above the model's {embedder.dim}", code="invalid_value")
        matrix, usage = await vectors(request, texts, INPUT_TYPES[body.input_type], model)
        matrix = truncate(matrix.astype(np.float32), body.dimensions, embedder.setup.normalize).astype(np.float32)
        encode = (lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if body.encoding_format == "base64" else (lambda v: v.tolist())
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(matrix)]
        return JSONResponse({"object": "list", "data": data, "model": model, "usage": {**usage, "total_tokens": usage["prompt_tokens"]}})

    @app.post("/v1/search")
    async def search(body: SearchRequest, request: Request):
        from starlette.concurrency import run_in_threadpool

        if check_model(body.model) != name:
            raise ApiError(400, f"field 'model': search runs with '{name}', the model the indexes were built with", code="invalid_value")
        if not indexes:
            raise ApiError(404, "no index is loaded (start the server with --index FOLDER)", code="no_index")
        queries = [body.query] if isinstance(body.query, str) else body.query
        matrix, usage = await vectors(request, queries, "query", name)
        matrix = as_index_queries(matrix, indexes[0].manifest)
        qids = [str(i) for i in range(len(queries))]
        found = await run_in_threadpool(lambda: list(search_opened(indexes, qids, matrix, body.k)))
        data = [{"index": int(qid), "hits": [hit_json(h, r, digits=None) for r, h in enumerate(hits, start=1)]} for qid, hits in found]
        return JSONResponse({"object": "list", "data": data, "model": name, "usage": {**usage, "total_tokens": usage["prompt_tokens"]}})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "models": served.names, "queue": state["batcher"].depth if "batcher" in state else 0}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "ullme", "dimensions": served[model].dim,
                                            "max_input_tokens": served[model].setup.max_length, **({"parent": name} if model != name else {})}
                                           for model in served.names]}  # fmt: skip

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _key_matches(header: str | None, key: str) -> bool:
    """Constant-time comparison of the bearer key (no early exit on the first differing byte)."""
    return hmac.compare_digest((header or "").encode(), f"Bearer {key}".encode())


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away. The body has been read, so the next ASGI message is the
    disconnect: waiting for it costs nothing (polling `is_disconnected` woke the loop 20 times a second
    per waiting request)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
