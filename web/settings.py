"""ServerSettings: everything the web layer needs that is not the engine's, validated once.

The command line fills it (flags named as in `vllm serve`); tests build it by hand. Derived values
(the chat template's text, the SSL context) are computed here once, never per request.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aio_engine import __version__

CONTENT_FORMATS = ("auto", "string", "openai")


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None  # --api-key / AIO_ENGINE_API_KEY: guards /v1 routes
    response_role: str = "assistant"
    max_body_bytes: int = 32 * 2**20  # larger bodies get a 413
    # Chat
    chat_template: str | None = None  # a file path or the template itself; overrides the tokenizer's
    chat_template_content_format: str = "auto"  # string | openai | auto (guessed from the template)
    trust_request_chat_template: bool = False  # let a request's `chat_template` field replace ours
    default_chat_template_kwargs: dict = field(default_factory=dict)
    # Tools and reasoning
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # hermes | llama3_json
    exclude_tools_when_tool_choice_none: bool = False
    reasoning_parser: str | None = None  # qwen3 | deepseek_r1
    # Responses
    return_tokens_as_token_ids: bool = False
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens
    enable_force_include_usage: bool = False  # a usage chunk at the end of every stream
    system_fingerprint: str = f"aio-engine-{__version__}"
    # Admission
    max_waiting_requests: int | None = None  # more waiting than this: 503 (None: no limit)
    enable_server_load_tracking: bool = False  # GET /load
    # HTTP
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    root_path: str = ""  # serve every route under this prefix too (behind a path-based proxy)
    enable_request_id_headers: bool = False  # X-Request-Id on every response
    access_log: bool = True  # --disable-uvicorn-access-log turns it off
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = int(ssl.CERT_NONE)  # 0 none, 1 optional, 2 required (client certificates)
    # Websocket and chat page
    ws_max_message_bytes: int = 4 * 2**20  # larger messages close the socket with 1009
    enable_chat_page: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.served_model_names, str):
            self.served_model_names = [self.served_model_names]
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.chat_template_content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat_template_content_format must be one of {CONTENT_FORMATS}, "
                             f"got {self.chat_template_content_format!r}")
        from .reasoning import REASONING_PARSERS
        from .tools import TOOL_PARSERS

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
        self.root_path = "/" + self.root_path.strip("/") if self.root_path.strip("/") else ""
        self.chat_template = load_chat_template(self.chat_template)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


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
