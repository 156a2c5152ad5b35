"""Cross-cutting HTTP concerns: CORS, errors as OpenAI objects, the API key, response headers.

Order (outermost first): CORS preflight (answered before auth or routing), error mapping, API
key. Headers that every response needs (CORS, X-Request-Id) and the per-route status counters
are added when a response is prepared, so streamed responses get them too.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from .errors import error_body, error_from_exception
from .responses import json_response
from .settings import ServerSettings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SETTINGS = web.AppKey("settings", ServerSettings)
logger = logging.getLogger(__name__)


def strip_root(settings: ServerSettings, path: str) -> str:
    root = settings.root_path
    return path[len(root):] or "/" if root and (path == root or path.startswith(root + "/")) else path


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place exceptions become OpenAI error objects."""
    try:
        return await handler(request)
    except Exception as e:  # noqa: BLE001 - CancelledError (client gone) is a BaseException and passes
        status, body = error_from_exception(e, f"{request.method} {request.path}")
        if status < 500 and request.app[SETTINGS].log_error_stack:  # 5xx are logged with their stack anyway
            logger.info("error response %d on %s %s", status, request.method, request.path, exc_info=e)
        return json_response(body, status)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    key = settings.api_key
    path = strip_root(settings, request.path)
    if key and path.startswith("/v1"):
        given = request.headers.get(hdrs.AUTHORIZATION, "")
        if not given and path == "/v1/ws":  # browsers cannot set headers on a websocket
            given = f"Bearer {request.query.get('api_key', '')}"
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return json_response(error_body("invalid or missing API key", "AuthenticationError", 401), 401,
                                 headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


def _allowed(values: list[str], value: str) -> bool:
    return "*" in values or value in values


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflight requests; other requests get their headers in on_prepare."""
    settings = request.app[SETTINGS]
    origin = request.headers.get(hdrs.ORIGIN)
    wanted = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD)
    if request.method != hdrs.METH_OPTIONS or origin is None or wanted is None:
        return await handler(request)
    if not _allowed(settings.allowed_origins, origin):
        return json_response(error_body(f"origin {origin!r} not allowed", "CORSError", 400), 400)
    if not _allowed(settings.allowed_methods, wanted.upper()):
        return json_response(error_body(f"method {wanted!r} not allowed", "CORSError", 400), 400)
    asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
    if "*" in settings.allowed_headers:
        allow_headers = asked
    else:
        refused = [h.strip() for h in asked.split(",") if h.strip() and h.strip().lower()
                   not in {a.lower() for a in settings.allowed_headers}]
        if refused:
            return json_response(error_body(f"headers {refused} not allowed", "CORSError", 400), 400)
        allow_headers = ", ".join(settings.allowed_headers)
    methods = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT" if "*" in settings.allowed_methods \
        else ", ".join(settings.allowed_methods)
    headers = {hdrs.ACCESS_CONTROL_ALLOW_METHODS: methods, hdrs.ACCESS_CONTROL_MAX_AGE: "600"}
    if allow_headers:
        headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = allow_headers
    return web.Response(status=200, text="OK", headers=headers)


def cors_headers(settings: ServerSettings, origin: str | None) -> dict[str, str]:
    if origin is None or not _allowed(settings.allowed_origins, origin):
        return {}
    wildcard = "*" in settings.allowed_origins and not settings.allow_credentials
    headers = {hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: "*" if wildcard else origin}
    if not wildcard:
        headers[hdrs.VARY] = "Origin"
    if settings.allow_credentials:
        headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
    return headers


def make_on_prepare(observe: Callable[[str, str, int], None]):
    """The on_response_prepare hook: CORS and X-Request-Id headers, status counters."""
    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        settings = request.app[SETTINGS]
        for name, value in cors_headers(settings, request.headers.get(hdrs.ORIGIN)).items():
            response.headers.setdefault(name, value)
        if settings.enable_request_id_headers:
            response.headers["X-Request-Id"] = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        route = request.match_info.route.resource
        observe(request.method, route.canonical if route is not None else "unmatched", response.status)

    return on_prepare
