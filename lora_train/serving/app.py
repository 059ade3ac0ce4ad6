"""The HTTP API (FastAPI): classify, list / load / unload adapters, health and readiness, the page at ``/``.

Errors are JSON ``{"detail": ...}`` with these statuses: 400 a source that is not a usable adapter or a Host
header that is not allowed, 401 a load or unload without the admin token, 403 loading and unloading off, 404 an
unknown adapter, 409 a name already taken or an adapter of another base model, 413 too many texts or too large a
body, 422 a malformed body (bad JSON, wrong types, an empty list, an empty or blank text, text that is not valid
Unicode), 500 a forward that failed (only the requests that make it fail get it), 503 queue full or not ready.
Who may call what: :mod:`lora_train.serving.access`.
The interactive ``/docs`` page is off (it loads scripts from a CDN); the schema is at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from starlette.concurrency import run_in_threadpool

from lora_train.serving.access import Access, AdminGate, HostCheck, hide_root, hot_load_source
from lora_train.serving.batcher import MicroBatcher
from lora_train.serving.page import PAGE
from lora_train.serving.registry import AdapterRegistry, ServingError, read_adapter
from lora_train.serving.replicas import ReplicatedRegistry

Registry = AdapterRegistry | ReplicatedRegistry
"""One model, or one replica per batcher worker: the app uses the catalog both have."""


@dataclass(frozen=True)
class Limits:
    """Per-request bounds; anything larger is refused with 413 before any work."""

    max_texts: int = 64
    max_body_bytes: int = 1 << 20


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's "\\ud800" decodes to a lone surrogate, which no tokenizer takes
        raise ValueError(
            f"not valid Unicode: a lone surrogate {text[err.start]!a} at character {err.start}"
            " (send UTF-8 text; in JSON, an \\ud8xx escape needs its \\udcxx pair)"
        ) from None
    return text


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text must not be empty or whitespace only")
    return text


Str = Annotated[StrictStr, AfterValidator(_unicode)]
Text = Annotated[StrictStr, AfterValidator(_unicode), AfterValidator(_not_blank)]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: Optional[Str] = Field(None, description="name of a loaded adapter (see GET /v1/adapters)")
    adapters: Optional[list[Str]] = Field(
        None,
        min_length=1,
        description="instead of adapter: several adapters, each classifying every text (a fan-out request,"
        " answered from shared forwards)",
    )
    texts: list[Text] = Field(min_length=1, description="texts to classify; each non-blank")

    @model_validator(mode="after")
    def one_of_adapter_and_adapters(self) -> "ClassifyRequest":
        if (self.adapter is None) == (self.adapters is None):
            raise ValueError("give either adapter (one name) or adapters (a list of names), not both or neither")
        if self.adapters is not None and len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"adapters {self.adapters} name an adapter twice")
        return self


class Prediction(BaseModel):
    label: str
    probability: float = Field(description="probability of the predicted label")
    probabilities: dict[str, float] = Field(description="probability of every label, in the adapter's label order")
    truncated: bool = Field(description="the text was longer than the adapter's max_length tokens and was cut")


class ClassifyResponse(BaseModel):
    adapter: str
    predictions: list[Prediction]


class FanOutResponse(BaseModel):
    results: list[ClassifyResponse] = Field(description="one entry per adapter, in the order of the request's")


class AdapterInfo(BaseModel):
    name: str
    source: str
    task: str
    labels: list[str]
    base_model: str
    peft_type: str
    max_length: int
    metrics: dict[str, Any] = Field(description="from the run's metrics.json (validation accuracy, macro-F1...)")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Str = Field(
        min_length=1,
        description="run directory under the server's adapter root, relative to it; or Hub repo id user/name"
        " (where the server allows the Hub)",
    )
    name: Optional[Str] = Field(None, description="adapter name (default: the run directory's name)")


class Error(BaseModel):
    detail: Any


ERRORS = {status: {"model": Error} for status in (400, 404, 409, 413, 422, 500, 503)}
ADMIN_ERRORS = {status: {"model": Error} for status in (400, 401, 403, 404, 409, 413, 422, 500, 503)}


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413 (chunked bodies too), else replay it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        body, more = b"", declared is None or int(declared) <= self.max_bytes
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= self.max_bytes
        if len(body) > self.max_bytes or (declared is not None and int(declared) > self.max_bytes):
            response = JSONResponse(
                {"detail": f"request body over {self.max_bytes} bytes; send fewer or shorter texts per request"},
                status_code=413,
            )
            return await response(scope, receive, send)

        return await self.app(scope, _replay(body), send)


def _replay(body: bytes):
    """An ASGI ``receive`` that hands on a body already read, whole, in one message."""

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


INLINE_ENCODE_CHARS = 1024
"""Requests whose texts hold at most this many characters are tokenized on the event loop's thread where the
adapter's tokenizer is free (else, and for longer ones, in its thread pool). On the AMD host, a 160-character SST-2
sentence took 0.07 ms to tokenize and 16 of them (1,918 characters) 0.57 ms, less than the hop to a pool thread and
back costs the GIL; a 1,943-character IMDb review took 1.7 ms, long enough to hold up other requests. Mix B,
alternating runs: 186.5 against 178.1 requests/s (median of 3 each; docs/serving.md)."""
Answer = Callable[["ClassifyRequest"], Awaitable[dict[str, Any]]]
"""What ``POST /v1/classify`` answers to a valid request (raises :class:`ServingError`)."""
CLASSIFY_ANSWER = TypeAdapter(ClassifyResponse | FanOutResponse)
"""The route's response model: the fast path validates and writes its answers with it, as FastAPI does."""


