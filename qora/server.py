"""OpenAI-compatible HTTP server: `python -m qora serve --load m.qora [--host 127.0.0.1 --port 8000]`.

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions
(streamed as server-sent events ending with `data: [DONE]`, or one JSON answer with `usage`).

Design: one model means one engine and one KV cache, so one worker thread runs the requests one at a
time, in arrival order, off a queue. The asyncio side (starlette on uvicorn) only parses, validates,
queues and streams back what the worker produces, so the event loop never waits on the engine and two
requests never touch the cache at once. The Model's KV reuse carries over between requests: a client
that resends a growing conversation pays for its new turn only. A client that goes away marks its job
cancelled; the worker checks between tokens and moves on to the next request.

Beyond OpenAI's fields: `top_k`, `min_p`, `repetition_penalty`, `think_budget`, `ignore_eos`, and
`chat_template_kwargs.enable_thinking` (SmolLM3's thinking switch; `/think` or `/no_think` in the
system message works too). Thinking comes back as `reasoning_content`, apart from `content`.
`max_tokens` caps the answer; thinking has its own budget (think_budget, default from RAM), as in
the CLI. Sampling values a request leaves out take qora's defaults, not OpenAI's.

Needs the `server` extra: pip install "qora[server]" (starlette, uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import queue
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from qora import limits
from qora.errors import ContextOverflowError, ModelFileChangedError, QoraError
from qora.generate import MAX_TOP_LOGPROBS, GenerationOptions, Response, stream_generate

log = logging.getLogger("qora.server")

FINISH = {"stop": "stop", "length": "length", "loop": "length", "interrupted": "stop"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOPS = 4
MAX_LEGACY_LOGPROBS = 5
_POLL_S = 0.2  # how often a waiting non-streamed request checks that its client is still there


# ───── errors ─────


class ApiError(Exception):
    """An OpenAI-style error answer: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}.get(self.status)
        kind = kind or ("invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ───── request parsing ─────
# json.loads alone takes NaN/Infinity, 1e999 (as inf), duplicate keys (the last wins), lone surrogates
# ("\ud800", which no encoder accepts later) and nesting until RecursionError: each of these is a 400
# here, with a short message, before any field is read.


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _number_literal(kind):
    def parse(text: str):
        if len(text) > limits.SERVER_MAX_NUMBER_CHARS:
            raise ValueError(f"a number of {len(text)} characters (at most {limits.SERVER_MAX_NUMBER_CHARS})")
        value = kind(text)
        if kind is float and value in (float("inf"), float("-inf")):
            raise ValueError(f"{text} is out of range")
        return value

    return parse


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {json.dumps(dup)[:40]}")
    return out


_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys,
    parse_float=_number_literal(float),
    parse_int=_number_literal(int),
    parse_constant=_no_constant,
)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _depth(text: str) -> int:
    """Deepest nesting of a JSON text, counted before parsing it (vectorised: a 1 MiB body takes
    milliseconds; walking the parsed tree in Python took seconds for 300K small objects)."""
    import numpy as np

    bare = _JSON_STRING.sub("", text).encode("utf-8", "replace")  # brackets inside strings do not count
    b = np.frombuffer(bare, dtype=np.uint8)
    step = (b == ord("[")).astype(np.int32) + (b == ord("{")) - (b == ord("]")) - (b == ord("}"))
    return int(np.cumsum(step).max(initial=0))


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or ApiError(400) saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: not UTF-8 ({e.reason} at byte {e.start})") from None
    text = text.removeprefix("\ufeff")  # a BOM is allowed, as HTTP clients may send one
    try:
        body = _DECODER.decode(text)
    except RecursionError:  # deeper than the interpreter's recursion limit (~1000)
        raise ApiError(400, f"the request body is nested more than {limits.MAX_JSON_DEPTH} deep") from None
    except ValueError as e:  # JSONDecodeError, and the checks above
        raise ApiError(400, f"the request body is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if _depth(text) > limits.MAX_JSON_DEPTH:  # on valid JSON only: its strings all end, the scan is linear
        raise ApiError(400, f"the request body is nested more than {limits.MAX_JSON_DEPTH} deep")
    try:  # "\ud800" escapes decode to lone surrogates, which nothing downstream can encode
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request body has a lone UTF-16 surrogate (\\ud800-\\udfff) in a string") from None
    return body


# ───── request validation ─────

_TYPE_NAMES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    dict: "an object",
    list: "an array",
}


