"""fakegpt: a one-file, standard-library client for FakeGpt "shared token" ChatGPT proxies.

A drop-in for gpt4free's ``FakeGpt`` provider: it logs in to the upstream (a random
shared account from ``/api/loads``, ``/auth/login``, ``/api/auth/session``), keeps the
``credential`` cookie and the access token, POSTs the conversation and streams the reply
back as text pieces::

    async for piece in FakeGpt.create_async_generator("", [{"role": "user", "content": "Hi"}]):
        print(piece, end="")

It speaks HTTP/1.1 over asyncio's transports and needs nothing outside the standard library
(Python 3.9+), so the file can be copied into any code base. The public service it was
written for (https://chat-shared2.zhile.io) shut down in January 2024: point ``url`` at
another upstream, or run ``python -m fakegpt --mock "Hello"`` to talk to the bundled mock.

Layers, each under a banner below, in dependency order: constants, errors, pure protocol
(bytes in, events out, no sockets), transport, session, provider API, command line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime
import functools
import gc
import http.cookiejar
import json
import logging
import math
import os
import re
import secrets
import select
import signal
import socket
import ssl
import stat
import string
import sys
import threading
import time
import urllib.parse
import urllib.request
import weakref
import zlib
from typing import (
    Any,
    AsyncGenerator,
    Awaitable,
    Callable,
    Dict,
    Final,
    Iterator,
    List,
    NamedTuple,
    NoReturn,
    Optional,
    Sequence,
    Set,
    TextIO,
    Tuple,
    TypeVar,
    Union,
    cast,
)

__version__ = "1.8.11"
__all__ = [
    "AsyncResult",
    "AuthenticationError",
    "ChatEvent",
    "ChallengeError",
    "ChatStream",
    "ConnectError",
    "ConversationDecoder",
    "Data",
    "DEFAULT_MODEL",
    "DEFAULT_URL",
    "PROFILES",
    "EndOfMessage",
    "FakeGpt",
    "FakeGptError",
    "FinishReason",
    "JsonConversation",
    "HTTPStatusError",
    "KEYWORDS",
    "LimitExceeded",
    "Limits",
    "Messages",
    "NEED_DATA",
    "NoResponseError",
    "ProtocolError",
    "ProxyError",
    "RateLimitError",
    "RequestTimeout",
    "Response",
    "ResponseReader",
    "SSEDecoder",
    "ServerSentEvent",
    "Timeouts",
    "TLSError",
    "TokenExpiredError",
    "TransportError",
    "TruncatedStreamError",
    "UpstreamError",
    "UsageError",
    "format_prompt",
    "get_random_string",
    "load_mock_server",
    "main",
]

# ---------------------------------------------------------------------------------------
# Constants and shared helpers
# ---------------------------------------------------------------------------------------

DEFAULT_URL = "https://chat-shared2.zhile.io"
DEFAULT_MODEL = "text-davinci-002-render-sha"
PROFILES = ("shared", "backend-api")
"""``shared``: the shared-token site's login and ``/api/conversation``; ``backend-api``:
a ChatGPT-web gateway's ``/backend-api/conversation`` with an access token."""
# Names gpt4free passes for "whatever this provider's default model is".
_DEFAULT_MODEL_ALIASES = frozenset({"", "gpt-3.5-turbo", DEFAULT_MODEL})

Messages = List[Dict[str, Any]]
"""Chat messages: ``{"role": ..., "content": ...}``, a content a string or a list of
OpenAI-style text parts."""
AsyncResult = AsyncGenerator[Union[str, Any], None]
"""Text pieces (``str``); with ``return_conversation=True``, gpt4free's conversation and
finish-reason objects after them."""

_log = logging.getLogger("fakegpt")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(text: str) -> str:
    """`text` with each lone surrogate (a ``\\ud800`` escape in JSON; valid pairs are
    joined by the parser) as U+FFFD, as invalid UTF-8 already is: text that encodes."""
    if not text.isascii():
        try:
            text.encode("utf-8")  # (faster than searching: only a surrogate cannot be)
        except UnicodeEncodeError:
            return _SURROGATE.sub("\ufffd", text)
    return text


