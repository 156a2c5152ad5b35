"""ServerSettings: everything the web layer needs that is not the engine's, validated once.

Like EngineArgs, each field carries its CLI help (and vLLM's flag name where ours differs), so
the command line can build `--flags` from `dataclasses.fields(ServerSettings)` with no second
list to keep in sync. Fields marked cli=False come from elsewhere (the engine's config, the
environment). Derived values (the chat template's text, the SSL context) are computed here once,
never per request.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aio_engine import __version__

from .reasoning import REASONING_PARSERS
from .tools import TOOL_PARSERS

CONTENT_FORMATS = ("auto", "string", "openai")


def opt(default: Any, help: str, choices: tuple | None = None, flag: str | None = None, cli: bool = True) -> Any:
    """A ServerSettings field with what the CLI needs to expose it."""
    meta = {"help": help, "choices": choices, "flag": flag, "cli": cli}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ServerSettings:
    served_model_names: list[str] = opt(None, "Names the API answers to (from the engine config).", cli=False)
    api_key: str | None = opt(None, "Require this key (Bearer) on /v1 routes. Also AIO_ENGINE_API_KEY.")
    response_role: str = opt("assistant", "Role of the generated chat message (with add_generation_prompt).")
    max_body_bytes: int = opt(32 * 2**20, "Largest request body; larger ones get a 413.")
    # Chat
    chat_template: str | None = opt(None, "Chat template file or inline Jinja; overrides the tokenizer's.")
    chat_template_content_format: str = opt(
        "auto", "How message content reaches the template: string, openai (list of parts), or auto.", CONTENT_FORMATS)
    trust_request_chat_template: bool = opt(False, "Let a request's `chat_template` field replace the server's.")
    default_chat_template_kwargs: dict = opt({}, "JSON object of extra template variables for every chat request.")
    # Tools and reasoning
    enable_auto_tool_choice: bool = opt(False, "Parse tool calls out of the output for tool_choice auto.")
    tool_call_parser: str | None = opt(None, "Tool-call format of the model.", tuple(sorted(TOOL_PARSERS)))
    exclude_tools_when_tool_choice_none: bool = opt(False, "Leave `tools` out of the prompt for tool_choice none.")
    reasoning_parser: str | None = opt(None, "Reasoning format: fills reasoning_content.",
                                       tuple(sorted(REASONING_PARSERS)))
    # Responses
    return_tokens_as_token_ids: bool = opt(False, "Show logprob tokens as 'token_id:N'.")
    enable_prompt_tokens_details: bool = opt(False, "Report usage.prompt_tokens_details.cached_tokens.")
    enable_force_include_usage: bool = opt(False, "End every stream with a usage chunk.")
    system_fingerprint: str = opt(f"aio-engine-{__version__}", "system_fingerprint of responses.", cli=False)
    # Admission
    max_waiting_requests: int | None = opt(None, "Answer 503 while this many requests wait (default: no limit).")
    enable_server_load_tracking: bool = opt(False, "Count requests in flight, served at GET /load.")
    # HTTP
    allowed_origins: list[str] = opt(["*"], "CORS: allowed origins.")
    allowed_methods: list[str] = opt(["*"], "CORS: allowed methods.")
    allowed_headers: list[str] = opt(["*"], "CORS: allowed headers.")
    allow_credentials: bool = opt(False, "CORS: allow credentials.")
    root_path: str = opt("", "Also serve every route under this prefix (behind a path-based proxy).")
    enable_request_id_headers: bool = opt(False, "Send X-Request-Id (the client's, or a new one) on every response.")
    access_log: bool = opt(True, "Log every request (--disable-uvicorn-access-log turns it off).",
                           flag="--disable-uvicorn-access-log")
    ssl_keyfile: str | None = opt(None, "TLS private key file.")
    ssl_certfile: str | None = opt(None, "TLS certificate file.")
    ssl_ca_certs: str | None = opt(None, "CA certificates to verify client certificates.")
    ssl_cert_reqs: int = opt(int(ssl.CERT_NONE), "Client certificates: 0 none, 1 optional, 2 required.", (0, 1, 2))
    uds: str | None = opt(None, "Listen on this Unix domain socket instead of --host/--port.")
    h11_max_incomplete_event_size: int = opt(16384, "Longest request line or header field in bytes (aiohttp's max_line_size and max_field_size).")
    h11_max_header_count: int = opt(256, "Most headers in one request (aiohttp's max_headers).")
    # Processes
    engine_process: bool = opt(True, "Run the engine (scheduler, model, detokenizer) in a process of its own and the "
                                     "HTTP server in this one, as vLLM does: at a few hundred streams one process "
                                     "is host-bound. --no-engine-process runs both on one event loop.")
    # Logging
    enable_log_requests: bool = opt(False, "Log each request's prompt and sampling parameters.")
    enable_log_outputs: bool = opt(False, "Log each request's generated text when it finishes.")
    max_log_len: int | None = opt(None, "Longest prompt or output logged, in characters (default: no limit).")
    log_error_stack: bool = opt(False, "Log the stack trace of error responses, not only of internal errors.")
    # Websocket and chat page
    ws_max_message_bytes: int = opt(4 * 2**20, "Largest websocket message; larger ones close the socket (1009).")
    enable_chat_page: bool = opt(True, "Serve the chat page at /.")

    def __post_init__(self) -> None:
        if isinstance(self.served_model_names, str):
            self.served_model_names = [self.served_model_names]
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.chat_template_content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat_template_content_format must be one of {CONTENT_FORMATS}, "
                             f"got {self.chat_template_content_format!r}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}, got {self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {sorted(REASONING_PARSERS)}, got {self.reasoning_parser!r}")
        if self.ssl_cert_reqs not in (0, 1, 2):
            raise ValueError(f"ssl_cert_reqs must be 0 (none), 1 (optional) or 2 (required), got {self.ssl_cert_reqs!r}")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("ssl_keyfile and ssl_certfile go together")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"max_log_len must be >= 0, got {self.max_log_len}")
        for name in ("max_body_bytes", "ws_max_message_bytes", "h11_max_incomplete_event_size", "h11_max_header_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.root_path = "/" + self.root_path.strip("/") if self.root_path.strip("/") else ""
        self.chat_template = load_chat_template(self.chat_template)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


def clip(text: object, limit: int | None) -> str:
    """`text` for a log line, cut at `limit` characters (--max-log-len)."""
    text = str(text)
    return text if limit is None or len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more)"


def load_chat_template(value: str | None) -> str | None:
    """A template given as a file path or inline (vLLM's rule: an existing file wins)."""
    if value is None:
        return None
    try:
        path = Path(value)
        if path.is_file():
            return path.read_text()
    except OSError:  # a long inline template is not a valid path
        pass
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"chat_template {value!r} is neither a readable file nor a Jinja template")


def build_ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The server's TLS context from the ssl_* settings, or None to serve plain HTTP."""
    if settings.ssl_certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    context.verify_mode = ssl.VerifyMode(settings.ssl_cert_reqs)
    if settings.ssl_ca_certs:
        context.load_verify_locations(settings.ssl_ca_certs)
    return context
