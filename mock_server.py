"""mock_server: an offline copy of the FakeGpt upstream (a Pandora "shared token" proxy).

Every test, demo and benchmark of fakegpt runs against it. Standard library only, and
written independently of fakegpt's parsers, so a bug on one side cannot hide the same
bug on the other. It serves the four endpoints with the upstream's shapes:

    GET  /api/loads          the shared accounts and their load
    POST /auth/login         form login; sets the ``credential`` cookie
    GET  /api/auth/session   the access token ({} without a valid cookie)
    POST /api/conversation   the reply as a text/event-stream of cumulative events

Run it three ways:

    python -m mock_server [--host 127.0.0.1] [--port 0] [options]   # prints its URL first
    async with MockServer() as server: ...                          # in-process, .url, .requests
    with serve_in_thread() as server: ...                            # from synchronous code

Options choose the framing of the stream (chunked, Content-Length or connection close;
LF, CRLF or CR; multi-line data, comments, pings, writes of N bytes) and faults, for
every request (``--fault``) or per request (the ``X-Mock-Fault`` header, a
``[[fault NAME]]`` in the prompt, or ``server.fail_next(NAME)``). See ``FAULTS``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import http
import json
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
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

__version__ = "1.0.0"
__all__ = [
    "FAULTS",
    "MockOptions",
    "MockServer",
    "RecordedRequest",
    "default_reply",
    "mixed_text",
    "main",
    "serve_in_thread",
]

FAULTS = {
    "status:CODE[:RETRY_AFTER]": "answer the conversation with an upstream-shaped error: 401 "
    "token_expired, 403, 429 (with Retry-After), 500, 504 (a CDN's HTML page), or any other",
    "expired200": "a 200 whose JSON body says token_expired",
    "content_type": "a 200 text/html page instead of the event stream",
    "delay_headers:SECONDS": "wait before the response head",
    "delay_events:SECONDS": "wait between events",
    "pause_after:N:SECONDS": "wait once, after the Nth assistant event",
    "hang": "never answer",
    "hang_after:N": "stop sending after N events, keeping the connection open",
    "cut:N": "end the body cleanly after N events, without [DONE]",
    "reset:N": "reset the connection (RST) after N events",
    "garbage:N": "send seeded random bytes after N events, then close",
    "error_event:N": "after N events, an event whose error is set",
    "rewrite:N": "after N events, change text already sent",
    "empty": "a complete stream with no assistant text",
}

_Bytes = Union[bytes, bytearray]
_FAULT_IN_PROMPT = re.compile(r"\[\[fault ([^\]\s]+)\]\]")
_CHARS_IN_PROMPT = re.compile(r"\[\[chars ([0-9]{1,9})\]\]")
_STEP_IN_PROMPT = re.compile(r"\[\[step ([0-9]{1,9})\]\]")
_MIXED_TEXT = 'Hello, мир! 你好世界 👋🏽 "quoted" and back\\slash; Ünïcödé. '

_CDN_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>504 Gateway Time-out</title></head>\n<body>"
    "<h1>Gateway Time-out</h1><p>The origin web server timed out responding to this request."
    "</p></body></html>\n"
)
_EXPIRED = {
    "message": "Your authentication token has expired. Please try signing in again.",
    "type": "invalid_request_error",
    "param": None,
    "code": "token_expired",
}


@dataclasses.dataclass
class MockOptions:
    """How the mock answers. Every field has a command-line flag of the same name."""

    framing: str = "chunked"  # chunked | length | close: how the stream's body is framed
    newline: str = "\n"  # "\n", "\r\n" or "\r" between event stream lines
    data_space: bool = True  # "data: x" or "data:x"
    multiline: bool = False  # spread each event's JSON over several data lines
    comments: bool = False  # a ": keep-alive" comment before each event
    pings: bool = False  # an "event: ping" event before each event
    bom: bool = False  # start the stream with a byte order mark
    write_size: int = 0  # write the stream in pieces of this many bytes (0: per event)
    step: int = 4  # characters of text each assistant event adds
    delay: float = 0.0  # seconds between events
    reply: Union[None, str, Callable[[str], str]] = None  # the text, or prompt -> text
    finish: str = "stop"  # finish_details.type of the last event
    ascii_json: bool = False  # escape non-ASCII text as \\uXXXX
    gzip: str = "off"  # off | accept (when the client asks) | always: compress bodies
    loads: str = "normal"  # normal | empty | malformed
    login: str = "ok"  # ok | refuse
    session: str = "ok"  # ok | empty
    fault: Optional[str] = None  # a fault for every conversation (see FAULTS)
    seed: int = 0  # seeds token ids, loads and garbage bytes
    access_token: Optional[str] = None  # the token to issue (a test's sentinel)
    certfile: Optional[str] = None  # serve TLS with this certificate chain
    keyfile: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """A request as the mock received it."""

    method: str
    path: str
    query: str
    headers: Tuple[Tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class _BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _Closed(Exception):
    """The client went away; nothing more to send."""


def mixed_text(length: int) -> str:
    """`length` characters of ASCII, Cyrillic, CJK, emoji, quotes and backslashes."""
    repeats = length // len(_MIXED_TEXT) + 1
    return (_MIXED_TEXT * repeats)[:length]


def default_reply(prompt: str) -> str:
    """The reply to `prompt` when none is scripted: a deterministic, non-ASCII text.

    A ``[[chars N]]`` in the prompt asks for a reply of exactly N mixed characters.
    """
    chars = _CHARS_IN_PROMPT.search(prompt)
    if chars:
        return mixed_text(int(chars.group(1)))
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return f"Привет! You said “{shown}”. 你好, 世界 👋 Reply {digest}: \"quotes\" and \\ fine."


class MockServer:
    """The mock upstream on an asyncio server; ``async with MockServer() as server``."""

    def __init__(
        self, options: Optional[MockOptions] = None, *, host: str = "127.0.0.1", port: int = 0,
        **overrides: Any,
    ) -> None:
        self.options = dataclasses.replace(options or MockOptions(), **overrides)
        self.host = host
        self.port = port
        self.url = ""
        self.requests: List[RecordedRequest] = []
        self._random = random.Random(self.options.seed)
        self.token_ids = [f"{self._random.getrandbits(128):032x}" for _ in range(5)]
        self._credentials: Dict[str, str] = {}  # credential cookie -> token id
        self._access_tokens: Dict[str, str] = {}  # credential cookie -> access token
        self._expired: Set[str] = set()
        self._queued_faults: List[str] = []
        self._server: Optional[asyncio.AbstractServer] = None
        self._connections: Set["asyncio.Task[None]"] = set()

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> "MockServer":
        context = None
        if self.options.certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.options.certfile, self.options.keyfile)
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

    # -- test controls --------------------------------------------------------------

    def fail_next(self, fault: str, times: int = 1) -> None:
        """Apply `fault` to the next `times` conversations."""
        _parse_fault(fault)
        self._queued_faults.extend([fault] * times)

    def expire_tokens(self) -> None:
        """Make every access token issued so far expired, as the upstream does."""
        self._expired.update(self._access_tokens.values())
        self._access_tokens.clear()

    def count(self, method: str, path: str) -> int:
        """How many requests of `method` to `path` arrived."""
        return sum(1 for r in self.requests if r.method == method and r.path == path)

    # -- HTTP -----------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _BadRequest as exc:
                    await _send_json(writer, exc.status, {"detail": exc.detail}, keep_alive=False)
                    break
                if request is None:
                    break
                self.requests.append(request)
                keep_alive = (request.header("connection") or "").lower() != "close"
                keep_alive = await self._route(request, reader, writer, keep_alive)
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

    async def _route(
        self, request: RecordedRequest, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter, keep_alive: bool,
    ) -> bool:
        routes = {
            "/api/loads": ("GET", self._loads),
            "/auth/login": ("POST", self._login),
            "/api/auth/session": ("GET", self._session),
        }
        if request.path == "/api/conversation":
            if request.method != "POST":
                await _send_json(writer, 405, {"detail": "Method Not Allowed"}, keep_alive=keep_alive)
                return keep_alive
            return await self._conversation(request, reader, writer, keep_alive)
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
        return 200, {"loads": [{"token_id": t, "count": counts.randint(1, 99)} for t in self.token_ids]}, []

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
        cookie = f"credential={credential}; Path=/; HttpOnly; SameSite=Lax"
        return 200, {"code": 0, "url": "/"}, [("Set-Cookie", cookie)]

    def _session(self, request: RecordedRequest) -> Tuple[int, Any, List[Tuple[str, str]]]:
        credential = _cookie(request, "credential")
        if self.options.session == "empty" or credential not in self._credentials:
            return 200, {}, []
        token = self._access_tokens.get(credential)
        if token is None:
            token = self.options.access_token or "eyJ" + uuid.UUID(int=self._random.getrandbits(128)).hex
            self._access_tokens[credential] = token
        return 200, {
            "user": {"id": "user-" + self._credentials[credential][:12], "name": "shared",
                     "email": "shared@example.com", "image": None, "picture": None, "groups": []},
            "expires": "2089-08-08T23:59:59.999Z",
            "accessToken": token,
            "authProvider": "auth0",
        }, []

    # -- the conversation -----------------------------------------------------------

    async def _conversation(
        self, request: RecordedRequest, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter, keep_alive: bool,
    ) -> bool:
        authorization = request.header("x-authorization") or ""
        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        if not token:
            await _send_json(writer, 401, {"detail": "Unauthorized: no X-Authorization header"}, keep_alive=keep_alive)
            return keep_alive
        if token not in self._access_tokens.values():
            await _send_json(writer, 401, {"detail": _EXPIRED}, keep_alive=keep_alive)
            return keep_alive
        try:
            body = json.loads(request.body)
        except ValueError:
            await _send_json(writer, 400, {"detail": "Invalid JSON body."}, keep_alive=keep_alive)
            return keep_alive
        problem = _conversation_problem(body)
        if problem:
            await _send_json(writer, 422, {"detail": problem}, keep_alive=keep_alive)
            return keep_alive
        prompt = body["messages"][0]["content"]["parts"][0]
        fault = self._fault_for(request, prompt)
        name, args = _parse_fault(fault) if fault else ("", [])
        if name == "delay_headers":
            await asyncio.sleep(float(args[0]))
        if name == "hang":
            await _wait_for_close(reader)
            return False
        if name in ("status", "expired200", "content_type"):
            await self._send_error_fault(writer, name, args, keep_alive)
            return keep_alive
        reply = self.options.reply
        text = reply(prompt) if callable(reply) else (reply if reply is not None else default_reply(prompt))
        events = self._events(body, "" if name == "empty" else text, name, args)
        return await self._send_stream(request, reader, writer, events, name, args, keep_alive)

    def _fault_for(self, request: RecordedRequest, prompt: str) -> Optional[str]:
        if self._queued_faults:
            return self._queued_faults.pop(0)
        in_prompt = _FAULT_IN_PROMPT.search(prompt)
        fault = request.header("x-mock-fault") or (in_prompt.group(1) if in_prompt else None)
        return fault or self.options.fault

    async def _send_error_fault(
        self, writer: asyncio.StreamWriter, name: str, args: List[str], keep_alive: bool
    ) -> None:
        if name == "expired200":
            await _send_json(writer, 200, {"detail": _EXPIRED}, keep_alive=keep_alive)
        elif name == "content_type":
            await _send_body(writer, 200, "text/html; charset=utf-8", b"<html><body>Hi</body></html>", keep_alive)
        else:
            status = int(args[0])
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
            headers = [("Retry-After", args[1])] if status == 429 and len(args) > 1 else []
            await _send_json(writer, status, {"detail": detail}, keep_alive=keep_alive, headers=headers)

    def _events(
        self, body: Dict[str, Any], text: str, fault: str, args: List[str]
    ) -> Iterator[Tuple[Tuple[_Bytes, ...], bool]]:
        """The stream's events as (the parts of their JSON, carries assistant text).

        The parts are only valid until the next event: the text grows in place.
        """
        options = self.options
        conversation_id = body.get("conversation_id") or str(uuid.UUID(int=self._random.getrandbits(128)))
        user = body["messages"][0]
        model = body.get("model") or "text-davinci-002-render-sha"
        now = time.time()
        def dump(value: Any) -> str:
            return json.dumps(value, ensure_ascii=options.ascii_json, indent=1 if options.multiline else None)

        yield (dump({
            "message": {"id": str(uuid.uuid4()), "author": {"role": "system", "name": None, "metadata": {}},
                        "create_time": now, "update_time": None,
                        "content": {"content_type": "text", "parts": [""]}, "status": "finished_successfully",
                        "end_turn": True, "weight": 0.0, "metadata": {}, "recipient": "all"},
            "conversation_id": conversation_id, "error": None}).encode(),), False
        yield (dump({
            "message": {"id": user.get("id"), "author": {"role": "user", "name": None, "metadata": {}},
                        "create_time": now, "update_time": None, "content": user["content"],
                        "status": "finished_successfully", "end_turn": None, "weight": 1.0,
                        "metadata": {"timestamp_": "absolute", "message_type": None}, "recipient": "all"},
            "conversation_id": conversation_id, "error": None}).encode(),), False
        message_id = str(uuid.uuid4())

        def assistant(status: str, finished: bool) -> Tuple[bytes, bytes]:
            metadata: Dict[str, Any] = {"message_type": "next", "model_slug": model}
            if finished:
                metadata["finish_details"] = {"type": options.finish, "stop": "<|im_end|>"}
            event: Dict[str, Any] = {
                "message": {"id": message_id, "author": {"role": "assistant", "name": None, "metadata": {}},
                            "create_time": now, "update_time": None,
                            "content": {"content_type": "text", "parts": ["\x00TEXT\x00"]},
                            "status": status, "end_turn": True if finished else None, "weight": 1.0,
                            "metadata": metadata, "recipient": "all"},
                "conversation_id": conversation_id, "error": None}
            head, tail = dump(event).split(dump("\x00TEXT\x00"))
            return (head + '"').encode(), ('"' + tail).encode()

        # The escaped text grows in place, piece by piece: escaping or copying the whole
        # text for every event would make the mock quadratic and the benchmark's bottleneck.
        escaped = bytearray()
        head, tail = assistant("in_progress", False)
        step_in_prompt = _STEP_IN_PROMPT.search(str(user["content"].get("parts", [""])[0]))
        step = max(int(step_in_prompt.group(1)) if step_in_prompt else options.step, 1)
        sent = 0
        for start in range(0, len(text), step):
            escaped += dump(text[start:start + step])[1:-1].encode()
            sent += 1
            if fault == "error_event" and sent > int(args[0]):
                yield (json.dumps({"message": None, "conversation_id": conversation_id,
                                   "error": "Something went wrong in the model."}).encode(),), False
                return
            if fault == "rewrite" and sent == int(args[0]) + 1:
                yield (head, b"REWRITTEN ", escaped, tail), True
                continue
            yield (head, escaped, tail), True
        if text:
            head, tail = assistant("finished_successfully", True)
            yield (head, escaped, tail), True
        yield (dump({"conversation_id": conversation_id, "message_id": message_id, "is_completion": True,
                     "moderation_response": {"flagged": False, "blocked": False,
                                             "moderation_id": "modr-" + message_id[:8]}}).encode(),), False
        yield (b"[DONE]",), False

    async def _send_stream(
        self, request: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        events: Iterator[Tuple[Tuple[_Bytes, ...], bool]], fault: str, args: List[str],
        keep_alive: bool,
    ) -> bool:
        options = self.options
        framing = options.framing
        keep_alive = keep_alive and framing != "close"
        newline = options.newline.encode()
        prefix = b"data: " if options.data_space else b"data:"
        plain = not (options.multiline or options.pings or options.comments)
        compressor = zlib.compressobj(wbits=31) if self._compress(request) else None
        first = [b"\xef\xbb\xbf"] if options.bom else []

        def encoded(parts: Tuple[_Bytes, ...]) -> Tuple[_Bytes, ...]:
            """The event as it goes on the wire, before the transfer coding."""
            if plain:
                pieces: Tuple[_Bytes, ...] = (prefix, *parts, newline, newline)
            else:
                payload = b"".join(parts)
                lines = payload.split(b"\n") if options.multiline else [payload]
                out = b"".join([prefix + line + newline for line in lines]) + newline
                if options.pings:
                    stamp = b'"' + str(time.time()).encode() + b'"'
                    out = b"event: ping" + newline + prefix + stamp + newline + newline + out
                if options.comments:
                    out = b": keep-alive" + newline + out
                pieces = (out,)
            if first:
                pieces = (first.pop(), *pieces)
            if compressor is not None:
                joined = b"".join(pieces)
                pieces = (compressor.compress(joined) + compressor.flush(zlib.Z_SYNC_FLUSH),)
            return pieces

        headers = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache")]
        if compressor is not None:
            headers.append(("Content-Encoding", "gzip"))
        flagged: List[Tuple[Tuple[_Bytes, ...], bool]] = []
        if framing == "length":
            # The length must be known first: build the whole body (fine for a mock); a
            # fault then leaves it short of what was declared.
            flagged = [((b"".join(encoded(parts)),), flag) for parts, flag in events]
            tail = compressor.flush() if compressor is not None else b""
            if tail:
                flagged.append(((tail,), False))
            headers.append(("Content-Length", str(sum(len(p[0][0]) for p in flagged))))
            events = iter(flagged)
        elif framing == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
        await _write_head(writer, 200, headers, keep_alive)
        chunked = framing == "chunked"
        delay = float(args[0]) if fault == "delay_events" else options.delay
        # Events go out in batches of about 64 KiB unless something needs each one on its
        # own: a delay, a fault, or writes of a given size.
        each = bool(delay or fault or options.write_size)
        batch = bytearray()
        assistant_count = 0
        for count, (parts, is_assistant) in enumerate(events):
            if fault in ("cut", "reset", "garbage", "hang_after") and count == int(args[0]):
                return await self._break_stream(reader, writer, fault, chunked, keep_alive)
            wire = parts if framing == "length" else encoded(parts)
            if chunked:
                batch += b"%x\r\n" % sum(len(piece) for piece in wire)
            for piece in wire:
                batch += piece
            if chunked:
                batch += b"\r\n"
            if each or len(batch) >= 65536:
                await self._write(writer, batch)
                batch = bytearray()
            assistant_count += is_assistant
            if fault == "pause_after" and is_assistant and assistant_count == int(args[0]):
                await asyncio.sleep(float(args[1]))
            if delay:
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
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: str,
        chunked: bool, keep_alive: bool,
    ) -> bool:
        """End the stream the way `fault` says; returns whether the connection stays open."""
        if fault == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif fault == "garbage":
            garbage = random.Random(self.options.seed)
            await self._write(writer, bytes(garbage.getrandbits(8) for _ in range(64)))
        elif fault == "hang_after":
            await _wait_for_close(reader)
        elif chunked:  # "cut": a clean end of the body, only [DONE] is missing
            await self._write(writer, b"0\r\n\r\n")
            return keep_alive
        return False

    async def _write(self, writer: asyncio.StreamWriter, data: Union[bytes, bytearray]) -> None:
        size = self.options.write_size
        try:
            if size <= 0:
                writer.write(data)
                await writer.drain()
                return
            for start in range(0, len(data), size):
                writer.write(data[start:start + size])
                await writer.drain()
        except ConnectionError:
            raise _Closed() from None


def _parse_fault(fault: str) -> Tuple[str, List[str]]:
    name, *args = fault.split(":")
    needs = {"status": 1, "delay_headers": 1, "delay_events": 1, "pause_after": 2, "hang": 0,
             "hang_after": 1, "cut": 1, "reset": 1, "garbage": 1, "error_event": 1, "rewrite": 1,
             "expired200": 0, "content_type": 0, "empty": 0}
    if name not in needs or len(args) < needs[name]:
        raise ValueError(f"unknown fault {fault!r}; faults: {', '.join(FAULTS)}")
    try:
        [float(a) for a in args]
    except ValueError:
        raise ValueError(f"fault {fault!r}: arguments must be numbers") from None
    return name, args


def _conversation_problem(body: Any) -> Optional[str]:
    if not isinstance(body, dict):
        return "The body must be a JSON object."
    if body.get("action") not in ("next", "variant", "continue"):
        return "action must be next, variant or continue."
    messages = body.get("messages")
    try:
        parts = messages[0]["content"]["parts"]  # type: ignore[index]
        if not isinstance(parts[0], str):
            raise TypeError
    except (TypeError, KeyError, IndexError):
        return "messages[0].content.parts[0] must be a string."
    for key in ("parent_message_id", "model"):
        if not isinstance(body.get(key), str):
            return f"{key} must be a string."
    return None


def _cookie(request: RecordedRequest, name: str) -> Optional[str]:
    for part in (request.header("cookie") or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


async def _read_request(reader: asyncio.StreamReader) -> Optional[RecordedRequest]:
    """The next request on the connection, None when the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest(400, "Incomplete request.") from None
        return None
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, "Request Header Fields Too Large") from None
    lines = head[:-4].decode("latin-1").split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
        raise _BadRequest(400, "Malformed request line.")
    method, target, _ = request_line
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(400, "Malformed header line.")
        headers.append((name, value.strip()))
    lookup = {k.lower(): v for k, v in headers}
    if "transfer-encoding" in lookup:
        raise _BadRequest(411, "Length Required")
    try:
        length = int(lookup.get("content-length", "0"))
        if length < 0 or length > 16 * 1024 * 1024:
            raise ValueError
    except ValueError:
        raise _BadRequest(400, "Bad Content-Length.") from None
    body = await reader.readexactly(length) if length else b""
    if target.startswith(("http://", "https://")):  # absolute form, as proxies forward it
        parts = urllib.parse.urlsplit(target)
        target = urllib.parse.urlunsplit(("", "", parts.path, parts.query, parts.fragment))
    path, _, query = target.partition("?")
    return RecordedRequest(method, path, query, tuple(headers), body)