def _redact(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret in it replaced by ``***``: in every form a server may
    echo it (as is, JSON-escaped, with ``\\/``, percent-encoded), and only whole values
    (no letter or digit either side), so that a short secret does not eat words."""
    for secret in secrets:
        if not secret:
            continue
        forms = {secret, json.dumps(secret)[1:-1], secret.replace("/", "\\/"),
                 urllib.parse.quote(secret, safe="")}
        # And each long run of plain characters in it: escaping its separators in some
        # other way must not leave the body of the token readable.
        forms.update(re.findall(r"[A-Za-z0-9._~-]{8,}", secret))
        for form in sorted(forms, key=len, reverse=True):
            if form in text:
                text = re.sub(f"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])", "***", text)
    return text


_K = TypeVar("_K")
_V = TypeVar("_V")


def _memo_put(memo: Dict[_K, _V], key: _K, value: _V) -> _V:
    """`value`, kept in `memo` under `key`; a full memo (64 entries: calls mostly share
    a handful) is emptied first."""
    if len(memo) >= 64:
        memo.clear()
    memo[key] = value
    return value


def _excerpt(data: Union[bytes, str], limit: int = 80) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return _cut(" ".join(text.split()), limit)


def _as_sent(line: bytes, limit: int = 80) -> str:
    """A line of the wire as it came (cut to `limit` characters), for what is wrong in its
    syntax: `_excerpt` tidies white space away, which may be the very fault (``1a `` as a
    chunk size, a space before a header's colon)."""
    return _cut(line.decode("latin-1"), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class FakeGptError(RuntimeError):
    """Base of every error this module raises on purpose.

    It is a RuntimeError because that is what the original provider documented.
    Messages never contain the access token, the ``credential`` cookie or proxy passwords.
    """


class UsageError(FakeGptError, ValueError):
    """The caller's arguments are wrong: messages, URL, proxy, keyword values."""


class ProtocolError(FakeGptError):
    """The upstream broke HTTP/1.1, Server-Sent Events or the conversation protocol."""


class LimitExceeded(ProtocolError):
    """A response went over one of the configured `Limits`."""


class TruncatedStreamError(ProtocolError):
    """The reply stream ended before ``data: [DONE]``: the answer is incomplete.

    Raised after every piece that did arrive was delivered; ``text`` holds them.
    """

    def __init__(self, message: str, *, text: str = "") -> None:
        super().__init__(message)
        self.text = text


class NoResponseError(FakeGptError):
    """The stream completed but carried no assistant text ("No valid response")."""


class TransportError(FakeGptError):
    """The connection to the upstream or the proxy failed."""


class ConnectError(TransportError):
    """A connection could not be opened (refused, unresolvable host, proxy refused)."""


class ProxyError(ConnectError):
    """The proxy will not carry the request: it wants credentials (407), or refuses the
    tunnel (another 4xx). Not tried again: the same request gets the same answer."""


class TLSError(ConnectError):
    """The TLS handshake failed: untrusted certificate, wrong host name, bad protocol."""


class RequestTimeout(TransportError):
    """A timeout of `Timeouts` ran out; ``phase`` is "connect", "read" or "total"."""

    def __init__(self, message: str, *, phase: str) -> None:
        super().__init__(message)
        self.phase = phase


class HTTPStatusError(FakeGptError):
    """The upstream answered with an error status or an error body.

    ``status`` is the HTTP status, ``detail`` the server's message (its JSON ``detail``,
    ``message`` or an HTML page's title), ``code`` the machine-readable code if any and
    ``body`` an excerpt of the raw body.
    """

    def __init__(
        self, message: str, *, status: int, detail: str = "", code: Optional[str] = None,
        body: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.code = code
        self.body = body


class ChallengeError(HTTPStatusError):
    """The upstream answered with a Cloudflare challenge page (a browser check) instead
    of the API: a client without a browser cannot pass it."""


class TokenExpiredError(HTTPStatusError):
    """The upstream no longer accepts the access token (401, 403 or ``token_expired``)."""


class RateLimitError(HTTPStatusError):
    """429 Too Many Requests; ``retry_after`` is the server's ``Retry-After`` in seconds."""

    def __init__(self, message: str, *, retry_after: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class AuthenticationError(FakeGptError):
    """The login flow failed: no shared token offered, login refused, no access token."""


class UpstreamError(FakeGptError):
    """An event of the reply stream carried an ``error``; ``code`` is its code if any."""

    def __init__(self, message: str, *, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------
# Pure protocol: HTTP/1.1 response reader (RFC 9112), bytes in, events out
# ---------------------------------------------------------------------------------------


def _bytes_given(data: Any, where: str) -> None:
    """A `UsageError` unless `data` is bytes (a bytearray, a memoryview): what the
    protocol layer's readers take."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UsageError(f"{where} takes bytes, not {type(data).__name__}")


class Limits(NamedTuple):
    """Size limits on what the upstream may send (going over raises `LimitExceeded`), and
    how many connections to it are in use at once.

    Memory stays bounded by them: an endless line is refused once it passes its limit.
    """

    max_line_size: int = 64 * 1024
    """Longest HTTP status, header or chunk-size line, in bytes."""
    max_header_count: int = 128
    """Most header (and trailer) fields in one response."""
    max_sse_line_size: int = 16 * 1024 * 1024
    """Longest line of the event stream, in bytes."""
    max_event_size: int = 16 * 1024 * 1024
    """Largest event (all its ``data`` lines), in bytes."""
    max_error_body_size: int = 64 * 1024
    """Most bytes of a non-stream body (JSON or an error page) that are read."""
    max_connections: int = 100
    """Most connections in use at once to one upstream (origin, proxy, TLS settings) in
    one event loop, as aiohttp's and httpx's default: a request beyond them waits its
    turn (within the connect timeout), then takes the connection one of them leaves."""


_DEFAULT_LIMITS = Limits()


def _checked_limits(limits: Any) -> Limits:
    """`limits`, if it is a `Limits` of positive whole numbers; else a `UsageError`."""
    checked = _checked.get(id(limits))  # (kept alive there, so that its id stays its own)
    if checked is not None and checked is limits:
        return checked  # checked before: a call checks its limits three times, for each layer
    if not isinstance(limits, Limits):
        raise UsageError("limits must be a fakegpt.Limits")
    for name, value in zip(Limits.__annotations__, limits):  # the fields, in order
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"Limits.{name} must be a positive whole number, not {value!r}")
    return _memo_put(_checked, id(limits), limits)


_checked: Dict[int, Limits] = {id(_DEFAULT_LIMITS): _DEFAULT_LIMITS}  # the last `Limits` found good


class Response(NamedTuple):
    """The head of a response. Header names are lower case, in the order received."""

    status: int
    reason: str
    headers: Tuple[Tuple[str, str], ...]

    def get(self, name: str) -> Optional[str]:
        """The field's value, several fields joined with ", ", or None."""
        name = name.lower()
        found = None
        for key, value in self.headers:  # a loop: a reader asks for five fields a response
            if key == name:
                found = value if found is None else f"{found}, {value}"
        return found

    def get_all(self, name: str, default: Optional[List[str]] = None) -> List[str]:
        """Every value of the field (`http.cookiejar` reads ``Set-Cookie`` this way)."""
        name = name.lower()
        values = [value for key, value in self.headers if key == name]
        return values if values else ([] if default is None else default)


class Data(NamedTuple):
    """A piece of the body, after transfer and content codings are removed."""

    data: bytes


class EndOfMessage(NamedTuple):
    """The body is complete."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""`ResponseReader.next_event` has nothing to give until more bytes are fed."""

ReaderEvent = Union[Response, Data, EndOfMessage]

# A later HTTP/1.x is read as 1.1, the highest minor version this speaks (RFC 9110 2.5).
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([1-5][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_FIELD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Each field line after a CRLF, up to the next CRLF, as `_parse_field_line` takes it (the
# value's trailing spaces and tabs still to strip), in a head decoded as Latin-1.
_FIELD_LINES = re.compile(r"\r\n([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)(?=\r\n)")
# A chunk size, an extension after it or spaces and tabs (not in RFC 9112's grammar, but
# sent by servers in the wild, and read by curl, Go and h11).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*|[ \t]*)")
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_NEXT_CHUNK = re.compile(rb"\r\n([0-9A-Fa-f]{1,16})\r\n")  # a chunk's end and the next one's size
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_FRAMING_FIELDS = frozenset({"transfer-encoding", "content-length", "content-encoding", "connection"})
_DECOMPRESS_STEP = 1024 * 1024


class ResponseReader:
    """Reads one HTTP/1.1 response from bytes, h11-style, never touching a socket.

    ``feed(data)`` buffers bytes (``b""`` means the peer closed); ``next_event()`` returns a
    `Response`, then `Data` pieces, then `EndOfMessage`, or `NEED_DATA`. Interim 1xx
    responses are skipped. Bodies are framed by Content-Length, chunked coding or the end
    of the connection; gzip and deflate content codings are removed. Anything malformed
    raises `ProtocolError`, anything oversized `LimitExceeded`. After `EndOfMessage`,
    `keep_alive` says whether the connection may carry another request.
    """

    def __init__(
        self, *, method: str = "GET", limits: Limits = _DEFAULT_LIMITS, decode_content: bool = True
    ) -> None:
        if not isinstance(method, str):
            raise UsageError(f"method must be a string, not {type(method).__name__}")
        self._buf = bytearray()
        self._eof = False
        self._method = method.upper()
        self._limits = _checked_limits(limits)
        self._decode_content = decode_content
        self._status: Optional[Tuple[bool, int, str]] = None  # (HTTP/1.0?, status, reason)
        self._persistent = False  # the response lets the connection carry another
        self._complete = False  # EndOfMessage returned
        self._fields: List[Tuple[str, str]] = []
        self._field_lines = 0  # the head's, folded ones too: what the limit counts
        self._remaining = 0
        self._decoder: Any = None
        self._compressed_seen = False
        self._chunk_end_pending = False  # chunk data read, its CRLF not yet
        # Body bytes taken as they were fed, not yet returned: in the usual case (a body
        # framed by length, or chunks framed the usual way, with nothing buffered) the
        # body is copied once out of what is fed, instead of into the buffer and out.
        self._fed_body: Optional[bytes] = None
        self._error: Optional[ProtocolError] = None
        self._compressed_tail = b""
        self._trailer_count = 0
        self._step: Callable[[], Union[ReaderEvent, _NeedData]] = self._read_head
        self.response: Optional[Response] = None

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Add received bytes (copied); ``b""`` marks the end of the connection."""
        _bytes_given(data, "ResponseReader.feed")
        if self._eof and data:
            raise ProtocolError("bytes fed after the end of the connection")
        if not data:
            self._eof = True
            return
        if not self._buf and self._fed_body is None:  # (after an error, its bytes are buffered)
            taken = self._take_body_as_fed(data)
            if taken == len(data):
                return
            data = data[taken:]
        self._buf += data

    def _take_body_as_fed(self, data: Union[bytes, bytearray, memoryview]) -> int:
        """Take the body bytes at the start of `data` (fed with nothing buffered) where
        they lie, copied once; returns how many bytes of `data` they and the chunks'
        framing between them took (0: none, `data` is for the buffer)."""
        if self._step == self._read_chunked:
            view = memoryview(data)
            pieces: List[memoryview] = []
            taken = self._take_chunks(data, view, 0, len(data), pieces)
            if pieces:
                self._fed_body = b"".join(pieces)
            return taken
        if self._step == self._read_length_body and self._remaining:
            taken = min(self._remaining, len(data))
            self._fed_body = bytes(data[:taken])
            self._remaining -= taken
            return taken
        return 0

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet returned in events (compressed ones waiting included)."""
        return len(self._buf) + len(self._compressed_tail) + len(self._fed_body or b"")

    @property
    def unconsumed(self) -> bytes:
        """Bytes fed but not part of the response (after a tunnel's head, for instance)."""
        return bytes(self._buf)

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request: the response was read to its
        end, it is HTTP/1.1 without ``Connection: close``, its body was framed by length
        or chunks (not by the end of the connection), and nothing came after it."""
        return self._complete and self._persistent and not self._buf and not self._eof and self._error is None

    def next_event(self) -> Union[ReaderEvent, _NeedData]:
        """The next event, or `NEED_DATA` until more is fed.

        Body bytes that arrived before a protocol error are returned first; the error is
        raised by the call after.
        """
        if self._fed_body is not None:
            body, self._fed_body = self._fed_body, None
            event = self._decoded(body)
            if event is not None:
                return event
        if self._error is not None:
            raise self._error
        return self._step()

    # -- lines -------------------------------------------------------------------------

    def _take_line(self, what: str) -> Optional[bytes]:
        buf = self._buf
        end = buf.find(b"\n", 0, self._limits.max_line_size + 2)
        if end < 0:
            if len(buf) > self._limits.max_line_size:
                raise LimitExceeded(f"{what} longer than {self._limits.max_line_size} bytes")
            if self._eof:
                raise TruncatedStreamError(f"connection closed in the middle of the {what}")
            return None
        line = bytes(buf[:end])
        del buf[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._limits.max_line_size:
            raise LimitExceeded(f"{what} longer than {self._limits.max_line_size} bytes")
        return line

    # -- head --------------------------------------------------------------------------

    def _read_head(self) -> Union[ReaderEvent, _NeedData]:
        while True:
            if self._status is None:
                if self._eof and not self._buf:
                    raise TruncatedStreamError("connection closed before a response arrived")
                if self._take_whole_head():
                    response = self._head_read()
                    if response is not None:
                        return response
                    continue
                line = self._take_line("status line")
                if line is None:
                    return NEED_DATA
                self._status = _parse_status_line(line)
                continue
            line = self._take_line("header line")
            if line is None:
                return NEED_DATA
            if line:
                if line[:1] in (b" ", b"\t") and self._fields:
                    # obs-fold: the last field's value goes on, joined by a space (RFC 9112 5.2)
                    name, value = self._fields[-1]
                    self._fields[-1] = (name, " ".join(filter(None, (value, _folded_value(line)))))
                else:
                    self._fields.append(_parse_field_line(line))
                self._field_lines += 1
                if self._field_lines > self._limits.max_header_count:
                    raise LimitExceeded(f"more than {self._limits.max_header_count} header fields")
                continue
            response = self._head_read()
            if response is not None:
                return response

    def _head_read(self) -> Optional[Response]:
        """The head taken (status and fields) as a response; None for an interim one."""
        assert self._status is not None
        http10, status, reason = self._status
        headers, self._status, self._fields, self._field_lines = tuple(self._fields), None, [], 0
        if status == 101:
            raise ProtocolError("unexpected 101 Switching Protocols")
        if status < 200:
            return None  # an interim response: the real one follows
        self.response = Response(status, reason, headers)
        # The fields that frame the body, in one pass (as `Response.get` joins them).
        framing: Dict[str, str] = {}
        for name, value in headers:
            if name in _FRAMING_FIELDS:
                framing[name] = f"{framing[name]}, {value}" if name in framing else value
        self._choose_framing(self.response, framing)
        connection = framing.get("connection", "").lower()
        self._persistent = (
            not http10 and self._step != self._read_until_close and self._method != "CONNECT"
            and ("close" not in connection or "close" not in [token.strip() for token in connection.split(",")])
        )
        return self.response

    def _take_whole_head(self) -> bool:
        """The usual head, all of it here, in one go: the status line and fields it
        takes are what taking it line by line gives. Anything else (a line ending in a
        bare LF, a line or field it would refuse, more fields than the limit) is left to
        that, which says what is wrong; then this returns False."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n", 0, self._limits.max_line_size)  # (so no line is too long)
        if end < 0:
            return False
        head = bytes(buf[:end + 2])
        status_end = head.find(b"\r\n")
        match = _STATUS_LINE.fullmatch(head, 0, status_end)
        fields = _FIELD_LINES.findall(head.decode("latin-1"), status_end)
        # A field line matches from the CRLF before it up to the CRLF after it, so as
        # many matches as LFs after the status line means every line is a valid field
        # line and none ends in a bare LF.
        if match is None or len(fields) != head.count(b"\n") - 1:
            return False
        if len(fields) > self._limits.max_header_count:
            return False
        del buf[:end + 4]
        self._status = _status_of(match)
        self._fields = [(name.lower(), value.rstrip(" \t")) for name, value in fields]
        return True

    def _choose_framing(self, response: Response, framing: Dict[str, str]) -> None:
        transfer_coding = framing.get("transfer-encoding")
        content_length = framing.get("content-length")
        if self._decode_content:
            self._decoder = _content_decoder(framing.get("content-encoding"))
        tunnel = self._method == "CONNECT" and 200 <= response.status < 300
        if tunnel or self._method == "HEAD" or response.status in (204, 304):
            self._step = self._end_of_message
        elif transfer_coding is not None:
            if content_length is not None:
                raise ProtocolError("both Transfer-Encoding and Content-Length in one response")
            if transfer_coding.strip().lower() != "chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding {transfer_coding!r}")
            self._step = self._read_chunked
        elif content_length is not None:
            self._remaining = _parse_content_length(content_length)
            self._step = self._read_length_body
        else:
            self._step = self._read_until_close

    # -- bodies ------------------------------------------------------------------------

    def _read_length_body(self) -> Union[ReaderEvent, _NeedData]:
        if self._compressed_tail:  # what is already here first: input must not pile up
            event = self._decoded(b"")
            if event is not None:
                return event
        while self._remaining:
            if not self._buf:
                if self._eof:
                    raise TruncatedStreamError(
                        f"connection closed with {self._remaining} bytes of the body missing"
                    )
                return NEED_DATA
            piece = self._take(self._remaining)
            self._remaining -= len(piece)
            event = self._decoded(piece)
            if event is not None:
                return event
        return self._end_of_message()

    def _read_until_close(self) -> Union[ReaderEvent, _NeedData]:
        if self._compressed_tail:
            event = self._decoded(b"")
            if event is not None:
                return event
        while self._buf:
            event = self._decoded(self._take(len(self._buf)))
            if event is not None:
                return event
        if self._eof:
            return self._end_of_message()
        return NEED_DATA

    def _read_chunked(self) -> Union[ReaderEvent, _NeedData]:
        """Every complete piece of chunk data in the buffer, as one `Data`.

        One event per read rather than per chunk: servers often send a chunk per SSE
        event, and per-chunk events would cost more than the parsing itself.
        """
        if self._compressed_tail:
            event = self._decoded(b"")
            if event is not None:
                return event
        buf, pos, size = self._buf, 0, len(self._buf)
        pieces: List[memoryview] = []
        view = memoryview(buf)  # slices of it join with one copy instead of two
        try:
            while True:
                pos = self._take_chunks(buf, view, pos, size, pieces)
                if self._step != self._read_chunked or pos == size:
                    break  # the last chunk, or all that is here
                if self._chunk_end_pending:
                    if size - pos < 2:
                        break
                    if buf[pos] != 0x0D or buf[pos + 1] != 0x0A:
                        raise ProtocolError("chunk data not followed by CRLF")
                    pos += 2
                    self._chunk_end_pending = False
                end = buf.find(b"\n", pos, pos + self._limits.max_line_size + 2)
                if end < 0:
                    if size - pos > self._limits.max_line_size:
                        raise LimitExceeded(
                            f"chunk size line longer than {self._limits.max_line_size} bytes"
                        )
                    break
                line = buf[pos:end - 1] if end > pos and buf[end - 1] == 0x0D else buf[pos:end]
                digits: Union[bytes, bytearray] = line
                if not (0 < len(line) <= 16 and not line.strip(_HEX_DIGITS)):
                    # Not plain hex (the usual case, where int() is safe): check it all.
                    match = _CHUNK_SIZE.fullmatch(line)
                    if match is None:
                        raise ProtocolError(f"malformed chunk size line {_as_sent(bytes(line))!r}")
                    digits = match.group(1)
                pos = end + 1
                self._remaining = int(digits, 16)
                if not self._remaining:
                    self._step = self._read_trailers
                    break
        except ProtocolError as exc:
            if not pieces:
                view.release()
                raise
            self._error = exc
        body = b"".join(pieces)
        pieces.clear()
        view.release()  # the buffer cannot shrink while a view of it is alive
        del buf[:pos]
        if body:
            event = self._decoded(body)
            if event is not None:
                return event
        if self._step != self._read_chunked:
            return self._step()
        if self._eof:
            raise TruncatedStreamError("connection closed inside a chunked body")
        return NEED_DATA

    def _take_chunks(
        self, buf: Union[bytes, bytearray, memoryview], view: memoryview, pos: int, size: int,
        pieces: List[memoryview],
    ) -> int:
        """Chunk data from `pos` on, while the chunks are framed as servers write them
        (each followed by CRLF, a plain size line and CRLF, matched at once): its pieces
        (views) go to `pieces`; returns where what is left starts. The rest of a chunk
        whose data is not all here is taken too; a size line after anything else (the
        body's first, or one with an extension), and anything malformed, are left to the
        caller (the CRLF due after a chunk's data: `_chunk_end_pending`)."""
        remaining = self._remaining
        if not remaining:
            if not self._chunk_end_pending:
                return pos
            match = _NEXT_CHUNK.match(buf, pos)
            if match is None:
                return pos
            self._chunk_end_pending = False
            pos, remaining = match.end(), int(match[1], 16)
        while remaining:
            end = pos + remaining
            if end > size:
                if pos < size:
                    pieces.append(view[pos:size])
                self._remaining = end - size
                return size
            pieces.append(view[pos:end])
            match = _NEXT_CHUNK.match(buf, end)
            if match is None:
                self._remaining, self._chunk_end_pending = 0, True
                return end
            pos, remaining = match.end(), int(match[1], 16)
        self._remaining = 0
        self._step = self._read_trailers  # a chunk of size 0: the last
        return pos

    def _read_trailers(self) -> Union[ReaderEvent, _NeedData]:
        if self._buf.startswith(b"\r\n"):  # no trailers, as usual: the blank line at once
            del self._buf[:2]
            return self._end_of_message()
        while True:
            line = self._take_line("trailer line")
            if line is None:
                return NEED_DATA
            if not line:
                return self._end_of_message()
            if line[:1] in (b" ", b"\t") and self._trailer_count:
                _folded_value(line)  # a folded line of the last trailer: validated, then dropped
            else:
                _parse_field_line(line)  # validated, then dropped
            self._trailer_count += 1
            if self._trailer_count > self._limits.max_header_count:
                raise LimitExceeded(f"more than {self._limits.max_header_count} trailer fields")

    def _end_of_message(self) -> Union[ReaderEvent, _NeedData]:
        self._step = self._end_of_message
        if self._decoder is not None:
            event = self._decoded(b"")
            if event is not None:
                return event
            if self._compressed_seen and not self._decoder.eof:
                raise TruncatedStreamError("compressed body ended before its end marker")
            self._decoder = None
        self._complete = True
        return EndOfMessage()

    def _take(self, limit: int) -> bytes:
        buf = self._buf
        if len(buf) <= limit:
            piece = bytes(buf)
            buf.clear()
        else:
            piece = bytes(memoryview(buf)[:limit])
            del buf[:limit]
        return piece

    def _decoded(self, piece: bytes) -> Optional[Data]:
        """`piece` with the content coding removed, None when it decodes to nothing."""
        decoder = self._decoder
        if decoder is None:
            return Data(piece) if piece else None
        self._compressed_seen = self._compressed_seen or bool(piece)
        # Decompress at most a step at a time so that a small bomb cannot grow memory.
        while True:
            pending = self._compressed_tail + piece
            try:
                out = decoder.decompress(pending, _DECOMPRESS_STEP)
            except zlib.error as exc:
                raise ProtocolError(f"undecodable compressed body: {exc}") from None
            self._compressed_tail = decoder.unconsumed_tail
            rest = getattr(decoder, "unused_data", b"")
            if decoder.eof and rest and rest.strip(b"\0"):
                # Another gzip member follows (RFC 1952 allows any number): go on with it.
                decoder = self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._compressed_tail = rest
            if out:
                return Data(out)
            if not self._compressed_tail:
                return None
            piece = b""


def _parse_status_line(line: bytes) -> Tuple[bool, int, str]:
    """(HTTP/1.0?, status, reason)"""
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise ProtocolError(f"malformed status line {_as_sent(line)!r}")
    return _status_of(match)


def _status_of(match: "re.Match[bytes]") -> Tuple[bool, int, str]:
    return match.group(1) == b"0", int(match.group(2)), (match.group(3) or b"").decode("latin-1")


def _parse_field_line(line: bytes) -> Tuple[str, str]:
    if line[:1] in (b" ", b"\t"):  # (one after a field is a folded line: the reader joins it)
        raise ProtocolError("a header line that starts with white space, before any field")
    name, colon, value = line.partition(b":")
    if not colon:
        raise ProtocolError(f"header line without a colon: {_as_sent(line)!r}")
    if _TOKEN.fullmatch(name) is None:
        raise ProtocolError(f"invalid header name {_as_sent(name)!r}")
    value = value.strip(b" \t")
    if _BAD_FIELD_VALUE.search(value):
        raise ProtocolError(f"invalid character in header {name.decode('ascii')!r}")
    return name.decode("ascii").lower(), value.decode("latin-1")


def _folded_value(line: bytes) -> str:
    """What an obs-fold line (white space, then more of the last field's value) adds."""
    if _BAD_FIELD_VALUE.search(line):
        raise ProtocolError("invalid character in a folded header line")
    return line.strip(b" \t").decode("latin-1")


def _parse_content_length(value: str) -> int:
    # Repeated fields or a list are fine only when every value is the same (RFC 9110 8.6).
    values = {part.strip() for part in value.split(",")}
    if len(values) != 1:
        raise ProtocolError(f"conflicting Content-Length values {value!r}")
    (single,) = values
    if _CONTENT_LENGTH.fullmatch(single) is None:
        raise ProtocolError(f"malformed Content-Length {value!r}")
    return int(single)


def _content_decoder(content_coding: Optional[str]) -> Any:
    coding = (content_coding or "identity").strip().lower()
    if coding in ("identity", ""):
        return None
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return _DeflateDecoder()
    raise ProtocolError(f"unsupported Content-Encoding {content_coding!r}")


class _DeflateDecoder:
    """zlib-wrapped deflate, falling back to raw deflate, as browsers do."""

    def __init__(self) -> None:
        self._inner: Any = None
        self._buffered = b""

    @property
    def eof(self) -> bool:
        return bool(self._inner is not None and self._inner.eof)

    @property
    def unconsumed_tail(self) -> bytes:
        return b"" if self._inner is None else bytes(self._inner.unconsumed_tail)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._inner is None:
            self._buffered += data
            if len(self._buffered) < 2:
                return b""
            # A zlib header is CM=8 with a header checksum divisible by 31 (RFC 1950).
            cmf, flg = self._buffered[0], self._buffered[1]
            wrapped = cmf & 0x0F == 8 and (cmf * 256 + flg) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            data, self._buffered = self._buffered, b""
        return bytes(self._inner.decompress(data, max_length))


# ---------------------------------------------------------------------------------------
# Pure protocol: Server-Sent Events decoder (WHATWG HTML, "event stream interpretation")
# ---------------------------------------------------------------------------------------


class ServerSentEvent(NamedTuple):
    """One dispatched event. ``raw`` is its data as bytes (the ``data`` lines joined with
    LF); ``data`` decodes it, invalid UTF-8 becoming U+FFFD."""

    event: str = "message"
    raw: bytes = b""
    id: str = ""
    retry: Optional[int] = None

    @property
    def data(self) -> str:
        return self.raw.decode("utf-8", "replace")


_BOM = b"\xef\xbb\xbf"


class SSEDecoder:
    """Decodes an event stream from bytes, following the WHATWG steps line by line.

    Lines end with LF, CRLF or a lone CR, even when a CRLF is split between two reads.
    Splitting happens on bytes, before decoding, so U+2028, U+0085 and UTF-8 sequences
    split across reads never break a line. A leading BOM is skipped, comments ignored,
    ``data`` lines joined with LF, and blocks without data not dispatched. ``close()``
    discards an incomplete event, as the standard says.
    """

    def __init__(self, *, limits: Limits = _DEFAULT_LIMITS) -> None:
        limits = _checked_limits(limits)
        self._max_line = limits.max_sse_line_size
        self._max_event = limits.max_event_size
        self._partial = bytearray()  # an unterminated line
        self._start: Optional[bytes] = b""  # the first bytes, until the BOM is ruled out
        self._skip_lf = False  # the last read ended with CR: a LF first in the next is its pair
        self._data: List[bytes] = []
        self._data_size = 0
        self._event_type = ""
        self._last_event_id = ""
        self._retry: Optional[int] = None
        self._error: Optional[LimitExceeded] = None

    def feed(self, chunk: bytes) -> List[ServerSentEvent]:
        """Events completed by `chunk`, in order.

        Events completed before a line that breaks a limit are returned first; the error
        is raised by the next call (of `feed` or `close`).
        """
        events: List[ServerSentEvent] = []
        try:
            self.feed_into(chunk, events)
        except LimitExceeded:
            if not events:
                raise
        return events

    def feed_into(self, chunk: bytes, events: List[ServerSentEvent]) -> None:
        """Append the events `chunk` completes to `events`, in order.

        An error is raised in the call that meets it, once the events completed before
        it have been appended; every later call raises it again.
        """
        _bytes_given(chunk, "SSEDecoder.feed")
        if self._error is not None:
            raise self._error
        try:
            self._feed(chunk, events)
        except LimitExceeded as exc:
            self._error = exc
            raise

    @property
    def at_start(self) -> bool:
        """Whether no bytes have been fed yet."""
        return self._start == b""

    def take_start(self, chunk: bytes) -> int:
        """For a reader that reads `chunk`, the stream's first bytes, itself: how many of
        them are a BOM to skip (0 if they do not start with one). The decoder is then at
        an event boundary, as if it had been fed them. -1, and nothing taken, if they are
        too few to tell: feed them instead."""
        if not self.at_start or (len(chunk) < len(_BOM) and _BOM.startswith(chunk)):
            return -1
        self._start = None
        return len(_BOM) if chunk.startswith(_BOM) else 0

    @property
    def at_event_boundary(self) -> bool:
        """Whether every byte fed so far is decoded, at the start of a line, with no
        event begun: the next bytes start a fresh event."""
        return (
            self._start is None and not self._skip_lf and not self._partial and not self._data
            and not self._event_type and self._retry is None and self._error is None
        )

    def _feed(self, chunk: bytes, events: List[ServerSentEvent]) -> None:
        if self._start is not None:
            chunk = self._start + chunk
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._start = chunk
                return
            self._start = None
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM):]
        pos, size = 0, len(chunk)
        if self._skip_lf and size:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                pos = 1
        has_cr = chunk.find(b"\r", pos) >= 0
        while pos < size:
            end = chunk.find(b"\n", pos)
            after = end + 1
            if has_cr:
                cr = chunk.find(b"\r", pos, size if end < 0 else end)
                if cr >= 0:
                    end, after = cr, cr + 1
                    if after == size:
                        self._skip_lf = True
                    elif chunk[after] == 0x0A:
                        after += 1
            if end < 0:
                break
            if self._partial:
                if len(self._partial) + end - pos > self._max_line:
                    raise LimitExceeded(f"event stream line longer than {self._max_line} bytes")
                self._partial += chunk[pos:end]
                line = bytes(self._partial)
                self._partial.clear()
                self._line(line, 0, len(line), events)
            elif end - pos > self._max_line:
                raise LimitExceeded(f"event stream line longer than {self._max_line} bytes")
            elif end == pos:
                if self._data:
                    self._dispatch(events)
                else:
                    self._event_type, self._retry = "", None
            elif chunk.startswith(b"data: ", pos, end):  # the usual line, inline
                self._append_data(chunk[pos + 6:end])
            else:
                self._line(chunk, pos, end, events)
            pos = after
        if pos < size:
            if len(self._partial) + size - pos > self._max_line:
                raise LimitExceeded(f"event stream line longer than {self._max_line} bytes")
            self._partial += chunk[pos:]

    def close(self) -> None:
        """The stream ended: whatever event is incomplete is discarded."""
        if self._error is not None:
            raise self._error
        self._partial.clear()
        self._data = []
        self._data_size = 0
        self._event_type = ""

    def _line(self, buf: bytes, start: int, end: int, events: List[ServerSentEvent]) -> None:
        if start == end:
            self._dispatch(events)
            return
        if buf.startswith(b"data:", start, end):
            value_start = start + 5
            if value_start < end and buf[value_start] == 0x20:
                value_start += 1
            self._append_data(buf[value_start:end])
            return
        if buf[start] == 0x3A:  # ":" starts a comment
            return
        colon = buf.find(b":", start, end)
        if colon < 0:
            name, value = buf[start:end], b""
        else:
            name, value_start = buf[start:colon], colon + 1
            if value_start < end and buf[value_start] == 0x20:
                value_start += 1
            value = buf[value_start:end]
        if name == b"event":
            self._event_type = value.decode("utf-8", "replace")
        elif name == b"data":
            self._append_data(value)
        elif name == b"id":
            if b"\x00" not in value:
                self._last_event_id = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value.isdigit() and len(value) <= 12:  # ASCII digits (bytes); longer is no time a client waits
                self._retry = int(value)
        # Any other field is ignored, as the standard says.

    def _append_data(self, value: bytes) -> None:
        self._data_size += len(value) + 1
        if self._data_size > self._max_event:
            raise LimitExceeded(f"event larger than {self._max_event} bytes")
        self._data.append(value)

    def _dispatch(self, events: List[ServerSentEvent]) -> None:
        data = self._data
        if data:
            raw = data[0] if len(data) == 1 else b"\n".join(data)
            events.append(
                ServerSentEvent(self._event_type or "message", raw, self._last_event_id, self._retry)
            )
            data.clear()
        self._data_size = 0
        self._event_type = ""
        self._retry = None


# ---------------------------------------------------------------------------------------
# Pure protocol: the conversation, from each event's data to text deltas
# ---------------------------------------------------------------------------------------


class ChatEvent:
    """One update of the assistant's reply.

    ``delta`` is the text this event adds (possibly empty); ``text`` the reply's whole
    text so far; ``reasoning`` the reasoning this event adds (the model's thoughts, never
    part of the text); ``status`` is "in_progress" or "finished_successfully";
    ``finish_reason`` is this event's ``finish_details.type`` ("stop", "max_tokens") if
    it carries one; ``conversation_id`` and ``message_id`` continue the conversation later.
    """

    __slots__ = (
        "delta", "status", "finish_reason", "conversation_id", "message_id", "reasoning",
        "_pieces", "_length",
    )

    def __init__(
        self, delta: str, status: Optional[str], finish_reason: Optional[str],
        conversation_id: Optional[str], message_id: Optional[str], pieces: List[str],
        length: int, reasoning: str = "",
    ) -> None:
        self.delta = delta
        self.status = status
        self.finish_reason = finish_reason
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.reasoning = reasoning
        # The text is joined only when asked for: a long reply has thousands of events.
        # The pieces are the reply's own list (joined in place now and then), so every
        # event shares one copy of the text and keeps only its length.
        self._pieces = pieces
        self._length = length

    @property
    def text(self) -> str:
        text = "".join(self._pieces)
        return text if len(text) == self._length else text[: self._length]

    def as_dict(self) -> Dict[str, Optional[str]]:
        """The event without ``text``, as ``--json`` writes it."""
        return {
            "delta": self.delta,
            "reasoning": self.reasoning,
            "status": self.status,
            "finish_reason": self.finish_reason,
            "conversation_id": self.conversation_id,
            "message_id": self.message_id,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChatEvent):
            return NotImplemented
        return self.as_dict() == other.as_dict() and self.text == other.text

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in self.as_dict().items())
        return f"ChatEvent({fields})"


class _Reply(NamedTuple):
    """What a visible message says of itself (see `_visible_reply`)."""

    message_id: Optional[str]
    text: "Union[str, _Text]"
    status: Optional[str]
    finish_reason: Optional[str]
    end_turn: Optional[bool]
    model: Optional[str]


class _Text:
    """A string of the delta format that grows by ``append``: kept as pieces, so that a
    reply of thousands of appends is not copied whole at each one."""

    __slots__ = ("pieces", "length")

    def __init__(self, first: str, then: str) -> None:
        self.pieces = [first, then]
        self.length = len(first) + len(then)

    def append(self, more: str) -> None:
        self.pieces.append(more)
        self.length += len(more)

    def since(self, start: int) -> str:
        """The text from character `start` on, joining only the pieces it needs."""
        taken, size, index = [], self.length, len(self.pieces)
        while size > start:
            index -= 1
            piece = self.pieces[index]
            size -= len(piece)
            taken.append(piece if size >= start else piece[start - size:])
        return "".join(reversed(taken))

    def __str__(self) -> str:
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0]


def _plain(value: Any) -> Any:
    """A value of a delta document as JSON would give it (a `_Text` as its string)."""
    return str(value) if isinstance(value, _Text) else value


_DELTA_OPS = frozenset({"add", "replace", "append", "truncate", "remove", "patch"})
_MAX_PATCH_DEPTH = 32
_VISIBLE_CHANNELS = (None, "final")
_MESSAGE_SEPARATOR = "\n\n"  # between two messages of one reply: their texts, and their reasoning
_VISIBLE_TEXT_PATH = "/message/content/parts/0"


_PARTS_MARKERS = (b'"parts": ["', b'"parts":["')
# Learning an event's shape costs a second parse of its envelope (a probe), and taking
# in an event whose envelope changed costs two: worth it for events this large, or
# (learning) while the reply goes on. A smaller event whose envelope changed (the last)
# is decoded in full, which costs less than the probes.
_PROBE_WORTH_BYTES = 4096
# A JSON string's bytes that are its text as they stand: no escapes, no control characters.
_NEEDS_JSON = re.compile(rb"[\x00-\x1f\\]")
# A delta record that appends text to the carried path, an event of one data line (after
# "event: delta", or none), padding allowed: its data, and its string's content (plain
# bytes and escapes, which are checked when decoded).
_DELTA_TEXT_RECORD = re.compile(
    rb'(?:event: delta\n)?data: (\{"v": ?"([^"\\\x00-\x1f]*(?:\\[^\n][^"\\\x00-\x1f]*)*)"\} *)\n\n'
)
# JSON string content of plain bytes and escapes of whole characters (none of half a
# surrogate pair). Matched from a token boundary, it stops where the string ends, or at
# what needs a closer look: a surrogate's escape, a control character, a bad escape.
_WHOLE_CONTENT = re.compile(
    rb'[^"\\\x00-\x1f]*(?:(?:\\["\\/bfnrt]|\\u(?![dD][89a-fA-F])[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*'
)
# The same, for new text: not starting inside a UTF-8 sequence either.
_NEW_CONTENT = re.compile(rb"(?![\x80-\xbf])" + _WHOLE_CONTENT.pattern)
_PADDING = re.compile(rb" *")  # after an event's JSON: servers pad lines to varying lengths
_scan_json: Callable[[str, int], Tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_scan_json_string: Callable[[str, int], Tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _loads(text: str) -> Any:
    """``json.loads(text)``, a microsecond sooner for the usual event: its scanner, which
    json.loads runs between two searches for white space; for anything else (white space
    around the value, or not JSON at all), json.loads itself, which says what is wrong."""
    try:
        value, end = _scan_json(text, 0)
    except (StopIteration, ValueError, RecursionError):
        end = -1
    return value if end == len(text) else json.loads(text)


class ConversationDecoder:
    """Turns the reply stream's events into `ChatEvent`s; pure, no I/O.

    Both stream formats of the ChatGPT web protocol are read, detected record by record:
    cumulative snapshots (each event repeats the whole message) and the delta format
    (``event: delta`` records of JSON-pointer ops on numbered documents, with ``c``, ``p``
    and ``o`` carried forward, patches and bare batches), with their notices
    (``title_generation``, ``server_ste_metadata``, ...).

    Only visible text is text: an assistant message addressed to everyone, of text
    content, not on the ``commentary`` or ``analysis`` channel, not a thinking preamble,
    not marked ``is_visually_hidden_from_conversation`` (the web page does not show it).
    Reasoning (``thoughts`` content, the ``analysis`` channel) comes separately, in
    ``ChatEvent.reasoning``. A reply may hold several visible messages (text, a tool's
    round trip, more text): told apart by their ids, each one's text goes on after a
    blank line, in both formats. Text once delivered is never taken back nor given twice:
    a snapshot that does not extend it yields nothing if it is a prefix and raises
    `ProtocolError` otherwise, as does a delta op that would change it, a change to an
    earlier message after a later one's text began, or another message that starts with
    the text of the one before (its id changed, as far as one can tell). A truthy ``error``
    raises `UpstreamError` (`TokenExpiredError` for ``token_expired``); ``stream_handoff``
    raises `ProtocolError`; ``[DONE]`` sets ``done``, and ``complete`` is true once the
    reply is whole (``[DONE]``, or the visible message finished with ``end_turn``).

    The reference path decodes every event in full. The known-shape path (on unless
    ``fast_path=False``) serves the usual snapshot, which repeats the whole text so far:
    once an event has been decoded in full, the next one whose bytes around ``parts[0]``
    are the same and whose ``parts[0]`` starts with the previous one as sent only needs
    its new suffix decoded. `extend` is its entry point, event by event; `extend_run`
    takes a run of such events at once when only their text is wanted. Both paths give
    the same events and errors.
    """

    __slots__ = (
        "done", "conversation_id", "message_id", "status", "finish_reason", "end_turn", "title",
        "model", "_fast_path", "_pieces", "_length", "_reasoning", "_event_finish_reason",
        "_documents", "_cursor", "_visible", "_visible_text", "_base", "_earlier", "_doc_reasoning", "_reasoning_from",
        "_append_to",
        "_head", "_tail", "_one_line", "_escaped_text", "_buffer", "_buffer_view",
    )

    def __init__(
        self, *, fast_path: bool = True, continues: Optional["ConversationDecoder"] = None
    ) -> None:
        """`continues`: the decoder of the reply this one continues (``"action":
        "continue"``); the text goes on from its text, in the same message."""
        self.done = False
        self.conversation_id: Optional[str] = continues.conversation_id if continues else None
        self.message_id: Optional[str] = continues.message_id if continues else None
        self.status: Optional[str] = None
        self.finish_reason: Optional[str] = None
        self.end_turn: Optional[bool] = None
        self.title: Optional[str] = continues.title if continues else None
        self.model: Optional[str] = continues.model if continues else None
        self._fast_path = fast_path
        given = continues.text if continues else ""
        self._pieces: List[str] = [given] if given else []
        self._length = len(given)  # characters in _pieces
        self._reasoning: List[str] = [continues.reasoning] if continues and continues.reasoning else []
        self._event_finish_reason: Optional[str] = None  # the last event's own, not carried over
        # The delta format's state: the documents by number, the carried (c, p, o), the
        # document that is the visible message, its text as last seen (to tell growth by
        # append from a rewrite), the text of earlier visible messages before it, and
        # each document's reasoning delivered so far.
        self._documents: Dict[Any, Dict[str, Any]] = {}
        self._cursor: Tuple[Any, Optional[str], Optional[str]] = (0, None, None)
        self._visible: Any = None
        self._visible_text: Any = None
        # Where the visible message's text starts in the reply's (after the text of
        # earlier visible messages and the blank line after it), and where each earlier
        # one's lies, by message id (both formats).
        self._base = len(given) - len(continues.message_text) if continues else 0
        self._earlier: Dict[Optional[str], Tuple[int, int]] = {}
        self._doc_reasoning: Dict[Any, str] = {}
        self._reasoning_from: Any = None  # the message whose reasoning was delivered last
        # While the carried op appends to the visible text: that message's parts list,
        # for the known-shape path's {"v": "..."} records.
        self._append_to: Optional[List[Any]] = None
        # The known-shape path's state: the bytes around parts[0] in the last event (no
        # head: no shape known), whether they hold no line break, and parts[0] as sent
        # (JSON-escaped), often a view of the buffer it arrived in.
        self._head: Optional[bytes] = None
        self._tail = b""
        self._one_line = False
        self._escaped_text: Union[bytes, memoryview] = b""
        self._buffer: Optional[bytes] = None  # the last buffer given to `extend`,
        self._buffer_view: Optional[memoryview] = None  # and a view of it

    @property
    def text(self) -> str:
        """The reply's text so far."""
        pieces = self._pieces
        if len(pieces) > 1:
            pieces[:] = ["".join(pieces)]  # in place: events share this list
        return pieces[0] if pieces else ""

    @property
    def message_text(self) -> str:
        """The text of the reply's last visible message: all of `text` for a reply of one
        message; for several, what came after the blank line that began the last one."""
        return "" if self._separator_due() else self.text[self._base:]

    @property
    def has_text(self) -> bool:
        """Whether any text has been delivered."""
        return self._length > 0

    @property
    def reasoning(self) -> str:
        """The reasoning delivered so far."""
        return "".join(self._reasoning)

    @property
    def complete(self) -> bool:
        """Whether the reply is whole: ``[DONE]`` came, or the visible message finished
        with ``end_turn``."""
        return self.done or (self.status == "finished_successfully" and self.end_turn is True)

    def feed(self, event: ServerSentEvent) -> Optional[ChatEvent]:
        """The `ChatEvent` this event makes, or None if it carries no reply."""
        if not isinstance(event, ServerSentEvent):
            raise UsageError(f"ConversationDecoder.feed takes a ServerSentEvent, not {type(event).__name__}")
        return self.feed_data(event.raw, event.event)

    def feed_data(self, raw: bytes, kind: str = "message", *, extends: bool = True) -> Optional[ChatEvent]:
        """`feed` for an event given as its data and type; ``extends=False`` says that
        `extend` would not take it, which is then not asked."""
        if not isinstance(raw, (bytes, bytearray)):
            raise UsageError(f"ConversationDecoder.feed_data takes bytes, not {type(raw).__name__}")
        if kind == "message" and len(raw) < 16 and raw.strip() == b"[DONE]":
            self.done = True
            return None
        if kind not in ("message", "delta"):
            return None  # "ping", "delta_encoding" and other named events carry no reply
        if extends:
            delta = self.extend(raw, 0, len(raw), kind)
            if delta is not None:
                return self.event(delta)
        payload = _json_payload(raw, "event data")
        if not isinstance(payload, dict):
            return None  # bare strings and numbers are keep-alives
        if kind == "delta" or (("v" in payload or "o" in payload) and "message" not in payload):
            return self._delta(payload)
        if "type" in payload and "message" not in payload:
            return self._notice(payload)
        return self._snapshot(raw, payload)

    def event(self, delta: str, reasoning: str = "") -> ChatEvent:
        """The `ChatEvent` of the event just taken in, whose new text is `delta`."""
        return ChatEvent(
            delta, self.status, self._event_finish_reason, self.conversation_id,
            self.message_id, self._pieces, self._length, reasoning,
        )

    def _deliver(self, delta: str) -> None:
        if delta:
            self._pieces.append(delta)
            self._length += len(delta)

    def _take_status(self, reply: _Reply) -> None:
        self.status = reply.status
        self.end_turn = reply.end_turn
        self._event_finish_reason = reply.finish_reason
        self.finish_reason = reply.finish_reason or self.finish_reason
        if reply.status == "finished_successfully" and self.finish_reason is None:
            self.finish_reason = "stop"  # finished, and no reason given
        if reply.model:
            self.model = reply.model

    def _read_envelope(self, payload: Dict[str, Any]) -> None:
        """An error raises; the conversation id is kept."""
        _raise_for_event_error(payload)
        conversation_id = payload.get("conversation_id")
        if isinstance(conversation_id, str):
            self.conversation_id = conversation_id

    # -- notices ------------------------------------------------------------------------

    def _notice(self, payload: Dict[str, Any]) -> Optional[ChatEvent]:
        self._read_envelope(payload)
        kind = payload.get("type")
        if kind == "title_generation" and isinstance(payload.get("title"), str):
            self.title = payload["title"]
        elif kind == "server_ste_metadata":
            metadata = payload.get("metadata")
            model = metadata.get("model_slug") if isinstance(metadata, dict) else None
            if isinstance(model, str) and model:
                self.model = model
        elif kind == "stream_handoff":
            raise ProtocolError(
                "the upstream moved the rest of the reply to a websocket (stream_handoff), "
                "which this client does not speak; ask the server for a plain event stream"
            )
        return None

    # -- snapshots: the reference path, every event decoded in full ----------------------

    def _snapshot(self, raw: bytes, payload: Dict[str, Any]) -> Optional[ChatEvent]:
        self._head = None
        self._read_envelope(payload)
        message = payload.get("message")
        reply = _visible_reply(message)
        if reply is None:
            reasoning = _reasoning_of(message)
            if reasoning is None or not isinstance(message, dict):
                return None
            return self._reason(("snapshot", message.get("id")), reasoning)
        text = _valid_text(_plain(reply.text))
        delta = self._message_delta(reply.message_id, text, repeats=True)
        if delta is None:
            return None  # an earlier message of the reply, as it was
        self._take_status(reply)
        if self._fast_path and (len(raw) >= _PROBE_WORTH_BYTES or not self.complete):
            self._learn_shape(raw, text)
        return self.event(delta)

    # -- visible messages: both formats --------------------------------------------------

    def _separator_due(self) -> bool:
        """Whether the visible message, which has no text yet, follows text of another:
        its first text then goes after a blank line."""
        return self._length == self._base > 0

    def _message_delta(self, message_id: Optional[str], text: str, *, repeats: bool) -> Optional[str]:
        """The new text of the visible message `message_id`, whose text is now `text`,
        delivered; None if it is an earlier message of the reply, unchanged. A reply may
        hold several (text, a tool's round trip, more text): another message's text
        goes on after a blank line (unless the one before had not finished and it starts
        with that one's text, which would then be delivered twice), and an earlier one
        must not change once a later one has given text. `repeats`: a text that is a
        prefix of what was delivered is a repeat (snapshots) rather than a rewrite."""
        if message_id != self.message_id:
            earlier = self._earlier.get(message_id)
            if earlier is not None:  # an earlier visible message again
                given = self.text[earlier[0]:earlier[1]]
                if text == given or (repeats and given.startswith(text)):
                    return None
                if earlier[1] < self._length:  # text came after it: its place is gone
                    raise ProtocolError(
                        "an earlier message of the reply changed after a later one began "
                        f"(at character {earlier[0] + _common_prefix(given, text)})"
                    )
                # Only messages with no text yet came after it (a server that opens the
                # next before the last ends): it goes on where it stopped.
                del self._earlier[message_id]
                base = earlier[0]
            else:
                if self._length > self._base:
                    if self.status != "finished_successfully" and text.startswith(self.text[self._base:]):
                        # The text delivered, sent again as another message before the one
                        # that had it finished: a server that changed the message's id, as
                        # far as one can tell. Going on after a blank line would deliver it
                        # twice.
                        raise ProtocolError("the upstream switched to another message in mid-reply")
                    self._earlier[self.message_id] = (self._base, self._length)
                base = self._length
            self.message_id, self._base = message_id, base
        due = self._separator_due()
        given = "" if due else self.text[self._base:]
        if text.startswith(given):
            delta = text[len(given):]
        elif repeats and given.startswith(text):
            delta = ""
        else:
            raise ProtocolError(
                f"the reply rewrote text already delivered (at character {self._base + _common_prefix(given, text)})"
            )
        if delta and due:
            delta = _MESSAGE_SEPARATOR + delta
            self._base += len(_MESSAGE_SEPARATOR)
        self._deliver(delta)
        return delta

    def _reason(self, document: Any, reasoning: str) -> Optional[ChatEvent]:
        """The event for a reasoning message's text, if it grew."""
        reasoning = _valid_text(reasoning)
        seen = self._doc_reasoning.get(document, "")
        if not reasoning.startswith(seen) or reasoning == seen:
            self._doc_reasoning[document] = reasoning  # rewritten reasoning is not re-sent
            return None
        self._doc_reasoning[document] = reasoning
        added = reasoning[len(seen):]
        if document != self._reasoning_from and self._reasoning:
            added = _MESSAGE_SEPARATOR + added  # another message's reasoning: after a blank line
        self._reasoning_from = document
        self._reasoning.append(added)
        return self.event("", added)

    # -- the delta format ----------------------------------------------------------------

    def _delta(self, record: Dict[str, Any]) -> Optional[ChatEvent]:
        document, path, op = self._cursor
        if "c" in record:
            document = record["c"]
        if isinstance(document, (dict, list)):
            raise ProtocolError("a delta record whose document number is not a number or string")
        value = record.get("v")
        if "p" not in record and "o" not in record and isinstance(value, dict) and "message" in value:
            self._cursor = (document, "", "add")  # a whole message: document c anew
            self._apply(document, "", "add", value, 0)
        elif "o" not in record and _is_batch(value):
            self._cursor = (document, path, op)  # a bare batch states no path or op
            self._apply(document, "", "patch", value, 0)
        else:
            path, op = record.get("p", path), record.get("o", op)
            if op is None or (path is None and op != "patch"):  # (a patch's ops have their own paths)
                raise ProtocolError("a delta record without a path or an op, and none to carry forward")
            self._cursor = (document, path, op)
            if "v" not in record and op != "remove":
                raise ProtocolError(f"a delta record without a value: {_excerpt(json.dumps(record))!r}")
            self._apply(document, "" if path is None else path, op, value, 0)
        event = self._look_at(document)
        self._append_to = None
        document, path, op = self._cursor
        if (
            self._fast_path and document == self._visible and path == _VISIBLE_TEXT_PATH and op == "append"
            and not self._separator_due()
        ):
            parts = self._documents[document]["message"]["content"]["parts"]
            if parts[0] is self._visible_text:
                self._append_to = parts
        return event

    def _apply(self, document: Any, path: Any, op: Any, value: Any, depth: int) -> None:
        if op not in _DELTA_OPS or not isinstance(path, str):
            raise ProtocolError(f"unknown delta op {_excerpt(str(op))!r} or path {_excerpt(str(path))!r}")
        if op == "patch":
            if not isinstance(value, list) or depth >= _MAX_PATCH_DEPTH:
                raise ProtocolError("a delta patch whose value is not a list of ops (or nested too deep)")
            for inner in value:
                if not isinstance(inner, dict) or "o" not in inner or "p" not in inner:
                    raise ProtocolError("a delta patch with an op that lacks its own path or op")
                if "v" not in inner and inner["o"] != "remove":
                    raise ProtocolError("a delta patch with an op that lacks its value")
                self._apply(document, inner["p"], inner["o"], inner.get("v"), depth + 1)
            return
        if path == "":
            root = self._documents.get(document)
            if op in ("add", "replace") and isinstance(value, dict):
                self._documents[document] = value
            elif op == "append" and isinstance(value, dict) and root is not None:
                root.update(value)
            elif op == "remove":
                self._documents.pop(document, None)
            else:
                raise ProtocolError(f"delta op {op!r} cannot apply to a whole document")
            return
        root = self._documents.get(document)
        if root is None:
            raise ProtocolError(f"a delta for document {document!r} before it was added")
        if not path.startswith("/"):
            raise ProtocolError(f"a delta path that is not a JSON pointer: {_excerpt(path)!r}")
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]
        parent: Any = root
        for token in tokens[:-1]:
            parent = _child(parent, token, path)
        _apply_op(parent, tokens[-1], op, value, path)

    def _look_at(self, document: Any) -> Optional[ChatEvent]:
        """What a delta on `document` changed of the reply: new text, reasoning, status."""
        root = self._documents.get(document)
        if root is None:
            return None
        self._read_envelope(root)
        message = root.get("message")
        reply = _visible_reply(message)
        if reply is None:
            reasoning = _reasoning_of(message)
            if reasoning is not None:
                return self._reason(("delta", document), reasoning)
            if document == self._visible:  # no longer visible: its text stays delivered
                self._visible = None
            return None
        text = reply.text
        if (
            document == self._visible and text is self._visible_text and isinstance(text, _Text)
            and not self._separator_due()
        ):
            delta = _valid_text(text.since(self._length - self._base))  # grown by appends only
            self._deliver(delta)
        else:
            found = self._message_delta(reply.message_id, _valid_text(_plain(text)), repeats=False)
            if found is None:
                return None  # an earlier message of the reply, as it was
            delta = found
            self._visible = document
        self._visible_text = text
        self._take_status(reply)
        return self.event(delta)

    # -- the known-shape path -----------------------------------------------------------

    @property
    def known_prefix_size(self) -> Optional[int]:
        """While a shape is known: how many bytes every event that extends the text so
        far has before its new text (the head, and the text so far as sent), none of
        them a line break; None otherwise."""
        if self._head is not None:
            return len(self._head) + len(self._escaped_text) if self._one_line else None
        return 5 if self._append_to is not None else None  # {"v":

    def extend(self, buffer: bytes, start: int, end: int, event: str = "message") -> Optional[str]:
        """If ``buffer[start:end]`` is the data of an event (of type `event`) of the
        known shape, with text that extends the text so far, take it in and return the
        new text (possibly empty); otherwise return None and change nothing. Known shapes:
        a snapshot like the last one whose text starts with the text so far (never
        decoded again), and ``{"v": "..."}`` while the delta format's carried op appends
        to the visible text. Call `detach` before `buffer` is freed or reused."""
        head, escaped_text = self._head, self._escaped_text
        if head is None:
            return None if self._append_to is None else self._extend_delta(buffer, start, end)
        if event != "message":
            return None
        while end > start and buffer[end - 1] == 0x20:  # padding
            end -= 1
        text_start = start + len(head)
        resume = text_start + len(escaped_text)
        if not (buffer.startswith(head, start, end) and buffer.startswith(escaped_text, text_start, end)):
            return None
        reframed = None
        tail = self._tail
        if _text_ends_at(buffer, resume, end, tail):
            text_end = end - len(tail)
        elif end - start < _PROBE_WORTH_BYTES:
            return None  # decoding it in full costs less than proving where its text is
        else:
            reframed = self._reframe(buffer, resume, end)
            if reframed is None:
                return None
            text_end = reframed[0]
        text = _string_content(buffer[resume:text_end])
        if text is None:
            return None
        if reframed is not None:
            _, payload, reply = reframed
            self._read_envelope(payload)
            self._take_status(reply)
            self._tail = buffer[text_end:end]
            self._one_line = self._one_line and b"\n" not in self._tail
        # A view: copying the text so far per event would cost more than the event.
        if buffer is not self._buffer:
            self._buffer, self._buffer_view = buffer, memoryview(buffer)
        self._escaped_text = self._buffer_view[text_start:text_end]  # type: ignore[index]
        if text:
            self._pieces.append(text)
            self._length += len(text)
        return text

    def extend_run(
        self, buffer: bytes, pos: int, before: bytes, after: bytes, max_data: int
    ) -> Tuple[int, str]:
        """`extend` for a run of events, when only their text is wanted: takes in the
        events from `pos` on that are each `before`, data of at most `max_data` bytes and
        `after` (``data: `` and LF LF, say), while their data is a snapshot of the known
        shape on one line whose text extends the last one's and whose envelope is
        unchanged (padding after it allowed); returns where the last it took ends (-1 if
        none) and their new text, decoded once for all of them. That is the text `extend`
        gives taking them one by one: each new text is checked to be whole (characters
        and escapes of whole characters, not cut off, no half of a surrogate pair), else
        the run stops before it (at a surrogate pair's escapes or a control character
        too); if the text does not decode, none is taken."""
        head = self._head
        if head is None or not self._one_line:
            return -1, ""
        tail = self._tail
        ending = tail + after  # what follows each text (unpadded)
        if buffer is not self._buffer:
            self._buffer, self._buffer_view = buffer, memoryview(buffer)
        view = self._buffer_view
        assert view is not None
        lead = before + head
        if not buffer.startswith(lead, pos):
            return -1, ""
        between = ending + lead  # from one event's text to the next one's
        ending_size, between_size = len(ending), len(between)
        tail_size, next_event = len(tail), after + lead  # (after padding)
        max_text = max_data - len(head) - tail_size  # the event's data: head, text, tail, padding
        escaped = before_run = self._escaped_text
        escaped_size = len(escaped)
        taken_to = -1
        new_text = _NEW_CONTENT.match
        text_start = pos + len(lead)
        while buffer.startswith(escaped, text_start):
            match = new_text(buffer, text_start + escaped_size)
            if match is None:
                break  # it starts inside a UTF-8 sequence
            text_end = match.end()
            if text_end - text_start > max_text:
                break
            if buffer.startswith(between, text_end):  # the usual case: another event follows
                escaped_size = text_end - text_start
                escaped = view[text_start:text_end]
                taken_to = text_end + ending_size
                text_start = text_end + between_size
            else:
                # The run's last event, a padded one, or not this shape (or a surrogate
                # pair's escapes or a control character: the match stopped before them).
                if not buffer.startswith(tail, text_end):
                    break
                padded = _PADDING.match(buffer, text_end + tail_size)
                assert padded is not None  # (" *" matches anywhere)
                data_end = padded.end()
                if data_end - tail_size - text_start > max_text:
                    break
                if buffer.startswith(next_event, data_end):
                    escaped_size = text_end - text_start
                    escaped = view[text_start:text_end]
                    taken_to = data_end + len(after)
                    text_start = data_end + len(next_event)
                    continue
                if buffer.startswith(after, data_end):
                    escaped = view[text_start:text_end]
                    taken_to = data_end + len(after)
                break
        if taken_to < 0:
            return -1, ""
        text = _string_content(bytes(escaped[len(before_run):]))
        if text is None:
            return -1, ""  # decoding them in full says what they hold
        self._escaped_text = escaped
        if text:
            self._pieces.append(text)
            self._length += len(text)
        return taken_to, text

    def _extend_delta(self, buffer: bytes, start: int, end: int) -> Optional[str]:
        """`extend` for ``{"v": "<text>"}`` (padding after it allowed), appended to the
        visible text."""
        if buffer.startswith(b'{"v": "', start, end):
            text_start = start + 7
        elif buffer.startswith(b'{"v":"', start, end):
            text_start = start + 6
        else:
            return None
        while buffer[end - 1] == 0x20 and end > text_start:
            end -= 1
        text_end = end - 2
        if text_end < text_start or buffer[text_end] != 0x22 or buffer[end - 1] != 0x7D:
            return None
        content = buffer[text_start:text_end]
        if _NEEDS_JSON.search(content) is None and b'"' not in content:
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError:
                return None
        else:
            decoded = _json_escaped(content)
            if decoded is None:
                return None
            text = decoded
        self._append_visible(text)
        return text

    def _append_visible(self, text: str) -> None:
        """Append `text` to the visible message, as the carried op does, and deliver it."""
        parts = self._append_to
        assert parts is not None
        current = parts[0]
        if current.__class__ is _Text:  # the usual case, inline: thousands of these a reply
            current.pieces.append(text)
            current.length += len(text)
        else:
            parts[0] = current = _appended(current, text, _VISIBLE_TEXT_PATH)
        self._visible_text = current
        if text:
            self._pieces.append(text)
            self._length += len(text)

    def extend_delta_run(self, buffer: bytes, pos: int, max_data: int) -> Tuple[int, str]:
        """`extend` for a run of delta records, when only their text is wanted: takes in
        the events from `pos` on that are each ``data: {"v": "<text>"}`` (after ``event:
        delta`` or not, padding allowed) and a blank line, their data of at most
        `max_data` bytes, while the carried op appends to the visible text; returns where
        the last it took ends (-1 if none) and their text. That is the text `extend` gives
        taking them one by one: a record whose text does not decode (a bad escape, invalid
        UTF-8) ends the run before it, for the event's own reading to say what is wrong."""
        if self._head is not None or self._append_to is None:
            return -1, ""
        texts: List[str] = []
        taken_to = -1
        match = _DELTA_TEXT_RECORD.match
        found = match(buffer, pos)
        while found is not None:
            data_start, data_end = found.span(1)
            if data_end - data_start > max_data:
                break
            content = found[2]
            if b"\\" in content:
                text = _json_escaped(content)
                if text is None:
                    break
            else:
                try:
                    text = content.decode("utf-8")
                except UnicodeDecodeError:
                    break
            texts.append(text)
            taken_to = found.end()
            found = match(buffer, taken_to)
        if taken_to < 0:
            return -1, ""
        text = "".join(texts)
        self._append_visible(text)
        return taken_to, text

    def detach(self) -> None:
        """Let go of the buffers given to `extend`: the text so far is copied out of them."""
        if isinstance(self._escaped_text, memoryview):
            self._escaped_text = self._escaped_text.tobytes()
        self._buffer = self._buffer_view = None

    def _reframe(
        self, buffer: bytes, resume: int, end: int
    ) -> Optional[Tuple[int, Dict[str, Any], _Reply]]:
        """For an event whose bytes after the text changed (the final event's status,
        say): where its text ends, its envelope and what it says of the reply, or None."""
        assert self._head is not None
        text_end = _string_end(buffer, resume)
        if not resume <= text_end < end:
            return None
        # The same head leaves a JSON parser at the same place, inside a string; two
        # different texts there that both read back prove it is still parts[0] (a later
        # duplicate key could make another string the text), and the envelope is read.
        head, tail = self._head, buffer[text_end:end]
        probed = [_probe(head, tail, probe) for probe in ("", "x")]
        if probed[0] is None or probed[1] is None:
            return None  # decoding it in full says what is wrong, if anything is
        payload, reply = probed[0]
        if reply.message_id != self.message_id:
            return None
        return text_end, payload, reply

    def _learn_shape(self, raw: bytes, text: str) -> None:
        """Remember where ``parts[0]`` sits in `raw`, if that can be proved."""
        if self._separator_due() or self.text[self._base:] != text:
            return
        for marker in _PARTS_MARKERS:
            found = raw.find(marker)
            if found >= 0:
                break
        else:
            return
        start = found + len(marker)
        end = _string_end(raw, start)
        if end < 0:
            return
        if "\ufffd" in text:  # only then can the bytes be invalid UTF-8 made good
            try:
                raw[start:end].decode("utf-8")
            except UnicodeDecodeError:
                return
        head, tail = raw[:start], raw[end:].rstrip(b" ")  # (the padding varies by event)
        # Proof that the string found is message.content.parts[0]: put a different string
        # there; the message must then read exactly that (not `text`, as it would if
        # another string were parts[0]).
        if _probe(head, tail, "x" if text == "" else "") is None:
            return
        self._escaped_text = raw[start:end]
        self._head, self._tail = head, tail
        self._one_line = b"\n" not in head and b"\n" not in tail


def _string_content(content: bytes) -> Optional[str]:
    """The text of JSON string content (no quotes around it) known to end where it ends,
    or None if it is not a string by itself (see `_json_escaped`). Without escapes or
    control characters, the content is its own text."""
    if _NEEDS_JSON.search(content) is None:
        try:
            return content.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return _json_escaped(content)


def _json_escaped(content: bytes) -> Optional[str]:
    """The text of JSON string content (no quotes around it) that holds an escape or a
    control character, or None if it is not a string by itself: bad escapes, a raw quote
    or control character, invalid UTF-8, or a second half of a surrogate pair that
    decoding in full would join to what came before. (Content without escapes is its own
    text: the known-shape paths decode that in place.)"""
    try:
        quoted = '"' + content.decode("utf-8") + '"'
        text, stop = _scan_json_string(quoted, 1)  # json.loads's own string scanner
    except ValueError:
        return None
    if stop != len(quoted) or (text[:1] and "\udc00" <= text[0] <= "\udfff"):
        return None
    # A lone surrogate can only come from a \ud... escape: look for it only then.
    return _valid_text(text) if b"\\ud" in content or b"\\uD" in content else text


def _probe(head: bytes, tail: bytes, probe: str) -> Optional[Tuple[Dict[str, Any], _Reply]]:
    """The event ``head + probe + tail`` and its visible reply, if that reply's text is
    `probe`; None if it is not, or the event is not one."""
    try:
        payload = _loads((head + probe.encode() + tail).decode("utf-8", "replace"))
        reply = _visible_reply(payload.get("message")) if isinstance(payload, dict) else None
    except (ValueError, RecursionError, FakeGptError):
        return None
    if reply is None or reply.text != probe:
        return None
    return payload, reply


def _text_ends_at(buf: bytes, resume: int, last: int, tail: bytes) -> bool:
    """Whether ``buf[:last]`` ends with `tail` and the JSON string that resumes at
    `resume` ends where `tail` begins."""
    end = last - len(tail)
    return buf.endswith(tail, resume, last) and (
        buf.find(b'"', resume, last) == end and buf[end - 1] != 0x5C  # no quote in the new text
        or _string_end(buf, resume) == end
    )


def _string_end(raw: bytes, pos: int) -> int:
    """Index of the quote that ends the JSON string whose content resumes at `pos`.

    `pos` is at a token boundary, so only backslashes from `pos` on can escape a quote.
    """
    while True:
        quote = raw.find(b'"', pos)
        if quote < 0:
            return -1
        first = quote
        while first > pos and raw[first - 1] == 0x5C:
            first -= 1
        if (quote - first) % 2 == 0:
            return quote
        pos = quote + 1


def _common_prefix(a: str, b: str) -> int:
    index = 0
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))


class _ReplyDecoder:
    """The reply's event stream, from body bytes to `ChatEvent`s: `SSEDecoder` then
    `ConversationDecoder`, with a shortcut for the usual event.

    A long reply is thousands of events, each its predecessor plus new text. When the
    event stream is at an event boundary and the conversation decoder knows their shape,
    each ``data: ...`` line followed by a blank line goes straight to
    `ConversationDecoder.extend`, read where it lies in the chunk: no `ServerSentEvent`,
    no copy. An event of one ``data:`` line that a chunk ends in is kept aside until the
    next chunk ends it (a read of the socket ends in the middle of an event as a rule).
    Anything else (other fields or line endings, another shape, a limit reached) goes
    through both decoders up to the next blank line. Both ways give the same events and
    errors.
    """

    def __init__(
        self, conversation: ConversationDecoder, limits: Limits, *, text_only: bool = False
    ) -> None:
        self.conversation = conversation
        self.text_only = text_only  # deltas (the non-empty ones) instead of ChatEvents
        self.sse = SSEDecoder(limits=limits)
        self._max_line = limits.max_sse_line_size
        self._max_data = limits.max_event_size - 1  # SSE counts the LF that joins lines
        self._max_run_data = min(self._max_line - 6, self._max_data)  # a "data: " line's value
        # The start of the usual event (``data: `` and no line end yet) that the last chunk
        # ended in: the event stream decoder has not seen it, and is at an event boundary.
        self._carry = b""

    @property
    def done(self) -> bool:
        return self.conversation.done

    def feed(self, chunk: bytes, events: List[Any]) -> None:
        """Append the events `chunk` completes (their deltas, if `text_only`), up to
        ``[DONE]``; errors are raised once the events before them have been appended."""
        try:
            self._feed(chunk, events)
        finally:
            self.conversation.detach()  # the chunk can go

    def _feed(self, chunk: bytes, events: List[Any]) -> None:
        conversation, sse = self.conversation, self.sse
        pos, size = 0, len(chunk)
        if self._carry:
            pos = self._end_carried(chunk, events)
        elif sse.at_start:  # the first event too can go where it lies
            pos = max(sse.take_start(chunk), 0)
        while pos < size and not conversation.done:
            if sse.at_event_boundary:
                if conversation.known_prefix_size is not None:
                    pos = self._shortcut(chunk, pos, events)
                    if pos == size:
                        break
                # The usual event of another shape, one ``data:`` line and a blank line:
                # its data is where it lies, and the event stream decoder has nothing to do.
                # (`extend` would not take it: `_shortcut` stopped before it, or there is no shape.)
                if chunk.startswith(b"data: ", pos):
                    last = self._data_end(chunk, pos + 6, 0)
                    if last >= 0 and chunk.find(b"\r", pos, last) < 0:
                        self._take(conversation.feed_data(chunk[pos + 6:last], extends=False), events)
                        pos = last + 2
                        continue
                    if size - pos <= self._max_line and chunk.find(b"\n", pos) < 0 and chunk.find(b"\r", pos) < 0:
                        self._carry = chunk[pos:]  # the next chunk ends it, most likely
                        return
            stop = _blank_line_end(chunk, pos)  # where the shortcut may apply again
            sse_events: List[ServerSentEvent] = []
            error: Optional[LimitExceeded] = None
            try:
                sse.feed_into(chunk[pos:stop], sse_events)
            except LimitExceeded as exc:
                error = exc  # raised once the events before it are in
            for sse_event in sse_events:
                event = conversation.feed(sse_event)
                if conversation.done:
                    return
                self._take(event, events)
            if error is not None:
                raise error
            pos = stop

    def close(self) -> None:
        """The body ended; raises what the event stream still holds."""
        self._carry = b""  # an incomplete event, which the event stream decoder discards
        self.sse.close()

    def _end_carried(self, chunk: bytes, events: List[Any]) -> int:
        """Take the event begun in the last chunk, if `chunk` ends it as the usual event
        ends (a LF, no CR, and a blank line), within the limits; returns where the rest
        of `chunk` starts. Else the event stream decoder is given its start, as if it had
        been fed it then, and the whole of `chunk` is left to read."""
        carry, self._carry = self._carry, b""
        end = chunk.find(b"\n")
        if (
            0 <= end < len(chunk) - 1 and chunk[end + 1] == 0x0A and chunk.find(b"\r", 0, end) < 0
            and len(carry) + end <= self._max_line and len(carry) - 6 + end <= self._max_data
        ):
            data = b"".join((memoryview(carry)[6:], memoryview(chunk)[:end]))
            self._take(self.conversation.feed_data(data), events)
            return end + 2
        self.sse.feed_into(carry, [])  # a line begun: no event, and within the line limit
        return 0

    def _take(self, event: Optional[ChatEvent], events: List[Any]) -> None:
        """Append `event` as the caller wants it: itself, or (text only) its new text."""
        if event is not None:
            if not self.text_only:
                events.append(event)
            elif event.delta:
                events.append(event.delta)

    def _shortcut(self, chunk: bytes, pos: int, events: List[Any]) -> int:
        """Events of the known shape from `pos` on; returns where the first other one starts.

        Such an event is ``data: `` + its data + LF LF, perhaps after ``event: delta``
        LF, and its data starts with bytes known to hold no line break
        (`ConversationDecoder.known_prefix_size`), so the search for the line's end
        starts after them. Each event taken only makes them longer, so the size read once
        holds for the whole run. When only text is wanted, a run of snapshots goes to
        `ConversationDecoder.extend_run` first, which decodes their new text once.
        """
        conversation = self.conversation
        known = conversation.known_prefix_size
        if known is None:
            return pos
        if self.text_only:
            run_end, run_text = conversation.extend_run(chunk, pos, b"data: ", b"\n\n", self._max_run_data)
            if run_end < 0:
                run_end, run_text = conversation.extend_delta_run(chunk, pos, self._max_run_data)
            if run_text:
                events.append(run_text)
            if run_end >= 0:
                pos = run_end
        extend, text_only = conversation.extend, self.text_only
        while True:
            if chunk.startswith(b"data: ", pos):
                event, first = "message", pos + 6
            elif chunk.startswith(b"event: delta\ndata: ", pos):
                event, first = "delta", pos + 19
            else:
                break
            last = self._data_end(chunk, first, known)
            if last < 0:
                break
            text = extend(chunk, first, last, event)
            if text is None:
                break
            if not text_only:
                events.append(conversation.event(text))
            elif text:
                events.append(text)
            pos = last + 2
        return pos

    def _data_end(self, chunk: bytes, first: int, known: int) -> int:
        """Where the data of the event whose ``data:`` line's value starts at `first` ends
        (the LF before the blank line), or -1 if that is not one line followed by a blank
        line, all in `chunk`, within the limits."""
        last = chunk.find(b"\n", first + known)
        if last < 0 or last + 1 == len(chunk) or chunk[last + 1] != 0x0A:
            return -1  # incomplete, or more than one line
        if last - first + 6 > self._max_line or last - first > self._max_data:
            return -1  # the event stream decoder raises
        return last


def _blank_line_end(chunk: bytes, pos: int) -> int:
    """Where the first LF LF from `pos` on ends, or the chunk's end."""
    # One byte at a time: bytes.find is memchr for one byte, many times slower for two.
    end = chunk.find(b"\n", pos)
    while 0 <= end < len(chunk) - 1:
        if chunk[end + 1] == 0x0A:
            return end + 2
        end = chunk.find(b"\n", end + 2)
    return len(chunk)


def _json_payload(raw: bytes, what: str) -> Any:
    """`raw` as JSON; anything else (nesting too deep for the parser too) is a `ProtocolError`."""
    text = raw.decode("utf-8", "replace")
    try:
        return _loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(f"{what} is not JSON: {_excerpt(text)!r}") from None


def _is_batch(value: Any) -> bool:
    """Whether `value` is a list of delta ops, each with its own path and op."""
    return (
        isinstance(value, list) and bool(value)
        and all(isinstance(op, dict) and "p" in op and "o" in op for op in value)
    )


def _child(parent: Any, token: str, path: str) -> Any:
    if isinstance(parent, dict):
        if token in parent:
            return parent[token]
    elif isinstance(parent, list):
        index = _list_index(parent, token, path, end_allowed=False)
        return parent[index]
    raise ProtocolError(f"a delta path that leads nowhere: {_excerpt(path)!r}")


def _list_index(items: List[Any], token: str, path: str, *, end_allowed: bool) -> int:
    size = len(items)
    if token == "-" and end_allowed:
        return size
    if token.isdigit() and token.isascii() and (token == "0" or not token.startswith("0")):
        index = int(token)
        if index < size or (end_allowed and index == size):
            return index
    raise ProtocolError(f"a delta path with an index out of range: {_excerpt(path)!r}")


def _apply_op(parent: Any, key: str, op: str, value: Any, path: str) -> None:
    """One op (not a patch) on ``parent[key]``, as the delta format defines it."""
    if isinstance(parent, dict):
        if op in ("add", "replace") or (op == "append" and key not in parent):
            parent[key] = value
        elif op == "append":
            parent[key] = _appended(parent[key], value, path)
        elif op == "truncate":
            if key in parent:
                parent[key] = _truncated(parent[key], value, path)
        else:  # remove
            parent.pop(key, None)
    elif isinstance(parent, list):
        index = _list_index(parent, key, path, end_allowed=op in ("add", "append"))
        if op == "add" or index == len(parent):  # (an append past the end: as to a missing key)
            parent.insert(index, value)
        elif op == "replace":
            parent[index] = value
        elif op == "append":
            parent[index] = _appended(parent[index], value, path)
        elif op == "truncate":
            parent[index] = _truncated(parent[index], value, path)
        else:
            del parent[index]
    else:
        raise ProtocolError(f"a delta path that leads nowhere: {_excerpt(path)!r}")


def _appended(target: Any, value: Any, path: str) -> Any:
    """``append``: a string concatenates, a list takes the items, an object merges keys."""
    if isinstance(target, _Text) and isinstance(value, str):
        target.append(value)
        return target
    if isinstance(target, str) and isinstance(value, str):
        return _Text(target, value) if value else target
    if isinstance(target, list):
        return target + value if isinstance(value, list) else [*target, value]
    if isinstance(target, dict) and isinstance(value, dict):
        return {**target, **value}
    raise ProtocolError(f"a delta append of {type(value).__name__} to {type(_plain(target)).__name__} at {_excerpt(path)!r}")


def _truncated(target: Any, length: Any, path: str) -> Any:
    if isinstance(length, int) and not isinstance(length, bool) and length >= 0:
        plain = _plain(target)
        if isinstance(plain, (str, list)):
            return plain[:length]
    raise ProtocolError(f"a delta truncate that cannot apply at {_excerpt(path)!r}")


def _visible_reply(message: Any) -> Optional[_Reply]:
    """The reply's fields if `message` is one the user sees: by the assistant, to
    everyone, of text content, on no channel or the final one, not a thinking preamble,
    not one the web page hides."""
    if not isinstance(message, dict):
        return None
    author = message.get("author")
    if not isinstance(author, dict) or author.get("role") != "assistant":
        return None
    if message.get("recipient", "all") not in ("all", None):
        return None
    if message.get("channel") not in _VISIBLE_CHANNELS:
        return None
    metadata = message.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    if metadata.get("is_thinking_preamble_message") or metadata.get("is_visually_hidden_from_conversation"):
        return None
    content = message.get("content")
    if not isinstance(content, dict):
        raise ProtocolError("assistant message without content")
    if content.get("content_type", "text") != "text":
        return None
    parts = content.get("parts", [])
    if not isinstance(parts, list) or (parts and not isinstance(parts[0], (str, _Text))):
        raise ProtocolError("assistant message without text in content.parts[0]")
    finish = metadata.get("finish_details")
    finish_reason = finish.get("type") if isinstance(finish, dict) else None
    message_id, status = message.get("id"), message.get("status")
    end_turn, model = message.get("end_turn"), metadata.get("model_slug")
    return _Reply(
        message_id if isinstance(message_id, str) else None,
        parts[0] if parts else "",  # no parts yet: no text yet
        status if isinstance(status, str) else None,
        finish_reason if isinstance(finish_reason, str) else None,
        end_turn if isinstance(end_turn, bool) else None,
        model if isinstance(model, str) else None,
    )


def _reasoning_of(message: Any) -> Optional[str]:
    """The reasoning an assistant message holds (``thoughts`` content, or text on the
    ``analysis`` channel), None if it is not reasoning."""
    if not isinstance(message, dict):
        return None
    author, content = message.get("author"), message.get("content")
    if not isinstance(author, dict) or author.get("role") != "assistant" or not isinstance(content, dict):
        return None
    if content.get("content_type") == "thoughts":
        thoughts = content.get("thoughts")
        if not isinstance(thoughts, list):
            return None
        texts = [_plain(t.get("content")) for t in thoughts if isinstance(t, dict)]
        return "\n\n".join(t for t in texts if isinstance(t, str) and t)
    if message.get("channel") == "analysis" and content.get("content_type", "text") == "text":
        parts = content.get("parts")
        if isinstance(parts, list) and parts and isinstance(_plain(parts[0]), str):
            return str(_plain(parts[0]))
    return None


def _raise_for_event_error(payload: Dict[str, Any]) -> None:
    error = payload.get("error")
    if not error and isinstance(payload.get("detail"), (str, dict)) and "message" not in payload:
        error = payload["detail"]  # some proxies send their JSON error body as an event
    if not error:
        return
    detail, code = _detail_and_code(error)
    if code == "token_expired":
        raise TokenExpiredError(
            f"the upstream no longer accepts the access token: {detail}",
            status=200, detail=detail, code=code,
        )
    raise UpstreamError(f"the upstream reported an error: {detail}", code=code)


def _detail_and_code(error: Any) -> Tuple[str, Optional[str]]:
    """A readable message and a code from an ``error`` or ``detail`` value."""
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or json.dumps(error)[:200]
        code = error.get("code")
        return _valid_text(str(message)), code if isinstance(code, str) else None
    return _valid_text(str(error)), None


# ---------------------------------------------------------------------------------------
# Transport: URLs, connections, TLS, proxies, timeouts, cookies
# ---------------------------------------------------------------------------------------

# One read buffer per thread: each read lands in it, then in the parser. It starts at 256
# KiB and grows to a megabyte once a read fills it: a read costs the reader about 0.1 ms
# besides its bytes (the loop's turn, the parser's and the reply's steps, a piece of text),
# and a long reply comes faster than that: a 48 MB reply took 185 reads of 256 KiB and
# 55-60 ms of CPU here, and takes 50-90 reads and 35-40 ms. (A thread that reads no such
# reply, one of many in a pool, say, keeps the smaller one.)
_READ_BUFFER_SIZE, _READ_BUFFER_MOST = 256 * 1024, 1024 * 1024
_PAUSE_READING_AT = 1024 * 1024  # bytes in the parser not yet parsed: more pauses the socket
# Keep-alive: how long an idle connection is kept when the server does not say (common
# servers close theirs after 5 s: Node, uvicorn, Apache), the most it is kept when it does
# (``Keep-Alive: timeout=N``, less a second for the trip), and how many are kept per loop.
_IDLE_SECONDS, _IDLE_MAX_SECONDS, _IDLE_CONNECTIONS = 4.0, 60.0, 16
_IDLE_EARLY_SECONDS = 0.05  # closed up to this early: connections kept in a burst close at one wake
_END_WAIT_SECONDS = 0.25  # after a stream's last event, how long the end of its body is awaited
# After the reply is whole (its visible message finished its turn), how long in all what
# may follow (notices, the title, [DONE]) is waited for before the reply stands without it.
_AFTER_REPLY_SECONDS = 2.0
_DRAIN_BYTES = 64 * 1024  # after the last wanted byte, how much more is read to reuse a connection
_T = TypeVar("_T")


class Timeouts(NamedTuple):
    """Seconds to wait, None for no limit.

    ``connect`` covers opening the connection (proxy tunnel and TLS included), ``read``
    the silence between two reads (a model may think a while before its first token),
    ``total`` the whole call.
    """

    connect: Optional[float] = 10.0
    read: Optional[float] = 120.0
    total: Optional[float] = None

    @classmethod
    def coerce(cls, value: Union[None, float, "Timeouts"]) -> "Timeouts":
        """A `Timeouts` from None (the defaults), itself, or gpt4free's plain number of
        seconds (the total, which also caps the other two)."""
        if value is None:
            return cls()
        if isinstance(value, Timeouts):
            for name, seconds in zip(("connect", "read", "total"), value):
                if seconds is not None and not _positive_seconds(seconds):
                    raise UsageError(f"Timeouts.{name} must be None or a positive number of seconds, not {seconds!r}")
            return value
        if _positive_seconds(value):
            assert isinstance(value, (int, float))
            return _timeouts_within(value)
        raise UsageError(f"timeout must be a positive number of seconds or Timeouts, not {value!r}")


@functools.lru_cache(maxsize=64, typed=True)  # most calls pass the same number
def _timeouts_within(seconds: float) -> Timeouts:
    """The default timeouts, capped by a total of `seconds`."""
    default = Timeouts()
    return Timeouts(
        connect=min(seconds, default.connect or seconds),
        read=min(seconds, default.read or seconds),
        total=float(seconds),
    )


def _positive_seconds(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and value > 0
    )


class _Clock:
    """The timeouts of one call, with its deadline.

    Waits, thousands of reads in a long reply, share one watchdog timer instead of a
    timeout context each: a wait only notes when it started and how long it may last,
    and the timer, when it fires, cancels the wait if it has gone on too long, or sets
    itself again.
    """

    def __init__(self, timeouts: Timeouts, loop: asyncio.AbstractEventLoop) -> None:
        """`loop`: the running one (passed in: asking for it is a system call in 3.11)."""
        self.timeouts = timeouts
        self._loop = loop
        self._deadline = None if timeouts.total is None else loop.time() + timeouts.total
        # The timer, and when it is due (kept here: uvloop's call_at gives a timer due
        # now as a plain Handle, which cannot say when).
        self._watchdog: Optional[asyncio.Handle] = None
        self._watchdog_at = 0.0
        self._waiting: Optional["asyncio.Task[Any]"] = None  # the task in a wait
        self._waiting_since = 0.0
        self._phase = "read"  # the wait's: "read", "connect" or "total"
        self._limit: Optional[float] = None  # its timeout
        self._expired: Optional[str] = None
        self._read_limit = timeouts.read  # a read's timeout (`limit_reads` lowers it)

    async def wait(self, awaitable: Awaitable[_T], phase: str = "read") -> _T:
        """`awaitable` under the `phase` timeout ("read": a read; "connect": opening a
        connection, or waiting for one; "total": only the call's) and the total one."""
        limit = self._read_limit if phase == "read" else self.timeouts.connect if phase == "connect" else None
        if limit is None and self._deadline is None:
            return await awaitable
        self._waiting_since = self._loop.time()
        self._phase, self._limit = phase, limit
        self._waiting = task = asyncio.current_task(self._loop)
        watchdog = self._watchdog
        if watchdog is None or (limit is not None and self._waiting_since + limit < self._watchdog_at):
            if watchdog is not None:
                watchdog.cancel()
            self._arm()
        try:
            return await awaitable
        except asyncio.CancelledError:
            expired, self._expired = self._expired, None
            uncancel = getattr(task, "uncancel", None)  # 3.11+: was it only our cancel?
            if expired is None or (uncancel is not None and uncancel() > 0):
                raise
            raise RequestTimeout(self._timeout_message(expired), phase=expired) from None
        finally:
            self._waiting = None

    def limit_reads(self, seconds: Optional[float]) -> None:
        """From now on a read waits at most `seconds` (the read timeout, if shorter);
        None: the read timeout again."""
        read = self.timeouts.read
        self._read_limit = read if seconds is None else seconds if read is None else min(read, seconds)

    def time_left(self) -> Optional[float]:
        """Seconds until the total timeout, None without one."""
        return None if self._deadline is None else max(self._deadline - self._loop.time(), 0.0)

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _arm(self) -> None:
        when = self._deadline
        if self._limit is not None:
            wait_end = self._waiting_since + self._limit
            when = wait_end if when is None else min(when, wait_end)
        assert when is not None
        self._watchdog, self._watchdog_at = self._loop.call_at(when, self._check), when

    def _check(self) -> None:
        self._watchdog = None
        if self._waiting is None:
            return  # not waiting: the next wait sets the watchdog again
        now = self._loop.time()
        if self._deadline is not None and now >= self._deadline:
            self._expired = "total"
        elif self._limit is not None and now - self._waiting_since >= self._limit:
            self._expired = self._phase
        else:
            self._arm()
            return
        self._waiting.cancel()

    def _timeout_message(self, phase: str) -> str:
        timeouts = self.timeouts
        if phase == "connect":
            return f"could not connect within {timeouts.connect:g} s (connect timeout)"
        if phase == "read":
            return f"the upstream sent nothing for {self._read_limit:g} s (read timeout)"
        return f"the call took longer than {timeouts.total:g} s (total timeout)"


class _Endpoint(NamedTuple):
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.authority}"


def _parse_url(url: str, *, what: str = "url") -> Tuple[_Endpoint, str]:
    """The endpoint and the base path (no trailing slash) of an upstream URL."""
    if not isinstance(url, str) or not url:
        raise UsageError(f"{what} must be a non-empty string")
    return _split_url(url, what)


def _userinfo(url: str) -> str:
    """The user and password of `url` ("" if none), where urlsplit (and so a request)
    finds them: up to the authority's last @, a password may hold one."""
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    return authority.rpartition("@")[0]


def _urlsplit_complaint(exc: ValueError, url: str) -> str:
    """What urlsplit found wrong in `url`, without its user and password: some of its
    messages quote the whole authority."""
    return _redact(str(exc), [_userinfo(url)])


@functools.lru_cache(maxsize=64)  # every call parses its URL; most calls share one
def _split_url(url: str, what: str) -> Tuple[_Endpoint, str]:
    userinfo = _userinfo(url)
    shown = repr(url.replace(userinfo + "@", "***@") if userinfo else url)  # never a password in a message
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid {what} {shown}: {_urlsplit_complaint(exc, url)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"{what} must start with http:// or https://, not {shown}")
    if not parts.hostname:
        raise UsageError(f"{what} {shown} has no host")
    if parts.username is not None or parts.password is not None:
        raise UsageError(f"{what} must not carry user credentials")
    if parts.query or parts.fragment:
        raise UsageError(f"{what} must not have a query or a fragment")
    port = port if port is not None else (443 if scheme == "https" else 80)
    try:
        # As requests carry it: characters a path cannot hold percent-encoded (UTF-8), as
        # browsers send them; what is already percent-encoded stays as it is.
        path = urllib.parse.quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=")
    except UnicodeEncodeError:
        raise UsageError(f"{what} {shown} is not Unicode text (a lone surrogate in its path)") from None
    return _Endpoint(scheme, _wire_host(parts.hostname, f"{what} {shown}"), port), path


_HOST_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")


def _ascii_name(name: str) -> Optional[str]:
    """A host name in ASCII: as it is, or an internationalized one in its IDNA form;
    None if it has none."""
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def _wire_host(host: str, where: str) -> str:
    """`host` as requests carry it (the Host field, the TLS server name, a proxy's
    CONNECT): an IPv6 address as it is, a name in ASCII (an internationalized one in its
    IDNA form: ``bücher.example`` is ``xn--bcher-kva.example``). A name that cannot be a
    host's (an empty label, one over 63 characters, a character no host name has) is a
    `UsageError` here rather than an error of the codec later."""
    if ":" in host:  # an IPv6 address, taken out of its brackets
        return host
    name = _ascii_name(host) or ""  # no IDNA form: refused below, as other names that are not names
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")  # a trailing dot: the root
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise UsageError(
            f"{where}: invalid host name {host!r} (expected labels of 1 to 63 letters, digits, "
            "'-' or '_', separated by dots; or an internationalized name)"
        )
    return name


class _Proxy:
    """An http:// proxy; ``repr`` and messages never show its credentials."""

    __slots__ = ("endpoint", "authorization", "secrets")

    def __init__(self, url: str) -> None:
        if not isinstance(url, str):
            raise UsageError(f"the proxy must be an http:// URL string, not {type(url).__name__}")
        try:
            parts = urllib.parse.urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"invalid proxy URL: {_urlsplit_complaint(exc, url)}") from None
        scheme = parts.scheme.lower()
        if scheme.startswith("socks"):
            raise UsageError(f"{scheme}:// proxies are not supported: use an http:// proxy")
        if scheme != "http" or not parts.hostname:
            raise UsageError("the proxy must be an http://[user:password@]host:port URL")
        self.endpoint = _Endpoint("http", _wire_host(parts.hostname, "the proxy URL"), port or 80)
        self.authorization: Optional[str] = None
        self.secrets: List[str] = []  # never shown: the password, in every form it is sent
        if parts.username is not None:
            password = urllib.parse.unquote(parts.password or "")
            userinfo = urllib.parse.unquote(parts.username) + ":" + password
            encoded = base64.b64encode(userinfo.encode()).decode("ascii")
            self.authorization = "Basic " + encoded
            self.secrets = [s for s in (password, parts.password, encoded) if s]

    def __repr__(self) -> str:
        return f"<proxy {self.endpoint.origin}>"