def _field(body: dict, name: str, kinds: tuple, default=None):
    """body[name] if present and not null, checked against `kinds` (bool is never taken for a number)."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"'{name}' must be {want}, got {json.dumps(value)[:60]}", param=name)
    return value


def _number(body: dict, name: str, low: float, high: float | None = None, low_open: bool = False):
    value = _field(body, name, (float,))
    if value is None:
        return None
    if value < low or (low_open and value == low) or (high is not None and value > high):
        span = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ApiError(400, f"'{name}' must be {span}, got {value}", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None):
    value = _field(body, name, (int,))
    if value is None:
        return None
    if value < low or (high is not None and value > high):
        span = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise ApiError(400, f"'{name}' must be {span}, got {value}", param=name)
    return value


def _stops(body: dict) -> list[str]:
    stop = _field(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or up to {MAX_STOPS} of them", param="stop")
    if any(len(s) > limits.SERVER_MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"a stop string may have at most {limits.SERVER_MAX_STOP_CHARS} characters", param="stop")
    return list(stops)


def _text_content(content, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        if len(content) > limits.SERVER_MAX_CONTENT_PARTS:
            raise ApiError(400, f"{where}: at most {limits.SERVER_MAX_CONTENT_PARTS} content parts", param="messages")
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: 'content' must be a string or a list of text parts", param="messages")


def _messages(body: dict) -> list[dict]:
    messages = _field(body, "messages", (list,))
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    if len(messages) > limits.SERVER_MAX_MESSAGES:
        raise ApiError(400, f"'messages' may hold at most {limits.SERVER_MAX_MESSAGES} messages", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", param="messages")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"{where}: unknown role {role!r}", param="messages")
        out.append({"role": role, "content": _text_content(m.get("content"), where)})
    return out


def _options(body: dict, chat: bool) -> tuple[GenerationOptions, int | None]:
    """GenerationOptions for a request, and how many top logprobs to report (None: no logprobs)."""
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.get("tools"):
        raise ApiError(400, "tools are not supported by this server", param="tools")
    max_tokens = _integer(body, "max_completion_tokens", 1) if chat else None
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    if max_tokens is None and not chat:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    temperature = _number(body, "temperature", 0.0, 2.0)
    if chat:
        want = _field(body, "logprobs", (bool,), False)
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _integer(body, "logprobs", 0, MAX_LEGACY_LOGPROBS)
    seed = _integer(body, "seed", -(2**63))
    enable_thinking = None
    if chat:
        kwargs = _field(body, "chat_template_kwargs", (dict,), {})
        enable_thinking = _field(kwargs, "enable_thinking", (bool,))
    try:
        options = GenerationOptions(
            max_tokens=max_tokens,
            think_budget=_integer(body, "think_budget", 0),
            temperature=temperature,
            top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
            top_k=_integer(body, "top_k", 0),
            min_p=_number(body, "min_p", 0.0, 1.0),
            repeat_penalty=_number(body, "repetition_penalty", 0.0, low_open=True),
            presence_penalty=_number(body, "presence_penalty", -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0),
            seed=None if seed is None else seed % 2**63,
            stop=_stops(body),
            greedy=temperature == 0.0,
            enable_thinking=enable_thinking,
            raw=not chat,
            # OpenAI semantics: max_tokens is a hard count, not "stop at a sentence near it".
            sentence_stop=False,
            logprobs=logprobs,
            ignore_eos=_field(body, "ignore_eos", (bool,), False),  # as vLLM and llama.cpp's server
        )
    except QoraError as e:
        raise ApiError(400, str(e)) from None
    return options, logprobs


# ───── the engine worker ─────

_END = object()  # a job's last event


class _ClientGone(Exception):
    """The client disconnected while its non-streamed request waited."""


@dataclass
class Job:
    """One request's generation: the worker puts Responses (then _END, or an exception) on `events`."""

    prompt: object
    options: GenerationOptions
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    checked: float = field(default_factory=time.monotonic)  # when the client was last seen connected

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """Runs jobs one at a time on a thread of its own, over one model."""

    def __init__(self, model):
        self.model = model
        self.jobs: queue.Queue = queue.Queue()
        self.counts = {"served": 0, "cancelled": 0, "failed": 0}
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._run, name="qora-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running and wait for the thread (the engine must be idle before close)."""
        if self.running is not None:
            self.running.cancel()
        self.jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def cancel_all(self) -> None:
        """Cancel the running job and every queued one (the server is stopping): open streams then end
        at the next token instead of holding the shutdown up."""
        running = self.running
        if running is not None:
            running.cancel()
        with self.jobs.mutex:
            queued = [job for job in self.jobs.queue if job is not None]
        for job in queued:
            job.cancel()

    def submit(self, prompt, options: GenerationOptions) -> Job:
        job = Job(prompt, options, asyncio.get_running_loop())
        self.jobs.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.running = job
            try:
                self._serve(job)
            finally:
                self.running = None

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():  # the client left while queued
            self.counts["cancelled"] += 1
            job.emit(_END)
            return
        gen = stream_generate(self.model, job.prompt, job.options)
        try:
            for r in gen:
                if job.cancelled.is_set():
                    break
                job.emit(r)
        except QoraError as e:
            self.counts["failed"] += 1
            job.emit(e)
        except Exception as e:  # a bug: answer 500 and keep serving
            log.exception("generation failed")
            self.counts["failed"] += 1
            job.emit(e)
        else:
            self.counts["cancelled" if job.cancelled.is_set() else "served"] += 1
        finally:
            gen.close()
            job.emit(_END)


