"""mock_server: an offline copy of the ChatGPT web conversation protocol's servers.

Every test, demo and benchmark of fakegpt runs against it. Standard library only, and
written independently of fakegpt's parsers, so a bug on one side cannot hide the same
bug on the other. Two profiles:

``shared`` (the default): the FakeGpt "shared token" site (a Pandora proxy)::

    GET  /api/loads          the shared accounts and their load
    POST /auth/login         form login; sets the ``credential`` cookie
    GET  /api/auth/session   the access token ({} without a valid cookie)
    POST /api/conversation   the reply (X-Authorization or Authorization: Bearer)

``backend-api``: a ChatGPT-web gateway (aurora, chat2api): no login, the access token
given (``access_token``, else one made up and shown as ``server.access_token``)::

    POST /backend-api/conversation   the reply (Authorization: Bearer)

The reply streams as cumulative snapshots (``stream_format="snapshots"``, the shared
profile's default) or in the delta format (``"v1"``, the backend-api default), which
uses every construct of the format: carried-forward paths and ops, patches with and
without a path, bare batches, hidden documents (a commentary preamble, reasoning, a
tool round trip) interleaved with the reply, notices, a late title, pings, padding.
The mock remembers its conversations (the 10,000 most recently used): a later turn's
reply depends on the turns before, an unknown conversation or parent message is
refused, and ``"action": "continue"`` goes on with a reply that stopped at ``max_tokens``.

Run it three ways:

    python -m mock_server [--host 127.0.0.1] [--port 0] [options]   # prints its URL first
    async with MockServer() as server: ...                          # in-process, .url, .requests
    with MockServer() as server: ...                                # from synchronous code (a thread)

Options choose the framing of the stream (chunked, Content-Length or connection close;
LF, CRLF or CR; multi-line data, comments, pings, writes of N bytes) and faults, for
every request (``--fault``) or per request (the ``X-Mock-Fault`` header, a
``[[fault NAME]]`` in the prompt, or ``server.fail_next(NAME)``). See ``FAULTS``.
Prompt directives (``[[fault ...]]``, ``[[chars N]]``, ``[[step N]]``) can be turned off
with ``directives=False``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import http
import json
import math
import random
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from typing import (
    Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple, Union,
)

__version__ = "1.7.5"
__all__ = [
    "FAULTS",
    "MockOptions",
    "MockServer",
    "RecordedRequest",
    "TOOL_USE_PREAMBLE",
    "default_reply",
    "mixed_text",
    "main",
    "serve_in_thread",
]

# ---------------------------------------------------------------------------------------
# Faults: one table, each fault parsed once where it is given
# ---------------------------------------------------------------------------------------

MAX_EVENTS = 1_000_000  # the largest event count a fault argument may name
MAX_SECONDS = 3600.0  # the longest wait a fault or option may ask for
MAX_REPLY_CHARS = 50_000_000  # the longest reply a [[chars N]] directive may ask for


def _count(text: str) -> int:
    if not text.isdigit() or not text.isascii() or int(text) > MAX_EVENTS:
        raise ValueError(f"must be a whole number from 0 to {MAX_EVENTS}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"must be a number of seconds from 0 to {MAX_SECONDS:g}")
    return value


def _status_code(text: str) -> int:
    if not (text.isdigit() and text.isascii() and len(text) == 3 and 400 <= int(text) <= 599):
        raise ValueError("must be an HTTP error status from 400 to 599")
    return int(text)


class _FaultKind(NamedTuple):
    params: Tuple[Tuple[str, Callable[[str], Any]], ...]
    required: int  # how many of the params must be given
    help: str


_FAULT_KINDS: Dict[str, _FaultKind] = {
    "status": _FaultKind((("CODE", _status_code), ("RETRY_AFTER", _count)), 1,
                         "answer the conversation with an upstream-shaped error: 401 token_expired, "
                         "403, 429 (with Retry-After), 500, 504 (a CDN's HTML page), or any other"),
    "cap": _FaultKind((("SECONDS", _count),), 1,
                      "a 429 usage cap whose JSON detail says when it clears (clears_in), with no Retry-After"),
    "expired200": _FaultKind((), 0, "a 200 whose JSON body says token_expired"),
    "content_type": _FaultKind((), 0, "a 200 text/html page instead of the event stream"),
    "challenge": _FaultKind((), 0, "a 403 Cloudflare challenge page"),
    "delay_headers": _FaultKind((("SECONDS", _seconds),), 1, "wait before the response head"),
    "delay_events": _FaultKind((("SECONDS", _seconds),), 1, "wait between events"),
    "pause_after": _FaultKind((("N", _count), ("SECONDS", _seconds)), 2,
                              "wait once, after the Nth assistant event"),
    "hang": _FaultKind((), 0, "never answer"),
    "hang_after": _FaultKind((("N", _count),), 1, "stop sending after N events, keeping the connection open"),
    "hang_at_end": _FaultKind((), 0, "send every event but [DONE], then neither it nor the body's end, "
                                     "keeping the connection open"),
    "cut": _FaultKind((("N", _count),), 1, "end the body cleanly after N events, without [DONE]"),
    "reset": _FaultKind((("N", _count),), 1, "reset the connection (RST) after N events"),
    "garbage": _FaultKind((("N", _count),), 1, "send seeded random bytes after N events, then close"),
    "error_event": _FaultKind((("N", _count),), 1, "after N events, an event whose error is set"),
    "rewrite": _FaultKind((("N", _count),), 1, "after N events, change text already sent"),
    "handoff": _FaultKind((), 0, "move the reply to a websocket (a stream_handoff notice)"),
    "empty": _FaultKind((), 0, "a complete stream with no assistant text"),
}

def _fault_form(name: str, kind: _FaultKind) -> str:
    """How the fault is written: ``status:CODE[:RETRY_AFTER]``."""
    return name + "".join(f":{p}" if i < kind.required else f"[:{p}]" for i, (p, _) in enumerate(kind.params))


FAULTS = {_fault_form(name, kind): kind.help for name, kind in _FAULT_KINDS.items()}
"""Every fault, as written (``NAME:ARG``), and what it does."""


class _Fault(NamedTuple):
    name: str
    args: Tuple[Any, ...] = ()

    def arg(self, index: int, default: Any = None) -> Any:
        return self.args[index] if index < len(self.args) else default


_NO_FAULT = _Fault("")


def _parse_fault(text: Any) -> _Fault:
    """The fault `text` names, its arguments checked; ValueError says what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"a fault is a string such as 'cut:3', not {type(text).__name__}")
    name, *given = text.split(":")
    kind = _FAULT_KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown fault {text!r}; faults: {', '.join(FAULTS)}")
    if not kind.required <= len(given) <= len(kind.params):
        raise ValueError(f"fault {text!r}: write it as {_fault_form(name, kind)}")
    args = []
    for (param, parse), value in zip(kind.params, given):
        try:
            args.append(parse(value))
        except ValueError as exc:
            raise ValueError(f"fault {text!r}: {param} {exc}") from None
    return _Fault(name, tuple(args))


# ---------------------------------------------------------------------------------------
# Options: each field's default, help and check in one place
# ---------------------------------------------------------------------------------------

_NEWLINES = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}


