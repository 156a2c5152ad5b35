"""Errors as the OpenAI API shows them: one place maps exceptions to (status, error object).

The HTTP middleware, the SSE writer (after headers went out) and the websocket session all call
`error_from_exception`, so a given failure reads the same on every transport.
"""

from __future__ import annotations

import dataclasses
import logging

from aiohttp import web

from aio_engine.async_engine import EngineDeadError
from sampling.params import SamplingParams

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A client error with an HTTP status, an OpenAI error type and the offending field."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.err_type, self.param = status, err_type, param


class OverloadedError(RuntimeError):
    """The server refuses new work for now (too many waiting requests)."""


def error_body(message: str, err_type: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} | {"structured_outputs", "prompt", "messages"}


def _param_of(message: str) -> str | None:
    """SamplingParams and friends start their messages with the field's name."""
    head = message.split(" ", 1)[0].strip("'\":,").split(".", 1)[0]
    return head if head in _FIELDS else None


def error_from_exception(e: BaseException, where: str = "") -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for any exception a request can raise."""
    if isinstance(e, RequestError):
        return e.status, error_body(str(e), e.err_type, e.status, e.param)
    if isinstance(e, ValueError):  # validation in SamplingParams, StructuredOutputsParams, the engine
        return 400, error_body(str(e), "BadRequestError", 400, _param_of(str(e)))
    if isinstance(e, EngineDeadError):
        return 503, error_body(str(e), "ServiceUnavailableError", 503)
    if isinstance(e, OverloadedError):
        return 503, error_body(str(e), "ServiceUnavailableError", 503)
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return 413, error_body(e.text or "request body too large", "RequestTooLargeError", 413)
    if isinstance(e, web.HTTPNotFound):
        return 404, error_body(f"route {where} not found", "NotFoundError", 404)
    if isinstance(e, web.HTTPMethodNotAllowed):
        return 405, error_body(f"method not allowed on {where}", "MethodNotAllowed", 405)
    if isinstance(e, web.HTTPException):
        return e.status, error_body(e.reason or str(e), type(e).__name__, e.status)
    # A bug of ours: say so, never take the server down.
    logger.error("internal error on %s", where or "a request", exc_info=e)
    return 500, error_body(f"internal error: {e!r}", "InternalServerError", 500)