# ───── answers ─────


def _usage(r: Response) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.generation_tokens,
        "total_tokens": r.prompt_tokens + r.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": r.think_tokens},
    }


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class _Answer:
    """Accumulates one request's stream: text per channel, logprob entries, the last Response."""

    def __init__(self, tokenizer, strip_leading_newlines: bool):
        self.tok = tokenizer
        self.strip = strip_leading_newlines
        self.answer_started = False
        self.last: Response | None = None

    def pieces(self, r: Response) -> tuple[str, str]:
        """(reasoning text, answer text) this response adds."""
        self.last = r
        if r.channel == "think":
            return r.text, ""
        text = r.text
        if not self.answer_started and self.strip:
            text = text.lstrip("\r\n")  # the newline a model puts after </think>, as the CLI drops it
        if text:
            self.answer_started = True
        return "", text

    def token_text(self, token: int) -> str:
        return self.tok.decode([token])

    def chat_logprob(self, r: Response) -> dict | None:
        """OpenAI's chat logprob entry for an answer token."""
        if r.logprob is None or r.token is None or r.channel != "answer" or r.token in self.tok.stop_ids:
            return None
        text = self.token_text(r.token)
        tops = [
            {"token": (t := self.token_text(i)), "logprob": lp, "bytes": list(t.encode())}
            for i, lp in (r.top_logprobs or [])
        ]
        return {"token": text, "logprob": r.logprob, "bytes": list(text.encode()), "top_logprobs": tops}


class _Legacy:
    """The /v1/completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self):
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, answer: _Answer, r: Response, offset: int) -> None:
        if r.logprob is None or r.token is None or r.token in answer.tok.stop_ids:
            return
        self.tokens.append(answer.token_text(r.token))
        self.token_logprobs.append(r.logprob)
        self.top_logprobs.append({answer.token_text(i): lp for i, lp in (r.top_logprobs or [])})
        self.text_offset.append(offset)

    def take(self) -> dict:
        out = {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }
        self.__init__()
        return out


# ───── who may talk to the server ─────

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """("name", port or None) of a Host header or a --allowed-host value ("[::1]:8000" -> ("::1", 8000));
    None when it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if not rest:
        port = None
    elif rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit() and len(rest) <= 6:
        port = int(rest[1:])
    else:
        return None
    name = name.removesuffix(".")  # "localhost." is the same name
    if not name or any(c in name for c in "/@\\ \t,;?#%"):
        return None
    return name, port


