"""The API's error answer, and what a failed generation is answered with."""

from __future__ import annotations

from qora.errors import ContextOverflowError, ModelFileChangedError, QoraError


class ApiError(Exception):
    """An OpenAI-style error answer: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

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