def _proxy_from_environment(endpoint: _Endpoint) -> Optional[_Proxy]:
    """The proxy HTTPS_PROXY / HTTP_PROXY name for `endpoint`, unless NO_PROXY excludes it."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(endpoint.scheme)
    if not url or _bypasses_proxy(endpoint, proxies.get("no", "")):
        return None
    if "://" not in url:  # host:port, as curl and pip accept it
        url = "http://" + url
    try:
        return _Proxy(url)
    except UsageError as exc:  # named, or the user may not know where the proxy came from
        lower = f"{endpoint.scheme}_proxy"
        raise UsageError(f"{lower if os.environ.get(lower) else lower.upper()}: {exc}") from None


def _bypasses_proxy(endpoint: _Endpoint, no_proxy: str) -> bool:
    """Whether NO_PROXY names the host: "*", the host, a parent domain (".example.com"
    or "*.example.com" too), or host:port; an IP address also by a network that holds
    it ("10.0.0.0/8", as curl, Go and requests read it), an IPv6 one in brackets too
    ("[::1]:8443")."""
    host = endpoint.host.lower().rstrip(".")
    address = _ip_address(host)
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if address is not None and entry != "*":
            if _names_address(entry, address, endpoint.port):
                return True
            continue
        name, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        name = name.removeprefix("*").lstrip(".").rstrip(".")  # ("*.example.com", as Go reads it, is ".example.com")
        ascii_name = _ascii_name(name)  # the host is in its IDNA form (`_wire_host`): the entry too
        if ascii_name is None:
            continue
        name = ascii_name
        if entry == "*" or (name and (host == name or host.endswith("." + name))
                            and (not port or port == str(endpoint.port))):
            return True
    return False


def _ip_address(text: str) -> Any:
    """`text` as an `ipaddress` address, or None if it is a host name."""
    import ipaddress  # here: only an upstream given by its address needs it

    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _names_address(entry: str, address: Any, port: int) -> bool:
    """Whether a NO_PROXY entry names `address` (on `port`): the address, the address
    and the port (an IPv6 one in brackets), or a network that holds it."""
    import ipaddress

    given_port = ""
    if entry.startswith("["):  # [IPv6] or [IPv6]:port
        entry, _, rest = entry[1:].partition("]")
        if rest and not rest.startswith(":"):
            return False
        given_port = rest[1:]
    elif entry.count(":") == 1:  # IPv4:port (an IPv6 address has two colons at least)
        entry, _, given_port = entry.partition(":")
    if given_port and given_port != str(port):
        return False
    try:
        if "/" in entry:
            return address in ipaddress.ip_network(entry, strict=False)
        return bool(address == ipaddress.ip_address(entry))
    except ValueError:  # (and a network of the other IP version: not this one's)
        return False


_default_ssl_context: Optional[ssl.SSLContext] = None
_default_ssl_lock = threading.Lock()


def _build_default_ssl_context() -> ssl.SSLContext:
    global _default_ssl_context
    with _default_ssl_lock:
        if _default_ssl_context is None:
            _default_ssl_context = ssl.create_default_context()
        return _default_ssl_context


async def _ssl_context(given: Optional[ssl.SSLContext]) -> ssl.SSLContext:
    """`given`, or the system's trust store (SSL_CERT_FILE honoured) with host checks,
    built once per process and off the event loop: loading the store takes tens of
    milliseconds, which every task on the loop would wait for."""
    if "encodings.idna" not in sys.modules:
        "".encode("idna")  # the codec every TLS host name goes through: imported once, a few ms
    if given is not None:
        return given
    if _default_ssl_context is not None:
        return _default_ssl_context
    return await asyncio.get_running_loop().run_in_executor(None, _build_default_ssl_context)


async def _open_socket(endpoint: _Endpoint) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = _numeric_address(endpoint) or await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    last_error: Optional[OSError] = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
        except BaseException:
            sock.close()
            raise
    raise last_error or OSError(f"no address for {endpoint.host}")


def _numeric_address(endpoint: _Endpoint) -> List[Tuple[Any, ...]]:
    """getaddrinfo's answer for a host that is an IP address, without a trip to a thread."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, endpoint.host)
        except (OSError, ValueError):
            continue
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (endpoint.host, endpoint.port))]
    return []