class Guard:
    """ASGI middleware in front of every route; checks what a web page could forge, before any handler:
    - Host must name this server (the bound address, localhost, 127.0.0.1, [::1], or --allowed-host):
      a page on evil.example whose name is rebound to 127.0.0.1 (DNS rebinding) sends Host: evil.example;
    - a browser request from another site (an Origin header, or Sec-Fetch-Site: cross-site) is refused
      unless --cors allows that origin; this covers the "simple" cross-origin POST (text/plain) that a
      browser sends without asking first, which CORS headers alone would not stop;
    - a declared Content-Length above the body limit is refused before any byte is read (a body without
      one, chunked, is counted as it arrives in read_body).
    starlette's TrustedHostMiddleware is not used: it ignores the port and cannot parse "[::1]:8000"."""

    def __init__(self, app, hosts, port, any_ip, origins, max_body_bytes):
        self.app = app
        self.any_host = hosts is None or "*" in hosts
        self.hosts = set()
        for h in hosts or ():
            if h != "*" and (parsed := _split_host(h)) is not None:
                self.hosts.add(parsed)
        self.port, self.any_ip = port, any_ip
        self.any_origin = "*" in origins
        self.origins = {o.rstrip("/").lower() for o in origins}
        self.max_body = max_body_bytes

    def host_ok(self, value: str | None) -> bool:
        if self.any_host:
            return True
        parsed = _split_host(value or "")
        if parsed is None:
            return False
        name, port = parsed
        if (name, port) in self.hosts:
            return True
        if port not in (None, self.port) and self.port is not None:
            return False
        if (name, None) in self.hosts:
            return True
        if self.any_ip:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def origin_ok(self, origin: str) -> bool:
        return self.any_origin or origin.rstrip("/").lower() in self.origins

    def refusal(self, headers: dict) -> ApiError | None:
        host = headers.get("host")
        if not self.host_ok(host):
            shown = json.dumps(host)[:80] if host is not None else "none"
            return ApiError(
                400,
                f"Host header {shown} does not name this server (qora serve --allowed-host HOST allows a name)",
                code="invalid_host",
            )
        origin = headers.get("origin")
        if origin is not None and not self.origin_ok(origin):
            return ApiError(
                403,
                f"requests from web pages ({json.dumps(origin)[:80]}) are not allowed "
                "(qora serve --cors ORIGIN allows one)",
                code="origin_not_allowed",
            )
        if origin is None and headers.get("sec-fetch-site", "").strip().lower() == "cross-site":
            return ApiError(403, "cross-site browser requests are not allowed", code="origin_not_allowed")
        length = headers.get("content-length")
        if length is not None:
            length = length.strip()
            if not (length.isascii() and length.isdigit()):
                return ApiError(400, "bad Content-Length header")
            if int(length) > self.max_body:
                return ApiError(
                    413,
                    f"the request body is {int(length)} bytes; this server takes at most {self.max_body} "
                    "(qora serve --max-body-bytes)",
                    code="request_too_large",
                )
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", ()):
            name = k.decode("latin-1").lower()
            if name in ("host", "origin") and name in headers:  # two of them: the checks would be ambiguous
                headers[name] = "\x00"
            else:
                headers[name] = v.decode("latin-1")
        err = self.refusal(headers)
        if err is None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await send({"type": "websocket.close", "code": 1008})
        from starlette.responses import JSONResponse

        close = [("connection", "close")] if err.status == 413 else []  # the body is not read
        response = JSONResponse(err.body(), status_code=err.status)
        response.raw_headers.extend((k.encode(), v.encode()) for k, v in close)
        await response(scope, receive, send)


