"""The starlette app: routes, their handlers, error answers, and the scheduler's life with the app's."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse as _JSONResponse
from starlette.responses import Response as HTTPResponse
from starlette.responses import StreamingResponse
from starlette.routing import Route

from qora import limits
from qora.api import answers, metrics, security
from qora.api.errors import ApiError, generation_error, json_bytes, quote, valid_text
from qora.api.jobs import END, ClientGone, QueueFull, Scheduler, Worker
from qora.api.models import ChatRequest, CompletionRequest

log = logging.getLogger("qora.server")


class JSONResponse(_JSONResponse):
    """starlette's, except that a lone surrogate (from a file name, say) becomes U+FFFD instead of a 500."""

    def render(self, content) -> bytes:
        return json_bytes(content)


def _fingerprint() -> str:
    try:
        from qora import __version__

        return f"qora-{__version__}"
    except ImportError:  # pragma: no cover - the package always has it
        return "qora"


class Handlers:
    """The routes' handlers, over one model served as `model_id` and the scheduler that runs its jobs."""

    def __init__(self, model, model_id: str, scheduler: Scheduler, api_key, created: int, max_body_bytes: int):
        self.model, self.model_id, self.scheduler = model, model_id, scheduler
        self.api_key, self.created, self.max_body_bytes = api_key, created, max_body_bytes
        self.fingerprint = _fingerprint()
        self.stats = metrics.Stats()
        self.instance = uuid.uuid4().hex[:12]  # tells replicas behind one address apart

    def routes(self) -> list[Route]:
        return [
            Route("/", self.page),
            Route("/static/{name}", self.static),
            Route("/health", self.health),
            Route("/metrics", self.metrics),
            Route("/v1/models", self.models),
            Route("/v1/models/{name:path}", self.one_model),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "qora"}

    async def health(self, request: Request):
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model_id,
                "instance": self.instance,
                "queued": self.scheduler.queued,
                "busy": self.scheduler.busy,
                "active": metrics.scheduler_gauges(self.scheduler)[1],
                "slots": metrics.scheduler_gauges(self.scheduler)[2],
                "requests": dict(self.scheduler.counts),
                "cached_tokens": len(getattr(self.model, "cache_tokens", [])),
            }
        )

    async def page(self, request: Request):
        return _static("index.html")

    async def static(self, request: Request):
        return _static(request.path_params["name"])

    async def metrics(self, request: Request):
        security.check_api_key(request, self.api_key)
        return HTTPResponse(
            self.stats.render(self.scheduler, self.model_id), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def models(self, request: Request):
        security.check_api_key(request, self.api_key)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def one_model(self, request: Request):
        security.check_api_key(request, self.api_key)
        name = request.path_params["name"]
        if name != self.model_id:
            raise ApiError(404, f"model {quote(name)} does not exist", "model", "model_not_found")
        return JSONResponse(self.model_card())

    async def chat_completions(self, request: Request):
        return await self.complete(request, ChatRequest, answers.ChatAnswer)

    async def completions(self, request: Request):
        return await self.complete(request, CompletionRequest, answers.TextAnswer)

    async def complete(self, request: Request, request_type, answer_type):
        """complete_request, counted in the stats (and logged under --verbose) with its outcome."""
        endpoint = "chat" if request_type is ChatRequest else "completions"
        t0 = time.monotonic()
        try:
            response = await self.complete_request(request, request_type, answer_type, endpoint, t0)
        except ApiError as e:
            self.stats.finished(endpoint, e.status, duration=time.monotonic() - t0, error=e.message[:200])
            raise
        except ClientGone:
            self.stats.finished(endpoint, 499, duration=time.monotonic() - t0)
            raise
        return response

    async def complete_request(self, request: Request, request_type, answer_type, endpoint: str, t0: float):
        """Validate, queue the job, then answer whole or streamed once the first event is in."""
        security.check_api_key(request, self.api_key)
        body = await security.read_body(request, self.max_body_bytes)
        vocab = getattr(getattr(self.model, "engine", None), "vocab_size", None)
        req = request_type.parse(body, self.model_id, vocab=vocab)
        options = req.options(getattr(self.model.tokenizer, "chat_template", None))
        try:
            job = self.scheduler.submit(req.prompt_input, options)
        except QueueFull as e:
            raise ApiError(
                429, f"the server is busy ({e.waiting} requests waiting): retry later", headers={"Retry-After": "1"}
            ) from None
        try:
            first = await job.next_event(request.is_disconnected)
        except ClientGone:
            return HTTPResponse(status_code=499)  # nobody reads it: the client is gone
        except BaseException:  # the server is stopping: drop the job
            job.cancel()
            raise
        if isinstance(first, BaseException):
            raise generation_error(first)
        if first is END:  # nothing produced: the job was cancelled before it ran
            self.stats.finished(endpoint, 499, duration=time.monotonic() - t0)
            return HTTPResponse(status_code=499)
        ttft = time.monotonic() - t0
        answer = answer_type(self.model.tokenizer, options.logprobs, req.echo_text)
        answer.tools = getattr(req, "tool_spec", None)
        head = {
            "id": f"{answer.id_prefix}-{uuid.uuid4().hex}",
            "object": answer.chunk_object,
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": self.fingerprint,
        }

        def done(status):
            self.stats.finished(
                endpoint,
                status,
                answer.last,
                ttft,
                time.monotonic() - t0,
                id=head["id"],
                stream=bool(req.stream),
                user=req.user,
            )

        if req.stream:
            return StreamingResponse(
                answers.stream(job, first, answer, head, req.include_usage, self.stats.tokens, done),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            whole = await answers.collect(job, first, answer, head, request.is_disconnected, self.stats.tokens)
        except ClientGone:
            done(499)
            return HTTPResponse(status_code=499)
        done(200)
        return JSONResponse(whole)


# the chat page's files (qora/api/static/), the only ones served: no path from the client reaches the disk
STATIC = {"index.html": "text/html", "chat.js": "text/javascript", "chat.css": "text/css"}


def _static(name: str) -> HTTPResponse:
    if name not in STATIC:
        raise ApiError(404, f"no file {quote(name)}")
    from importlib import resources

    body = resources.files("qora.api").joinpath("static", name).read_bytes()
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if name == "index.html":  # the page runs only its own script and style, and talks only to this server
        headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    return HTTPResponse(body, media_type=f"{STATIC[name]}; charset=utf-8", headers=headers)


async def _on_api_error(request, exc: ApiError):
    # a 413 leaves the rest of the body unread: the connection cannot carry another request
    headers = {"Connection": "close"} if exc.status == 413 else {}
    return JSONResponse(exc.body(), status_code=exc.status, headers={**getattr(exc, "headers", {}), **headers})


async def _on_http_error(request, exc: HTTPException):
    message = {404: f"no route {quote(request.url.path, str)}", 405: f"method {request.method} not allowed here"}
    err = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
    return JSONResponse(err.body(), status_code=exc.status_code)


async def _on_client_gone(request, exc: Exception):
    # the client left (mid-body, say): nobody reads an answer, and it is no server fault worth a traceback
    return HTTPResponse(status_code=499)


async def _on_error(request, exc: Exception):
    log.exception("request failed")
    err = ApiError(500, f"internal error: {type(exc).__name__}")
    return JSONResponse(err.body(), status_code=500)


def create_app(
    model,
    model_id: str,
    api_key: str | None = None,
    created: int | None = None,
    *,
    max_body_bytes: int = limits.SERVER_MAX_BODY_BYTES,
    allowed_hosts: list[str] | None = None,
    port: int | None = None,
    any_ip_host: bool = False,
    cors: list[str] = (),
    scheduler: Scheduler | None = None,
):
    """The starlette app serving `model` as `model_id`; it starts and stops its scheduler itself.

    allowed_hosts: Host header names (optionally NAME:PORT; "*" any) the server answers; None checks no
    Host (in-process use; `qora serve` always passes its list). port: the port a name without one must
    carry (or none). any_ip_host: any IP-address Host passes (the server listens on every address).
    cors: origins ("https://app.example", "*") whose web pages may call the API; any other request that
    carries an Origin is refused. max_body_bytes: the largest request body read. scheduler: what runs
    the generation jobs (default: a Worker, one job at a time)."""
    scheduler = scheduler if scheduler is not None else Worker(model)
    model_id = valid_text(model_id)  # the id clients send as JSON text and every answer carries
    created = int(created if created is not None else time.time())
    handlers = Handlers(model, model_id, scheduler, api_key, created, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = Starlette(
        routes=handlers.routes(),
        exception_handlers={
            ApiError: _on_api_error,
            HTTPException: _on_http_error,
            ClientDisconnect: _on_client_gone,
            ClientGone: _on_client_gone,
            Exception: _on_error,
        },
        lifespan=lifespan,
        middleware=security.middleware(allowed_hosts, port, any_ip_host, cors, max_body_bytes),
    )
    app.state.worker = scheduler
    app.state.stats = handlers.stats
    return app