async def _wait_for_close(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def _write_head(
    writer: asyncio.StreamWriter, status: int, headers: List[Tuple[str, str]], keep_alive: bool
) -> None:
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
    """Run a `MockServer` on its own thread and event loop for the ``with`` block."""
    ready = threading.Event()
    holder: Dict[str, Any] = {}

    async def run() -> None:
        stop = asyncio.Event()
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), stop
        try:
            async with MockServer(options, **overrides) as server:
                holder["server"] = server
                ready.set()
                await stop.wait()
        except Exception as exc:  # noqa: BLE001 - re-raised in the thread that waits for `ready`
            holder["error"] = exc
            ready.set()

    thread = threading.Thread(target=asyncio.run, args=(run(),), name="mock_server", daemon=True)
    thread.start()
    ready.wait()
    if "error" in holder:
        thread.join()
        raise holder["error"]
    try:
        yield holder["server"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join()


def _cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mock_server", description="An offline copy of the FakeGpt upstream.",
        epilog="faults: " + "; ".join(f"{k}: {v}" for k, v in FAULTS.items()),
    )
    defaults = MockOptions()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--framing", choices=["chunked", "length", "close"], default=defaults.framing)
    parser.add_argument("--newline", choices=["lf", "crlf", "cr"], default="lf")
    parser.add_argument("--no-data-space", dest="data_space", action="store_false")
    parser.add_argument("--multiline", action="store_true")
    parser.add_argument("--comments", action="store_true")
    parser.add_argument("--pings", action="store_true")
    parser.add_argument("--bom", action="store_true")
    parser.add_argument("--write-size", type=int, default=0, help="write the stream N bytes at a time")
    parser.add_argument("--step", type=int, default=defaults.step, help="characters per event")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between events")
    parser.add_argument("--reply", help="the reply text (default: derived from the prompt)")
    parser.add_argument("--finish", default="stop", choices=["stop", "max_tokens"])
    parser.add_argument("--ascii-json", action="store_true")
    parser.add_argument("--gzip", choices=["off", "accept", "always"], default="off")
    parser.add_argument("--loads", choices=["normal", "empty", "malformed"], default="normal")
    parser.add_argument("--login", choices=["ok", "refuse"], default="ok")
    parser.add_argument("--session", choices=["ok", "empty"], default="ok")
    parser.add_argument("--fault", help="a fault for every conversation, e.g. cut:3 or status:429:7")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Serve until Ctrl-C or SIGTERM; the first line of stdout is the base URL."""
    parser = _cli_parser()
    args = vars(parser.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    args["newline"] = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}[args["newline"]]
    if args["fault"]:
        try:
            _parse_fault(args["fault"])
        except ValueError as exc:
            parser.error(str(exc))
    options = MockOptions(**args)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        async with MockServer(options, host=host, port=port) as server:
            print(server.url, flush=True)
            await stop.wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"mock_server: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
