"""Who may talk to the server and what bytes it reads: strict JSON decoding of request bodies, the body
size limit, the API key, and the Host / Origin / cross-site checks in front of every route (`Guard`).
The CORS headers themselves come from starlette's CORSMiddleware, behind Guard (`middleware`)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import re

from qora import limits
from qora.api.errors import ApiError, quote

# ───── strict JSON ─────
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
        raise ValueError(f"duplicate key {quote(dup, json.dumps, 40)}")
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


# ───── who may talk to the server ─────

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def split_host(value: str) -> tuple[str, int | None] | None:
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
            if h != "*" and (parsed := split_host(h)) is not None:
                self.hosts.add(parsed)
        self.port, self.any_ip = port, any_ip
        self.any_origin = "*" in origins
        self.origins = {o.rstrip("/").lower() for o in origins}
        self.max_body = max_body_bytes

    def host_ok(self, value: str | None) -> bool:
        if self.any_host:
            return True
        parsed = split_host(value or "")
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
            shown = quote(host, json.dumps) if host is not None else "none"
            return ApiError(
                400,
                f"Host header {shown} does not name this server (qora serve --allowed-host HOST allows a name)",
                code="invalid_host",
            )
        origin = headers.get("origin")
        # the server's own page (GET /): its Origin is this very Host, which the check above accepted
        same_origin = (
            origin is not None
            and host is not None
            and origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower())
        )
        if origin is not None and not same_origin and not self.origin_ok(origin):
            return ApiError(
                403,
                f"requests from web pages ({quote(origin, json.dumps)}) are not allowed "
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
        from qora.api.app import JSONResponse

        close = [("connection", "close")] if err.status == 413 else []  # the body is not read
        response = JSONResponse(err.body(), status_code=err.status)
        response.raw_headers.extend((k.encode(), v.encode()) for k, v in close)
        await response(scope, receive, send)


# ───── per request: key and body ─────


def check_api_key(request, api_key: str | None) -> None:
    """ApiError(401) unless the request carries Authorization: Bearer API_KEY (any request passes with no key)."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")


async def read_body(request, max_body_bytes: int) -> dict:
    """The request body as a JSON object: ApiError(413) past `max_body_bytes`, ApiError(400) if not strict JSON."""
    from starlette.requests import ClientDisconnect

    from qora.api.jobs import ClientGone

    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # counted as it arrives: chunked bodies declare no length
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(
                    413,
                    f"the request body is larger than {max_body_bytes} bytes (qora serve --max-body-bytes)",
                    code="request_too_large",
                )
            chunks.append(chunk)
    except (ClientDisconnect, OSError):  # the client left mid-body: the app answers 499 to nobody, no traceback
        raise ClientGone from None
    raw = b"".join(chunks)
    del chunks
    return parse_body(raw)


def middleware(hosts, port, any_ip, cors, max_body_bytes) -> list:
    """Guard, then (with --cors) the CORS headers for the origins Guard let through."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    cors = [o.rstrip("/").lower() for o in cors]  # as browsers write an Origin
    guard = Middleware(Guard, hosts=hosts, port=port, any_ip=any_ip, origins=cors, max_body_bytes=max_body_bytes)
    if not cors:
        return [guard]
    # only the --cors origins reach this far (Guard refused the others)
    headers = Middleware(
        CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST"], allow_headers=["*"], max_age=600
    )
    return [guard, headers]