# ───── the app ─────


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
):
    """The starlette app serving `model` as `model_id`; it starts and stops its engine worker itself.

    allowed_hosts: Host header names (optionally NAME:PORT; "*" any) the server answers; None checks no
    Host (in-process use; `qora serve` always passes its list). port: the port a name without one must
    carry (or none). any_ip_host: any IP-address Host passes (the server listens on every address).
    cors: origins ("https://app.example", "*") whose web pages may call the API; any other request that
    carries an Origin is refused. max_body_bytes: the largest request body read."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    cors = [o.rstrip("/").lower() for o in cors]  # as browsers write an Origin
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.responses import Response as HTTPResponse
    from starlette.routing import Route

    worker = Worker(model)
    created = int(created if created is not None else time.time())
    fingerprint = "qora"
    try:
        from qora import __version__

        fingerprint = f"qora-{__version__}"
    except ImportError:  # pragma: no cover - the package always has it
        pass

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "qora"}

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        check_auth(request)
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: chunked bodies declare no length
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(
                    413,
                    f"the request body is larger than {max_body_bytes} bytes (qora serve --max-body-bytes)",
                    code="request_too_large",
                )
            chunks.append(chunk)
        raw = b"".join(chunks)
        del chunks
        body = parse_body(raw)
        name = _field(body, "model", (str,))
        if name is None:
            raise ApiError(400, "'model' is required", param="model")
        if name != model_id:
            raise ApiError(
                404, f"model {name!r} does not exist; this server has {model_id!r}", "model", "model_not_found"
            )
        if _field(body, "stream_options", (dict,)) is not None and not body.get("stream"):
            raise ApiError(400, "'stream_options' needs 'stream': true", param="stream_options")
        return body

    async def next_event(job: Job, request: Request):
        """The job's next event; every _POLL_S (whether events flow or not) it checks that the client is
        still there, and cancels the job if not."""
        getter = asyncio.ensure_future(job.events.get())
        try:
            while True:
                wait = max(0.0, job.checked + _POLL_S - time.monotonic())
                done, _ = await asyncio.wait({getter}, timeout=wait)
                if time.monotonic() >= job.checked + _POLL_S:
                    job.checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancel()
                        raise _ClientGone
                if done:
                    return getter.result()
        finally:
            if not getter.done():
                getter.cancel()

    def failure(exc: BaseException) -> ApiError:
        if isinstance(exc, ModelFileChangedError):  # the server's fault, not the request's
            return ApiError(503, str(exc), code="model_file_changed")
        if isinstance(exc, ContextOverflowError):
            return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
        if isinstance(exc, QoraError):
            return ApiError(400, str(exc))
        return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details")

    async def run(request: Request, body: dict, chat: bool):
        options, logprobs = _options(body, chat)
        if chat:
            prompt = _messages(body)
        else:
            prompt = _field(body, "prompt", (str, list))
            if isinstance(prompt, list):  # a batch of one prompt is fine; more is not supported
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    raise ApiError(400, "'prompt' must be a string (or a list of one string)", param="prompt")
                prompt = prompt[0]
            if not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
            if _field(body, "suffix", (str,)):
                raise ApiError(400, "'suffix' is not supported", param="suffix")
        stream = bool(_field(body, "stream", (bool,), False))
        include_usage = bool(_field(_field(body, "stream_options", (dict,), {}), "include_usage", (bool,), False))
        echo = "" if chat or not _field(body, "echo", (bool,), False) else prompt

        if worker.jobs.qsize() >= limits.SERVER_MAX_QUEUED:
            raise ApiError(503, f"the server is busy ({limits.SERVER_MAX_QUEUED} requests waiting): retry later")
        job = worker.submit(prompt, options)
        try:
            first = await next_event(job, request)
        except BaseException:  # the client left (or the server is stopping): drop the job
            job.cancel()
            raise
        if isinstance(first, BaseException):
            raise failure(first)
        if first is _END:  # nothing produced: the job was cancelled before it ran
            raise _ClientGone
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        now = int(time.time())
        answer = _Answer(model.tokenizer, strip_leading_newlines=chat)
        head = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": now,
            "model": model_id,
            "system_fingerprint": fingerprint,
        }
        if stream:
            return StreamingResponse(
                stream_events(job, first, answer, head, chat, include_usage, logprobs, echo),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await collect(request, job, first, answer, head, chat, logprobs, echo)

    async def collect(request, job, first, answer, head, chat, logprobs, echo) -> JSONResponse:
        reasoning, text, lps, legacy = [], [echo], [], _Legacy()
        event = first
        try:
            while event is not _END:
                if isinstance(event, BaseException):
                    raise failure(event)
                think, piece = answer.pieces(event)
                if chat and logprobs is not None and (entry := answer.chat_logprob(event)):
                    lps.append(entry)
                if not chat and logprobs is not None:
                    legacy.add(answer, event, sum(map(len, text)))
                reasoning.append(think)
                text.append(piece)
                event = await next_event(job, request)
        finally:
            job.cancel()  # a no-op once finished; stops the worker if we leave early
        last = answer.last
        finish = FINISH.get(last.finish_reason or "stop", "stop")
        if chat:
            message = {"role": "assistant", "content": "".join(text)}
            if any(reasoning):
                message["reasoning_content"] = "".join(reasoning)
            choice = {
                "index": 0,
                "message": message,
                "logprobs": {"content": lps} if logprobs is not None else None,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": "".join(text),
                "logprobs": legacy.take() if logprobs is not None else None,
                "finish_reason": finish,
            }
            obj = "text_completion"
        return JSONResponse({**head, "object": obj, "choices": [choice], "usage": _usage(last)})

    async def stream_events(job, first, answer, head, chat, include_usage, logprobs, echo) -> AsyncIterator[bytes]:
        usage_field = {"usage": None} if include_usage else {}
        pending_lps: list = []
        legacy = _Legacy()
        sent = 0  # completion text characters sent (legacy text_offset)

        def chunk(delta_or_text, finish=None, lp=None) -> bytes:
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_or_text, "logprobs": lp, "finish_reason": finish}
            return _sse({**head, "choices": [choice], **usage_field})

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            elif echo:
                yield chunk(echo)
                sent = len(echo)
            event = first
            while event is not _END:
                if isinstance(event, BaseException):
                    err = failure(event)
                    yield _sse(err.body())  # the stream has started: the error goes in band
                    break
                think, piece = answer.pieces(event)
                if chat:
                    if logprobs is not None and (entry := answer.chat_logprob(event)):
                        pending_lps.append(entry)
                    if think:
                        yield chunk({"reasoning_content": think})
                    if piece:
                        lp = {"content": pending_lps} if logprobs is not None else None
                        yield chunk({"content": piece}, lp=lp)
                        pending_lps = []
                else:
                    if logprobs is not None:
                        legacy.add(answer, event, sent)
                    if piece:
                        yield chunk(piece, lp=legacy.take() if logprobs is not None else None)
                        sent += len(piece)
                if event.finish_reason is not None:
                    finish = FINISH.get(event.finish_reason, "stop")
                    if chat:
                        lp = {"content": pending_lps} if logprobs is not None else None
                        yield chunk({}, finish=finish, lp=lp)
                    else:
                        yield chunk("", finish=finish, lp=legacy.take() if logprobs is not None else None)
                event = await job.events.get()
            if include_usage and answer.last is not None:
                yield _sse({**head, "choices": [], "usage": _usage(answer.last)})
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (or we are done): the worker stops at the next token

    async def chat_completions(request: Request):
        try:
            return await run(request, await read_body(request), chat=True)
        except _ClientGone:
            return HTTPResponse(status_code=499)  # nobody reads it: the client is gone

    async def completions(request: Request):
        try:
            return await run(request, await read_body(request), chat=False)
        except _ClientGone:
            return HTTPResponse(status_code=499)

    async def models(request: Request):
        check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: Request):
        check_auth(request)
        if request.path_params["name"] != model_id:
            raise ApiError(404, f"model {request.path_params['name']!r} does not exist", "model", "model_not_found")
        return JSONResponse(model_card())

    async def health(request: Request):
        return JSONResponse(
            {
                "status": "ok",
                "model": model_id,
                "queued": worker.jobs.qsize(),
                "busy": worker.running is not None,
                "requests": dict(worker.counts),
                "cached_tokens": len(getattr(model, "cache_tokens", [])),
            }
        )

    async def on_api_error(request, exc: ApiError):
        # a 413 leaves the rest of the body unread: the connection cannot carry another request
        headers = {"Connection": "close"} if exc.status == 413 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def on_http_error(request, exc: HTTPException):
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}
        err = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
        return JSONResponse(err.body(), status_code=exc.status_code)

    async def on_error(request, exc: Exception):
        log.exception("request failed")
        err = ApiError(500, f"internal error: {type(exc).__name__}")
        return JSONResponse(err.body(), status_code=500)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/models/{name:path}", one_model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_error},
        lifespan=lifespan,
        middleware=[
            Middleware(
                Guard,
                hosts=allowed_hosts,
                port=port,
                any_ip=any_ip_host,
                origins=cors,
                max_body_bytes=max_body_bytes,
            ),
            *(
                # only the --cors origins reach this far (Guard refused the others)
                [
                    Middleware(
                        CORSMiddleware,
                        allow_origins=list(cors),
                        allow_methods=["GET", "POST"],
                        allow_headers=["*"],
                        max_age=600,
                    )
                ]
                if cors
                else []
            ),
        ],
    )
    app.state.worker = worker
    return app


# ───── command line ─────


def _text(value: str) -> str:
    """An argument that must be text: Python hands undecodable bytes of argv over as lone surrogates,
    which no JSON answer or header could carry later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qora serve",
        description="Serve a model over an OpenAI-compatible HTTP API (chat and completions, streaming).",
        epilog=(
            "Example: qora serve --load smollm3-3b-q4.qora, then point an OpenAI client at "
            "http://127.0.0.1:8000/v1 with model set to the id GET /v1/models lists."
        ),
    )
    p.add_argument("--load", metavar="PATH", help="the .qora model file, or a pulled REPO_ID (default as qora)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY", type=_text, help="require Authorization: Bearer KEY on /v1 routes")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        type=_text,
        help="also answer requests whose Host header is HOST or HOST:PORT (repeatable; '*': any). By default "
        "only the --host address, localhost, 127.0.0.1 and [::1] are answered (no DNS rebinding)",
    )
    p.add_argument(
        "--cors",
        action="append",
        default=[],
        metavar="ORIGIN",
        type=_text,
        help="let web pages from ORIGIN (e.g. http://localhost:3000; '*': any) call the API from a browser "
        "(repeatable). Without it, any request carrying an Origin header is refused",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=limits.SERVER_MAX_BODY_BYTES,
        metavar="N",
        help=f"largest request body accepted (default {limits.SERVER_MAX_BODY_BYTES}); larger ones get 413",
    )
    p.add_argument(
        "--model-name", metavar="ID", type=_text, help="the model id clients send (default: REPO_ID or file name)"
    )
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument("--context", type=int, metavar="N", help="KV cache size in tokens (default: auto)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is usable")
    p.add_argument("--verbose", "-v", action="store_true", help="log every request")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        # listening before "serving ... at" is printed: a client that connects at once waits in the
        # backlog until uvicorn accepts, instead of being refused
        sock.listen(2048)
    except OSError as e:
        raise QoraError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError as e:
        raise QoraError(f"qora serve needs the server extra ({e}): pip install 'qora[server]'") from None
    if not 0 <= args.port <= 65535:
        raise QoraError(f"--port must be in 0..65535, got {args.port}")
    if args.api_key is not None and not args.api_key:
        raise QoraError("--api-key must not be empty")
    if not 1 <= args.max_body_bytes <= 1 << 40:
        raise QoraError(f"--max-body-bytes must be in 1..{1 << 40}, got {args.max_body_bytes}")
    for host in args.allowed_host:
        if host != "*" and _split_host(host) is None:
            raise QoraError(f"--allowed-host {host!r} is not a host name, NAME:PORT or '*'")
    for origin in args.cors:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise QoraError(f"--cors {origin!r} is not an origin such as http://localhost:3000 (or '*')")

    from qora.hub import looks_like_repo_id, split_spec
    from qora.loader import load_model, resolve_model_path

    path = resolve_model_path(args.load)
    model_id = args.model_name or (
        split_spec(args.load)[0]
        if args.load and not Path(args.load).exists() and looks_like_repo_id(args.load)
        else path.stem
    )
    sock = _bind(args.host, args.port)
    model = load_model(path, "cpu" if args.cpu else "auto", args.threads, args.context, verbose=args.verbose)
    try:
        host, port = sock.getsockname()[:2]
        bound = args.host.strip("[]")
        app = create_app(
            model,
            model_id,
            api_key=args.api_key,
            created=int(path.stat().st_mtime),
            max_body_bytes=args.max_body_bytes,
            allowed_hosts=[*LOOPBACK_HOSTS, f"[{bound}]" if ":" in bound else bound, *args.allowed_host],
            port=port,
            any_ip_host=bound in WILDCARD_BINDS,
            cors=args.cors,
        )
        shown = f"[{host}]" if ":" in host else host
        print(
            f"qora: serving {model_id} ({model.engine.max_seq_len}-token context) at http://{shown}:{port}/v1 "
            "- OpenAI-compatible; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        if not _is_loopback(args.host) and args.api_key is None:
            print(
                f"qora: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
                file=sys.stderr,
                flush=True,
            )
        config = uvicorn.Config(
            app,
            log_level="info" if args.verbose else "warning",
            access_log=args.verbose,
            timeout_graceful_shutdown=3,
            limit_concurrency=limits.SERVER_MAX_CONNECTIONS,  # beyond it uvicorn answers 503 at once
        )
        worker = app.state.worker

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                worker.cancel_all()
                super().handle_exit(sig, frame)

        Server(config).run(sockets=[sock])
    finally:
        model.close()
        sock.close()
    return 0