def _option(default: Any, help: str, **cli: Any) -> Any:  # noqa: A002 - argparse's word
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass
class MockOptions:
    """How the mock answers. Every field but ``reply``'s function form has a command-line
    flag of the same name; values are checked here (ValueError) wherever they come from."""

    profile: str = _option("shared", "which server to be: the shared-token site or a ChatGPT-web "
                           "gateway under /backend-api", choices=("shared", "backend-api"))
    stream_format: Optional[str] = _option(None, "cumulative snapshots or the delta format "
                                           "(default: snapshots for shared, v1 for backend-api)",
                                           choices=("snapshots", "v1"))
    framing: str = _option("chunked", "how the stream's body is framed", choices=("chunked", "length", "close"))
    newline: str = _option("\n", "line ending of the event stream: lf, crlf or cr (or the characters)",
                           choices=tuple(_NEWLINES))
    stream_content_type: str = _option("text/event-stream; charset=utf-8",
                                       "the stream's Content-Type, as a proxy in front may relabel it "
                                       "(text/plain, say; empty: none)")
    data_space: bool = _option(True, 'put a space after "data:"')
    multiline: bool = _option(False, "spread each event's JSON over several data lines")
    comments: bool = _option(False, 'a ": keep-alive" comment before each event')
    pings: bool = _option(False, 'an "event: ping" event before each event')
    bom: bool = _option(False, "start the stream with a byte order mark")
    padding: bool = _option(False, "end each event's data with 0-31 spaces, a different number each time, "
                            "as ChatGPT's own servers pad their lines")
    write_size: int = _option(0, "write the stream in pieces of this many bytes (0: an event at a time)")
    step: int = _option(4, "characters of text each assistant event adds")
    delay: float = _option(0.0, "seconds between events")
    reply: Union[None, str, Callable[[str], str]] = _option(
        None, "the reply text, or a function of the prompt (default: derived from the prompt "
        "and the conversation)")
    finish: str = _option("stop", "finish_details.type of the last event", choices=("stop", "max_tokens"))
    tool_use: bool = _option(False, "answer a new turn in two visible messages around a tool's call and "
                             "answer: TOOL_USE_PREAMBLE first, then the reply (if it has text)")
    max_tokens: int = _option(0, "stop a reply after this many characters with max_tokens, "
                              "for the client to continue (0: never)")
    ascii_json: bool = _option(False, "escape non-ASCII text as \\uXXXX")
    gzip: str = _option("off", "compress bodies: never, when the client asks, or always",
                        choices=("off", "accept", "always"))
    loads: str = _option("normal", "what /api/loads offers", choices=("normal", "empty", "malformed"))
    idle_accounts: bool = _option(False, "also offer idle accounts (count 0) in /api/loads")
    login: str = _option("ok", "whether /auth/login accepts", choices=("ok", "refuse"))
    session: str = _option("ok", "whether /api/auth/session gives a token", choices=("ok", "empty"))
    fault: Optional[str] = _option(None, "a fault for every conversation, e.g. cut:3 or status:429:7")
    directives: bool = _option(True, "honour [[fault]], [[chars]] and [[step]] in prompts")
    seed: int = _option(0, "seeds token ids, loads, garbage bytes and the delta format's schedule")
    access_token: Optional[str] = _option(None, "the access token to issue (shared) or accept "
                                          "(backend-api); a test's sentinel")
    session_lifetime: float = _option(0.0, "seconds a login's session lasts, as /api/auth/session's "
                                      "expires says; then its token is refused (0: until 2089)")
    keep_alive_timeout: float = _option(5.0, "seconds an idle keep-alive connection stays open (0: forever)")
    max_recorded: int = _option(10_000, "requests kept in .requests (the oldest go first)")
    certfile: Optional[str] = _option(None, "serve TLS with this certificate chain")
    keyfile: Optional[str] = _option(None, "the certificate's private key")

    def __post_init__(self) -> None:
        self.newline = _NEWLINES.get(self.newline, self.newline)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            choices = field.metadata.get("choices")
            if field.name == "newline":
                choices = tuple(_NEWLINES.values())
            if choices is not None and not (value is None and field.default is None) and value not in choices:
                raise ValueError(f"{field.name} must be one of {', '.join(map(repr, choices))}, not {value!r}")
            if isinstance(field.default, bool) and not isinstance(value, bool):
                raise ValueError(f"{field.name} must be True or False, not {value!r}")
        for name, low in (("write_size", 0), ("step", 1), ("max_tokens", 0), ("seed", 0), ("max_recorded", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}, not {value!r}")
        for name in ("delay", "keep_alive_timeout", "session_lifetime"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_SECONDS:
                raise ValueError(f"{name} must be a number of seconds from 0 to {MAX_SECONDS:g}, not {value!r}")
        if not (self.reply is None or isinstance(self.reply, str) or callable(self.reply)):
            raise ValueError("reply must be a string or a function of the prompt")
        for name in ("access_token", "certfile", "keyfile"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        if not isinstance(self.stream_content_type, str) or not re.fullmatch(r"[\x20-\x7e]*", self.stream_content_type):
            raise ValueError("stream_content_type must be printable ASCII")
        if self.access_token is not None and not re.fullmatch(r"[\x21-\x7e]+", self.access_token):
            raise ValueError("access_token must be printable ASCII without spaces")
        if self.fault is not None:
            _parse_fault(self.fault)

    @property
    def format(self) -> str:
        """The stream format in force."""
        return self.stream_format or ("v1" if self.profile == "backend-api" else "snapshots")


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """A request as the mock received it (a chunked body already joined)."""

    method: str
    path: str
    query: str
    headers: Tuple[Tuple[str, str], ...]
    body: bytes
    connection: int = 0
    """Which connection it came on: the server's accepted connections, counted from 1."""
    version: str = "HTTP/1.1"
    """The request line's HTTP version."""

    def header(self, name: str) -> Optional[str]:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def json(self) -> Any:
        """The body as JSON (ValueError if it is not). A lone surrogate escape in a string
        reads as U+FFFD, as the JSON decoders of Go and JavaScript servers make it."""
        value = json.loads(self.body)
        return _well_formed(value) if _SURROGATE_ESCAPE.search(self.body) else value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # (or an escaped backslash and "ud8..": a walk for nothing)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins the pairs: what is left is alone


def _well_formed(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_well_formed(item) for item in value]
    if isinstance(value, dict):
        return {_well_formed(key): _well_formed(item) for key, item in value.items()}
    return value


class _BadRequest(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


class _Closed(Exception):
    """The client went away; nothing more to send."""


# ---------------------------------------------------------------------------------------
# Reply texts
# ---------------------------------------------------------------------------------------

_FAULT_IN_PROMPT = re.compile(r"\[\[fault ([^\]\s]+)\]\]")
_CHARS_IN_PROMPT = re.compile(r"\[\[chars ([0-9]{1,12})\]\]")
_STEP_IN_PROMPT = re.compile(r"\[\[step ([0-9]{1,12})\]\]")
_MIXED_TEXT = 'Hello, мир! 你好世界 👋🏽 "quoted" and back\\slash; Ünïcödé. '


TOOL_USE_PREAMBLE = "Let me look that up."
"""With ``tool_use``, the text of the visible message before the tool's round trip: a
client shows ``TOOL_USE_PREAMBLE + "\\n\\n" + reply``."""


def mixed_text(length: int) -> str:
    """`length` characters of ASCII, Cyrillic, CJK, emoji, quotes and backslashes."""
    repeats = length // len(_MIXED_TEXT) + 1
    return (_MIXED_TEXT * repeats)[:length]


def default_reply(prompt: str) -> str:
    """The reply to `prompt` as a conversation's first turn, when none is scripted: a
    deterministic, non-ASCII text.

    A ``[[chars N]]`` in the prompt asks for a reply of exactly N mixed characters.
    """
    chars = _CHARS_IN_PROMPT.search(prompt)
    if chars:
        return mixed_text(int(chars.group(1)))
    return _echo_reply(prompt)


def _echo_reply(prompt: str) -> str:
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"Привет! You said “{_shown(prompt)}”. 你好, 世界 👋 Reply {digest}: \"quotes\" and \\ fine."


def _shown(prompt: str) -> str:
    return prompt if len(prompt) <= 60 else prompt[:57] + "..."


def _title(prompt: str) -> str:
    words = re.sub(r"\[\[[^\]]*\]\]", " ", prompt).split()[:5]
    return " ".join(words).capitalize()[:40] or "New chat"


# ---------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------


class _Conversation:
    """What the mock remembers of one conversation."""

    def __init__(self, conversation_id: str) -> None:
        self.id = conversation_id
        self.parents: Dict[str, str] = {}  # message id -> its parent's id: a tree, as upstream
        self.prompts: Dict[str, str] = {}  # user message id -> its prompt
        self.unfinished: Dict[str, Tuple[str, int, str]] = {}  # assistant id -> (reply, sent, prompt)

    def history(self, parent: str) -> Tuple[int, Optional[str]]:
        """How many user turns lead to `parent`, and the latest of their prompts."""
        turns, latest, node = 0, None, parent
        for _ in range(len(self.parents) + 1):  # ids are the client's: a cycle must end
            if node in self.prompts:
                turns += 1
                latest = latest if latest is not None else self.prompts[node]
            if node not in self.parents:
                break
            node = self.parents[node]
        return turns, latest


class _Turn(NamedTuple):
    """One reply to stream: its text so far (``before``, already sent in an earlier
    round) and up to ``text``, and how it finishes."""

    conversation_id: str
    message_id: str
    user: Optional[Dict[str, Any]]  # the user's message, None when continuing
    model: str
    before: str
    text: str
    finish: str
    title: Optional[str]  # a conversation's first turn names it; later turns do not
    step: int


class _Event(NamedTuple):
    """One event of the stream: its data's parts (joined on the wire), its ``event:``
    type, and whether it carries assistant text. A type of ":" is a comment line."""

    data: Tuple[Union[bytes, memoryview], ...]
    kind: Optional[str] = None
    assistant: bool = False


_DONE = _Event((b"[DONE]",))
_BOM = b"\xef\xbb\xbf"
_CDN_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>504 Gateway Time-out</title></head>\n<body>"
    "<h1>Gateway Time-out</h1><p>The origin web server timed out responding to this request."
    "</p></body></html>\n"
)
_CHALLENGE_PAGE = (
    "<!DOCTYPE html><html lang=\"en-US\"><head><title>Just a moment...</title></head><body>"
    "<div id=\"cf-please-wait\">Checking your browser before accessing the site.</div>"
    "<script>window._cf_chl_opt={cType:'managed'};</script>"
    "<script src=\"/cdn-cgi/challenge-platform/h/g/orchestrate/chl_page/v1\"></script>"
    "</body></html>"
)
_EXPIRED = {
    "message": "Your authentication token has expired. Please try signing in again.",
    "type": "invalid_request_error",
    "param": None,
    "code": "token_expired",
}
_MODEL_ERROR = "Something went wrong in the model."
_BREAKS = ("cut", "reset", "garbage", "hang_after")
_MAX_BODY = 16 * 1024 * 1024
_MAX_CONVERSATIONS = 10_000  # remembered, the most recently used kept: an older one is "not found"
_MAX_HEAD = 64 * 1024
_MAX_REQUEST_LINE = 8 * 1024  # nginx's and Apache's default
_LINGER_SECONDS = 5.0  # at most, to read and drop the rest of a refused request (nginx: lingering_timeout 5 s)


class MockServer:
    """The mock upstream on an asyncio server: ``async with MockServer() as server`` in
    an event loop, or ``with MockServer() as server`` from synchronous code (it then runs
    on a thread and event loop of its own until the block ends).

    ``log``, if given, is called with one access-log line per request (method, path,
    status, milliseconds; never a header or a body).
    """

    def __init__(
        self, options: Optional[MockOptions] = None, *, host: str = "127.0.0.1", port: int = 0,
        log: Optional[Callable[[str], None]] = None, **overrides: Any,
    ) -> None:
        if options is not None and not isinstance(options, MockOptions):
            raise ValueError(f"options must be a MockOptions, not {type(options).__name__}")
        known = [field.name for field in dataclasses.fields(MockOptions)]
        for name in overrides:
            if name not in known:
                import difflib  # here: only a mistake needs it

                close = difflib.get_close_matches(name, known, n=1)
                raise ValueError(f"unknown option {name!r}" + (f": did you mean {close[0]!r}?" if close else
                                                               f"; the options: {', '.join(known)}"))
        self.options = dataclasses.replace(options or MockOptions(), **overrides)
        if not (isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535):
            raise ValueError(f"port must be a whole number from 0 to 65535, not {port!r}")
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be an address or a host name, not {host!r}")
        if log is not None and not callable(log):
            raise ValueError("log must be a function of one line of text, or None")
        self.host = host
        self.port = port
        self.url = ""
        self.requests: List[RecordedRequest] = []
        self._log = log
        self._fault = _parse_fault(self.options.fault) if self.options.fault else _NO_FAULT
        self._random = random.Random(self.options.seed)
        self.token_ids = [f"{self._random.getrandbits(128):032x}" for _ in range(5)]
        self.access_token = self.options.access_token or "eyJ" + uuid.UUID(int=self._random.getrandbits(128)).hex
        """A token the conversation accepts from the start, as a gateway's or a FakeOpen
        site's does (the shared login issues it too, when ``access_token`` is given)."""
        self._credentials: Dict[str, str] = {}  # credential cookie -> token id
        self._access_tokens: Dict[str, str] = {}  # credential cookie -> access token
        self._session_ends: Dict[str, float] = {}  # credential cookie, or access token -> time.time() it ends
        self._valid: Set[str] = {self.access_token}  # tokens the conversation accepts
        self._queued_faults: List[_Fault] = []
        self._conversations: Dict[str, _Conversation] = {}
        self._server: Optional[asyncio.AbstractServer] = None
        self._connections: Set["asyncio.Task[None]"] = set()
        self.accepted_connections = 0
        """Connections accepted so far (a client that keeps its connections opens few)."""
        self._thread: Optional[threading.Thread] = None  # ``with``'s: its loop, and what stops it
        self._thread_stop: Optional[Callable[[], object]] = None

    # -- lifecycle ------------------------------------------------------------------

    def _certificate_problem(self, error: OSError) -> str:
        """What `error`, from loading the certificate, means: OpenSSL says "PEM lib" for
        a certificate whose key is missing, as for a file that is no certificate."""
        options = self.options
        if isinstance(error, ssl.SSLError):
            if error.reason == "KEY_VALUES_MISMATCH":
                return f"the key in {options.keyfile or options.certfile} is not this certificate's"
            try:
                with open(options.certfile or "", "rb") as file:
                    pem = file.read(1024 * 1024)
            except OSError:
                pem = None
            if pem is not None and b"-----BEGIN CERTIFICATE-----" not in pem:
                return "the file holds no certificate in PEM form"
            if pem is not None and not options.keyfile and b"PRIVATE KEY-----" not in pem:
                return "the file holds no private key: give its key file too (keyfile, --keyfile)"
        return str(error.strerror or getattr(error, "reason", None) or error)

    async def start(self) -> "MockServer":
        if self._server is not None:
            raise RuntimeError(f"this MockServer is already running at {self.url}")
        context = None
        if self.options.certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(self.options.certfile, self.options.keyfile)
            except OSError as exc:  # ssl.SSLError too
                raise ValueError(
                    f"cannot load the certificate {self.options.certfile}: {self._certificate_problem(exc)}"
                ) from None
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, ssl=context, backlog=4096,
            limit=256 * 1024,
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self.port = port
        scheme = "https" if context else "http"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "MockServer":
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    def __enter__(self) -> "MockServer":
        if self._thread is not None:
            raise RuntimeError("this MockServer is already running on a thread")
        ready = threading.Event()
        failed: List[Exception] = []

        async def run() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._thread_stop = lambda: loop.call_soon_threadsafe(stop.set)
            try:
                async with self:
                    ready.set()
                    await stop.wait()
            except Exception as exc:  # noqa: BLE001 - raised again in the thread that waits for `ready`
                failed.append(exc)
                ready.set()

        self._thread = threading.Thread(target=asyncio.run, args=(run(),), name="mock_server", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self._join()
            raise failed[0]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._thread_stop is not None:
            with contextlib.suppress(RuntimeError):  # (a loop that has ended already)
                self._thread_stop()
        self._join()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self._thread = self._thread_stop = None

    # -- test controls --------------------------------------------------------------

    def fail_next(self, fault: str, times: int = 1) -> None:
        """Apply `fault` to the next `times` conversations (ValueError if it is unknown)."""
        if not isinstance(times, int) or isinstance(times, bool) or times < 1:
            raise ValueError(f"times must be a whole number of at least 1, not {times!r}")
        self._queued_faults.extend([_parse_fault(fault)] * times)

    def expire_tokens(self) -> None:
        """Make every access token issued or accepted so far expired, as the upstream does."""
        self._valid.clear()
        self._access_tokens.clear()

    def count(self, method: str, path: str) -> int:
        """How many requests of `method` to `path` arrived."""
        return sum(1 for r in self.requests if r.method == method and r.path == path)

    @property
    def open_connections(self) -> int:
        """Connections the server is serving now."""
        return len(self._connections)

    # -- HTTP -----------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.accepted_connections += 1
        serial = self.accepted_connections
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                started = time.perf_counter()
                try:
                    request = await asyncio.wait_for(
                        _read_request(reader, writer), self.options.keep_alive_timeout or None
                    )
                except asyncio.TimeoutError:
                    break  # idle too long: close, as servers do
                except _BadRequest as exc:
                    await _send_json(writer, exc.status, {"detail": exc.detail}, keep_alive=False)
                    self._log_exchange("-", "-", exc.status, started)
                    await _close_gently(reader, writer)
                    break
                if request is None:
                    break
                request = dataclasses.replace(request, connection=serial)
                self.requests.append(request)
                if len(self.requests) > self.options.max_recorded:
                    del self.requests[: len(self.requests) - self.options.max_recorded]
                keep_alive = _wants_keep_alive(request)
                _status.set(0)
                try:
                    keep_alive = await self._route(request, reader, writer, keep_alive)
                except (_Closed, ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - a bug here or in a `reply` function: a 500 that says so
                    await self._failed(exc, writer)
                    break
                finally:
                    self._log_exchange(request.method, request.path, _status.get(), started)
                if not keep_alive:
                    break
        except (_Closed, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels these tasks; ending quietly keeps asyncio from logging
            # the cancellation as a failed connection callback.
            writer.transport.abort()
        finally:
            self._connections.discard(task)
            writer.close()

    async def _failed(self, exc: Exception, writer: asyncio.StreamWriter) -> None:
        """An exchange that raised: the traceback logged (``mock_server`` logger), and if
        no response began, a 500 whose detail names the error, so that a test sees why
        instead of a dropped connection. The connection is closed either way."""
        import logging

        logging.getLogger("mock_server").error("the mock failed to answer a request", exc_info=exc)
        if _status.get() == 0:
            with contextlib.suppress(ConnectionError, _Closed):
                await _send_json(writer, 500, {"detail": f"the mock server failed: {type(exc).__name__}: {exc}"},
                                 keep_alive=False)

    def _log_exchange(self, method: str, path: str, status: int, started: float) -> None:
        if self._log is not None:
            elapsed = (time.perf_counter() - started) * 1000
            self._log(f"{method} {_printable(path)} {status or '-'} {elapsed:.0f} ms")

    async def _route(
        self, request: RecordedRequest, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter, keep_alive: bool,
    ) -> bool:
        conversation_path = "/backend-api/conversation" if self.options.profile == "backend-api" else "/api/conversation"
        routes = {} if self.options.profile == "backend-api" else {
            "/api/loads": ("GET", self._loads),
            "/auth/login": ("POST", self._login),
            "/api/auth/session": ("GET", self._session),
        }
        if request.path == conversation_path:
            if request.method != "POST":
                await _send_json(writer, 405, {"detail": "Method Not Allowed"}, keep_alive=keep_alive)
                return keep_alive
            try:
                return await self._conversation(request, reader, writer, keep_alive)
            except _BadRequest as exc:
                await _send_json(writer, exc.status, {"detail": exc.detail}, keep_alive=keep_alive)
                return keep_alive
        route = routes.get(request.path)
        if route is None:
            await _send_json(writer, 404, {"detail": "Not Found"}, keep_alive=keep_alive)
        elif request.method != route[0]:
            await _send_json(writer, 405, {"detail": "Method Not Allowed"}, keep_alive=keep_alive)
        else:
            status, payload, extra = route[1](request)
            await _send_json(
                writer, status, payload, keep_alive=keep_alive, headers=extra,
                compress=self._compress(request),
            )
        return keep_alive

    def _compress(self, request: RecordedRequest) -> bool:
        mode = self.options.gzip
        accepted = "gzip" in (request.header("accept-encoding") or "").lower()
        return mode == "always" or (mode == "accept" and accepted)

    # -- the login flow ---------------------------------------------------------------

    def _loads(self, request: RecordedRequest) -> Tuple[int, Any, List[Tuple[str, str]]]:
        mode = self.options.loads
        if mode == "empty":
            return 200, {"loads": []}, []
        if mode == "malformed":
            return 200, {"loads": "unavailable"}, []
        counts = random.Random(self.options.seed + 1)
        loads = [{"token_id": t, "count": counts.randint(1, 99)} for t in self.token_ids]
        if self.options.idle_accounts:
            for entry in loads[::2]:
                entry["count"] = 0
        return 200, {"loads": loads}, []

    def _login(self, request: RecordedRequest) -> Tuple[int, Any, List[Tuple[str, str]]]:
        form = urllib.parse.parse_qs(request.body.decode("utf-8", "replace"))
        token_key = form.get("token_key", [""])[0]
        password = form.get("session_password", [""])[0]
        if self.options.login == "refuse" or token_key not in self.token_ids:
            return 400, {"code": 400, "message": "Invalid token key."}, []
        if len(password) < 8 or not re.search(r"\d", password) or not re.search(r"[A-Za-z]", password):
            return 400, {
                "code": 400,
                "message": "Password must be at least 8 characters, containing digits and letters.",
            }, []
        credential = "fk-" + uuid.UUID(int=self._random.getrandbits(128)).hex
        self._credentials[credential] = token_key
        if self.options.session_lifetime:
            self._session_ends[credential] = time.time() + self.options.session_lifetime
        cookie = f"credential={credential}; Path=/; HttpOnly; SameSite=Lax"
        return 200, {"code": 0, "url": "/"}, [("Set-Cookie", cookie)]

    def _session(self, request: RecordedRequest) -> Tuple[int, Any, List[Tuple[str, str]]]:
        credential = _cookie(request, "credential")
        if self.options.session == "empty" or credential not in self._credentials or self._ended(credential):
            return 200, {}, []
        token = self._access_tokens.get(credential)
        if token is None:
            token = self.options.access_token or "eyJ" + uuid.UUID(int=self._random.getrandbits(128)).hex
            self._access_tokens[credential] = token
            self._valid.add(token)
        expires = "2089-08-08T23:59:59.999Z"
        if credential in self._session_ends:
            ends = self._session_ends[token] = self._session_ends[credential]
            expires = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ends)) + f".{int(ends % 1 * 1000):03d}Z"
        return 200, {
            "user": {"id": "user-" + self._credentials[credential][:12], "name": "shared",
                     "email": "shared@example.com", "image": None, "picture": None, "groups": []},
            "expires": expires,
            "accessToken": token,
            "authProvider": "auth0",
        }, []

    # -- the conversation -----------------------------------------------------------

    async def _conversation(
        self, request: RecordedRequest, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter, keep_alive: bool,
    ) -> bool:
        self._check_token(request)
        try:
            body = request.json()
        except (ValueError, RecursionError):
            raise _BadRequest(400, "Invalid JSON body.") from None
        problem = _conversation_problem(body)
        if problem:
            raise _BadRequest(422, problem)
        fault = self._fault_for(request, body)
        if fault.name == "delay_headers":
            await asyncio.sleep(fault.arg(0))
        if fault.name == "hang":
            await _wait_for_close(reader)
            return False
        if fault.name in ("status", "cap", "expired200", "content_type", "challenge"):
            await self._send_error_fault(writer, fault, keep_alive)
            return keep_alive
        turn = self._turn(body, empty=fault.name == "empty")
        if self.options.format == "v1":
            events = self._delta_events(turn, fault)
        else:
            events = self._snapshot_events(turn, fault)
        return await self._send_stream(request, reader, writer, events, fault, keep_alive)

    def _check_token(self, request: RecordedRequest) -> None:
        names = ("authorization",) if self.options.profile == "backend-api" else ("x-authorization", "authorization")
        given = next((request.header(name) or "" for name in names if request.header(name)), "")
        token = given[7:] if given.startswith("Bearer ") else ""
        if not token:
            header = "Authorization" if self.options.profile == "backend-api" else "X-Authorization"
            raise _BadRequest(401, f"Unauthorized: no {header} header")
        if token not in self._valid or self._ended(token):
            raise _BadRequest(401, _EXPIRED)

    def _ended(self, session: str) -> bool:
        """Whether the session of this credential cookie or access token has ended."""
        return time.time() >= self._session_ends.get(session, math.inf)

    def _fault_for(self, request: RecordedRequest, body: Dict[str, Any]) -> _Fault:
        if self._queued_faults:
            return self._queued_faults.pop(0)
        named = request.header("x-mock-fault")
        if not named and self.options.directives:
            in_prompt = _FAULT_IN_PROMPT.search(_prompt_of(body))
            named = in_prompt.group(1) if in_prompt else None
        if not named:
            return self._fault
        try:
            return _parse_fault(named)
        except ValueError as exc:
            raise _BadRequest(400, str(exc)) from None

    def _turn(self, body: Dict[str, Any], *, empty: bool) -> _Turn:
        """The reply to stream, from the request and the conversation so far."""
        options = self.options
        parent = body["parent_message_id"]
        conversation_id = body.get("conversation_id")
        if conversation_id is None:
            if body["action"] == "continue":
                raise _BadRequest(400, "continue needs a conversation_id.")
            conversation = _Conversation(_uuid4(self._random))
            self._conversations[conversation.id] = conversation
            if len(self._conversations) > _MAX_CONVERSATIONS:
                del self._conversations[next(iter(self._conversations))]
        else:
            found = self._conversations.pop(conversation_id, None)
            if found is None:
                raise _BadRequest(404, {"message": f"Conversation {conversation_id} not found.",
                                        "code": "conversation_not_found"})
            conversation = self._conversations[conversation_id] = found  # the most recently used: the last to go
            if parent not in conversation.parents:
                raise _BadRequest(400, {"message": f"Parent message {parent} is not in this conversation.",
                                        "code": "invalid_parent_message"})
        user: Optional[Dict[str, Any]] = None
        turns = 0
        if body["action"] == "continue":
            if parent not in conversation.unfinished:
                raise _BadRequest(400, "There is nothing to continue: that message finished.")
            whole, sent, prompt = conversation.unfinished.pop(parent)
            message_id = parent
        else:
            user = body["messages"][0]
            prompt = _prompt_of(body)
            turns, earlier = conversation.history(parent)
            whole = self._reply_text(prompt, turns + 1, earlier)
            sent, message_id = 0, _uuid4(self._random)
            conversation.parents[str(user.get("id"))] = parent
            conversation.parents[message_id] = str(user.get("id"))
            conversation.prompts[str(user.get("id"))] = prompt
        end, finish = len(whole), options.finish
        if options.max_tokens and len(whole) - sent > options.max_tokens:
            end, finish = sent + options.max_tokens, "max_tokens"
        if finish == "max_tokens":  # continuable, as the upstream's are
            conversation.unfinished[message_id] = (whole, end, prompt)
        step = options.step
        in_prompt = _STEP_IN_PROMPT.search(prompt) if options.directives else None
        if in_prompt:
            step = min(int(in_prompt.group(1)), MAX_REPLY_CHARS) or 1
        return _Turn(conversation.id, message_id, user, body.get("model") or "text-davinci-002-render-sha",
                     "" if empty else whole[:sent], "" if empty else whole[:end], finish,
                     _title(prompt) if turns == 0 and user is not None else None, step)

    def _reply_text(self, prompt: str, turn: int, earlier: Optional[str]) -> str:
        reply = self.options.reply
        if callable(reply):
            text = reply(prompt)
            if not isinstance(text, str):
                raise TypeError(f"the reply function returned {type(text).__name__}, not a string")
            return text
        if reply is not None:
            return reply
        if self.options.directives:
            chars = _CHARS_IN_PROMPT.search(prompt)
            if chars and int(chars.group(1)) > MAX_REPLY_CHARS:
                raise _BadRequest(400, f"[[chars N]] asks for at most {MAX_REPLY_CHARS} characters.")
            text = default_reply(prompt)
        else:
            text = _echo_reply(prompt)
        if earlier is not None:
            text = f"Turn {turn}: before, you said “{_shown(earlier)}”. {text}"
        return text

    async def _send_error_fault(self, writer: asyncio.StreamWriter, fault: _Fault, keep_alive: bool) -> None:
        if fault.name == "expired200":
            await _send_json(writer, 200, {"detail": _EXPIRED}, keep_alive=keep_alive)
        elif fault.name == "cap":
            await _send_json(writer, 429, {"detail": {
                "message": "You've reached the current usage cap for this model. Please try again later.",
                "code": "model_cap_exceeded", "clears_in": fault.arg(0)}}, keep_alive=keep_alive)
        elif fault.name == "content_type":
            await _send_body(writer, 200, "text/html; charset=utf-8", b"<html><body>Hi</body></html>", keep_alive)
        elif fault.name == "challenge":
            await _send_body(writer, 403, "text/html; charset=UTF-8", _CHALLENGE_PAGE.encode(), keep_alive,
                             headers=[("cf-mitigated", "challenge")])
        else:
            status = fault.arg(0)
            if status == 504:
                await _send_body(writer, 504, "text/html", _CDN_PAGE.encode(), keep_alive)
                return
            detail: Any = {
                401: _EXPIRED,
                403: "Forbidden: this shared account is not allowed to chat.",
                429: "Too many requests in 1 hour. Try again later.",
                500: "Internal Server Error",
            }.get(status, "Only one message at a time. Please allow any other responses to "
                          "complete before sending another message, or wait one minute.")
            retry_after = fault.arg(1)
            headers = [("Retry-After", str(retry_after))] if status == 429 and retry_after is not None else []
            await _send_json(writer, status, {"detail": detail}, keep_alive=keep_alive, headers=headers)

    # -- the stream: cumulative snapshots ----------------------------------------------

    def _dump(self, value: Any) -> bytes:
        options = self.options
        return json.dumps(value, ensure_ascii=options.ascii_json, indent=1 if options.multiline else None).encode()

    def _escaped_pieces(self, turn: _Turn) -> List[bytes]:
        """The reply's text as JSON string content: what an earlier round sent, then a
        piece per event. Escaping piece by piece is escaping the whole: no piece splits a
        character."""
        text, before = turn.text, turn.before
        pieces = [before] + [text[i:i + turn.step] for i in range(len(before), len(text), turn.step)]
        return [self._dump(piece)[1:-1] for piece in pieces]

    def _snapshot_tool_use(self, turn: _Turn, now: float) -> Iterator[_Event]:
        """A visible message, a call to a tool and the tool's answer, as snapshots: what
        comes before the reply's own message when the model uses a tool."""

        def snapshot(role: str, content: Dict[str, Any], status: str, recipient: str = "all",
                     end_turn: Optional[bool] = None, message_id: str = "") -> _Event:
            metadata = {"message_type": "next", "model_slug": turn.model} if role == "assistant" else {}
            return _Event((self._dump({
                "message": {"id": message_id or str(uuid.uuid4()),
                            "author": {"role": role, "name": "browser" if role == "tool" else None, "metadata": {}},
                            "create_time": now, "update_time": None, "content": content, "status": status,
                            "end_turn": end_turn, "weight": 1.0, "metadata": metadata, "recipient": recipient},
                "conversation_id": turn.conversation_id, "error": None}),), assistant=role == "assistant")

        first = str(uuid.uuid4())
        words = TOOL_USE_PREAMBLE.split(" ")
        for count in range(1, len(words) + 1):
            text = " ".join(words[:count])
            yield snapshot("assistant", {"content_type": "text", "parts": [text]}, "in_progress", message_id=first)
        yield snapshot("assistant", {"content_type": "text", "parts": [TOOL_USE_PREAMBLE]}, "finished_successfully",
                       end_turn=False, message_id=first)
        yield snapshot("assistant", {"content_type": "code", "language": "unknown", "text": "search(\"hello\")"},
                       "finished_successfully", recipient="browser", end_turn=False)
        yield snapshot("tool", {"content_type": "text", "parts": ["Search results: none worth quoting."]},
                       "finished_successfully")

    def _snapshot_events(self, turn: _Turn, fault: _Fault) -> Iterator[_Event]:
        dump = self._dump
        conversation_id, now = turn.conversation_id, time.time()
        if turn.user is not None:
            yield _Event((dump({
                "message": {"id": str(uuid.uuid4()), "author": {"role": "system", "name": None, "metadata": {}},
                            "create_time": now, "update_time": None,
                            "content": {"content_type": "text", "parts": [""]}, "status": "finished_successfully",
                            "end_turn": True, "weight": 0.0, "metadata": {}, "recipient": "all"},
                "conversation_id": conversation_id, "error": None}),))
            yield _Event((dump({
                "message": {"id": turn.user.get("id"), "author": {"role": "user", "name": None, "metadata": {}},
                            "create_time": now, "update_time": None, "content": turn.user["content"],
                            "status": "finished_successfully", "end_turn": None, "weight": 1.0,
                            "metadata": {"timestamp_": "absolute", "message_type": None}, "recipient": "all"},
                "conversation_id": conversation_id, "error": None}),))
            if self.options.tool_use and turn.text:  # (an empty reply stays empty)
                yield from self._snapshot_tool_use(turn, now)

        def assistant(status: str, finished: bool) -> Tuple[bytes, bytes]:
            metadata: Dict[str, Any] = {"message_type": "next" if turn.user is not None else "continue",
                                        "model_slug": turn.model}
            if finished:
                metadata["finish_details"] = {"type": turn.finish, "stop": "<|im_end|>"}
            event: Dict[str, Any] = {
                "message": {"id": turn.message_id, "author": {"role": "assistant", "name": None, "metadata": {}},
                            "create_time": now, "update_time": None,
                            "content": {"content_type": "text", "parts": ["\x00TEXT\x00"]},
                            "status": status, "end_turn": True if finished else None, "weight": 1.0,
                            "metadata": metadata, "recipient": "all"},
                "conversation_id": conversation_id, "error": None}
            head, tail = dump(event).split(dump("\x00TEXT\x00"))
            return head + b'"', b'"' + tail

        # Each event's text is a slice of the whole escaped text: copying or escaping the
        # text so far for every event would make the mock quadratic.
        pieces = self._escaped_pieces(turn)
        escaped = b"".join(pieces)
        view = memoryview(escaped)
        head, tail = assistant("in_progress", False)
        end = len(pieces[0])
        for sent, piece in enumerate(pieces[1:], 1):
            end += len(piece)
            if fault.name == "error_event" and sent > fault.arg(0):
                yield _Event((dump({"message": None, "conversation_id": conversation_id, "error": _MODEL_ERROR}),))
                return
            if fault.name == "handoff" and sent > 1:
                yield _Event((dump({"type": "stream_handoff", "conversation_id": conversation_id,
                                    "options": [{"type": "websocket"}]}),))
                return
            if fault.name == "rewrite" and sent == fault.arg(0) + 1:
                yield _Event((head, b"REWRITTEN ", view[:end], tail), assistant=True)
                continue
            yield _Event((head, view[:end], tail), assistant=True)
        head, tail = assistant("finished_successfully", True)  # even with no text, as the upstream does
        yield _Event((head, view, tail), assistant=True)
        yield _Event((dump({"conversation_id": conversation_id, "message_id": turn.message_id, "is_completion": True,
                            "moderation_response": {"flagged": False, "blocked": False,
                                                    "moderation_id": "modr-" + turn.message_id[:8]}}),))
        if turn.title is not None:
            yield _Event((dump({"type": "title_generation", "title": turn.title, "conversation_id": conversation_id}),))
        yield _DONE

    # -- the stream: the delta format ------------------------------------------------

    def _delta_events(self, turn: _Turn, fault: _Fault) -> Iterator[_Event]:
        """The reply in the delta format, with every construct of it; the seed places them."""
        dump, conversation_id = self._dump, turn.conversation_id
        schedule = random.Random(f"{self.options.seed}:{turn.message_id}")

        def delta(record: Dict[str, Any], assistant: bool = False) -> _Event:
            padding = b" " * schedule.choice((0, 0, 0, 1, 3))  # JSON may end in white space
            return _Event((dump(record) + padding,), "delta", assistant)

        def notice(notice_type: str, **fields: Any) -> _Event:
            return _Event((dump({"type": notice_type, **fields, "conversation_id": conversation_id}),))

        def message(message_id: str, role: str, content: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
            fields = {"id": message_id, "author": {"role": role, "name": extra.pop("name", None), "metadata": {}},
                      "create_time": time.time(), "update_time": None, "content": content,
                      "status": "in_progress", "end_turn": None, "weight": 1.0,
                      "metadata": extra.pop("metadata", {}), "recipient": "all", "channel": None}
            fields.update(extra)
            return {"message": fields, "conversation_id": conversation_id, "error": None}

        def ping() -> _Event:
            return _Event((b" ping - " + time.strftime("%Y-%m-%d %H:%M:%S").encode(),), ":")

        def hidden_id() -> str:
            return _uuid4(schedule)

        parts = "/message/content/parts/0"
        yield _Event((b'"v1"',), "delta_encoding")
        yield notice("resume_conversation_token", kind="conversation_id", token="rct-" + turn.message_id[:8])
        if turn.user is not None:
            yield notice("input_message", input_message={**turn.user, "author": {"role": "user"}})
            yield delta({"p": "", "o": "add", "v": message(str(turn.user.get("id")), "user", turn.user["content"],
                                                           status="finished_successfully"), "c": 0})
        if turn.title is not None:
            yield notice("title_generation", title="New chat")
        yield notice("message_marker", message_id=turn.message_id, marker="user_visible_token", event="first")
        # A commentary preamble addressed to everyone: the web page hides it.
        yield delta({"p": "", "o": "add", "c": 1, "v": message(
            hidden_id(), "assistant", {"content_type": "text", "parts": [""]}, channel="commentary",
            metadata={"is_thinking_preamble_message": True})})
        yield delta({"p": parts, "o": "append", "v": "Let me think"})
        yield delta({"v": " about that."})
        yield ping()
        # Reasoning, as thoughts.
        yield delta({"p": "", "o": "add", "c": 2, "v": message(
            hidden_id(), "assistant", {"content_type": "thoughts", "thoughts": [], "source_analysis_msg_id": ""},
            channel="analysis", recipient="all")})
        yield delta({"p": "/message/content/thoughts", "o": "append",
                     "v": [{"summary": "Reading the question", "content": "The user wrote to me."}]})
        tool_use = self.options.tool_use and turn.user is not None and bool(turn.text)
        if tool_use:  # a visible message before the tool's round trip, document 6
            yield delta({"p": "", "o": "add", "c": 6, "v": message(
                hidden_id(), "assistant", {"content_type": "text", "parts": [""]},
                metadata={"message_type": "next", "model_slug": turn.model})}, assistant=True)
            half = len(TOOL_USE_PREAMBLE) // 2
            yield delta({"p": parts, "o": "append", "v": TOOL_USE_PREAMBLE[:half]}, assistant=True)
            yield delta({"v": TOOL_USE_PREAMBLE[half:]}, assistant=True)
            yield delta({"p": "", "o": "patch", "v": [
                {"p": "/message/status", "o": "replace", "v": "finished_successfully"},
                {"p": "/message/end_turn", "o": "replace", "v": False}]})
        # A tool round trip: a call addressed to the tool, and the tool's answer.
        yield delta({"p": "", "o": "add", "c": 3, "v": message(
            hidden_id(), "assistant", {"content_type": "code", "language": "unknown", "text": ""},
            recipient="web.run")})
        yield delta({"p": "/message/content/text", "o": "append", "v": '{"search_query": "hello"}'})
        yield delta({"p": "", "o": "patch", "v": [
            {"p": "/message/status", "o": "replace", "v": "finished_successfully"},
            {"p": "/message/end_turn", "o": "replace", "v": False},
            {"p": "/message/metadata/search_done", "o": "add", "v": True}]})
        yield delta({"p": "", "o": "add", "c": 4, "v": message(
            hidden_id(), "tool", {"content_type": "text", "parts": ["Search results: none worth quoting."]},
            name="web.run", metadata={"scratch": {"draft": True}}, status="finished_successfully")})
        yield delta({"p": parts, "o": "truncate", "v": 14})
        yield delta({"p": "/message/metadata/scratch", "o": "remove"})
        yield notice("server_ste_metadata", metadata={"model_slug": turn.model, "turn_use_case": "text"})
        # The reply itself, document 5; other documents interleave by switching "c".
        yield delta({"p": "", "o": "add", "c": 5, "v": message(
            turn.message_id, "assistant", {"content_type": "text", "parts": [turn.before]}, channel="final",
            metadata={"message_type": "next" if turn.user is not None else "continue", "model_slug": turn.model,
                      "citations": []})})
        pieces = [turn.text[i:i + turn.step] for i in range(len(turn.before), len(turn.text), turn.step)]
        slots = max(len(pieces), 6)
        pieces += [""] * (slots - len(pieces))
        switch, patch, batch, padding_ping = schedule.sample(range(1, slots), 4)
        explicit = True  # the next text record must name its path and op
        for sent, piece in enumerate(pieces, 1):
            if fault.name == "error_event" and sent > fault.arg(0):
                yield delta({"p": "", "o": "add", "c": 6, "v": {"message": None, "conversation_id": conversation_id,
                                                                "error": _MODEL_ERROR}})
                return
            if fault.name == "handoff" and sent > 1:
                yield notice("stream_handoff", options=[{"type": "websocket"}])
                return
            if fault.name == "rewrite" and sent == fault.arg(0) + 1:
                yield delta({"p": parts, "o": "replace", "c": 5,
                             "v": "REWRITTEN " + turn.text[: len(turn.before) + sum(map(len, pieces[:sent]))]},
                            assistant=True)
                explicit = True
                continue
            if sent - 1 == switch:  # back to the reasoning for a moment, then "c" returns
                yield delta({"p": "/message/content/thoughts/0/content", "o": "append", "v": " Then answer.", "c": 2})
                if tool_use:  # and to the visible message before the tool's, its text as it was
                    yield delta({"p": "/message/metadata/search_done", "o": "add", "v": True, "c": 6})
                yield delta({"p": parts, "o": "append", "v": piece, "c": 5}, assistant=True)
                explicit = False
            elif sent - 1 == patch:  # a patch without a path
                yield delta({"o": "patch", "v": [
                    {"p": parts, "o": "append", "v": piece},
                    {"p": "/message/metadata", "o": "append", "v": {"citations": []}}]}, assistant=True)
                explicit = True
            elif sent - 1 == batch:  # a bare batch
                yield delta({"v": [
                    {"p": parts, "o": "append", "v": piece},
                    {"p": "/message/metadata/citations", "o": "append", "v": [{"start_ix": 0, "end_ix": 0}]}]},
                    assistant=True)
                explicit = True
            elif explicit:
                yield delta({"p": parts, "o": "append", "v": piece}, assistant=True)
                explicit = False
            else:
                yield delta({"v": piece}, assistant=True)
            if sent - 1 == padding_ping:
                yield ping()
        yield delta({"p": "", "o": "patch", "v": [
            {"p": "/message/status", "o": "replace", "v": "finished_successfully"},
            {"p": "/message/end_turn", "o": "replace", "v": True},
            {"p": "/message/metadata", "o": "append",
             "v": {"finish_details": {"type": turn.finish, "stop_tokens": [200002]}, "is_complete": True}}]})
        if turn.title is not None:
            yield notice("title_generation", title=turn.title)
        yield notice("message_stream_complete")
        yield notice("conversation_detail_metadata", banner_info=None, blocked_features=[],
                     model_limits=[], default_model_slug=turn.model)
        yield _DONE

    # -- the stream on the wire ------------------------------------------------------

    def _wire(self, events: Iterator[_Event]) -> Iterator[Tuple[Tuple[Union[bytes, memoryview], ...], Optional[_Event]]]:
        """Each event as it goes on the wire before the transfer and content codings,
        with the event; the byte order mark, if any, comes first on its own."""
        options = self.options
        newline = options.newline.encode()
        prefix = b"data: " if options.data_space else b"data:"
        plain = not (options.multiline or options.pings or options.comments)
        ends = newline + newline
        pads = random.Random(f"{options.seed}:padding") if options.padding else None
        leads = {None: prefix, ":": b":"}  # what goes before an event's data, by its type
        if options.bom:
            yield (_BOM,), None
        for event in events:
            lead = leads.get(event.kind)
            if lead is None:
                lead = leads[event.kind] = b"event: " + str(event.kind).encode() + newline + prefix
            data = event.data
            if pads is not None and event.kind != ":" and event is not _DONE:
                data = (*data, b" " * pads.randrange(32))
            if plain or event.kind == ":":
                yield (lead, *data, ends), event
                continue
            field = lead[: -len(prefix)]
            payload = b"".join(data)
            lines = payload.split(b"\n") if options.multiline else [payload]
            out = field + b"".join([prefix + line + newline for line in lines]) + newline
            if options.pings:
                stamp = b'"' + str(time.time()).encode() + b'"'
                out = b"event: ping" + newline + prefix + stamp + newline + newline + out
            if options.comments:
                out = b": keep-alive" + newline + out
            yield (out,), event

    async def _send_stream(
        self, request: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        events: Iterator[_Event], fault: _Fault, keep_alive: bool,
    ) -> bool:
        options = self.options
        framing = options.framing
        if framing == "chunked" and request.version == "HTTP/1.0":
            framing = "close"  # an HTTP/1.0 client cannot read chunks: servers end the body by closing
        keep_alive = keep_alive and framing != "close"
        compressor = zlib.compressobj(wbits=31) if self._compress(request) else None
        wire = self._wire(events)
        if compressor is not None:
            wire = ((((compressor.compress(b"".join(pieces)) + compressor.flush(zlib.Z_SYNC_FLUSH)),), event)
                    for pieces, event in wire)
        headers = [("Content-Type", self.options.stream_content_type)] if self.options.stream_content_type else []
        headers.append(("Cache-Control", "no-cache"))
        if compressor is not None:
            headers.append(("Content-Encoding", "gzip"))
        if framing == "length":
            # The length must be known first: build the whole body (fine for a mock); a
            # fault then leaves it short of what was declared.
            built = [((b"".join(pieces),), event) for pieces, event in wire]
            if compressor is not None:
                built.append(((compressor.flush(),), None))
            headers.append(("Content-Length", str(sum(len(pieces[0]) for pieces, _ in built))))
            wire = iter(built)
        elif framing == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
        await _write_head(writer, 200, headers, keep_alive)
        chunked = framing == "chunked"
        delay = fault.arg(0) if fault.name == "delay_events" else options.delay
        # Events go out in batches of about 64 KiB unless something needs each one on its
        # own: a delay, a fault, or writes of a given size.
        each = bool(delay or fault.name or options.write_size)
        batch = bytearray()
        count = assistant_count = 0
        for pieces, event in wire:
            if event is not None:
                if fault.name == "hang_at_end" and event is _DONE:
                    if batch:
                        await self._write(writer, batch)
                    await _wait_for_close(reader)
                    return False
                if fault.name in _BREAKS and count == fault.arg(0):
                    if batch:
                        await self._write(writer, batch)
                    return await self._break_stream(reader, writer, fault, chunked, keep_alive)
                count += 1
            size = sum(map(len, pieces))
            if chunked and size:
                batch += b"%x\r\n" % size
            for piece in pieces:
                batch += piece
            if chunked and size:
                batch += b"\r\n"
            if each or len(batch) >= 65536:
                await self._write(writer, batch)
                batch = bytearray()
            if event is not None and event.assistant:
                assistant_count += 1
                if fault.name == "pause_after" and assistant_count == fault.arg(0):
                    await asyncio.sleep(fault.arg(1))
            if delay and event is not None:
                await asyncio.sleep(delay)
        if compressor is not None and framing != "length":
            tail = compressor.flush()
            batch += (b"%x\r\n%b\r\n" % (len(tail), tail)) if chunked and tail else tail
        if chunked:
            batch += b"0\r\n\r\n"
        if batch:
            await self._write(writer, batch)
        return keep_alive

    async def _break_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: _Fault,
        chunked: bool, keep_alive: bool,
    ) -> bool:
        """End the stream the way `fault` says; returns whether the connection stays open."""
        if fault.name == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif fault.name == "garbage":
            garbage = random.Random(self.options.seed)
            await self._write(writer, bytes(garbage.getrandbits(8) for _ in range(64)))
        elif fault.name == "hang_after":
            await _wait_for_close(reader)
        elif chunked:  # "cut": a clean end of the body, only [DONE] is missing
            await self._write(writer, b"0\r\n\r\n")
            return keep_alive
        return False

    async def _write(self, writer: asyncio.StreamWriter, data: Union[bytes, bytearray]) -> None:
        """Write `data` (in pieces of `write_size`), each piece drained; raises `_Closed`
        when the client is gone. Each piece also lets the loop run: over TLS, the stream
        learns of a lost connection only then (`drain` waits only when the buffer is
        full), and a stream written on regardless went into the dead connection whole,
        with asyncio logging a warning for each write."""
        size = self.options.write_size if self.options.write_size > 0 else max(len(data), 1)
        try:
            for start in range(0, len(data), size):
                writer.write(data[start:start + size] if size < len(data) else data)
                await writer.drain()
                await asyncio.sleep(0)
                if writer.is_closing():
                    raise _Closed()
        except ConnectionError:
            raise _Closed() from None


def _prompt_of(body: Dict[str, Any]) -> str:
    messages = body.get("messages") or []
    return str(messages[0]["content"]["parts"][0]) if messages else ""


def _conversation_problem(body: Any) -> Optional[str]:
    if not isinstance(body, dict):
        return "The body must be a JSON object."
    if body.get("action") not in ("next", "variant", "continue"):
        return "action must be next, variant or continue."
    for key in ("parent_message_id", "model"):
        if not isinstance(body.get(key), str):
            return f"{key} must be a string."
    if body.get("conversation_id") is not None and not isinstance(body["conversation_id"], str):
        return "conversation_id must be a string."
    if body["action"] == "continue" and not body.get("messages"):
        return None
    messages = body.get("messages")
    try:
        message = messages[0]  # type: ignore[index]
        parts = message["content"]["parts"]
        if not isinstance(parts[0], str) or not isinstance(message, dict):
            raise TypeError
    except (TypeError, KeyError, IndexError):
        return "messages[0].content.parts[0] must be a string."
    return None


def _cookie(request: RecordedRequest, name: str) -> Optional[str]:
    for part in (request.header("cookie") or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _uuid4(source: random.Random) -> str:
    """A random id in UUID version 4 form, as the upstream's, from a seeded source."""
    return str(uuid.UUID(int=source.getrandbits(128), version=4))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Optional[RecordedRequest]:
    """The next request on the connection, None when the client closed it. A client that
    sends ``Expect: 100-continue`` is told to go on before its body is read."""
    first = await reader.read(1)
    if not first:
        return None
    if first == b"\x16":  # a TLS handshake: answer at once, as a plain HTTP server does
        raise _BadRequest(400, "This is a plain HTTP server: the client spoke TLS to it.")
    try:
        head = first + await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if (first + exc.partial).strip():
            raise _BadRequest(400, "Incomplete request.") from None
        return None
    except asyncio.LimitOverrunError:
        head = b""  # too long to hold: the request line, or the fields after it?
        try:
            line_end = len(first + await reader.readuntil(b"\r\n")) - 2
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            line_end = _MAX_HEAD
    else:
        line_end = head.find(b"\r\n")
    if line_end > _MAX_REQUEST_LINE:  # as servers answer a request line over their limit
        raise _BadRequest(414, "URI Too Long")
    if not head or len(head) > _MAX_HEAD:
        raise _BadRequest(431, "Request Header Fields Too Large")
    lines = head[:-4].decode("latin-1").split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
        raise _BadRequest(400, "Malformed request line.")
    method, target, version = request_line
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(400, "Malformed header line.")
        headers.append((name, value.strip()))
    lookup = {k.lower(): v for k, v in headers}
    coding = lookup.get("transfer-encoding")
    lengths = {value.strip() for key, value in headers if key.lower() == "content-length" for value in value.split(",")}
    length = 0
    if coding is not None:
        if coding.strip().lower() != "chunked" or lengths:
            raise _BadRequest(400, "Only a chunked Transfer-Encoding, without Content-Length, is understood.")
    else:
        if len(lengths) > 1:  # which one frames the body is anyone's guess (a list of one value is that value)
            raise _BadRequest(400, "Content-Length values that disagree.")
        length_text = lengths.pop() if lengths else "0"
        if not (length_text.isdigit() and length_text.isascii()):
            raise _BadRequest(400, "Bad Content-Length.")
        length = int(length_text)
        if length > _MAX_BODY:
            raise _BadRequest(413, "Request body too large.")
    expectation = lookup.get("expect")
    if expectation is not None and version == "HTTP/1.1":
        if expectation.strip().lower() != "100-continue":
            raise _BadRequest(417, "Expectation Failed")
        if coding is not None or length:  # the client waits for this before it sends the body
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if coding is not None:
        body = await _read_chunked_body(reader)
    else:
        body = await reader.readexactly(length) if length else b""
    if target.startswith(("http://", "https://")):  # absolute form, as proxies forward it
        parts = urllib.parse.urlsplit(target)
        target = urllib.parse.urlunsplit(("", "", parts.path, parts.query, parts.fragment))
    path, _, query = target.partition("?")
    return RecordedRequest(method, path, query, tuple(headers), body, version=version)


async def _close_gently(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End a connection whose request was refused before it was all read, as RFC 9112
    (9.6) asks: close the sending side, then read and drop what the client still sends
    until it closes too, for at most `_LINGER_SECONDS`. Closing at once with bytes unread
    makes the kernel answer with a reset, which can destroy the answer before the client
    reads it."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        await asyncio.wait_for(_wait_for_close(reader), _LINGER_SECONDS)


def _wants_keep_alive(request: RecordedRequest) -> bool:
    """Whether the connection stays open after the answer: in HTTP/1.1 unless the client
    says ``Connection: close``, in HTTP/1.0 only if it says ``Connection: keep-alive``."""
    tokens = {token.strip().lower() for token in (request.header("connection") or "").split(",")}
    return "keep-alive" in tokens if request.version == "HTTP/1.0" else "close" not in tokens


async def _read_chunked_body(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        try:
            size_line = (await reader.readuntil(b"\r\n"))[:-2].split(b";")[0].strip()
        except asyncio.LimitOverrunError:
            raise _BadRequest(400, "Chunk size line too long.") from None
        if not size_line or len(size_line) > 8 or size_line.strip(b"0123456789abcdefABCDEF"):
            raise _BadRequest(400, "Malformed chunk size.")
        size = int(size_line, 16)
        if len(body) + size > _MAX_BODY:
            raise _BadRequest(413, "Request body too large.")
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, dropped
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise _BadRequest(400, "Chunk data not followed by CRLF.")


async def _wait_for_close(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


# The status of the response being written on this connection (each is its own task),
# for the access log.
_status: "contextvars.ContextVar[int]" = contextvars.ContextVar("mock_server_status", default=0)


async def _write_head(
    writer: asyncio.StreamWriter, status: int, headers: List[Tuple[str, str]], keep_alive: bool
) -> None:
    _status.set(status)
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:  # a status the standard library does not name
        reason = ""
    lines = [f"HTTP/1.1 {status} {reason}", "Server: mock-pandora", *(f"{k}: {v}" for k, v in headers)]
    lines.append("Connection: " + ("keep-alive" if keep_alive else "close"))
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


async def _send_body(
    writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes, keep_alive: bool,
    headers: Optional[List[Tuple[str, str]]] = None, compress: bool = False,
) -> None:
    fields = [("Content-Type", content_type), *(headers or [])]
    if compress:
        body = _gzip(body)
        fields.append(("Content-Encoding", "gzip"))
    fields.append(("Content-Length", str(len(body))))
    await _write_head(writer, status, fields, keep_alive)
    writer.write(body)
    try:
        await writer.drain()
    except ConnectionError:
        raise _Closed() from None


def _gzip(body: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(body) + compressor.flush()


async def _send_json(
    writer: asyncio.StreamWriter, status: int, payload: Any, *, keep_alive: bool,
    headers: Optional[List[Tuple[str, str]]] = None, compress: bool = False,
) -> None:
    body = json.dumps(payload).encode()
    await _send_body(writer, status, "application/json", body, keep_alive, headers, compress)


@contextlib.contextmanager
def serve_in_thread(options: Optional[MockOptions] = None, **overrides: Any) -> Iterator[MockServer]:
    """Run a `MockServer` on its own thread and event loop for the ``with`` block (as
    ``with MockServer(...)`` does)."""
    with MockServer(options, **overrides) as server:
        yield server


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _cli_parser() -> argparse.ArgumentParser:
    """Built from `MockOptions`' fields: each default and help is written once, there."""
    parser = argparse.ArgumentParser(
        prog="mock_server", description="An offline copy of the ChatGPT web conversation protocol's servers.",
        epilog="faults: " + "; ".join(f"{k}: {v}" for k, v in FAULTS.items()),
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="the port to listen on; 0 picks a free one")
    parser.add_argument("--quiet", action="store_true", help="no access log on stderr")
    for field in dataclasses.fields(MockOptions):
        flag, help_text = "--" + field.name.replace("_", "-"), field.metadata["help"]
        if isinstance(field.default, bool):
            if field.default:
                parser.add_argument("--no-" + flag[2:], dest=field.name, action="store_false", help="do not " + help_text)
            else:
                parser.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = type(field.default) if field.default is not None else str
        default = "lf" if field.name == "newline" else field.default
        shown = " (default: %(default)s)" if field.default not in (None, "") else ""
        parser.add_argument(flag, type=kind, default=default, choices=field.metadata.get("choices"),
                            help=help_text + shown)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Serve until Ctrl-C or SIGTERM; the first line of stdout is the base URL."""
    parser = _cli_parser()
    args = vars(parser.parse_args(argv))
    host, port, quiet = args.pop("host"), args.pop("port"), args.pop("quiet")
    try:
        options = MockOptions(**args)
    except ValueError as exc:
        parser.error(str(exc))
    if options.profile == "backend-api" and options.access_token is None:
        # From Python, server.access_token says the one made up; here nothing could
        # (a token is never printed), and every request would be refused.
        parser.error("--profile backend-api needs --access-token TOKEN: the token the gateway accepts,"
                     " for the client to send (FAKEGPT_ACCESS_TOKEN)")

    def log(line: str) -> None:
        print(f"mock_server: {line}", file=sys.stderr, flush=True)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        async with MockServer(options, host=host, port=port, log=None if quiet else log) as server:
            print(server.url, flush=True)
            await stop.wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except ValueError as exc:  # the port, or the certificate
        print(f"mock_server: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mock_server: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