async def _open_tunnel(proxy: _Proxy, endpoint: _Endpoint, limits: Limits) -> socket.socket:
    """A socket to `endpoint` through `proxy`'s CONNECT, ready for the TLS handshake."""
    loop = asyncio.get_running_loop()
    sock = await _open_socket(proxy.endpoint)
    try:
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host  # IPv6, bracketed
        target = f"{host}:{endpoint.port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        reader = ResponseReader(method="CONNECT", limits=limits, decode_content=False)
        where = f"the proxy {proxy.endpoint.authority}"
        try:
            while True:
                data = await loop.sock_recv(sock, 65536)
                reader.feed(data)
                event = reader.next_event()
                if isinstance(event, Response):
                    break
        except TruncatedStreamError:
            raise ConnectError(f"{where} closed the connection instead of answering the tunnel request") from None
        except ProtocolError as exc:
            raise ConnectError(f"{where} did not answer the tunnel request in HTTP: {exc}") from None
        if event.status == 407:
            raise _proxy_wants_credentials(proxy)
        if not 200 <= event.status < 300:
            refused = f"{where} refused the tunnel to {endpoint.authority}: {event.status} {event.reason}".rstrip()
            # A 5xx is the proxy's trouble reaching the upstream, which may pass; a 4xx is its rule.
            raise (ProxyError if 400 <= event.status < 500 else ConnectError)(refused)
        if reader.unconsumed:
            raise ConnectError(f"{where} sent data before the TLS handshake")
        return sock
    except BaseException:
        sock.close()
        raise


async def _start_tls(
    transport: asyncio.Transport, protocol: asyncio.BaseProtocol, context: ssl.SSLContext, host: str,
) -> Optional[asyncio.Transport]:
    """``loop.start_tls``, unless the peer has closed the connection already (a proxy that
    hangs up after its 200, say): uvloop's would start the handshake on it all the same,
    fail to write, and never end."""
    if transport.is_closing():
        return None  # as start_tls says an end of stream during the handshake
    return await asyncio.get_running_loop().start_tls(transport, protocol, context, server_hostname=host)


def _abort_made_transport(handshake: "asyncio.Future[Optional[asyncio.Transport]]") -> None:
    """Abort the transport a TLS handshake made after all, once no one wanted it."""
    if not handshake.cancelled() and handshake.exception() is None:
        made = handshake.result()
        if made is not None:
            made.abort()


def _proxy_wants_credentials(proxy: _Proxy) -> ProxyError:
    """What a 407 from `proxy` means, to a CONNECT or to a request sent through it."""
    where = f"the proxy {proxy.endpoint.authority}"
    if proxy.authorization:
        return ProxyError(f"{where} refused the credentials in its URL (407 Proxy Authentication Required)")
    return ProxyError(
        f"{where} asks for credentials (407 Proxy Authentication Required): "
        "give them in its URL, http://user:password@host:port"
    )


# What OpenSSL says when the bytes that came back are not TLS but, say, "HTTP/1.1 400".
_PLAIN_HTTP_REASONS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"})

_read_buffers = threading.local()


def _read_buffer(size: int = _READ_BUFFER_SIZE) -> memoryview:
    """This thread's read buffer, made `size` bytes long if it is shorter. One is enough
    for all its connections: a socket is read into it and copied out in the same
    callback, so no two reads ever share it."""
    view: Optional[memoryview] = getattr(_read_buffers, "view", None)
    if view is None or len(view) < size:
        view = _read_buffers.view = memoryview(bytearray(size))
    return view


