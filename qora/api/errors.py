"""The API's error answer, and what a failed generation is answered with."""

from __future__ import annotations

import json

from qora.errors import ContextOverflowError, ModelFileChangedError, QoraError

QUOTE_LIMIT = 80  # characters of a caller's value an error message quotes


def quote(value, how=repr, limit: int = QUOTE_LIMIT) -> str:
    """`value` as an error message quotes it (`how`: repr or json.dumps), cut to `limit` characters + "…":
    a caller's 500 KB model name must not come back whole in the answer or the log."""
    cut = isinstance(value, str) and len(value) > limit
    text = how(value[:limit] if cut else value)  # cut before quoting: the quoting itself stays small
    if len(text) > limit + 2:  # escapes, or a long non-string value
        text, cut = text[:limit], True
    return text + "…" if cut else text


def valid_text(text: str) -> str:
    """`text` with every lone surrogate (an undecodable byte of a file name or argv, "\\ud800" in JSON)
    replaced by U+FFFD: what no UTF-8 answer or log line could carry."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # utf-16 pairs the valid surrogate pairs and replaces the lone ones
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def json_bytes(obj) -> bytes:
    """A JSON answer's bytes (as starlette writes them), which a lone surrogate cannot make fail."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
    return valid_text(text).encode("utf-8")


class ApiError(Exception):
    """An OpenAI-style error answer: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})  # extra response headers (429's Retry-After)

    def body(self) -> dict:
        kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}.get(self.status)
        kind = kind or ("invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def generation_error(exc: BaseException) -> ApiError:
    """The answer to an exception raised while generating: the request's fault (400), the server's (503),
    or a bug (500, with no detail: the log has it)."""
    if isinstance(exc, ModelFileChangedError):  # the server's fault, not the request's
        return ApiError(503, str(exc), code="model_file_changed")
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, QoraError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details")