@dataclass
class FastPathStats:
    """How many classify requests the fast path answered (the rest went through FastAPI's route)."""

    answered: int = 0


class ClassifyFastPath:
    """ASGI middleware, inside the Host check and the body limit: answers ``POST /v1/classify`` with a JSON body
    that is a valid request itself, without FastAPI's routing, dependency solving and exception middleware.

    Under load that machinery held the event loop's thread, and with it the GIL, between the model worker's
    operations: on the AMD host, mix B went from 169.8 to 189.7 requests/s and its p99 from 432 to 213 ms (median
    of 3 alternating runs each; docs/serving.md). The answer is the route's own (``answer``), validated and written
    with the route's response model; a ``ServingError`` gets the exception handler's body. Anything else (another
    path or method, a body that is not JSON or not a valid request, JSON pydantic's parser refuses but Python's
    takes, such as a byte-order mark) goes on to the route, which gives its canonical answer or 422.
    """

    def __init__(self, app, answer: Answer, stats: FastPathStats):
        self.app = app
        self.answer = answer
        self.stats = stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/classify":
            return await self.app(scope, receive, send)
        if not _is_json(dict(scope["headers"]).get(b"content-type", b"")):
            return await self.app(scope, receive, send)
        body, more = b"", True  # BodyLimit has read and bounded it: one replayed message
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            request = ClassifyRequest.model_validate_json(body)
        except ValidationError:
            return await self.app(scope, _replay(body), send)
        try:
            answer = CLASSIFY_ANSWER.dump_json(CLASSIFY_ANSWER.validate_python(await self.answer(request)))
            response = Response(answer, media_type="application/json")
        except ServingError as err:
            response = _error_response(err)
        self.stats.answered += 1
        return await response(scope, receive, send)


def _is_json(content_type: bytes) -> bool:
    """Whether a Content-Type is one FastAPI parses as JSON: application/json or application/*+json."""
    kind = content_type.split(b";", 1)[0].strip().lower()
    return kind.startswith(b"application/") and (kind == b"application/json" or kind.endswith(b"+json"))


def _error_response(err: ServingError) -> JSONResponse:
    return JSONResponse({"detail": err.message}, status_code=err.status)


def create_app(
    registry: Registry, batcher: MicroBatcher, limits: Limits = Limits(), access: Optional[Access] = None
) -> FastAPI:
    """The FastAPI application over a registry whose adapters are attached and a started batcher; ``access``
    says who may load and unload adapters, from where, and which Host names are answered (default: nobody,
    nowhere, loopback names)."""
    access = access or Access()
    app = FastAPI(
        title="lora_train adapter server",
        docs_url=None,
        redoc_url=None,
        description="Many LoRA classifiers over one base model, micro-batched. See docs/serving.md.",
    )
    answer = _classify_answer(registry, batcher, limits)
    app.state.fast_path = FastPathStats()
    # The last added runs first: Host, then the admin token, then the body size, then the classify fast path.
    app.add_middleware(ClassifyFastPath, answer=answer, stats=app.state.fast_path)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(AdminGate, token=access.admin_token)
    app.add_middleware(HostCheck, allowed_hosts=access.allowed_hosts)

    _add_error_handlers(app)
    _add_status_routes(app, registry, batcher)
    _add_admin_routes(app, registry, batcher, access)
    _add_classify_route(app, answer)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Errors as ``{"detail": ...}`` with their status; validation errors without the offending values."""

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, err: ServingError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes each bad value, which can be a 1 MB text or a lone surrogate that cannot be
        # written as UTF-8 (a 500); where and what is enough.
        problems = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in err.errors()
        ]
        return JSONResponse({"detail": problems}, status_code=422)


def _add_status_routes(app: FastAPI, registry: Registry, batcher: MicroBatcher) -> None:
    """The page, liveness, readiness and the adapter listing: read-only, for any caller the Host check lets in."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    @app.get("/healthz", summary="Liveness: the process answers and its model worker runs")
    async def health() -> JSONResponse:
        stats = batcher.stats
        body = {
            "status": "ok" if batcher.alive else "worker stopped",
            "batches": stats.batches,
            "requests": stats.requests,
            "texts": stats.texts,
            "busy_s": round(stats.busy_s, 3),
            "batching": batcher.batching,
        }
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

    @app.get("/readyz", summary="Readiness: at least one adapter is loaded and requests are accepted")
    async def ready() -> JSONResponse:
        names = registry.names()
        is_ready = batcher.alive and bool(names)
        return JSONResponse({"ready": is_ready, "adapters": names}, status_code=200 if is_ready else 503)

    @app.get("/v1/adapters", response_model=list[AdapterInfo], summary="The loaded adapters")
    async def list_adapters() -> list[dict[str, Any]]:
        return registry.describe()

    @app.get("/v1/adapters/{name}", response_model=AdapterInfo, responses=ERRORS)
    async def get_adapter(name: str) -> dict[str, Any]:
        return registry.get(name).describe()