class _Connection(asyncio.BufferedProtocol):
    """An HTTP/1.1 connection: bytes out, and bytes in to the parser of the exchange in
    progress. Between exchanges it is idle, waiting in a `_Pool`.

    An asyncio protocol rather than asyncio's streams: a StreamReader copies every byte
    into its buffer and out again, and copies the whole buffer again each time it grows
    while the reader is behind; on a long reply that cost more than parsing it. Here the
    socket is read into this thread's buffer and from there straight into the response's
    parser; `receive` waits until something has arrived.
    """

    def __init__(self) -> None:
        self._clock: Optional[_Clock] = None
        self._parser: Optional[ResponseReader] = None  # None while idle
        self._loop = asyncio.get_running_loop()
        self._transport: Optional[asyncio.Transport] = None
        self._fileno = -1  # the socket's, to look for input the loop has not read yet
        self._view = _read_buffer()
        self._fresh = False  # bytes fed to the parser since the last receive()
        self._reading_paused = False
        self._ended = False  # the peer closed, or the connection was lost
        self._lost: Optional[Exception] = None
        self._data_waiter: Optional["asyncio.Future[None]"] = None
        self._drain_waiter: Optional["asyncio.Future[None]"] = None
        self.answered = False  # bytes of a response arrived in the exchange in progress

    @classmethod
    async def open(
        cls, endpoint: _Endpoint, *, proxy: Optional[_Proxy], ssl_context: Optional[ssl.SSLContext],
        clock: _Clock, parser: ResponseReader, limits: Limits,
    ) -> "_Connection":
        """A new connection, its first exchange begun: what arrives goes to `parser`."""
        if proxy is None:
            where = endpoint.authority
        elif endpoint.tls:  # a tunnel: the proxy's TCP, then TLS with the endpoint through it
            where = f"{endpoint.authority} through the proxy {proxy.endpoint.authority}"
        else:  # plain HTTP: requests go to the proxy
            where = f"the proxy {proxy.endpoint.authority}"
        started = time.monotonic()

        def factory() -> "_Connection":
            connection = cls()
            connection.begin(parser, clock)
            return connection

        try:
            connection = await clock.wait(cls._connect(endpoint, proxy, ssl_context, factory, limits), "connect")
            _log.debug("connected to %s in %.0f ms", where, (time.monotonic() - started) * 1000)
            return connection
        except ssl.SSLCertVerificationError as exc:
            raise TLSError(
                f"TLS certificate of {endpoint.host} not accepted: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            if exc.reason in _PLAIN_HTTP_REASONS:
                raise TLSError(
                    f"{endpoint.authority} answered in plain HTTP, not TLS: use http:// instead of https://"
                ) from None
            reason = exc.reason or str(exc) or type(exc).__name__
            raise TLSError(f"TLS handshake with {endpoint.host} failed: {reason}") from None
        except socket.gaierror:
            raise ConnectError(f"cannot resolve the host name of {where}") from None
        except OSError as exc:
            reason = _connect_failure(exc)
            if not reason:  # an end of stream carries no words: say what it was
                closed = "the connection was closed"
                reason = f"{closed} during the TLS handshake" if endpoint.tls else f"{closed} ({type(exc).__name__})"
            raise ConnectError(f"cannot connect to {where}: {reason}") from None

    @staticmethod
    async def _connect(
        endpoint: _Endpoint, proxy: Optional[_Proxy], given: Optional[ssl.SSLContext],
        factory: Callable[[], "_Connection"], limits: Limits,
    ) -> "_Connection":
        loop = asyncio.get_running_loop()
        if not endpoint.tls:
            target = endpoint if proxy is None else proxy.endpoint  # plain http goes to a proxy in absolute form
            _, connection = await loop.create_connection(factory, target.host, target.port)
            return connection
        # The TCP connection (or tunnel) is set up while the TLS context is made: the
        # first time in a process, that takes a while.
        connecting = asyncio.ensure_future(
            _open_socket(endpoint) if proxy is None else _open_tunnel(proxy, endpoint, limits)
        )
        try:
            await asyncio.sleep(0)  # it starts
            context = await _ssl_context(given)
            sock = await connecting
        except BaseException:
            connecting.cancel()
            if connecting.done() and not connecting.cancelled():
                if connecting.exception() is None:
                    connecting.result().close()
            raise
        try:
            transport, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
        except BaseException:
            sock.close()  # (a transport that took it is closing it already, with nothing to send)
            raise
        # TLS set up on the TCP transport rather than by create_connection(ssl=...): that,
        # cancelled as its handshake ends, closes its TLS transport politely and keeps the
        # socket meanwhile (up to 30 s, for the peer's close_notify), out of this code's
        # reach. start_tls runs in a task of its own, never cancelled: cancelled as the
        # handshake ends, CPython 3.9 and 3.10's leaves the TLS transport it made unclosed
        # (a ResourceWarning). A cancel here aborts the TCP transport, which ends the
        # handshake, and a TLS transport made all the same is aborted as it comes.
        connection = factory()
        # The name without the dot of a fully qualified one ("example.com."): servers may
        # refuse one sent with it (RFC 6066), and certificates never carry it.
        handshake = asyncio.ensure_future(
            _start_tls(transport, connection, context, endpoint.host.rstrip("."))
        )
        try:
            tls = await asyncio.shield(handshake)
        except BaseException:
            transport.abort()  # at once, with what it had yet to send
            handshake.add_done_callback(_abort_made_transport)
            raise
        if tls is None:  # the peer closed the connection during the handshake, at an end of stream
            transport.abort()
            raise ConnectionResetError()
        connection.connection_made(tls)
        return connection

    @property
    def alive(self) -> bool:
        """Neither side has closed it, as far as the event loop has seen."""
        transport = self._transport
        return not (self._ended or transport is None or transport.is_closing())

    @property
    def usable(self) -> bool:
        """Open, and the peer has not closed it: it can carry a request. Asked between
        exchanges, when nothing should arrive, it also looks at the socket itself: a
        close (or bytes) that the event loop has not read yet, because it has not run
        since, makes it unusable too, as urllib3 and httpcore check a kept connection.
        Some servers and proxies close right after a response without saying so."""
        return self.alive and (self._fileno < 0 or not _input_pending(self._fileno))

    def begin(self, parser: ResponseReader, clock: _Clock) -> None:
        """Start an exchange: what arrives goes to `parser`, waits go by `clock`."""
        self._parser, self._clock = parser, clock
        self.answered = False

    def rest(self) -> None:
        """The exchange is over and the response read to its end: idle until the next."""
        self._parser = self._clock = None
        self._fresh = False
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()  # so that the peer's close is seen at once

    async def send(self, data: bytes) -> None:
        transport = self._transport
        if self._ended or transport is None or transport.is_closing():
            raise TransportError(f"connection lost before sending: {self._reason()}")
        transport.write(data)
        if self._drain_waiter is not None:  # the socket's buffer is full: wait for room
            assert self._clock is not None, "send() outside an exchange"
            await self._clock.wait(self._drain_waiter)
        if self._lost is not None and not self.answered:
            # (A server may answer before it has read the whole request, an error as a
            # rule, and close: then its answer is what the caller reads, as httpcore and
            # curl do, not the failed send.)
            raise TransportError(f"connection lost while sending: {self._reason()}")

    async def receive(self) -> None:
        """Wait until more bytes have gone to the parser; at the end of the connection,
        feed it b"" (or raise, if the connection was lost rather than closed)."""
        parser, clock = self._parser, self._clock
        assert parser is not None and clock is not None, "receive() outside an exchange"
        if not self._fresh and not self._ended:
            self._data_waiter = self._loop.create_future()
            try:
                await clock.wait(self._data_waiter)
            finally:
                self._data_waiter = None
        if self._fresh:
            self._fresh = False
            if self._reading_paused and self._transport is not None:
                self._reading_paused = False
                self._transport.resume_reading()
            return
        if self._lost is not None:
            raise TruncatedStreamError(f"connection lost: {self._reason()}")
        parser.feed(b"")

    def close(self) -> None:
        """Close at once: an abandoned stream must not keep its socket."""
        if self._transport is not None:
            self._transport.abort()

    def _reason(self) -> str:
        lost = self._lost
        if isinstance(lost, OSError) and lost.strerror:
            return lost.strerror
        return str(lost or "closed by the peer")

    # -- asyncio's protocol callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport by class: uvloop's
        # are its own.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fileno = sock.fileno()

    def get_buffer(self, sizehint: int) -> memoryview:
        self._view = _read_buffer()  # (another connection may have had it grow)
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        parser = self._parser
        if parser is None:  # bytes nobody asked for: this connection can carry no request
            self._ended = True
            self.close()
            return
        parser.feed(self._view[:nbytes])  # copied: the buffer is the next read's
        if nbytes == len(self._view) < _READ_BUFFER_MOST:  # more was waiting, most likely
            _read_buffer(min(4 * nbytes, _READ_BUFFER_MOST))
        self._fresh = self.answered = True
        if parser.buffered > _PAUSE_READING_AT and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake(self._data_waiter)

    def eof_received(self) -> bool:
        self._ended = True
        self._wake(self._data_waiter)
        return False  # the transport closes itself

    def connection_lost(self, exc: Optional[Exception]) -> None:
        # The transport is done with: asyncio's raises if aborted now, when it was closed
        # with bytes still to send and then sent them (the peer, having answered early,
        # read on: a 413 for a large prompt, with nginx's lingering close).
        self._transport = None
        self._ended = True
        self._lost = self._lost or exc
        self._wake(self._data_waiter)
        self._wake(self._drain_waiter)
        self._drain_waiter = None

    def pause_writing(self) -> None:
        self._drain_waiter = self._loop.create_future()

    def resume_writing(self) -> None:
        self._wake(self._drain_waiter)
        self._drain_waiter = None

    @staticmethod
    def _wake(waiter: Optional["asyncio.Future[None]"]) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _connect_failure(exc: OSError) -> str:
    """Why a connection could not be made, in the system's words ("Connection refused"):
    asyncio's own ("Connect call failed ('127.0.0.1', 9)", or "Multiple exceptions: ..."
    for a host of several addresses) repeat the address and leave the reason out."""
    if exc.errno:
        return os.strerror(exc.errno)
    codes = sorted({int(code) for code in re.findall(r"\[Errno (\d+)\]", str(exc))})
    if codes:
        return "; ".join(os.strerror(code) for code in codes)
    return exc.strerror or str(exc)


def _input_pending(fileno: int) -> bool:
    """Whether the socket `fileno` has input (bytes, an end of stream, an error) waiting,
    asked without waiting."""
    try:
        if hasattr(select, "poll"):  # no limit on descriptor numbers, unlike select()
            poller = select.poll()
            poller.register(fileno, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([fileno], [], [], 0)[0])
    except (OSError, ValueError):
        return True  # a socket that cannot be asked cannot be trusted with a request


def _keep_alive_seconds(head: Response) -> float:
    """How long a connection may stay idle after `head`: a little less than the server's
    ``Keep-Alive: timeout=N`` (a second less, or half of a short one; at most a minute),
    else `_IDLE_SECONDS`."""
    for part in (head.get("keep-alive") or "").split(","):
        name, _, value = part.partition("=")
        value = value.strip().strip('"')
        if name.strip().lower() == "timeout" and value.isascii() and value.isdigit() and len(value) < 6:
            seconds = int(value)
            return min(max(seconds - 1.0, seconds / 2), _IDLE_MAX_SECONDS)
    return _IDLE_SECONDS


class _Pool:
    """The connections of one event loop, by what they lead to (origin, proxy, TLS
    settings).

    At most ``Limits.max_connections`` to a key are in use at once: a request first takes
    a place (`reserve`, or `wait_for_place` in turn), and gives it back when its
    connection is kept (`put`) or closed (`release`); a place given back goes to the
    request that has waited longest. Idle keep-alive connections are kept apart, the most
    recently used taken first. Each closes after its idle time, the oldest when there are
    too many (unless a request waits to take it), and all of them with `close`.

    One timer a pool, not one a connection: it wakes at the earliest end of an idle time
    and closes what is due then (a timer each cost more than the rest of keeping one)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()  # its connections', and its calls' (`_Clock`)
        self._idle: Dict[Any, List[_Connection]] = {}  # by key, the most recent last
        self._due: Dict[_Connection, Tuple[Any, float]] = {}  # key and end of idle time, the oldest first
        self._sweep: Optional[asyncio.Handle] = None  # and when it is due (see `_Clock`)
        self._sweep_at = 0.0
        self._in_use: Dict[Any, int] = {}  # places taken, by key
        self._waiting: Dict[Any, "collections.deque[asyncio.Future[None]]"] = {}  # for a place, by key
        self.closed = False

    def reserve(self, key: Any, most: int) -> bool:
        """Take a place among the connections to `key` in use, if fewer than `most` are
        and no request waits for one."""
        taken = self._in_use.get(key, 0)
        if taken >= most or self._waiting.get(key):
            return False
        self._in_use[key] = taken + 1
        return True

    async def wait_for_place(self, key: Any) -> None:
        """Wait for a place among the connections to `key` in use, after those who wait
        already; it is taken when this returns."""
        waiter: "asyncio.Future[None]" = self.loop.create_future()
        queue = self._waiting.setdefault(key, collections.deque())
        queue.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(key)  # given a place as it was cancelled: the next one gets it
            elif waiter in queue:
                queue.remove(waiter)
            raise

    def release(self, key: Any) -> None:
        """Give back a place: to the request that has waited longest, if any."""
        queue = self._waiting.get(key)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place passes to it as it is
                return
        self._in_use[key] -= 1

    def take(self, key: Any) -> Optional[_Connection]:
        """An idle connection to `key` that can carry a request, or None."""
        connections = self._idle.get(key)
        while connections:
            connection = connections.pop()
            due = self._due.pop(connection)[1]
            # Past its time, even if the loop did not run to close it (a chat between turns).
            if connection.usable and due > self.loop.time():
                return connection
            connection.close()
        return None

    def put(self, key: Any, connection: _Connection, seconds: float) -> None:
        """Keep `connection` (its response read to the end) for at most `seconds`, and
        give back its place: a request waiting for one takes it next."""
        self._keep(key, connection, seconds)
        self.release(key)

    def _keep(self, key: Any, connection: _Connection, seconds: float) -> None:
        if self.closed or seconds <= 0 or not connection.alive:  # (`take` looks at its socket)
            connection.close()
            return
        connection.rest()
        if len(self._due) >= _IDLE_CONNECTIONS and not self._waiting.get(key):
            self._forget(next(iter(self._due)))  # (a request waiting for a place takes this one next)
        due = self.loop.time() + seconds
        self._idle.setdefault(key, []).append(connection)
        self._due[connection] = (key, due)
        sweep = self._sweep
        if sweep is None or due < self._sweep_at:
            if sweep is not None:
                sweep.cancel()
            self._sweep, self._sweep_at = self.loop.call_at(due, self._close_due, due), due

    def close(self) -> None:
        """Close every idle connection; a connection put afterwards is closed at once."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in self._due:
            connection.close()
        self._idle.clear()
        self._due.clear()

    def _close_due(self, now: float) -> None:
        """The timer, set for `now`: close the connections due by then (or by the loop's
        time, if it ran late, and a little after), and wake again at the next one's time."""
        self._sweep = None
        now = max(now, self.loop.time()) + _IDLE_EARLY_SECONDS
        for connection in [c for c, (_, due) in self._due.items() if due <= now]:
            self._forget(connection)
        if self._due:
            due = min(due for _, due in self._due.values())
            self._sweep, self._sweep_at = self.loop.call_at(due, self._close_due, due), due

    def _forget(self, connection: _Connection) -> None:
        key = self._due.pop(connection)[0]
        self._idle[key].remove(connection)
        connection.close()


class _Pools:
    """A `_Pool` per event loop: a connection never crosses loops, nor so threads.

    A loop's pool closes when the loop ends: ``asyncio.run`` (and ``create_completion``)
    close every async generator of the loop before closing it, and each pool has one
    waiting to close it. `aclose` closes the running loop's pool sooner.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Tuple[_Pool, AsyncGenerator[None, None]]]" = (
            weakref.WeakKeyDictionary()
        )
        self._last: Optional[Tuple[asyncio.AbstractEventLoop, _Pool]] = None  # the usual case, at once

    async def get(self) -> _Pool:
        """The running loop's pool, made on first use."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop and not last[1].closed:
            return last[1]
        found = self._by_loop.get(loop)
        if found is not None and not found[0].closed:
            self._last = (loop, found[0])
            return found[0]
        pool = _Pool()
        guard = self._guard(loop, pool)
        await guard.__anext__()  # started: the loop now knows it, and closes it at its end
        with self._lock:
            for other in [other for other in self._by_loop if other.is_closed()]:
                del self._by_loop[other]  # ended without closing its generators: let it go
            self._by_loop[loop] = (pool, guard)
            self._last = (loop, pool)
        return pool

    async def aclose(self) -> None:
        """Close the running loop's idle connections."""
        with self._lock:
            found = self._by_loop.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found[1].aclose()

    async def _guard(self, loop: asyncio.AbstractEventLoop, pool: _Pool) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            pool.close()
            with self._lock:
                if self._by_loop.get(loop, (None,))[0] is pool:
                    del self._by_loop[loop]
                if self._last is not None and self._last[1] is pool:
                    self._last = None


class _HTTPResponse:
    """A response whose head has arrived; the body is read on demand. When the caller is
    done with it, `release` keeps the connection for another request (if the body was read
    to its end and the response allows it) and `close` closes it: after an error, a
    cancel or a partial read, a connection is never reused."""

    def __init__(
        self, head: Response, parser: ResponseReader, connection: _Connection,
        keep: Callable[[_Connection, Response], None], lose: Callable[[_Connection], None],
    ) -> None:
        self.head = head
        self.status = head.status
        self._parser = parser
        self._connection: Optional[_Connection] = connection
        self._keep, self._lose = keep, lose  # what becomes of the connection: kept, or closed

    @property
    def is_event_stream(self) -> bool:
        """A success whose body is an event stream."""
        return self.status < 300 and _media_type(self.head) == "text/event-stream"

    async def next_chunk(self) -> Optional[bytes]:
        """The next piece of the body, or None at its end."""
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                connection = self._connection
                if connection is None:
                    raise UsageError("the response was closed before its body was read")
                await connection.receive()
            elif isinstance(event, Data):
                return event.data
            else:
                return None

    async def read(self, limit: int) -> bytes:
        """At most `limit` bytes of the body; the rest is left unread. The body of an
        error status that is cut short (the connection closed, lost or silent before its
        end) is what arrived: the status says more than how the body ended."""
        body = bytearray()
        try:
            while len(body) < limit:
                chunk = await self.next_chunk()
                if chunk is None:
                    break
                body += chunk
        except (TruncatedStreamError, TransportError):
            if self.status < 300:
                raise
            _log.debug("the body of the HTTP %d answer was cut short", self.status)
        return bytes(body[:limit])

    async def finish(self, seconds: float) -> None:
        """`release`, after waiting at most `seconds` for the rest of the body (after a
        stream's last event, the few bytes that end it, usually here already)."""
        arrived = self._read_arrived()  # usually: the end came with the last event
        if not arrived:
            deadline = time.monotonic() + seconds
            try:
                while self._connection is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    await asyncio.wait_for(self._connection.receive(), left)
                    if self._read_arrived():
                        break
            except (FakeGptError, asyncio.TimeoutError):
                pass  # then the connection is closed
            arrived = self._connection is not None and self._read_arrived()
        self._give_back(arrived)

    def release(self) -> None:
        """Done with the response, which went well: its connection is kept for another
        request if what has arrived ends the body and the response allows it, else closed."""
        self._give_back(self._read_arrived())

    def _give_back(self, arrived: bool) -> None:
        """`release`, knowing whether the body has ended."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if arrived and self._parser.keep_alive:
            self._keep(connection, self.head)
        else:
            self._lose(connection)

    def close(self) -> None:
        """Done with the response: close its connection at once (unless released)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._lose(connection)

    def _read_arrived(self) -> bool:
        """Whether the body has ended, reading through what has already arrived (a little
        of it at most: what the caller did not want)."""
        skipped = 0
        try:
            while skipped <= _DRAIN_BYTES:
                event = self._parser.next_event()  # EndOfMessage again, once it came
                if event is NEED_DATA:
                    return False
                if not isinstance(event, Data):
                    return True
                skipped += len(event.data)
        except FakeGptError:
            self.close()  # a broken end: the connection cannot carry another request
        return False


def _media_type(head: Response) -> str:
    """The Content-Type without its parameters, in lower case ("" if none)."""
    return (head.get("content-type") or "").split(";")[0].strip().lower()


class _CookieRequest:
    """The parts of a request that `http.cookiejar` reads and writes."""

    def __init__(self, url: str, fields: Sequence[Tuple[str, str]]) -> None:
        self.full_url = url
        self.unverifiable = False
        self.fields = list(fields)

    # The URL's parts are read only when the jar asks for them: an empty jar never does.

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.full_url).netloc

    @property
    def type(self) -> str:
        return urllib.parse.urlsplit(self.full_url).scheme

    @property
    def origin_req_host(self) -> str:
        return urllib.parse.urlsplit(self.full_url).hostname or ""

    def get_full_url(self) -> str:
        return self.full_url

    def has_header(self, name: str) -> bool:
        return any(key.lower() == name.lower() for key, _ in self.fields)

    def get_header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        for key, value in self.fields:
            if key.lower() == name.lower():
                return value
        return default

    def add_unredirected_header(self, name: str, value: str) -> None:
        self.fields.append((name, value))


class _CookieJar(http.cookiejar.CookieJar):
    """A cookie jar that counts the changes to which cookies it holds (`set_cookie` and
    `clear` are the only ways a `CookieJar` adds or removes one): while the count stays
    the same, its cookies are the ones seen last, without a walk through the jar."""

    def __init__(self, policy: Optional[http.cookiejar.CookiePolicy] = None) -> None:
        super().__init__(policy)
        self.changes = 0

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        super().set_cookie(cookie)
        self.changes += 1  # after: a change counted is one made

    def clear(self, domain: Optional[str] = None, path: Optional[str] = None, name: Optional[str] = None) -> None:
        super().clear(domain, path, name)
        self.changes += 1


class _KnownHeader(NamedTuple):
    """The headers a jar added for a URL, and what they came from."""

    url: str
    changes: Optional[int]  # the jar's `_CookieJar.changes` before they were made
    cookies: List[http.cookiejar.Cookie]
    state: List[Tuple[Any, ...]]  # each cookie's attributes then
    expires: float  # when the first of them expires
    fields: List[Tuple[str, str]]


# Making the headers runs the jar's whole policy, a tenth of a short conversation's cost;
# they change only when the cookies do (in the jar, or in place) or one expires. (A
# policy changed in place while its cookies stay the same takes effect when they next
# change.)
_cookie_headers: "weakref.WeakKeyDictionary[http.cookiejar.CookieJar, _KnownHeader]" = weakref.WeakKeyDictionary()


def _add_cookie_header(jar: http.cookiejar.CookieJar, request: _CookieRequest) -> None:
    """``jar.add_cookie_header(request)``, remembered while the jar's cookies stay the same."""
    known = _cookie_headers.get(jar)
    changes = jar.changes if isinstance(jar, _CookieJar) else None
    if known is not None and changes is not None and known.changes == changes:
        cookies = known.cookies
    else:
        cookies = list(iter(jar))  # list(jar) would walk the cookies twice: once for its len()
    if not cookies:
        return  # an empty jar adds no header (a call with an access token has one)
    state = [(id(c), c.name, c.value, c.domain, c.path, c.secure, c.expires, c.version) for c in cookies]
    if (
        known is not None and known.url == request.full_url and known.state == state
        and time.time() < known.expires
    ):
        request.fields.extend(known.fields)
        return
    before = len(request.fields)
    # http.cookiejar duck-types its request: the adapter is what it reads.
    jar.add_cookie_header(request)  # type: ignore[arg-type]
    expires = min((c.expires for c in cookies if c.expires is not None), default=math.inf)
    _cookie_headers[jar] = _KnownHeader(request.full_url, changes, cookies, state, expires, request.fields[before:])


class _CookieResponse:
    """The part of a response that `http.cookiejar` reads: ``info().get_all()``."""

    def __init__(self, head: Response) -> None:
        self._head = head

    def info(self) -> Response:
        return self._head


class _Secret(str):
    """A string never shown: its repr is a placeholder."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class _Options(NamedTuple):
    endpoint: _Endpoint
    base_path: str
    model: str
    proxy: Optional[_Proxy]
    trust_env: bool
    timeouts: Timeouts
    limits: Limits
    ssl_context: Optional[ssl.SSLContext]
    conversation_id: Optional[str]
    parent_message_id: Optional[str]
    history_and_training_disabled: bool
    profile: str
    access_token: Optional[_Secret]  # given by the caller: no login
    account_id: Optional[str]
    auto_continue: bool
    retries: int
    session_cache: bool  # keep the login between processes (the CLI's default)


class _Client:
    """HTTP/1.1 requests to one upstream, with the call's options, on connections kept in
    `pool`."""

    def __init__(self, options: _Options, *, pool: _Pool, timeouts: Optional[Timeouts] = None) -> None:
        self.endpoint, self.base_path = options.endpoint, options.base_path
        self.base_url = f"{self.endpoint.origin}{self.base_path}"
        self.options = options
        self.proxy = options.proxy
        if self.proxy is None and options.trust_env:
            self.proxy = _proxy_from_environment(self.endpoint)
        self.clock = _Clock(timeouts or options.timeouts, pool.loop)
        self.pool = pool

    @property
    def secrets(self) -> List[str]:
        """Values of this call that must never be shown: the proxy's credentials."""
        return self.proxy.secrets if self.proxy is not None else []

    @property
    def connection_key(self) -> Tuple[Any, ...]:
        """What a connection leads to: the origin, the TLS settings and the proxy."""
        proxy = self.proxy
        return (
            self.endpoint, self.options.ssl_context,
            None if proxy is None else (proxy.endpoint, hash(proxy.authorization)),
        )

    @property
    def session_key(self) -> Tuple[Any, ...]:
        """What a login depends on: the upstream, the TLS settings and the proxy. A token
        got one way is never used another way."""
        return (self.base_url, *self.connection_key[1:])

    def for_shared_work(self) -> "_Client":
        """This client without its call's total timeout: work that other calls share (a
        login) must not fail them when this call gives up; each waits by its own clock."""
        timeouts = self.options.timeouts
        shared = _Client(self.options, timeouts=Timeouts(timeouts.connect, timeouts.read, None), pool=self.pool)
        shared.proxy = self.proxy
        return shared

    async def request(
        self, method: str, path: str, *, headers: Sequence[Tuple[str, str]] = (),
        body: Optional[bytes] = None, cookie_jar: Optional[http.cookiejar.CookieJar] = None,
    ) -> _HTTPResponse:
        endpoint, proxy = self.endpoint, self.proxy
        key, pool = self.connection_key, self.pool
        debug = _log.isEnabledFor(logging.DEBUG)  # (a log line's parts cost more than asking)
        # The place first: a call that waits for one holds nothing else meanwhile, and
        # sends the cookies the jar has when its turn comes.
        if not pool.reserve(key, self.options.limits.max_connections):
            await self._wait_for_place(key)
        try:
            url = f"{self.base_url}{path}"
            target = url if proxy is not None and not endpoint.tls else f"{self.base_path}{path}"
            fields = [("Host", endpoint.authority), *_browser_headers(self.base_url), *headers]
            if proxy is not None and proxy.authorization and not endpoint.tls:
                fields.append(("Proxy-Authorization", proxy.authorization))
            if body is not None:
                fields.append(("Content-Length", str(len(body))))
            cookie_request = _CookieRequest(url, fields)
            if cookie_jar is not None:
                _add_cookie_header(cookie_jar, cookie_request)
            head = _serialize_head(method, target, cookie_request.fields)
            if debug:
                via = f" via {proxy.endpoint.authority}" if proxy is not None else ""
                _log.debug("%s %s%s", method, url.split("?")[0], via)
            message = head + body if body else head
            event, parser, connection = await self._send(method, path, url, message, key)
        except BaseException:
            pool.release(key)
            raise
        if debug:
            _log.debug("%s %s -> %d %s", method, url.split("?")[0], event.status, event.reason)
        response = _HTTPResponse(event, parser, connection, self._keep, self._lose)
        if cookie_jar is not None and any(name in ("set-cookie", "set-cookie2") for name, _ in event.headers):
            try:
                cookie_jar.extract_cookies(_CookieResponse(event), cookie_request)  # type: ignore[arg-type]
            except BaseException:
                response.close()  # its connection, and its place
                raise
        return response

    async def _wait_for_place(self, key: Any) -> None:
        """Wait (within the connect timeout) until one of the connections in use to `key`
        is done."""
        try:
            await self.clock.wait(self.pool.wait_for_place(key), "connect")
        except RequestTimeout as exc:
            most = self.options.limits.max_connections
            busy = "the one connection" if most == 1 else f"all {most} connections"
            raise RequestTimeout(
                f"{exc}: {busy} to {self.endpoint.authority} (Limits.max_connections) "
                + ("was" if most == 1 else "were") + " in use",
                phase=exc.phase,
            ) from None

    async def _send(
        self, method: str, path: str, url: str, message: bytes, key: Any,
    ) -> Tuple[Response, ResponseReader, _Connection]:
        """Send `message` on a kept connection to `key` or a new one, and wait for the
        head of the response: (the head, its reader, the connection)."""
        endpoint, proxy, limits = self.endpoint, self.proxy, self.options.limits
        connection = self.pool.take(key)
        while True:
            parser = ResponseReader(method=method, limits=limits)
            reused = connection is not None
            if connection is None:
                connection = await _Connection.open(
                    endpoint, proxy=proxy, ssl_context=self.options.ssl_context, clock=self.clock,
                    parser=parser, limits=limits,
                )
            else:
                connection.begin(parser, self.clock)
            try:
                event = await self._exchange(connection, parser, message)
            except (TransportError, TruncatedStreamError) as exc:
                connection.close()
                if not reused or connection.answered or isinstance(exc, RequestTimeout):
                    if isinstance(exc, TruncatedStreamError):  # before any response: the connection failed
                        raise TransportError(f"{method} {path.split('?')[0]}: {exc}") from None
                    raise
                # The server had closed the idle connection as we sent: nothing of the
                # request was processed, so it goes again, on a new connection.
                why = f"failed before any answer ({exc})"
            except ProtocolError as exc:  # not an HTTP/1.x head (another protocol on that port?)
                connection.close()
                exc.args = (f"{method} {path.split('?')[0]}: {exc}",)
                raise
            except BaseException:
                connection.close()
                raise
            else:
                if event.status == 407 and proxy is not None and not endpoint.tls:  # the proxy's, not the upstream's
                    connection.close()
                    raise _proxy_wants_credentials(proxy)
                if event.status != 408 or not reused:
                    break
                # 408 Request Timeout on a kept connection: the server gave up waiting on
                # it before the request came, and says so; RFC 9110 (15.5.9) lets the
                # request be repeated, on a new connection.
                connection.close()
                why = "was timed out by the server (408)"
            _log.debug("%s %s: a kept connection %s: once more on a new one", method, url.split("?")[0], why)
            connection = None
        return event, parser, connection

    @staticmethod
    async def _exchange(connection: _Connection, parser: ResponseReader, message: bytes) -> Response:
        """Send `message` and wait for the head of the response."""
        await connection.send(message)
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                await connection.receive()
                continue
            assert isinstance(event, Response)
            return event

    async def answer_body(self, response: _HTTPResponse, what: str) -> bytes:
        """`response.read` for an answer read whole (JSON, an error): a body cut short
        says which request's it was."""
        try:
            return await response.read(self.options.limits.max_error_body_size)
        except (TruncatedStreamError, TransportError) as exc:
            exc.args = (f"{what}: {exc}",)
            raise

    def _keep(self, connection: _Connection, head: Response) -> None:
        self.pool.put(self.connection_key, connection, _keep_alive_seconds(head))

    def _lose(self, connection: _Connection) -> None:
        connection.close()
        self.pool.release(self.connection_key)

    async def json(
        self, method: str, path: str, *, what: str, body: Optional[bytes] = None,
        headers: Sequence[Tuple[str, str]] = (), cookie_jar: Optional[http.cookiejar.CookieJar] = None,
        redact: Sequence[str] = (),
    ) -> Any:
        """The JSON answer of a request; error statuses raise through `_status_error`."""
        response = await self.request(
            method, path, body=body, cookie_jar=cookie_jar,
            headers=[("Accept", "application/json"), ("Accept-Encoding", "gzip, deflate"), *headers],
        )
        try:
            raw = await self.answer_body(response, what)
            if response.status >= 300:  # an error, or a redirect, which is not followed
                raise _status_error(response.head, raw, what=what, redact=[*redact, *self.secrets])
            try:
                value = json.loads(raw.decode("utf-8", "replace"))
            except (ValueError, RecursionError):
                raise ProtocolError(f"{what}: the answer is not JSON: {_excerpt(raw)!r}") from None
            response.release()
            return value
        finally:
            response.close()


def _serialize_head(method: str, target: str, fields: Sequence[Tuple[str, str]]) -> bytes:
    # All names, then all values, checked at once: a dozen fields each call. The names
    # are tokens joined by spaces, so as many spaces as joins: none was in a name (and
    # a call's names are mostly the last one's: each set is matched once). No value may
    # hold CR, LF or NUL: a search for each costs less than a regex over the values.
    names = " ".join([name for name, _ in fields])
    values = "".join([value for _, value in fields])
    if (
        names.count(" ") != len(fields) - 1 or not _valid_field_names(names)
        or "\r" in values or "\n" in values or "\x00" in values
    ):
        for name, value in fields:
            if _FIELD_NAME.fullmatch(name) is None or _FORBIDDEN_IN_VALUE.search(value) is not None:
                raise UsageError(f"invalid request header {name!r}")
    lines = [f"{method} {target} HTTP/1.1", *[f"{name}: {value}" for name, value in fields], "", ""]
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise UsageError("request headers must be Latin-1 text") from None


def _valid_field_names(names: str) -> bool:
    """Whether `names` is field names (tokens) joined by spaces."""
    valid = _field_names_checked.get(names)
    if valid is None:
        valid = _memo_put(_field_names_checked, names, _FIELD_NAMES.fullmatch(names) is not None)
    return valid


_field_names_checked: Dict[str, bool] = {}
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_NAMES = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?: [!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")  # joined by spaces
_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")  # what a token (or account id) may be: sent as is
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\x00]")
_USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/118.0.0.0 Safari/537.36"
)


def _browser_headers(base_url: str) -> List[Tuple[str, str]]:
    """The browser-like headers the original provider sent with every request."""
    return [
        ("User-Agent", _USER_AGENT),
        ("Accept-Language", "en-US"),
        ("Referer", f"{base_url}/?v=2"),
        ("sec-ch-ua", '"Google Chrome";v="117", "Not;A=Brand";v="8", "Chromium";v="117"'),
        ("sec-ch-ua-platform", '"Linux"'),
        ("sec-ch-ua-mobile", "?0"),
    ]


def _status_error(
    head: Response, body: bytes, *, what: str, redact: Sequence[str] = ()
) -> HTTPStatusError:
    """The error an error answer stands for: 429, token expiry or another status."""
    detail, code = _error_detail(head, body, redact)
    text_body = _excerpt(_redact(body.decode("utf-8", "replace"), redact), 300)
    status = head.status
    target = _redirect_target(head.get("location"), redact) if status in _REDIRECTS else None
    if target:
        message = f"{what}: HTTP {status}: the upstream redirects to {target} (redirects are not followed)"
    else:
        message = f"{what}: HTTP {status}" + (f": {detail}" if detail else "")
    fields: Dict[str, Any] = {"status": status, "detail": detail, "code": code, "body": text_body}
    if _is_challenge(head, body):
        return ChallengeError(
            f"{what}: the upstream answered with a Cloudflare challenge page (HTTP {status}), "
            "a browser check that this client cannot pass", **fields,
        )
    if status == 429:
        retry_after = _retry_after(head.get("retry-after"))
        if retry_after is None:
            retry_after = _clears_in(body)
        if retry_after is not None:
            message += f" (retry after {retry_after:g} s)"
        return RateLimitError(message, retry_after=retry_after, **fields)
    if status in (401, 403) or code == "token_expired":
        return TokenExpiredError(message, **fields)
    return HTTPStatusError(message, **fields)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _redirect_target(location: Optional[str], redact: Sequence[str]) -> Optional[str]:
    """Where a redirect's ``Location`` points, as the error says it: without userinfo,
    query or fragment, which may hold secrets (a URL's password, a token in the query)."""
    try:
        parts = urllib.parse.urlsplit((location or "").strip())
    except ValueError:  # a malformed authority ("http://[x"): nothing worth showing
        return None
    authority = parts.netloc.rpartition("@")[2]
    shown = urllib.parse.urlunsplit((parts.scheme, authority, parts.path, "", ""))
    return _excerpt(_redact(shown, redact), 200) or None


_CHALLENGE_MARKERS = (b"_cf_chl_opt", b"challenge-platform", b"cf-please-wait", b"<title>Just a moment")


def _is_challenge(head: Response, body: bytes) -> bool:
    """Whether the answer is a Cloudflare challenge page."""
    if (head.get("cf-mitigated") or "").strip().lower() == "challenge":
        return True
    return any(marker in body for marker in _CHALLENGE_MARKERS)


def _error_detail(head: Response, body: bytes, redact: Sequence[str] = ()) -> Tuple[str, Optional[str]]:
    """The server's message in an error answer, and its code; secrets redacted before
    anything is cut."""
    text = body.decode("utf-8", "replace")
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        payload = None
    message, code, limit = text, None, 200
    if isinstance(payload, dict):
        key = next((key for key in ("detail", "error", "message") if payload.get(key)), None)
        if key is not None:
            (message, code), limit = _detail_and_code(payload[key]), 500
    elif "html" in (head.get("content-type") or "").lower() or text.lstrip().startswith("<"):
        message = _html_title(text) or text
    return _excerpt(_redact(message, redact), limit), code


def _html_title(page: str) -> Optional[str]:
    """The first ``<title>``'s text: found with finds, linear in the page, where a regular
    expression over a page of many unclosed titles backtracks quadratically."""
    lower = page.lower()
    start = lower.find("<title")
    while start >= 0 and lower[start + 6:start + 7] not in (">", " ", "\t", "\n", "\r", "/"):
        start = lower.find("<title", start + 6)  # <titlefoo> is another tag
    if start < 0:
        return None
    opened = lower.find(">", start)
    closed = lower.find("</title>", opened)
    if opened < 0 or closed < 0:
        return None
    return page[opened + 1:closed]


_MAX_RETRY_AFTER = 86400.0  # a day: a longer Retry-After is taken as this


def _clears_in(body: bytes) -> Optional[float]:
    """The seconds a 429's JSON body says the limit clears in (``"clears_in"`` in its
    ``detail`` or ``error``, as ChatGPT's usage caps say it), bounded; None if it does not."""
    try:
        payload = json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    for key in ("detail", "error"):
        error = payload.get(key)
        seconds = error.get("clears_in") if isinstance(error, dict) else None
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds < math.inf:
            return min(float(seconds), _MAX_RETRY_AFTER)
    return None


def _retry_after(value: Optional[str]) -> Optional[float]:
    """A Retry-After header in seconds (delay-seconds or an HTTP date), bounded; None if
    it is neither."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # only ASCII digits count (RFC 9110)
        return min(float(value[:12]) if len(value) <= 12 else _MAX_RETRY_AFTER, _MAX_RETRY_AFTER)
    if len(value) > 64 or not value.isascii():
        return None
    import email.utils  # here: a 429 with an HTTP date is rare, the import is not free

    try:
        when = email.utils.parsedate_to_datetime(value)
        seconds = when.timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


# ---------------------------------------------------------------------------------------
# Session: the shared-token login, the access token
# ---------------------------------------------------------------------------------------


def get_random_string(length: int = 10) -> str:
    """`length` random lowercase letters and digits, drawn with `secrets`."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _session_password() -> str:
    """A password the upstream accepts: 10 characters with both letters and digits."""
    while True:
        password = get_random_string(10)
        if any(c.isdigit() for c in password) and any(c.isalpha() for c in password):
            return password


def _choose_token_id(payload: Any) -> str:
    """A shared account from ``/api/loads``, one of the least loaded."""
    loads = payload.get("loads") if isinstance(payload, dict) else None
    if not isinstance(loads, list):
        raise AuthenticationError("GET /api/loads: malformed answer (no 'loads' list)")
    candidates: Dict[str, int] = {}
    for entry in loads:
        if isinstance(entry, dict) and isinstance(entry.get("token_id"), str) and entry["token_id"]:
            count = entry.get("count")
            candidates[entry["token_id"]] = (
                count if isinstance(count, int) and not isinstance(count, bool) else 0
            )
    if not candidates:
        raise AuthenticationError("the upstream offers no shared token (empty /api/loads)")
    lowest = min(candidates.values())
    return secrets.choice(sorted(t for t, count in candidates.items() if count == lowest))


_ISO_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
    r"(?:[Zz]|([+-])([0-9]{2}):?([0-9]{2}))?"
)
_EXPIRY_MARGIN_SECONDS = 60.0


def _expiry_time(value: Any) -> Optional[float]:
    """The moment an ISO 8601 time such as a session's ``expires``
    (``2089-08-08T23:59:59.999Z``; UTC if it names no offset) stands for, in seconds since
    the epoch; None if `value` is not such a time."""
    match = _ISO_TIME.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    try:
        moment = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.timezone.utc)
    except ValueError:  # no such day or time
        return None
    seconds = moment.timestamp() + float(match[7] or 0)
    if match[8]:
        offset = int(match[9]) * 3600 + int(match[10]) * 60
        seconds -= offset if match[8] == "+" else -offset
    return seconds


def _over(expires: Optional[float], now: float) -> bool:
    """Whether a session that ends at `expires` (None: never, as far as we know) has
    ended by `now`, or ends within a minute of it (its token may not last a call)."""
    return expires is not None and now >= expires - _EXPIRY_MARGIN_SECONDS