def _add_admin_routes(app: FastAPI, registry: Registry, batcher: MicroBatcher, access: Access) -> None:
    """Hot load and unload, behind the admin token (:class:`AdminGate`) and the adapter root."""

    @app.post(
        "/v1/adapters",
        response_model=AdapterInfo,
        status_code=201,
        responses=ADMIN_ERRORS,
        summary="Load an adapter from a run directory under the adapter root or a Hub repo, while serving"
        " (admin token)",
    )
    async def load_adapter(request: LoadRequest) -> dict[str, Any]:
        try:
            source, shown = hot_load_source(request.source, access)
            adapter = await run_in_threadpool(read_adapter, source, request.name, shown)
            registry.check_can_attach(adapter)  # fail fast; checked again on the worker, where it counts
            await asyncio.wrap_future(batcher.call(lambda: registry.attach(adapter)))
        except ServingError as err:
            raise ServingError(err.status, hide_root(err.message, access)) from None
        return adapter.describe()

    @app.delete(
        "/v1/adapters/{name}",
        responses=ADMIN_ERRORS,
        summary="Unload an adapter; its queued requests finish first (admin token)",
    )
    async def unload_adapter(name: str) -> dict[str, str]:
        registry.mark_unloading(name)
        await asyncio.wrap_future(batcher.call(lambda: registry.detach(name)))
        return {"unloaded": name}


def _classify_answer(registry: Registry, batcher: MicroBatcher, limits: Limits) -> Answer:
    """The answer to a classify request: one adapter's predictions, or each adapter's (a fan-out request)."""

    async def answer(request: ClassifyRequest) -> dict[str, Any]:
        names = request.adapters or [request.adapter]
        if len(request.texts) * len(names) > limits.max_texts:
            fan_out = f" x {len(names)} adapters" if request.adapters else ""
            raise ServingError(413, f"{len(request.texts)} texts{fan_out} in one request; at most {limits.max_texts}")
        adapters = [registry.get(name) for name in names]
        # Adapters of one base share its tokenizer: the texts are tokenized once per max_length and truncation.
        encodings: dict[tuple, tuple] = {}
        short = sum(map(len, request.texts)) <= INLINE_ENCODE_CHARS
        for adapter in adapters:
            key = (adapter.max_length, adapter.recipe.data.truncation)
            if key in encodings:
                continue
            encodings[key] = adapter.encode_if_free(request.texts) if short else None
            if encodings[key] is None:  # a long request, or the tokenizer in use by another thread
                encodings[key] = await run_in_threadpool(adapter.encode, request.texts)
        encoded = [encodings[(a.max_length, a.recipe.data.truncation)] for a in adapters]
        futures = batcher.submit_together([(a.name, features) for a, (features, _) in zip(adapters, encoded)])
        results = [
            _predictions(adapter, await asyncio.wrap_future(future), truncated)
            for adapter, future, (_, truncated) in zip(adapters, futures, encoded, strict=True)
        ]
        return results[0] if request.adapter is not None else {"results": results}

    return answer


def _add_classify_route(app: FastAPI, answer: Answer) -> None:
    """``POST /v1/classify``: one adapter, or several in shared forwards (a fan-out request). Valid JSON requests
    are answered by :class:`ClassifyFastPath` before they reach it; the route answers the rest, and is the schema."""

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse | FanOutResponse,
        responses=ERRORS,
        summary="Classify texts with one adapter, or with several (adapters: [...]) in shared forwards",
    )
    async def classify(request: ClassifyRequest) -> dict[str, Any]:
        return await answer(request)


def _predictions(adapter, probabilities, truncated: list[bool]) -> dict[str, Any]:
    """One adapter's answer: the label, its probability and every label's, per text."""
    predictions = []
    for row, cut in zip(probabilities.tolist(), truncated, strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        predictions.append(
            {
                "label": adapter.label_names[best],
                "probability": row[best],
                "probabilities": dict(zip(adapter.label_names, row, strict=True)),
                "truncated": cut,
            }
        )
    return {"adapter": adapter.name, "predictions": predictions}