class _Session:
    """What one upstream has given us: the cookies and the access token, and when the
    login's session ends if the upstream said (``expires``); or, for a token the caller
    gave (``access_token``), that token and no login."""

    def __init__(self, access_token: Optional[str] = None) -> None:
        self.cookie_jar: http.cookiejar.CookieJar = _CookieJar()
        self.access_token = access_token
        self.expires: Optional[float] = None  # seconds since the epoch
        self.given = access_token is not None
        self.kept_token: Optional[str] = None  # the token last read from or written to the session file (None after a login)
        self._login: Optional["asyncio.Task[str]"] = None
        self._login_timeouts = Timeouts()  # those the login runs by

    def secrets(self) -> List[str]:
        """Values that must never be shown: the access token and the cookies."""
        values = [cookie.value for cookie in self.cookie_jar if cookie.value]
        return [self.access_token, *values] if self.access_token else values

    async def token(self, client: _Client) -> str:
        """The access token, logging in first if there is none; concurrent callers share
        one login. A login runs by the connect and read timeouts of the call that began
        it: a call that joined it, and whose own timeout of the kind it ran out of is
        longer, logs in again by its own."""
        if self.access_token:
            if not self.expired:
                return self.access_token
            _log.info("the session has expired, or is about to: logging in again")
            self.invalidate(self.access_token)
        loop = asyncio.get_running_loop()
        retried = False
        while True:
            task, timeouts = self._login, self._login_timeouts
            joined = task is not None and not task.done() and task.get_loop() is loop
            if task is None or not joined:
                shared = client.for_shared_work()
                task = self._login = loop.create_task(self._log_in(shared))
                task.add_done_callback(_consume_outcome)
                timeouts = self._login_timeouts = shared.clock.timeouts
            try:
                return await client.clock.wait(asyncio.shield(task), "total")
            except RequestTimeout as exc:  # this call's total, or the login's connect or read
                if not joined or retried or exc.phase not in ("connect", "read"):
                    raise
                ours, theirs = getattr(client.clock.timeouts, exc.phase), getattr(timeouts, exc.phase)
                if theirs is None or (ours is not None and ours <= theirs):
                    raise
                _log.info("the login another call began ran out of its %s timeout: logging in by this call's", exc.phase)
                retried = True

    @property
    def expired(self) -> bool:
        """Whether the login's session has ended, or ends within a minute (`_over`)."""
        return _over(self.expires, time.time())

    def invalidate(self, token: str) -> None:
        """Forget `token` and the cookies, unless a newer login replaced them already."""
        if self.access_token == token and not self.given:
            self.access_token = self.expires = None
            self.cookie_jar.clear()

    async def _log_in(self, client: _Client) -> str:
        loads = await client.json("GET", f"/api/loads?t={int(time.time())}", what="GET /api/loads")
        token_id = _choose_token_id(loads)
        form = urllib.parse.urlencode(
            {"token_key": token_id, "session_password": _session_password()}
        ).encode("ascii")
        response = await client.request(
            "POST", "/auth/login", body=form, cookie_jar=self.cookie_jar,
            headers=[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Accept", "application/json, text/plain, */*"),
            ],
        )
        try:
            answer = await client.answer_body(response, "POST /auth/login")
            _check_login(response.head, answer, redact=[*self.secrets(), *client.secrets])
            response.release()
        finally:
            response.close()
        session = await client.json(
            "GET", "/api/auth/session", what="GET /api/auth/session",
            cookie_jar=self.cookie_jar, redact=self.secrets(),
        )
        token = session.get("accessToken") if isinstance(session, dict) else None
        if isinstance(token, str) and token and _TOKEN_TEXT.fullmatch(token) is None:
            raise AuthenticationError(
                "the upstream gave an access token that cannot be sent in a header "
                "(not printable ASCII); nothing was kept"
            )
        if not isinstance(token, str) or not token:
            has_cookie = any(cookie.name == "credential" for cookie in self.cookie_jar)
            raise AuthenticationError(
                "the upstream gave no access token after login (/api/auth/session is empty"
                + ("" if has_cookie else "; the login set no credential cookie") + ")"
            )
        self.access_token, self.expires = token, _expiry_time(session.get("expires"))
        # Not in the session file yet, even if the token is the one it had: a shared
        # account's login gives the account's token, with a new expiry and cookies.
        self.kept_token = None
        return token


def _consume_outcome(task: "asyncio.Task[str]") -> None:
    # The login is shared: if every waiter was cancelled, nobody else reads its error.
    if not task.cancelled():
        task.exception()


def _check_login(head: Response, body: bytes, *, redact: Sequence[str]) -> None:
    if head.status == 429 or head.status >= 500:
        raise _status_error(head, body, what="POST /auth/login", redact=redact)
    try:
        payload = json.loads(body.decode("utf-8", "replace")) if body.strip() else None
    except (ValueError, RecursionError):
        payload = None
    code = payload.get("code") if isinstance(payload, dict) else None
    if head.status >= 400 or (code is not None and code != 0):
        detail, _ = _error_detail(head, body, redact)
        raise AuthenticationError(
            f"the upstream refused the login (HTTP {head.status}" + (f": {detail})" if detail else ")")
        )


class _KeptFile:
    """What a command keeps between processes: a JSON object of entries by key, in a
    file readable by its owner alone (directory 0700, file 0600, replaced atomically
    under a lock beside it, `.NAME.lock`). The `_MOST` most recently put entries stay."""

    _MOST = 50
    _LOCK_WAIT = 2.0  # seconds

    def __init__(self, path: str, what: str = "session") -> None:
        self.path = path
        self.what = what  # for the log: "the session was not kept", "the session file is replaced"
        self._stem = os.path.splitext(os.path.basename(path))[0]

    def get(self, key: str) -> Any:
        """The entry kept for `key`, or None."""
        return self._read().get(key)

    def put(self, key: str, entry: Any) -> None:
        """Keep `entry` for `key`, as the most recent."""

        def put(data: Dict[str, Any]) -> Dict[str, Any]:
            data.pop(key, None)
            data[key] = entry
            return dict(list(data.items())[-self._MOST:])

        self._update(put)

    def _update(self, change: Callable[[Dict[str, Any]], Optional[Dict[str, Any]]]) -> None:
        """Read the file, `change` what it holds, and replace it with what `change`
        returns (None: leave it), holding the lock beside it throughout, so that two
        commands keeping an entry at the same moment keep both."""
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        except OSError as exc:
            _log.info("the %s was not kept in %s: %s", self.what, self.path, exc.strerror or exc)
            return
        lock = self._lock(os.path.join(directory, f".{self._stem}.lock"))
        try:
            data = change(self._read())
            if data is not None:
                self._write(data)
        finally:
            if lock is not None:
                os.close(lock)  # and the lock with it

    def _lock(self, path: str) -> Optional[int]:
        """A descriptor of the lock file at `path`, locked for us alone (closing it
        unlocks); None where there is no such lock (not POSIX, a file system without
        locks, something other than a file in its place) or another process has held it
        for `_LOCK_WAIT` seconds: then the file is replaced unlocked, as before there was
        a lock."""
        try:
            import fcntl  # here: POSIX only, and only a command that keeps something needs it
        except ImportError:
            return None
        try:
            lock = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            _log.info("the %s file is replaced without its lock: %s", self.what, exc.strerror or exc)
            return None
        reason = "it is not a regular file"
        deadline = time.monotonic() + self._LOCK_WAIT
        while stat.S_ISREG(os.fstat(lock).st_mode):
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lock
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    reason = f"another process has held it for {self._LOCK_WAIT:g} s"
                    break
                time.sleep(0.005)  # the holder reads and writes a small file: a few ms
            except OSError as exc:
                reason = exc.strerror or str(exc)
                break
        os.close(lock)
        _log.info("the %s file is replaced without its lock: %s", self.what, reason)
        return None

    def _read(self) -> Dict[str, Any]:
        try:
            # Not blocking: a FIFO (or a device) in the file's place must not hang the command.
            with open(os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), encoding="utf-8") as file:
                info = os.fstat(file.fileno())
                if not stat.S_ISREG(info.st_mode):
                    return {}
                if hasattr(os, "getuid"):  # POSIX: the owner's alone, as `_write` makes it
                    if info.st_uid != os.getuid():
                        return {}  # someone else's: not a session of this user's
                    if info.st_mode & 0o077:
                        os.fchmod(file.fileno(), 0o600)  # copied or restored with looser modes
                data = json.load(file)
        except (OSError, ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: Dict[str, Any]) -> None:
        import tempfile  # here: only a command that logged in needs it

        try:
            fd, temporary = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=f".{self._stem}-")  # mode 0600
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    json.dump(data, file)
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as exc:
            _log.info("the %s was not kept in %s: %s", self.what, self.path, exc.strerror or exc)


class _SessionFile(_KeptFile):
    """Sessions kept between processes: the access token and the cookies of each
    upstream (the 50 most recently saved). Never a proxy's password: a proxy is known
    by its address."""

    @classmethod
    def default(cls) -> Optional["_SessionFile"]:
        """The user's session file; None where there is no home directory to keep it in."""
        base = _xdg_directory("XDG_CACHE_HOME", ".cache")
        if base is None:
            _log.info("no session is kept: there is no home directory, nor $XDG_CACHE_HOME")
            return None
        return cls(os.path.join(base, "fakegpt", "sessions.json"))

    def load(self, key: str, session: _Session) -> None:
        """Give `session` what the file keeps for `key`, if it is still good."""
        entry = self.get(key)
        if not isinstance(entry, dict):
            return
        token = entry.get("access_token")
        if not isinstance(token, str) or _TOKEN_TEXT.fullmatch(token) is None:
            return
        listed = entry.get("cookies", [])
        expires = entry.get("expires")  # None: the upstream did not say (or an older file)
        if not isinstance(listed, list) or not (
            expires is None or (type(expires) in (int, float) and math.isfinite(expires))
        ):
            return  # not a file this code wrote (or edited since): ignore the entry
        cookies = [cookie for cookie in map(_kept_cookie, listed) if cookie is not None]
        if len(cookies) != len(listed):
            return  # likewise
        now = time.time()
        if _over(expires, now):
            return  # a new login, rather than a request the upstream refuses
        for cookie in cookies:
            if cookie.expires is None or cookie.expires > now:
                session.cookie_jar.set_cookie(cookie)
        session.access_token, session.expires = token, expires

    def save(self, key: str, session: _Session) -> None:
        cookies = [
            {"name": c.name, "value": c.value, "domain": c.domain, "domain_specified": c.domain_specified,
             "path": c.path, "secure": c.secure, "expires": c.expires}
            for c in session.cookie_jar
        ]
        self.put(key, {"access_token": session.access_token, "expires": session.expires, "cookies": cookies,
                       "saved": time.time()})

    def drop(self, key: str, token: str) -> None:
        """Forget `key`'s session if it still holds `token` (the upstream refused it)."""

        def take_out(data: Dict[str, Any]) -> Optional[Dict[str, Any]]:
            entry = data.get(key)
            if not (isinstance(entry, dict) and entry.get("access_token") == token):
                return None  # a newer login is kept there already, or nothing
            del data[key]
            return data

        self._update(take_out)


def _xdg_directory(variable: str, default: str) -> Optional[str]:
    """The base directory an XDG variable names, or `default` under the home directory
    when it is unset or relative (the specification says to ignore relative paths); None
    without a home directory (no $HOME, no account entry), rather than a path relative to
    wherever the command runs."""
    base = os.environ.get(variable, "")
    if os.path.isabs(base):
        return base
    home = os.path.expanduser("~")
    return os.path.join(home, default) if os.path.isabs(home) else None


def _kept_cookie(fields: Any) -> Optional[http.cookiejar.Cookie]:
    """The cookie a session file keeps as `fields`, or None if they are not what
    `_SessionFile.save` writes."""
    if not isinstance(fields, dict):
        return None
    name, value, domain, path = (fields.get(k) for k in ("name", "value", "domain", "path"))
    specified, secure, expires = (fields.get(k) for k in ("domain_specified", "secure", "expires"))
    if not (
        isinstance(name, str) and isinstance(domain, str) and isinstance(path, str)
        and isinstance(value, (str, type(None))) and isinstance(specified, bool) and isinstance(secure, bool)
        and (expires is None or (type(expires) in (int, float) and 0 <= expires < 2**53))
    ):
        return None
    expires = None if expires is None else int(expires)
    return http.cookiejar.Cookie(
        0, name, value, None, False, domain, specified, domain.startswith("."), path, True,
        secure, expires, expires is None, None, None, {},
    )


# ---------------------------------------------------------------------------------------
# Provider API: gpt4free's FakeGpt, the event stream, sync wrappers
# ---------------------------------------------------------------------------------------


def format_prompt(messages: Messages, add_special_tokens: bool = False) -> str:
    """gpt4free's prompt: one message as is, else ``Role: content`` lines and ``Assistant:``.

    A content is a string, or a list of OpenAI-style text parts
    (``{"type": "text", "text": ...}``), whose texts are joined as gpt4free joins them;
    anything else (an image, say: the upstream takes text only) is a `UsageError`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    contents = [_content_text(message, index) for index, message in enumerate(messages)]
    if not add_special_tokens and len(messages) <= 1:
        return contents[0]
    formatted = "\n".join(
        f"{message['role'].capitalize()}: {content}" for message, content in zip(messages, contents)
    )
    return f"{formatted}\nAssistant:"


def _content_text(message: Any, index: int) -> str:
    """A message's content as text (see `format_prompt`)."""
    if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
        raise UsageError(f"messages[{index}] must be a dict with string 'role' and 'content'")
    content = message["content"]
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise UsageError(
            f"messages[{index}]['content'] must be a string or a list of text parts, not {type(content).__name__}"
        )
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            continue
        where = f"messages[{index}]['content'][{number}]"
        if kind == "text":
            raise UsageError(f"{where} is a text part whose 'text' is not a string")
        what = f"a part of type {_cut(kind, 40)!r}" if isinstance(kind, str) else "a part that is not a text part"
        raise UsageError(
            f"{where} is {what}: only text parts ({{'type': 'text', 'text': ...}}) can be sent, "
            "the upstream takes text only"
        )
    return "".join(texts)


def _unicode(text: str, what: str) -> str:
    """`text`, if it is Unicode text: a lone surrogate (what Python makes of bytes that
    were not text in the locale's encoding, say) is a `UsageError` before any request."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(
            f"{what} is not Unicode text: a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}"
        ) from None
    return text


def _upstream_model(model: Optional[str]) -> str:
    if model is not None and not isinstance(model, str):
        raise UsageError(f"model must be a string, not {type(model).__name__}")
    if model is None or model in _DEFAULT_MODEL_ALIASES:
        return DEFAULT_MODEL
    return _unicode(model, "the model")


# The keywords a call understands, and those gpt4free passes to every provider, which are
# accepted and ignored; another keyword close to one of these is taken for a typo.
KEYWORDS = frozenset({
    "url", "proxy", "timeout", "ssl", "trust_env", "limits", "conversation_id",
    "parent_message_id", "history_and_training_disabled", "profile", "access_token",
    "chatgpt_account_id", "auto_continue", "return_conversation", "conversation", "retries",
    "session_cache",
})
_GPT4FREE_KEYWORDS = frozenset({
    "stream", "stream_timeout", "web_search", "media", "images", "image", "image_name",
    "tools", "tool_choice", "parallel_tool_calls", "tool_emulation", "tool_calls", "api_key",
    "api_base", "user", "download_media", "image_provider", "ignore_stream", "max_tokens",
    "response_format", "stop", "temperature", "top_p", "presence_penalty",
    "frequency_penalty", "seed", "n", "raw", "action", "reasoning_effort", "headers",
    "cookies", "prompt", "extra_body", "model", "messages", "provider", "aspect_ratio",
    "conversation_style", "tone", "jailbreak", "auth", "context", "chat_id", "language",
})


def _check_keywords(kwargs: Dict[str, Any]) -> None:
    """A keyword close to a known one is a typo: a `UsageError` that says which."""
    import difflib  # here: only a call with a keyword we do not know needs it

    known = KEYWORDS | _GPT4FREE_KEYWORDS
    folded = {k.lower(): k for k in KEYWORDS}
    for name in kwargs:
        if name in known:
            continue
        close = folded.get(str(name).lower()) or next(
            iter(difflib.get_close_matches(str(name), sorted(KEYWORDS), n=1, cutoff=0.75)), None
        )
        if close is not None:
            raise UsageError(f"unknown keyword {name!r}: did you mean {close!r}?")


def _environment_url() -> str:
    """FAKEGPT_URL if set (a bad one named as where it came from), else the default URL."""
    url = os.environ.get("FAKEGPT_URL")
    if not url:
        return DEFAULT_URL
    _parse_url(url, what="FAKEGPT_URL")
    return url


def _environment_token() -> Optional[str]:
    """FAKEGPT_ACCESS_TOKEN if set (a bad one named as where it came from), else None."""
    token = os.environ.get("FAKEGPT_ACCESS_TOKEN")
    if not token:
        return None
    if _TOKEN_TEXT.fullmatch(token) is None:
        raise UsageError("FAKEGPT_ACCESS_TOKEN must be printable ASCII without spaces")
    return token


def _options(
    provider: type, model: Optional[str], proxy: Optional[str], kwargs: Dict[str, Any]
) -> _Options:
    """The call's options, checked: anything wrong is a `UsageError` before any I/O.

    A call with the arguments of an earlier one (and the same environment) gets the
    options checked then: most calls pass what the last passed. Not a call continuing a
    conversation object, which may have changed since."""
    url = kwargs.get("url")
    if url is None:
        url = provider.url  # type: ignore[attr-defined]
        if url == DEFAULT_URL:  # neither the call nor a subclass chose one
            url = _environment_url()
    token = kwargs.get("access_token")
    if token is None:
        token = _environment_token()
    if "media" in kwargs or "images" in kwargs or "image" in kwargs:
        _refuse_media(kwargs)  # before the look-up: the key has these keywords' names only
    if "conversation" in kwargs:
        return _checked_options(url, token, model, proxy, kwargs)
    try:
        # Typed: 1 and True are equal keys, but not equally good values. Of a keyword the
        # options ignore (gpt4free's, say), only the name counts: its value is not kept.
        key = (url, token, model, proxy, *[
            (name, type(value), value) if name in KEYWORDS else name for name, value in kwargs.items()
        ])
        known = _known_options.get(key)
    except TypeError:  # a value that cannot be a key: checked each time
        return _checked_options(url, token, model, proxy, kwargs)
    if known is None:
        known = _memo_put(_known_options, key, _checked_options(url, token, model, proxy, kwargs))
    return known


def _refuse_media(kwargs: Dict[str, Any]) -> None:
    """gpt4free's ``media=`` (``images=``, ``image=``) with an image in it is a
    `UsageError`, as an image part in a message is: sent without it, a question about the
    image would be answered as if there were none. None or an empty list is no image."""
    for name in ("media", "images", "image"):
        value = kwargs.get(name)
        if value is None or (isinstance(value, (list, tuple, dict, str, bytes)) and not value):
            continue
        raise UsageError(f"{name}= holds an image, which cannot be sent: the upstream takes text only")


def _flag(kwargs: Dict[str, Any], name: str, default: bool = False) -> bool:
    """A keyword that says yes or no: True or False (None, or not given: `default`).
    Anything else is an error rather than its truth: ``session_cache="false"`` would
    otherwise turn it on."""
    value = kwargs.get(name)
    if value is None:
        return default
    if value is not True and value is not False:
        raise UsageError(f"{name} must be True or False (given: {type(value).__name__})")
    return value


def _checked_options(
    url: Any, token: Any, model: Optional[str], proxy: Optional[str], kwargs: Dict[str, Any]
) -> _Options:
    """`_options`, given the URL and the token (the call's, or the environment's)."""
    if not kwargs.keys() <= KEYWORDS:
        _check_keywords(kwargs)
    endpoint, base_path = _parse_url(url)  # a bad URL fails here, before any I/O
    context = kwargs.get("ssl")
    if context is not None and not isinstance(context, ssl.SSLContext):
        raise UsageError("ssl must be an ssl.SSLContext")
    limits = kwargs.get("limits")
    limits = _checked_limits(_DEFAULT_LIMITS if limits is None else limits)  # (0 or "" is not None)
    continued = _conversation_keyword(kwargs.get("conversation"))
    for name in ("conversation_id", "parent_message_id", "chatgpt_account_id"):
        if kwargs.get(name) is not None and not isinstance(kwargs[name], str):
            raise UsageError(f"{name} must be a string")
    profile = kwargs.get("profile", "shared")
    if profile not in PROFILES:
        raise UsageError(f"profile must be one of {', '.join(map(repr, PROFILES))}, not {profile!r}")
    if token is not None and not (isinstance(token, str) and _TOKEN_TEXT.fullmatch(token)):
        raise UsageError("access_token must be a non-empty string of printable ASCII without spaces")
    if profile == "backend-api" and token is None:
        raise UsageError(
            "the backend-api profile needs an access token: pass access_token=..., or set "
            "FAKEGPT_ACCESS_TOKEN (command line: --access-token-file FILE)"
        )
    account_id = kwargs.get("chatgpt_account_id")
    if account_id is not None and not _TOKEN_TEXT.fullmatch(account_id):
        raise UsageError("chatgpt_account_id must be printable ASCII without spaces")
    retries = kwargs.get("retries", 0)
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 100:
        raise UsageError(f"retries must be a whole number from 0 to 100, not {retries!r}")
    _flag(kwargs, "return_conversation")  # (read where the reply is returned)
    return _Options(
        endpoint=endpoint,
        base_path=base_path,
        model=_upstream_model(model),
        proxy=_Proxy(proxy) if proxy else None,
        trust_env=_flag(kwargs, "trust_env"),
        timeouts=Timeouts.coerce(kwargs.get("timeout")),
        limits=limits,
        ssl_context=context,
        conversation_id=kwargs.get("conversation_id") or continued[0],
        parent_message_id=kwargs.get("parent_message_id") or continued[1],
        history_and_training_disabled=_flag(kwargs, "history_and_training_disabled", True),
        profile=profile,
        access_token=None if token is None else _Secret(token),
        account_id=account_id,
        auto_continue=_flag(kwargs, "auto_continue"),
        retries=retries,
        session_cache=_flag(kwargs, "session_cache"),
    )


_known_options: Dict[Any, _Options] = {}


def _conversation_keyword(conversation: Any) -> Tuple[Optional[str], Optional[str]]:
    """(conversation id, parent message id) from gpt4free's ``conversation=``: the
    `JsonConversation` a reply returned, or its dict."""
    if conversation is None:
        return None, None
    data = conversation if isinstance(conversation, dict) else getattr(conversation, "__dict__", None)
    if not isinstance(data, dict):
        raise UsageError("conversation must be the JsonConversation a reply returned, or its dict")
    conversation_id = data.get("conversation_id")
    parent = data.get("parent_message_id") or data.get("message_id")
    if not isinstance(conversation_id, str) or not isinstance(parent, str):
        raise UsageError("conversation must carry a conversation_id and a message_id (strings)")
    return conversation_id, parent


_MAX_CONTINUATIONS = 5  # auto_continue: at most this many "continue" requests a reply


class ChatStream:
    """The reply as `ChatEvent`s: an async iterator and an async context manager.

    Leaving the ``async with`` block, or ``aclose()``, closes the connection at once if
    the reply was not read to the end; a reply read to its end leaves its connection
    open for the next call. After the stream, ``text``,
    ``conversation_id``, ``message_id`` and ``finish_reason`` describe the reply; pass the
    first and the last two back (``conversation_id=``, ``parent_message_id=``) to continue.
    """

    def __init__(
        self, provider: "type[FakeGpt]", model: Optional[str], messages: Messages,
        proxy: Optional[str] = None, /, *, sessions: Dict[Any, _Session], pools: _Pools, **kwargs: Any,
    ) -> None:
        self.prompt = _unicode(format_prompt(messages), "the prompt")
        self._provider = provider
        self._sessions = sessions
        self._pools = pools
        self._options = _options(provider, model, proxy, kwargs)
        self._decoder = ConversationDecoder()
        # Events travel in batches, one per read of the socket: a long reply has
        # thousands of events, and a hop through an async generator per event would
        # cost more than decoding them. The batches start with the first read, which
        # chooses what they are: lists of ChatEvents, or (for `texts`) the new text.
        self._batches: Optional[AsyncGenerator[Any, None]] = None
        self._batch: List[Any] = []
        self._taken = 0
        self._text_only = False
        self._closed = False
        self._events: Optional[_Batches] = None  # the batches of events, read as events
        # The session file, if this call keeps its login between processes (never for a
        # TLS context of the caller's: it cannot be told apart in another process).
        kept = self._options.session_cache and self._options.ssl_context is None
        self._kept = _SessionFile.default() if kept else None

    @property
    def text(self) -> str:
        """All text delivered so far (several visible messages: each after a blank line)."""
        return self._decoder.text

    @property
    def conversation_id(self) -> Optional[str]:
        return self._decoder.conversation_id

    @property
    def message_id(self) -> Optional[str]:
        return self._decoder.message_id

    @property
    def finish_reason(self) -> Optional[str]:
        """``finish_details.type`` ("stop", "max_tokens"), or "stop" when the reply
        finished without one."""
        return self._decoder.finish_reason

    @property
    def title(self) -> Optional[str]:
        """The conversation's title, once the upstream has generated one (the last wins)."""
        return self._decoder.title

    @property
    def model(self) -> Optional[str]:
        """The model that answers, where the stream names it."""
        return self._decoder.model

    @property
    def reasoning(self) -> str:
        """The model's reasoning delivered so far (never part of ``text``)."""
        return self._decoder.reasoning

    def __aiter__(self) -> "ChatStream":
        return self

    async def __anext__(self) -> ChatEvent:
        if self._taken == len(self._batch):
            if self._closed:
                raise _closed_stream_error()
            if self._events is None:
                self._events = _Batches(self, self._start(text_only=False))
            self._batch, self._taken = await self._events.next_batch(), 0
        event: ChatEvent = self._batch[self._taken]
        self._taken += 1
        return event

    def texts(self) -> AsyncGenerator[str, None]:
        """The reply as text pieces instead of events: each piece is all the new text
        that arrived in one read. A stream is read one way: events or texts."""
        return _Batches(self, self._start(text_only=True))

    async def aclose(self) -> None:
        """Close the reply and its connection now, read to the end or not (the text
        pieces of `texts` too, even if a loop over them stopped early). A closed stream
        cannot be read: it raises `UsageError` rather than end as if the reply had."""
        self._closed = True
        self._batch, self._taken = [], 0
        if self._batches is not None:
            await self._batches.aclose()

    @property
    def closed(self) -> bool:
        """Its ``async with`` block ended, or ``aclose()`` was called: it cannot be read."""
        return self._closed

    def _start(self, *, text_only: bool) -> AsyncGenerator[Any, None]:
        if self._closed:
            raise _closed_stream_error()
        if self._batches is None:
            self._batches = self._run(text_only=text_only)
            self._text_only = text_only
        elif self._text_only != text_only or text_only:
            raise UsageError(
                "this ChatStream is already being read"
                + (" as text pieces (texts())" if self._text_only else " as events")
                + ": read a stream one way"
            )
        return self._batches

    async def __aenter__(self) -> "ChatStream":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def __enter__(self) -> NoReturn:
        raise UsageError("a ChatStream is an asynchronous context manager: use async with FakeGpt.stream(...)")

    def __exit__(self, *exc_info: Any) -> None:  # pragma: no cover - __enter__ always raises
        pass

    async def _run(self, *, text_only: bool) -> AsyncGenerator[Any, None]:
        """The reply, as batches of events or (`text_only`) text pieces: one request, or
        more when a try fails before any text or the reply is continued.

        One generator for all of it, not one per concern: each level of async generators
        costs every batch a hop, and every call making and closing one."""
        options = self._options
        client = _Client(options, pool=await self._pools.get())
        if options.access_token is not None:
            session = _Session(options.access_token)
        else:
            # A new jar costs more than the look-up: made only when there is none.
            key = client.session_key
            session = self._sessions.get(key) or self._sessions.setdefault(key, _Session())
            if self._kept is not None:
                if not session.access_token:
                    self._kept.load(self._kept_key(client), session)
                    session.kept_token = session.access_token  # written again only when it changes
        continues: Optional[ConversationDecoder] = None
        for _ in range(1 + (_MAX_CONTINUATIONS if options.auto_continue else 0)):
            attempt = 0
            logged_in_again = False
            while True:
                token = await session.token(client)
                self._note_token(client, session, token)
                batches = self._converse(client, session, token, text_only, continues)
                try:
                    try:
                        async for batch in batches:
                            yield batch
                    finally:
                        await batches.aclose()  # at once, not left to the garbage collector with its connection
                    break
                except FakeGptError as exc:
                    if isinstance(exc, TokenExpiredError) and not logged_in_again and self._log_in_again(client, session, token):
                        logged_in_again = True
                        continue
                    delay = self._retry_delay(client, exc, attempt)
                    if delay is None:
                        raise
                    _log.info("%s: trying again in %.1f s (retry %d of %d)", exc, delay, attempt + 1, options.retries)
                await asyncio.sleep(delay)
                attempt += 1
                logged_in_again = False
            decoder = self._decoder
            if decoder.finish_reason != "max_tokens" or not (decoder.conversation_id and decoder.message_id):
                return
            _log.info("the reply stopped at max_tokens: asking the upstream to continue it")
            continues = decoder

    def _kept_key(self, client: _Client) -> str:
        proxy = client.proxy
        return f"{self._options.profile} {client.base_url} via {proxy.endpoint.origin if proxy else 'direct'}"

    def _note_token(self, client: _Client, session: _Session, token: str) -> None:
        """The provider class, and the session file if kept, learn a login's token."""
        if not session.given:
            self._provider._access_token, self._provider._cookie_jar = token, session.cookie_jar
            if self._kept is not None and token != session.kept_token:
                # Once for the session's calls: concurrent ones share its login.
                self._kept.save(self._kept_key(client), session)
                session.kept_token = token

    def _log_in_again(self, client: _Client, session: _Session, token: str) -> bool:
        """After the upstream refused `token` before any text: whether to log in again
        and try once more (a shared-token session, not a token the caller gave)."""
        if session.given or self._decoder.has_text:
            return False
        _log.debug("the access token was refused: logging in again")
        session.invalidate(token)
        if self._kept is not None:
            self._kept.drop(self._kept_key(client), token)
        if self._provider._access_token == token:
            self._provider._access_token = None
        return True

    def _retry_delay(self, client: _Client, error: FakeGptError, attempt: int) -> Optional[float]:
        """How long to wait before trying again after `error` (``retries`` times at most,
        after a 429, a 5xx or a failed connection, while no text has arrived; never once
        text has), or None to give up."""
        if attempt == self._options.retries or self._decoder.has_text:
            return None
        delay = _retry_delay(error, attempt)
        left = client.clock.time_left()
        if delay is None or (left is not None and delay >= left):
            return None  # not worth it, or the total timeout would run out while waiting
        return delay

    async def _converse(
        self, client: _Client, session: _Session, token: str, text_only: bool,
        continues: Optional[ConversationDecoder],
    ) -> AsyncGenerator[Any, None]:
        """One request and its reply, as `_run` gives it."""
        options = self._options
        path = "/backend-api/conversation" if options.profile == "backend-api" else "/api/conversation"
        body = _request_body(self.prompt, options, continues)
        headers = [
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            ("Accept-Encoding", "identity"),
            ("Authorization" if options.profile == "backend-api" else "X-Authorization", f"Bearer {token}"),
        ]
        if options.account_id:
            headers.append(("ChatGPT-Account-ID", options.account_id))
        response = await client.request("POST", path, body=body, cookie_jar=session.cookie_jar, headers=headers)
        try:
            first = b""  # the body's start, if it was read to tell what the body is
            if not response.is_event_stream:
                first = await self._unlabelled_stream_start(
                    response, [*session.secrets(), *client.secrets], f"POST {path}"
                )
            decoder = self._decoder = ConversationDecoder(continues=continues)
            reply = _ReplyDecoder(decoder, options.limits, text_only=text_only)
            after_reply: Optional[float] = None  # when waiting for what follows a whole reply ends
            try:
                while not decoder.done:
                    if decoder.complete:
                        # What follows a whole reply is waited for a little, in all: a server
                        # that neither sends [DONE] nor ends the body (or trickles pings) is
                        # not waited out.
                        now = time.monotonic()
                        if after_reply is None:
                            after_reply = now + _AFTER_REPLY_SECONDS
                        client.clock.limit_reads(max(after_reply - now, 0.0))
                    chunk: Optional[bytes] = first or await response.next_chunk()
                    first = b""
                    if chunk is None:
                        break
                    batch: List[Any] = []
                    try:
                        reply.feed(chunk, batch)
                        # Let it go before the next one is read: two alive at once take
                        # twice the memory a read needs, which the allocator gives back
                        # and takes again, a page at a time, every few reads.
                        chunk = None
                    except FakeGptError as exc:
                        _scrub(exc, [*session.secrets(), *client.secrets])
                        if batch:  # what arrived before the error is delivered first
                            yield "".join(batch) if text_only else batch
                        raise
                    if batch:
                        yield "".join(batch) if text_only else batch
            except (TruncatedStreamError, TransportError) as exc:
                if not decoder.complete:
                    raise
                # The body was cut off, the connection failed, or nothing ended the body
                # soon enough, after the reply was whole (its visible message had finished
                # its turn): what was lost is notices and [DONE]. The reply stands; the
                # connection is not kept.
                if isinstance(exc, RequestTimeout) and exc.phase == "read" and after_reply is not None:
                    _log.debug("the reply is whole; its body did not end within %g s of it", _AFTER_REPLY_SECONDS)
                else:
                    _log.debug("the reply was whole when its body was cut off: %s", exc)
            if not decoder.done:
                reply.close()
            elif decoder.complete and decoder.has_text:  # the body's last bytes, and the connection is kept
                left = client.clock.time_left()
                await response.finish(_END_WAIT_SECONDS if left is None else min(left, _END_WAIT_SECONDS))
        except TruncatedStreamError as exc:  # the connection or the body ended early
            raise self._cut(str(exc)) from None
        finally:
            response.close()
            client.clock.stop()
            client.clock.limit_reads(None)  # a continuation's reads wait as long as the first's
        if not decoder.complete:
            raise self._cut("the stream ended before [DONE]")
        if not decoder.has_text:
            raise NoResponseError("No valid response: the reply finished without any text")

    async def _unlabelled_stream_start(self, response: _HTTPResponse, redact: Sequence[str], what: str) -> bytes:
        """The first line of a success whose body is an event stream though its
        Content-Type does not say so (a proxy that drops it or calls it text/plain, as a
        worker that builds a new response does); anything else raises what it says."""
        start = b""
        if response.status < 300:  # (no JSON or HTML body starts as an event stream does)
            limit = self._options.limits.max_error_body_size
            while len(start) < limit and _BODY_START.fullmatch(start) is not None:  # nothing to tell by yet
                chunk = await response.next_chunk()
                if chunk is None:
                    break
                start += chunk
            if _EVENT_STREAM_START.match(start) is not None:
                _log.debug("%s: an event stream, labelled %s", what, _media_type(response.head) or "nothing")
                return start
        await self._not_an_event_stream(response, redact, what, start)

    async def _not_an_event_stream(
        self, response: _HTTPResponse, redact: Sequence[str], what: str, start: bytes = b"",
    ) -> NoReturn:
        """Raise what a response that is not an event stream says: its error, or that.
        `start`: the start of its body, already read."""
        head = response.head
        content_type = _media_type(head)
        limit = self._options.limits.max_error_body_size
        raw = start[:limit]
        if len(raw) < limit:
            raw += await response.read(limit - len(raw))
        if head.status >= 300 or _is_challenge(head, raw):
            raise _status_error(head, raw, what=what, redact=redact)
        text = raw.decode("utf-8", "replace")
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError):
            payload = None
        try:
            if isinstance(payload, dict):
                _raise_for_event_error(payload)
        except FakeGptError as exc:  # an error body in a 200: its words may echo a secret
            _scrub(exc, redact)
            raise
        raise ProtocolError(
            f"{what}: expected an event stream, got "
            f"{content_type or 'no Content-Type'}: {_excerpt(_redact(text, redact))!r}"
        )

    def _cut(self, reason: str) -> TruncatedStreamError:
        text = self.text
        if text:
            message = f"the reply was cut off after {len(text)} characters: {reason}"
        else:
            message = f"the reply was cut off before any text: {reason}"
        return TruncatedStreamError(message, text=text)


_RETRY_BASE, _RETRY_CAP = 0.5, 30.0  # seconds: the first backoff, and the longest wait

# A success of another Content-Type whose body starts as an event stream does (after a BOM
# and blank lines, a comment or a field) is read as one.
_BODY_START = re.compile(rb"(?:\xef(?:\xbb\xbf?)?)?[\r\n]*[^\r\n]{0,6}")  # not yet a whole first line
_EVENT_STREAM_START = re.compile(rb"(?:\xef\xbb\xbf)?[\r\n]*(?::|(?:data|event|id|retry)[:\r\n])")


def _retry_delay(error: FakeGptError, attempt: int) -> Optional[float]:
    """How long to wait before trying again after `error`, None if it is not worth it:
    exponential backoff with jitter (capped), or the server's Retry-After. One longer than
    the cap gives up at once: asking sooner only earns another 429, and the error's
    `retry_after` tells the caller when to come back."""
    if isinstance(error, RateLimitError) and error.retry_after is not None:
        return error.retry_after if error.retry_after <= _RETRY_CAP else None
    transient = (
        isinstance(error, RateLimitError)
        or (isinstance(error, HTTPStatusError) and error.status >= 500 and not isinstance(error, ChallengeError))
        or (isinstance(error, TransportError) and not isinstance(error, (TLSError, ProxyError, RequestTimeout)))
        or (isinstance(error, RequestTimeout) and error.phase == "connect")
        or (isinstance(error, TruncatedStreamError) and not error.text)
    )
    if not transient:
        return None
    backoff: float = min(_RETRY_BASE * 2.0 ** attempt, _RETRY_CAP)
    return backoff * (0.5 + secrets.randbelow(1001) / 2000)  # jitter: half to all of it


def _scrub(error: FakeGptError, secrets: Sequence[str]) -> None:
    """Replace by ``***`` any secret the upstream echoed in `error`'s words."""
    error.args = tuple(_redact(arg, secrets) if isinstance(arg, str) else arg for arg in error.args)
    for name in ("detail", "body"):
        value = getattr(error, name, None)
        if isinstance(value, str):
            setattr(error, name, _redact(value, secrets))


class _RandomDigits:
    """Random hex digits from the system's generator, fetched for many ids at once: a
    system call for each id costs more than making it. A process forked from this one
    fetches its own."""

    def __init__(self) -> None:
        self._ids: Iterator[str] = iter(())
        if hasattr(os, "register_at_fork"):  # (POSIX)
            os.register_at_fork(after_in_child=self._forget)

    def take(self) -> str:
        """32 random hex digits, never given before (threads may take at once)."""
        digits = next(self._ids, None)  # one step of a list's iterator: no two threads get one id
        if digits is None:
            fetched = os.urandom(16 * 32).hex()
            ids = [fetched[start:start + 32] for start in range(0, len(fetched), 32)]
            digits = ids.pop()
            self._ids = iter(ids)
        return digits

    def _forget(self) -> None:
        self._ids = iter(())


_random_digits = _RandomDigits()


def _uuid4() -> str:
    """``str(uuid.uuid4())``, without importing uuid (and platform with it) at start-up."""
    digits = _random_digits.take()
    variant = "89ab"[int(digits[16], 16) & 3]  # RFC 4122: the variant's two bits, 10
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:]}"


_BODY_ENCODER = json.JSONEncoder(check_circular=False)  # json.dumps, less its check for loops in what it is given


def _request_body(prompt: str, options: _Options, continues: Optional[ConversationDecoder] = None) -> bytes:
    """The conversation request's body, as JSON."""
    if continues is None:
        template = _new_turn_template(options)
        if template is not None:  # what `_conversation_body` gives, encoded, for the same ids
            before_id, before_prompt, before_parent, rest = template
            encode = _BODY_ENCODER.encode
            message_id = _uuid4()
            parent = options.parent_message_id or _uuid4()
            pieces = (before_id, encode(message_id), before_prompt, encode(prompt), before_parent, encode(parent), rest)
            return "".join(pieces).encode("ascii")
    return _BODY_ENCODER.encode(_conversation_body(prompt, options, continues)).encode("ascii")


def _conversation_body(
    prompt: str, options: _Options, continues: Optional[ConversationDecoder] = None,
    ids: Optional[Tuple[str, str]] = None,
) -> Dict[str, Any]:
    """The body of a conversation request; a new turn's message and parent ids are `ids`,
    else new (the parent's the one the options give, if any)."""
    if continues is not None:
        body: Dict[str, Any] = {
            "action": "continue",
            "conversation_id": continues.conversation_id,
            "parent_message_id": continues.message_id,
            "model": options.model,
            "timezone_offset_min": -120,
            "history_and_training_disabled": options.history_and_training_disabled,
            "arkose_token": "",
            "force_paragen": False,
        }
    else:
        message_id, parent_id = ids or (_uuid4(), options.parent_message_id or _uuid4())
        body = _new_turn_body(prompt, options, message_id, parent_id)
    if options.profile == "backend-api":
        body["supported_encodings"] = ["v1"]  # the delta format; snapshots read as well
    return body


def _new_turn_body(prompt: str, options: _Options, message_id: str, parent_id: str) -> Dict[str, Any]:
    body: Dict[str, Any] = {
        "action": "next",
        "messages": [
            {
                "id": message_id,
                "author": {"role": "user"},
                "content": {"content_type": "text", "parts": [prompt]},
                "metadata": {},
            }
        ],
        "parent_message_id": parent_id,
        "model": options.model,
        "plugin_ids": [],
        "timezone_offset_min": -120,
        "suggestions": [],
        "history_and_training_disabled": options.history_and_training_disabled,
        "arkose_token": "",
        "force_paragen": False,
    }
    if options.conversation_id:
        body["conversation_id"] = options.conversation_id
    return body


# Where a template's variable parts go: a string, and its JSON. (An option that is this
# very string splits the template in more than four pieces: then it is not used.)
_SLOT = "\x00slot\x00"
_ENCODED_SLOT = '"\\u0000slot\\u0000"'
_new_turn_templates: Dict[Tuple[Any, ...], Optional[Tuple[str, str, str, str]]] = {}


def _new_turn_template(options: _Options) -> Optional[Tuple[str, str, str, str]]:
    """A new turn's body as JSON around its message id, prompt and parent message id (in
    that order), made once for the options it depends on: encoding the whole body each
    call cost more than the rest of building the request. None if an option's text
    would hide where they go."""
    key = (options.model, options.history_and_training_disabled, options.conversation_id, options.profile)
    if key in _new_turn_templates:
        return _new_turn_templates[key]
    body = _conversation_body(_SLOT, options, ids=(_SLOT, _SLOT))
    pieces = _BODY_ENCODER.encode(body).split(_ENCODED_SLOT)
    template = (pieces[0], pieces[1], pieces[2], pieces[3]) if len(pieces) == 4 else None
    return _memo_put(_new_turn_templates, key, template)


class _ClassProperty:
    """A read-only property of the class (``@classmethod @property`` is gone in 3.13)."""

    def __init__(self, getter: Callable[[Any], Any]) -> None:
        self._getter = getter

    def __get__(self, instance: Any, owner: Any) -> Any:
        return self._getter(owner)


class _Pieces(AsyncGenerator[Any, None]):
    """Pieces of a reply (`_next` gives each; StopAsyncIteration at the end), then what
    `_then` gives once they have all come. What `ChatStream.texts` and
    `FakeGpt.create_async_generator` give: an async generator in all but its type, which
    it is not so that a read cancelled in the middle leaves it raising (`ChatStream` says
    the reply is cut) where an async generator would end, as if the reply had. Slotted
    and small: a thousand concurrent replies keep a thousand of them."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest: Optional[List[Any]] = None  # `_then`'s items, once the pieces have ended

    async def _next(self) -> Any:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def _then(self) -> List[Any]:
        return []

    def __aiter__(self) -> "_Pieces":
        return self

    async def __anext__(self) -> Any:
        if self._rest is None:
            try:
                return await self._next()
            except StopAsyncIteration:
                self._rest = self._then()
            except asyncio.CancelledError:
                raise  # read again, it says why the pieces stopped
            except BaseException:
                self._rest = []  # as an async generator ends with its exception
                raise
        if self._rest:
            return self._rest.pop(0)
        raise StopAsyncIteration

    async def asend(self, value: Any) -> Any:
        return await self.__anext__()

    async def athrow(self, typ: Any, value: Any = None, traceback: Any = None) -> Any:
        """As an async generator that does not catch it: closed, and the exception raised."""
        await self.aclose()
        if isinstance(value, BaseException):
            raise value
        if isinstance(typ, type):
            raise typ() if value is None else typ(value)
        raise typ

    async def aclose(self) -> None:
        self._rest = []
        await self._close()


def _closed_stream_error() -> UsageError:
    return UsageError(
        "this ChatStream is closed (its async with block ended, or aclose()): read it"
        " inside the block, or ask again with a new FakeGpt.stream()"
    )


class _Batches(_Pieces):
    """A stream's batches: its text pieces (`ChatStream.texts`), or the lists of events
    the stream deals out one by one. A read cancelled in the middle (``asyncio.wait_for``
    around it, say) ends the batches' generator, and its connection: the next read says
    the reply is cut, where the generator would just have ended."""

    __slots__ = ("stream", "batches", "interrupted")

    def __init__(self, stream: Optional["ChatStream"], batches: Optional[AsyncGenerator[Any, None]]) -> None:
        super().__init__()
        self.stream, self.batches = stream, batches
        self.interrupted = False

    async def next_batch(self) -> Any:
        assert self.stream is not None and self.batches is not None
        if self.stream.closed:  # (its block ended while these were still to read)
            raise _closed_stream_error()
        if self.interrupted:
            raise TruncatedStreamError(
                "the reply is incomplete: a read of it was cancelled (a timeout around it?), which"
                " closed its connection; to bound the wait for each piece, pass"
                " timeout=fakegpt.Timeouts(read=SECONDS)", text=self.stream.text,
            )
        try:
            return await self.batches.__anext__()
        except asyncio.CancelledError:
            self.interrupted = True
            raise

    _next = next_batch  # (not a call more a read)

    async def _close(self) -> None:
        if self.batches is not None:
            await self.batches.aclose()


class _ReplyPieces(_Batches):
    """`FakeGpt.create_async_generator`: the text pieces of a stream made at the first
    read (which so raises what is wrong with the arguments, as an async generator
    function's first read would), then, with ``return_conversation``, gpt4free's
    conversation and finish. As small as the async generator it stands for: the call's
    arguments in slots, and the stream's own batches read directly."""

    __slots__ = ("_provider", "_model", "_messages", "_proxy", "_kwargs")

    def __init__(
        self, provider: "type[FakeGpt]", model: str, messages: Messages, proxy: Optional[str], kwargs: Dict[str, Any],
    ) -> None:
        super().__init__(None, None)
        self._provider, self._model, self._messages, self._proxy, self._kwargs = provider, model, messages, proxy, kwargs

    async def _next(self) -> Any:
        if self.stream is None:
            self.stream = self._provider.stream(self._model, self._messages, self._proxy, **self._kwargs)
            self.batches = cast(_Batches, self.stream.texts()).batches  # (that reader goes: this one reads them)
        return await super()._next()

    def _then(self) -> List[Any]:
        events = self.stream
        if events is None or not self._kwargs.get("return_conversation"):
            return []
        conversation_class, finish_class = _gpt4free_responses()
        return [
            conversation_class(conversation_id=events.conversation_id, message_id=events.message_id,
                               parent_message_id=events.message_id),
            finish_class(events.finish_reason or "stop"),
        ]

class FakeGpt:
    """gpt4free's FakeGpt provider, made to work.

    ``create_async_generator(model, messages, proxy=None, **kwargs)`` streams the reply as
    text pieces. Keywords: ``url`` (the upstream, default the class's ``url``), ``timeout``
    (seconds or `Timeouts`), ``ssl`` (an `ssl.SSLContext`), ``trust_env`` (use
    HTTPS_PROXY / HTTP_PROXY / NO_PROXY), ``limits`` (`Limits`), ``conversation_id`` and
    ``parent_message_id`` (continue a conversation), ``history_and_training_disabled``.
    Other keywords (gpt4free passes ``stream``, ...) are accepted and ignored.

    The access token and the cookies are kept on the class, one session per upstream URL:
    a second call makes one request, not four. Connections are kept too (HTTP/1.1
    keep-alive, per event loop): the login and later calls on a loop share one, which
    closes after a few idle seconds, when the loop ends, or on ``await FakeGpt.aclose()``.
    """

    url: str = DEFAULT_URL
    label = "FakeGpt"
    working = False  # the public service shut down in January 2024
    supports_stream = True
    supports_gpt_35_turbo = True
    supports_gpt_4 = False
    supports_message_history = True
    needs_auth = False
    # What gpt4free's own client reads of a provider besides the above (g4f 8.8.6, say).
    live = 0  # its count of the calls that went well (it adds and takes away)
    use_stream_timeout = True  # a stream's timeout is its stream_timeout keyword's
    _access_token: Optional[str] = None
    _cookie_jar: Optional[http.cookiejar.CookieJar] = None
    _sessions: Dict[Any, _Session] = {}
    _pools = _Pools()

    @classmethod
    def isolated(cls, url: Optional[str] = None, **attributes: Any) -> "type[FakeGpt]":
        """A subclass with a session cache of its own (token, cookies), aimed at `url`
        if given, with `attributes` set on it: for tests, and for code that must not
        share a login with the rest of the process."""
        unknown = sorted(name for name in attributes if name.startswith("_") or not hasattr(cls, name))
        if unknown:
            public = ", ".join(name for name in vars(FakeGpt) if not name.startswith("_") and not callable(getattr(cls, name)))
            raise UsageError(
                f"{cls.__name__}.isolated: no class attribute {unknown[0]!r} (there are {public});"
                " a call's options, such as ssl= or timeout=, go with each call, and an attribute"
                " of your own on a subclass"
            )
        namespace: Dict[str, Any] = {"_sessions": {}, "_pools": _Pools(), "_access_token": None, "_cookie_jar": None}
        if url is not None:
            _parse_url(url)  # a bad URL fails here
            namespace["url"] = url
        namespace.update(attributes)
        return type(cls.__name__, (cls,), namespace)

    @classmethod
    def stream(
        cls, model: Optional[str], messages: Messages, proxy: Optional[str] = None, **kwargs: Any
    ) -> ChatStream:
        """The reply as a `ChatStream` of `ChatEvent`s (same arguments as below)."""
        return ChatStream(cls, model, messages, proxy, sessions=cls._sessions, pools=cls._pools, **kwargs)

    @classmethod
    async def aclose(cls) -> None:
        """Close the connections this class keeps open for later calls on the running
        event loop (they close by themselves when idle a few seconds, and all of them
        when the loop ends, as ``asyncio.run`` returns)."""
        await cls._pools.aclose()

    @classmethod
    def create_async_generator(
        cls, model: str, messages: Messages, proxy: Optional[str] = None, **kwargs: Any
    ) -> AsyncResult:
        """The reply's text, piece by piece, as soon as each piece arrives. With
        ``return_conversation=True``, then a ``JsonConversation`` (pass it back as
        ``conversation=`` to continue) and a ``FinishReason``, gpt4free's own classes when
        g4f is installed. Nothing happens until the first read, which raises what is wrong
        with the arguments, as an async generator function's would."""
        return _ReplyPieces(cls, model, messages, proxy, kwargs)

    @classmethod
    async def create_async(cls, model: str, messages: Messages, **kwargs: Any) -> str:
        """The whole reply as one string."""
        pieces = cls.create_async_generator(model, messages, **kwargs)
        return "".join([piece async for piece in pieces if isinstance(piece, str)])

    @classmethod
    def create_completion(
        cls, model: str, messages: Messages, stream: bool = True, **kwargs: Any
    ) -> Union[Iterator[Any], str]:
        """From synchronous code: the reply's pieces as they arrive, or with
        ``stream=False`` the whole reply as one string. Inside a running event loop it
        would block that loop for the whole reply: a `UsageError` says to await
        `create_async` or iterate `create_async_generator` there instead."""
        pieces = _iterate_sync(cls.create_async_generator(model, messages, **kwargs))
        if stream:
            return pieces
        return "".join(piece for piece in pieces if isinstance(piece, str))

    @classmethod
    def get_dict(cls) -> Dict[str, Any]:
        return {"name": cls.__name__, "url": cls.url, "label": cls.label}

    @classmethod
    def get_parent(cls) -> str:
        return cls.__name__

    @_ClassProperty
    def params(cls: "type[FakeGpt]") -> str:  # noqa: N805 - a class property
        """gpt4free's description of the call's parameters."""
        import inspect

        signature = inspect.signature(cls.create_async_generator)
        lines = []
        for name, parameter in signature.parameters.items():
            if name in ("self", "kwargs"):
                continue
            line = f"    {name}"
            if parameter.annotation is not inspect.Parameter.empty:
                line += f": {parameter.annotation}"
            if parameter.default is not inspect.Parameter.empty:
                line += f" = {parameter.default!r}"
            lines.append(line)
        return f"fakegpt.{cls.__name__} supports: (\n" + ",\n".join(lines) + "\n)"


class JsonConversation:
    """A stand-in for gpt4free's ``JsonConversation`` where g4f is not installed: the
    conversation to continue, as attributes (``get_dict()`` gives them)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def get_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"JsonConversation({self.__dict__!r})"


class FinishReason:
    """A stand-in for gpt4free's ``FinishReason`` where g4f is not installed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def get_dict(self) -> Dict[str, Any]:
        return {"reason": self.reason}

    def __str__(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"FinishReason({self.reason!r})"


def _gpt4free_responses() -> Tuple[Callable[..., Any], Callable[[str], Any]]:
    """gpt4free's JsonConversation and FinishReason if g4f is importable, else ours."""
    import importlib  # here: only a return_conversation call needs it

    try:
        module = importlib.import_module("g4f.providers.response")
        return module.JsonConversation, module.FinishReason
    except (ImportError, AttributeError):
        return JsonConversation, FinishReason


def load_mock_server() -> Any:
    """The bundled mock upstream (``mock_server.py`` beside this file), as the module
    ``fakegpt.mock_server``: loaded from its own location, so that a project's own
    ``mock_server`` module never stands in for it, nor it for theirs.
    `UsageError` if it is not there (this file was copied alone)."""
    name = "fakegpt.mock_server"
    module = sys.modules.get(name)
    if module is not None:
        return module
    import importlib.util  # here: only --mock and the pytest plugin need it

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mock_server.py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise UsageError(f"the bundled mock needs mock_server.py beside fakegpt ({path} is missing)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: its dataclasses look themselves up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _iterate_sync(pieces: AsyncGenerator[_T, None]) -> Iterator[_T]:
    """Iterate an async generator from synchronous code, on a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _iterate_in_new_loop(pieces)
    raise UsageError(
        "create_completion is synchronous, and an event loop is running in this thread: "
        "it would block that loop for the whole reply. Use `await FakeGpt.create_async(...)` "
        "or `async for piece in FakeGpt.create_async_generator(...)` there."
    )


def _iterate_in_new_loop(pieces: AsyncGenerator[_T, None]) -> Iterator[_T]:
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                item = loop.run_until_complete(pieces.__anext__())
            except StopAsyncIteration:
                return
            yield item
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(pieces.aclose())  # and its connection
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())  # the TLS set-up's thread
        finally:
            loop.close()


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_CLI_EPILOG = """\
exit codes: 0 ok, 1 upstream or protocol error, 2 usage error, 130 interrupted.
environment: FAKEGPT_URL (the upstream), FAKEGPT_ACCESS_TOKEN (an access token),
HTTPS_PROXY, HTTP_PROXY, NO_PROXY.
With no prompt on a terminal, or as `fakegpt chat`, fakegpt chats (/help there lists
its commands): Ctrl-D quits, Ctrl-C stops a reply. `fakegpt -- chat` sends the word."""


def _cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fakegpt",
        description="Stream a reply from a server of the ChatGPT web conversation protocol.",
        epilog=_CLI_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # "--access-token X" must not pass for --access-token-file
    )
    parser.add_argument("prompt", nargs="?", help="the prompt; '-' or none reads standard input; chat: the chat")
    parser.add_argument("--mock", action="store_true", help="talk to the bundled mock upstream")
    parser.add_argument("--url", help=f"the upstream (default: $FAKEGPT_URL or {DEFAULT_URL})")
    parser.add_argument("--profile", choices=PROFILES, default="shared",
                        help="shared: the shared-token site's login and /api/conversation; backend-api: "
                        "a ChatGPT-web gateway's /backend-api/conversation (default: %(default)s)")
    parser.add_argument("--access-token-file", metavar="FILE",
                        help="read the access token from FILE (never pass a token as an argument: "
                        "other users can read process lists); default: $FAKEGPT_ACCESS_TOKEN")
    parser.add_argument("-c", "--continue", dest="continue_", action="store_true",
                        help="continue the last conversation with this upstream (kept in "
                        "$XDG_STATE_HOME/fakegpt/conversations.json)")
    parser.add_argument("--conversation-id", help="continue this conversation")
    parser.add_argument("--parent-message-id", help="the message to answer (with --conversation-id)")
    parser.add_argument("--proxy", help="an http://[user:password@]host:port proxy")
    parser.add_argument("-m", "--model", default=DEFAULT_MODEL, help="the upstream model (default: %(default)s)")
    parser.add_argument("-s", "--system", help="a system prompt, sent with the first turn of a new conversation")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds")
    parser.add_argument("--retries", type=int, default=2,
                        help="try again this many times after a 429, a 5xx or a failed connection, "
                        "before any text arrived (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="write one JSON object per event")
    parser.add_argument("--no-session-cache", action="store_true",
                        help="log in afresh: keep no session between commands (also: $FAKEGPT_NO_SESSION_CACHE)")
    parser.add_argument("--no-history", action="store_true",
                        help="keep no history: neither the chat's lines ($XDG_STATE_HOME/fakegpt/history) "
                        "nor the last conversation (for --continue)")
    parser.add_argument("--verbose", action="store_true",
                        help="show each request, the timings, the model and the finish on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit code."""
    if sys.stderr is None:  # closed (`2>&-`): errors go nowhere, the exit code still says
        sys.stderr = open(os.devnull, "w")
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = _cli_parser().parse_args(arguments)
    if args.prompt == "chat" and not _after_double_dash(arguments, "chat"):  # as `llm chat`
        if not sys.stdin.isatty():
            return _fail("fakegpt chat needs a terminal; to send the word chat as a prompt: fakegpt -- chat",
                         EXIT_USAGE)
        args.prompt = None
    if sys.stdout is None:  # closed (`>&-`): nowhere for the reply
        return _fail("standard output is closed: there is nowhere to write the reply", EXIT_USAGE)
    if args.timeout is not None and not _positive_seconds(args.timeout):
        return _fail("--timeout must be a positive number of seconds", EXIT_USAGE)
    if args.mock and args.url is not None:
        return _fail("--mock and --url exclude each other: the mock is the upstream", EXIT_USAGE)
    for flag, value in (("--url", args.url), ("--conversation-id", args.conversation_id),
                        ("--parent-message-id", args.parent_message_id), ("--system", args.system)):
        if value is not None and not value.strip():
            return _fail(f"{flag} is empty (an unset shell variable?)", EXIT_USAGE)
    if args.parent_message_id is not None and args.conversation_id is None:
        return _fail("--parent-message-id answers a message of a conversation: give --conversation-id too", EXIT_USAGE)
    if args.continue_ and args.conversation_id is not None:
        return _fail("--continue and --conversation-id exclude each other: each names the conversation", EXIT_USAGE)
    if args.continue_ and args.mock:
        return _fail("--mock starts a new upstream each time: it has no earlier conversation to continue", EXIT_USAGE)
    if args.system is not None and (args.continue_ or args.conversation_id is not None):
        return _fail("--system begins a new conversation: the upstream keeps the one you continue as it began",
                     EXIT_USAGE)
    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fakegpt: %(message)s"))
        _log.addHandler(handler)
        _log.setLevel(logging.DEBUG)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")
    try:
        token = _read_token_file(args.access_token_file) if args.access_token_file else _environment_token()
        url = args.url or ("" if args.mock else _environment_url())  # --mock: an upstream of its own
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE, json_too=args.json)
    try:
        if args.mock:
            return _with_mock(args, token)
        return _run(args, url, token, trust_env=True)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()  # the reader left: say nothing more
        return EXIT_ERROR
    except _OutputError as exc:
        _silence_stdout()
        return _fail(f"cannot write the reply to standard output: {exc}", EXIT_ERROR)


def _after_double_dash(arguments: List[str], prompt: str) -> bool:
    """Whether the prompt came after ``--`` (the positional argument is the last
    `prompt` among the arguments: an option's value before it cannot follow it)."""
    at = len(arguments) - 1 - arguments[::-1].index(prompt)
    return "--" in arguments[:at]


def _read_token_file(path: str) -> str:
    try:
        with open(path, "rb") as file:
            data = file.read(64 * 1024)
    except OSError as exc:
        raise UsageError(f"cannot read the access token file {path}: {exc.strerror or exc}") from None
    token = data.decode("utf-8", "replace").strip()
    if not token:
        raise UsageError(f"the access token file {path} is empty")
    if _TOKEN_TEXT.fullmatch(token) is None:
        raise UsageError(f"the access token in {path} must be one line of printable ASCII without spaces")
    return token


def _with_mock(args: argparse.Namespace, token: Optional[str]) -> int:
    try:
        mock_server = load_mock_server()
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    # A little time between events, as a model takes, so that the demo visibly streams.
    with mock_server.serve_in_thread(delay=0.01, profile=args.profile, access_token=token) as server:
        given = server.access_token if args.profile == "backend-api" else token
        return _run(args, server.url, given, trust_env=False)


def _run(args: argparse.Namespace, url: str, token: Optional[str], *, trust_env: bool) -> int:
    options: Dict[str, Any] = {"url": url, "trust_env": trust_env, "profile": args.profile,
                               "auto_continue": True, "retries": args.retries}
    if trust_env and not args.no_session_cache and not _env_flag("FAKEGPT_NO_SESSION_CACHE"):
        options["session_cache"] = True  # not for --mock: each of its runs is a new upstream
    if token is not None:
        options["access_token"] = token
    try:
        conversations = None if args.mock else _Conversations.default(args, url)
        title = None
        if args.continue_ and conversations is not None:
            options["conversation_id"], options["parent_message_id"], title = conversations.last()
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE, json_too=args.json)
    if args.conversation_id:
        options["conversation_id"] = args.conversation_id
    if args.parent_message_id:
        options["parent_message_id"] = args.parent_message_id
    if args.timeout is not None:
        options["timeout"] = args.timeout
    if args.proxy:
        options["proxy"] = args.proxy
    if args.prompt is None and sys.stdin.isatty():
        try:  # the options checked before the chat begins, not at each turn (no I/O)
            FakeGpt.stream(args.model, [{"role": "user", "content": "?"}], **options)
        except UsageError as exc:
            return _fail(str(exc), EXIT_USAGE)
        return _Chat(args, options, conversations, title).run()
    if args.prompt in (None, "-"):
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError as exc:
            return _fail(_undecodable(exc), EXIT_USAGE, json_too=args.json)
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt  # a piped line's own newline
        prompt = prompt[:-1] if prompt.endswith("\r") else prompt
        encoding = sys.stdin.encoding
    else:
        prompt, encoding = args.prompt, sys.getfilesystemencoding()
    if not prompt.strip():
        return _fail("the prompt is empty", EXIT_USAGE, json_too=args.json)
    problem = _not_text(prompt, encoding)
    if problem is not None:
        return _fail(problem, EXIT_USAGE, json_too=args.json)
    try:
        reply = asyncio.run(_print_reply(prompt, args, options))
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE, json_too=args.json)
    except FakeGptError as exc:
        return _fail(_explain(exc, url, args.profile), EXIT_ERROR, json_too=args.json, kind=type(exc).__name__)
    if conversations is not None:
        conversations.remember(reply)
    if reply.finish_reason == "max_tokens" and not args.json:
        _note("the reply stopped at the upstream's max_tokens: it is incomplete")
    return EXIT_OK


async def _print_reply(
    prompt: str, args: argparse.Namespace, options: Dict[str, Any], seen: Optional[List[ChatStream]] = None,
) -> ChatStream:
    """Stream the reply to stdout (a waiting sign on a terminal's stderr until the first
    text); the stream is returned for its ids. `seen` receives it at once, so that a
    caller interrupted in the middle still has it."""
    out = sys.stdout
    started = time.monotonic()
    first: Optional[float] = None
    waiting = _Waiting() if sys.stderr.isatty() and not args.json else None
    messages = [{"role": "user", "content": prompt}]
    if args.system and "conversation_id" not in options:  # a turn that begins a conversation
        messages.insert(0, {"role": "system", "content": args.system})
    async with FakeGpt.stream(args.model, messages, **options) as reply:
        if seen is not None:
            seen.append(reply)
        try:
            if waiting is not None:
                waiting.start()
            # An event a line with --json; else the text, one write for each read of the
            # socket (a long reply is thousands of events).
            terminal = out.isatty()
            async for piece in (_json_lines(reply) if args.json else reply.texts()):
                if first is None:
                    first = time.monotonic() - started
                    if waiting is not None:
                        waiting.stop()
                _put(out, _printable(piece) if terminal and not args.json else piece)
        finally:
            if waiting is not None:
                waiting.stop()
            if reply.text and not args.json:
                _put(out, "\n")
    if args.verbose:
        first_text = "no text" if first is None else f"first piece after {first * 1000:.0f} ms"
        _log.info(
            "%s, total %.0f ms; model %s, finish %s, conversation %s", first_text,
            (time.monotonic() - started) * 1000, reply.model or args.model,
            reply.finish_reason, reply.conversation_id,
        )
    return reply


class _Conversations:
    """The last conversation with each upstream (by profile and URL), kept between
    commands for --continue in the state directory: its id and its last reply's, which a
    turn that continues it answers. Written after each complete reply, unless --no-history."""

    def __init__(self, kept: Optional[_KeptFile], profile: str, base_url: str, *, keep: bool) -> None:
        self.kept = kept
        self.profile, self.base_url = profile, base_url
        self.key = f"{profile} {base_url}"
        self.keep = keep

    @classmethod
    def default(cls, args: argparse.Namespace, url: str) -> "_Conversations":
        """The user's; raises `UsageError` for a URL that is not one."""
        endpoint, path = _parse_url(url)
        directory = _state_directory()
        kept = None if directory is None else _KeptFile(os.path.join(directory, "conversations.json"), "conversation")
        return cls(kept, args.profile, f"{endpoint.origin}{path}", keep=not args.no_history)

    def last(self) -> Tuple[str, str, Optional[str]]:
        """The last conversation's id, its last reply's id and its title."""
        entry = self.kept.get(self.key) if self.kept is not None else None
        if isinstance(entry, dict):
            ids = [entry.get("conversation_id"), entry.get("message_id")]
            title = entry.get("title")
            if all(isinstance(value, str) and value for value in ids):
                return str(ids[0]), str(ids[1]), title if isinstance(title, str) else None
        raise UsageError(f"--continue: no earlier conversation with {self.base_url} (profile {self.profile}) is kept")

    def remember(self, reply: "ChatStream") -> None:
        if self.kept is None or not self.keep or not (reply.conversation_id and reply.message_id):
            return
        title = reply.title
        if title is None:  # upstreams name a conversation once: a later turn's keeps the name
            earlier = self.kept.get(self.key)
            if isinstance(earlier, dict) and earlier.get("conversation_id") == reply.conversation_id:
                title = earlier.get("title")
        self.kept.put(self.key, {"conversation_id": reply.conversation_id, "message_id": reply.message_id,
                                 "title": title, "saved": time.time()})


class _OutputError(Exception):
    """Standard output refused the reply (a full disk, say): not the upstream's doing."""


def _put(out: TextIO, text: str) -> None:
    """Write `text` to `out` now; a failure other than a reader that left is an `_OutputError`."""
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise _OutputError(exc.strerror or str(exc)) from None


def _silence_stdout() -> None:
    """Point standard output at the null device, so that what is still buffered for it
    goes nowhere instead of failing again at exit."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(null)


async def _json_lines(reply: ChatStream) -> AsyncGenerator[str, None]:
    """Each event of `reply` as a line of JSON."""
    async for event in reply:
        yield json.dumps(event.as_dict(), ensure_ascii=False) + "\n"


class _Waiting:
    """A sign on stderr (a terminal) while no text has arrived; cleared when it does."""

    _FRAMES = "|/-\\"

    def __init__(self) -> None:
        self._task: Optional["asyncio.Task[None]"] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._spin())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    async def _spin(self) -> None:
        await asyncio.sleep(0.15)  # a quick reply shows no sign at all
        frame = 0
        while True:
            sys.stderr.write(f"\r{self._FRAMES[frame % 4]} waiting for the upstream")
            sys.stderr.flush()
            frame += 1
            await asyncio.sleep(0.12)


_CHAT_HELP = """\
/help            this list
/new             start a new conversation
/save FILE       save the transcript: Markdown, or JSON if FILE ends in .json (a new
                 file, or one this chat saved)
/retry           ask the last prompt again (a new answer in its place)
/quit, /exit     leave (so do Ctrl-D, and exit or quit alone on a line)
//text           send "/text" (a message that starts with a slash)
A line ending in \\ goes on in the next line; a block between two lines of three
double quotes (\"\"\") is sent as one message; Ctrl-D in either sends it too. Ctrl-C
stops a reply: its text stays in the transcript, marked stopped, and the next turn
answers the last complete reply."""


def _input_or_none(prompt: str) -> Optional[str]:
    """A line typed after `prompt`, or None at Ctrl-D (the end of input)."""
    try:
        return input(prompt)
    except EOFError:
        print(file=sys.stderr)  # the terminal's cursor to a line of its own
        return None


class _Chat:
    """The interactive chat: each line (or block) is a turn of one conversation."""

    def __init__(
        self, args: argparse.Namespace, options: Dict[str, Any], conversations: Optional[_Conversations] = None,
        title: Optional[str] = None,
    ) -> None:
        self.args = args
        self.options = options
        self.conversations = conversations
        self.transcript: List[Dict[str, Any]] = []
        self.title = title  # the conversation's, once the upstream gives one (or the one continued)
        self.model: Optional[str] = None
        # The last turn asked: its prompt, conversation and parent, and where its entries in
        # the transcript start (what a /retry that gets its answer replaces).
        self.last: Optional[Tuple[str, Optional[str], Optional[str], int]] = None
        self.history_file: Optional[str] = None
        self.saved: Set[str] = set()  # files /save wrote: saving to one again replaces it
        self.turns = _Turns()

    def run(self) -> int:
        self._set_up_line_editing()
        try:
            self._banner()
            while True:
                try:
                    prompt = self._read()
                except EOFError:
                    print(file=sys.stderr)
                    return EXIT_OK
                except KeyboardInterrupt:
                    print(file=sys.stderr)
                    continue
                if prompt is None or not prompt.strip():
                    continue
                if prompt.strip().lower() in ("exit", "quit"):  # as llm's and Python's own prompts
                    return EXIT_OK
                if prompt.startswith("/") and not prompt.startswith("//"):
                    if self._command(prompt.strip()):
                        return EXIT_OK
                    continue
                self._ask(prompt[1:] if prompt.startswith("//") else prompt)
        finally:
            self.turns.close()
            self._save_history()

    # -- input ---------------------------------------------------------------------------

    def _read(self) -> Optional[str]:
        """The next message, or None if there is none to send."""
        try:
            prompt = self._read_lines()
        except UnicodeDecodeError as exc:
            problem: Optional[str] = _undecodable(exc)
        else:
            problem = _not_text(prompt, sys.stdin.encoding)
        if problem is not None:
            print(f"fakegpt: error: {problem}", file=sys.stderr)
            return None
        return prompt

    def _read_lines(self) -> str:
        """A message: a line, lines joined by a trailing backslash, or a block between two
        lines of three quotes. Ctrl-D in the middle of one ends it as its last line would
        (the message is sent, as in `mail`): only at the first prompt does it quit."""
        line = input("you> ")
        lines: List[str] = []
        if line.strip() == '"""':
            while True:
                more = _input_or_none("...> ")
                if more is None or more.strip() == '"""':
                    return "\n".join(lines)
                lines.append(more)
        while line.endswith("\\") and not line.endswith("\\\\"):
            lines.append(line[:-1])
            more = _input_or_none("...> ")
            if more is None:
                return "\n".join(lines)
            line = more
        lines.append(line)
        return "\n".join(lines)

    def _set_up_line_editing(self) -> None:
        try:
            import readline  # importing it gives input() line editing
        except ImportError:  # pragma: no cover - a platform without readline
            return
        directory = _state_directory()
        if self.args.no_history or directory is None:
            return
        path = os.path.join(directory, "history")
        if os.path.exists(path) and not os.path.isfile(path):
            return  # a FIFO or a directory there: reading or writing it could hang, so no history
        try:
            if os.path.exists(path):
                readline.read_history_file(path)
            readline.set_history_length(1000)
        except OSError:
            return
        self.history_file = path

    def _save_history(self) -> None:
        if self.history_file is None:
            return
        import readline

        try:
            os.makedirs(os.path.dirname(self.history_file), mode=0o700, exist_ok=True)
            fd = os.open(self.history_file, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(self.history_file, 0o600)
            readline.write_history_file(self.history_file)
        except OSError as exc:
            _note(f"the history was not saved: {exc.strerror or exc}")

    # -- turns ---------------------------------------------------------------------------

    def _banner(self) -> None:
        options = self.options
        print(
            f"fakegpt {__version__}: {options['url']}, profile {options['profile']}, "
            f"model {self.args.model}\n"
            "Type /help for commands; \"\"\" for a block of lines; Ctrl-C stops a reply, Ctrl-D quits.",
            file=sys.stderr,
        )
        if options.get("conversation_id"):
            shown = f"“{self.title}”" if self.title else f"conversation {options['conversation_id']}"
            print(f"[continuing {_printable(shown)}]", file=sys.stderr)

    def _ask(self, prompt: str, *, again: Optional[Tuple[Optional[str], Optional[str], int]] = None) -> None:
        """One turn. `again`: the conversation, parent and transcript entries of the turn
        this one asks again; its answer replaces that turn's (a stopped or failed one leaves
        it, and the next turn still answers it)."""
        options = dict(self.options)
        conversation_id, parent = self._position() if again is None else again[:2]
        for key, value in (("conversation_id", conversation_id), ("parent_message_id", parent)):
            options.pop(key, None)
            if value:
                options[key] = value
        start = len(self.transcript)
        self.last = (prompt, conversation_id, parent, start if again is None else again[2])
        self.transcript.append({"role": "user", "content": prompt})
        seen: List[ChatStream] = []
        try:
            reply = self.turns.run(_print_reply(prompt, self.args, options, seen))
        except KeyboardInterrupt:
            text = seen[0].text if seen else ""
            print("[reply stopped]", file=sys.stderr)
            self.transcript.append({"role": "assistant", "content": text, "stopped": True})
            return
        except FakeGptError as exc:
            print(f"fakegpt: error: {_printable(_explain(exc, self.options['url'], self.args.profile))}", file=sys.stderr)
            if conversation_id and isinstance(exc, HTTPStatusError) and exc.status == 404:
                # The upstream forgot the conversation (restarted, expired): every later turn
                # would fail the same way.
                print("[the upstream does not know this conversation: /new starts a new one]", file=sys.stderr)
            self.transcript.pop()
            return
        self.transcript.append({
            "role": "assistant", "content": reply.text, "conversation_id": reply.conversation_id,
            "message_id": reply.message_id,
        })
        if again is not None:  # the answer asked for again takes the place of the earlier one
            del self.transcript[again[2]:start]
        if self.conversations is not None:
            self.conversations.remember(reply)
        if reply.finish_reason == "max_tokens":
            _note("the reply stopped at the upstream's max_tokens: it is incomplete")
        if reply.model:
            self.model = reply.model
        if reply.title and reply.title != self.title:
            self.title = reply.title
            print(f"[{_printable(reply.title)}]", file=sys.stderr)

    def _position(self) -> Tuple[Optional[str], Optional[str]]:
        """The conversation and the message a new turn answers: the last complete reply."""
        for entry in reversed(self.transcript):
            if entry["role"] == "assistant" and not entry.get("stopped"):
                return entry.get("conversation_id"), entry.get("message_id")
        return self.options.get("conversation_id"), self.options.get("parent_message_id")

    # -- commands ------------------------------------------------------------------------

    def _command(self, line: str) -> bool:
        """Run a /command; True to leave."""
        name, _, argument = line.partition(" ")
        if name in ("/quit", "/exit"):
            return True
        if name == "/help":
            print(_CHAT_HELP, file=sys.stderr)
        elif name == "/new":
            self.transcript, self.title, self.last = [], None, None
            self.options.pop("conversation_id", None)
            self.options.pop("parent_message_id", None)
            print("[a new conversation]", file=sys.stderr)
        elif name == "/retry":
            if self.last is None:
                print("[nothing to retry yet]", file=sys.stderr)
            else:
                prompt, conversation_id, parent, start = self.last
                print(f"[asking again: {_printable(prompt)}]", file=sys.stderr)
                self._ask(prompt, again=(conversation_id, parent, start))
        elif name == "/save":
            self._save(argument.strip())
        else:
            print(f"[unknown command {_printable(name)}: /help lists them; //text sends /text]", file=sys.stderr)
        return False

    def _save(self, path: str) -> None:
        if not path:
            print("[/save needs a file name: /save chat.md or /save chat.json]", file=sys.stderr)
            return
        if path.lower().endswith(".json"):
            document = json.dumps({"title": self.title, "model": self.model, "messages": self.transcript},
                                  ensure_ascii=False, indent=2) + "\n"
        else:
            parts = [f"# {self.title or 'fakegpt chat'}\n"]
            for entry in self.transcript:
                who = "You" if entry["role"] == "user" else "Assistant"
                stopped = " (stopped)" if entry.get("stopped") else ""
                parts.append(f"**{who}{stopped}:**\n\n{entry['content']}\n")
            document = "\n".join(parts)
        where = os.path.abspath(os.path.expanduser(path))
        # A file of the user's is never replaced: only one this chat saved (an earlier /save).
        mode = "w" if where in self.saved else "x"
        try:
            with open(where, mode, encoding="utf-8") as file:
                file.write(document)
        except FileExistsError:
            print(f"[not saved: {_printable(path)} exists already; /save to a new name]", file=sys.stderr)
            return
        except OSError as exc:
            print(f"[not saved: {exc.strerror or exc}]", file=sys.stderr)
            return
        self.saved.add(where)
        print(f"[saved {len(self.transcript)} messages to {_printable(path)}]", file=sys.stderr)


class _Turns:
    """One event loop for all the turns of a chat, so that a turn can take the connection
    the one before it kept. Like ``asyncio.run`` for each turn: Ctrl-C cancels the turn in
    progress (its connection closes) and raises KeyboardInterrupt; a second Ctrl-C before
    it has stopped raises at once."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, turn: Awaitable[_T]) -> _T:
        task = asyncio.ensure_future(turn, loop=self.loop)
        interrupted = False

        def on_interrupt(signum: int, frame: Any) -> None:
            nonlocal interrupted
            if interrupted or task.done():
                raise KeyboardInterrupt
            interrupted = True
            task.cancel()
            self.loop.call_soon_threadsafe(lambda: None)  # wake the loop to see it

        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_interrupt) if in_main_thread else None
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            if interrupted:
                raise KeyboardInterrupt from None
            raise
        finally:
            self._cancel_the_rest()  # as asyncio.run does: a stopped turn's login, say
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _cancel_the_rest(self) -> None:
        left = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
        for task in left:
            task.cancel()
        if left:
            self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))

    def close(self) -> None:
        """Close what the loop holds (kept connections, the TLS set-up's thread), then it."""
        loop = self.loop
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _env_flag(name: str) -> bool:
    """Whether the environment variable `name` is set to something other than an empty
    string, 0, false, no or off (``FAKEGPT_NO_SESSION_CACHE=0`` leaves the cache on)."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _state_directory() -> Optional[str]:
    """Where fakegpt keeps what it remembers between commands (XDG's state directory);
    None without a home directory."""
    base = _xdg_directory("XDG_STATE_HOME", os.path.join(".local", "state"))
    return None if base is None else os.path.join(base, "fakegpt")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")
_UNDECODED = re.compile("[\udc80-\udcff]")  # the surrogateescape error handler's bytes


def _not_text(prompt: str, encoding: str) -> Optional[str]:
    """Why `prompt` is not text: bytes that were not `encoding` (Python keeps them as
    surrogates); None if it is text."""
    undecoded = _UNDECODED.search(prompt)
    return None if undecoded is None else _not_text_because(encoding, ord(undecoded.group()) - 0xDC00)


def _undecodable(error: UnicodeDecodeError) -> str:
    """Why a prompt that could not be decoded is not text."""
    return _not_text_because(error.encoding, error.object[error.start])


def _not_text_because(encoding: str, byte: int) -> str:
    return f"the prompt is not {encoding} text (it holds the byte 0x{byte:02X})"


def _printable(text: str) -> str:
    """`text` as a terminal may show it: control characters (newline and tab aside) go."""
    return _CONTROL.sub("", text)


def _explain(exc: FakeGptError, url: str, profile: str = "shared") -> str:
    """The error's message, with a hint where the command line's choices likely caused it."""
    message = str(exc)
    unreachable = isinstance(exc, ConnectError) or (
        isinstance(exc, RequestTimeout) and exc.phase == "connect"
    )
    if unreachable and url.rstrip("/") == DEFAULT_URL:
        message += (
            f" - the public service at {DEFAULT_URL} shut down in January 2024;"
            " use --url for another upstream, or --mock for the bundled mock"
        )
    elif isinstance(exc, HTTPStatusError) and exc.status == 404 and "conversation" not in exc.detail.lower():
        # No such route (not an unknown conversation): likely the other profile's server.
        if profile == "shared" and message.startswith("GET /api/loads:"):
            message += (
                " - the upstream has no shared-token login: for a ChatGPT-web gateway"
                " (/backend-api/conversation), use --profile backend-api and its access token"
            )
        elif profile == "backend-api" and message.startswith("POST /backend-api/conversation:"):
            message += (
                " - the upstream has no /backend-api/conversation: for a shared-token or"
                " FakeOpen-style server (/api/conversation), use --profile shared"
            )
    return message


def _note(message: str) -> None:
    print(f"fakegpt: note: {message}", file=sys.stderr)


def _fail(message: str, code: int, *, json_too: bool = False, kind: str = "UsageError") -> int:
    """Say `message` on stderr (a terminal sees no control characters) and, for a JSON
    reader, as one object on stdout; returns `code`."""
    shown = _printable(message) if sys.stderr.isatty() else message
    print(f"fakegpt: error: {shown}", file=sys.stderr)
    if json_too:
        try:
            _put(sys.stdout, json.dumps({"error": message, "type": kind}, ensure_ascii=False) + "\n")
        except (OSError, _OutputError):
            pass  # said on stderr already
    return code


def command() -> int:
    """The ``fakegpt`` command and ``python -m fakegpt``: `main`, in a process that ends
    with it."""
    try:
        return main()
    finally:
        # The interpreter's last collection at exit walks every object left, for a tenth
        # of a short command's time, and the system takes the memory back anyway: frozen
        # objects are left out of it. Objects still close their sockets and files as the
        # modules are cleared, and the standard streams are flushed as always.
        gc.freeze()


if __name__ == "__main__":
    raise SystemExit(command())
