"""Offline tests of fakegpt and mock_server: pure layers on bytes, then end to end.

Every server here binds to 127.0.0.1 on an ephemeral port.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import calendar
import collections.abc
import contextlib
import copy
import dataclasses
import datetime
import errno
import functools
import gc
import http.client
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import pathlib
import pty
import random
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse
import urllib.request
import uuid
import warnings
import zlib
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import fakegpt
import mock_server
from fakegpt import (
    NEED_DATA,
    ChatEvent,
    ConversationDecoder,
    Data,
    EndOfMessage,
    FakeGpt,
    Limits,
    Response,
    ResponseReader,
    ServerSentEvent,
    SSEDecoder,
)

HERE = pathlib.Path(__file__).resolve().parent
TESTDATA = HERE / "testdata"
USER = [{"role": "user", "content": "Hello"}]
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SENTINEL = "SENTINEL-ACCESS-TOKEN-5f3c"


@contextlib.contextmanager
def environment(**values: Optional[str]) -> Iterator[None]:
    """`os.environ` with `values` in it (None: unset) for the block, as it was after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        set_environment(values)
        yield
    finally:
        set_environment(saved)


def set_environment(values: Dict[str, Optional[str]]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True, scope="session")
def no_user_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test, nor any command a test starts, writes to the user's cache or state: they
    point into a temporary directory, and the CLI keeps no session unless a test asks."""
    home = tmp_path_factory.mktemp("home")
    with environment(XDG_CACHE_HOME=str(home / "cache"), XDG_STATE_HOME=str(home / "state"),
                     FAKEGPT_NO_SESSION_CACHE="1"):
        yield


@pytest.fixture(autouse=True, scope="session")
def bytecode_kept_for_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite starts a Python process a few hundred times, and where bytecode is not
    written (PYTHONDONTWRITEBYTECODE) each compiled fakegpt.py afresh: a tenth of a second
    or more each time, a fifth of the suite. Those processes keep their bytecode in a
    directory of the session's own instead, never beside the sources."""
    with environment(PYTHONDONTWRITEBYTECODE=None, PYTHONPYCACHEPREFIX=str(tmp_path_factory.mktemp("pycache"))):
        yield


# ---------------------------------------------------------------------------------------
# The modules' shape: layers that hold, no object in another's private state
# ---------------------------------------------------------------------------------------

BANNER = re.compile(r"^# -{20,}\n# (.+)\n# -{20,}$", re.M)
SEED_ATTRIBUTES = {"_access_token", "_cookie_jar"}  # the seed documents them on the class


def names_in(node: ast.AST) -> Iterator[str]:
    """Every name `node` reads, string annotations ("_Options") included."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            yield sub.id
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value.isprintable():
            try:
                inner = ast.parse(sub.value, mode="eval")
            except SyntaxError:
                continue
            yield from (n.id for n in ast.walk(inner) if isinstance(n, ast.Name))


def later_section_names(source: str) -> List[Tuple[str, str, str]]:
    """(name, the section using it, the later section defining it) for each such use."""
    starts = [(source.count("\n", 0, m.start()) + 1, m.group(1)) for m in BANNER.finditer(source)]

    def section(line: int) -> int:
        return max([i for i, (start, _) in enumerate(starts) if start <= line], default=-1)

    tree = ast.parse(source)
    defined: Dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, section(node.lineno))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    defined.setdefault(target.id, section(node.lineno))
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["__all__"]:
            continue  # names exported, not used
        here = section(node.lineno)
        for name in names_in(node):
            if defined.get(name, -1) > here:
                found.add((name, starts[here][1], starts[defined[name]][1]))
    return sorted(found)


def private_reaches(source: str) -> List[str]:
    """Each ``x._member`` whose ``x`` is not ``self``, ``cls`` or ``super()``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
            continue
        if node.attr.endswith("__") or node.attr in SEED_ATTRIBUTES:
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_shape_checks_catch_what_they_name() -> None:
    layered = "# ---------------------\n# One\n# ---------------------\ndef a(x: 'B') -> int:\n    return b()\n" \
              "# ---------------------\n# Two\n# ---------------------\nclass B: pass\ndef b() -> int:\n    return 1\n"
    assert later_section_names(layered) == [("B", "One", "Two"), ("b", "One", "Two")]
    reaching = "class A:\n    def f(self, other):\n        self._ok = other._bad + super()._ok2 + other._access_token\n"
    assert private_reaches(reaching) == ["line 3: other._bad"]


def test_no_section_of_fakegpt_uses_a_name_defined_in_a_later_section() -> None:
    source = (HERE / "fakegpt.py").read_text(encoding="utf-8")
    assert [m.group(1) for m in BANNER.finditer(source)][:3] == [
        "Constants and shared helpers", "Errors", "Pure protocol: HTTP/1.1 response reader (RFC 9112), bytes in, events out"]
    assert later_section_names(source) == []


@pytest.mark.parametrize("module", ["fakegpt.py", "mock_server.py"])
def test_no_object_reads_or_writes_another_objects_private_members(module: str) -> None:
    assert private_reaches((HERE / module).read_text(encoding="utf-8")) == []


# ---------------------------------------------------------------------------------------
# Helpers: feeding pure readers, building responses
# ---------------------------------------------------------------------------------------


def reader_events(chunks: Sequence[bytes], **kwargs: Any) -> Iterator[Any]:
    """Every event a `ResponseReader` makes of `chunks` then EOF, up to `EndOfMessage`."""
    reader = ResponseReader(**kwargs)
    for chunk in [*chunks, b""]:
        reader.feed(chunk)
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                break
            yield event
            if isinstance(event, EndOfMessage):
                return
    raise AssertionError("no EndOfMessage")


def read_response(chunks: Sequence[bytes], **kwargs: Any) -> Tuple[Response, bytes]:
    """Feed `chunks` then EOF; the response head and the whole body."""
    head: Optional[Response] = None
    body = bytearray()
    for event in reader_events(chunks, **kwargs):
        if isinstance(event, Response):
            head = event
        elif isinstance(event, Data):
            body += event.data
    assert head is not None
    return head, bytes(body)


def three_ways(data: bytes) -> List[List[bytes]]:
    """All at once, one byte at a time, and in uneven pieces."""
    return [[data], [data[i:i + 1] for i in range(len(data))], [data[i:i + 7] for i in range(0, len(data), 7)]]


def split_at(data: bytes, cuts: Sequence[int]) -> List[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return [piece for piece in pieces if piece]  # b"" means EOF to the readers


def corrupted(body: Union[bytes, bytearray], edits: Sequence[Tuple[str, int, int]]) -> bytearray:
    """`body` with each edit made: a byte flipped, inserted or deleted at a position."""
    body = bytearray(body)
    for kind, position, value in edits:
        position %= len(body)
        if kind == "flip":
            body[position] ^= value or 1
        elif kind == "insert":
            body[position:position] = bytes([value])
        else:
            del body[position]
    return body


def sse_events(chunks: Sequence[bytes]) -> List[ServerSentEvent]:
    decoder = SSEDecoder()
    events: List[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    decoder.close()
    return events


def assistant_event(text: str, *, status: str = "in_progress", message_id: str = "m1",
                    finish: Optional[str] = None, ensure_ascii: bool = False,
                    separators: Tuple[str, str] = (", ", ": "), extra: Optional[Dict[str, Any]] = None) -> bytes:
    metadata: Dict[str, Any] = {"message_type": "next", "model_slug": "text-davinci-002-render-sha"}
    if finish:
        metadata["finish_details"] = {"type": finish, "stop": "<|im_end|>"}
    message = {"id": message_id, "author": {"role": "assistant", "name": None, "metadata": {}},
               "create_time": 1700000000.0, "update_time": None,
               "content": {"content_type": "text", "parts": [text]}, "status": status,
               "end_turn": None, "weight": 1.0, "metadata": metadata, "recipient": "all"}
    payload: Dict[str, Any] = {"message": message, "conversation_id": "c1", "error": None}
    if extra:
        message["metadata"].update(extra)
        payload.update({"x_" + k: v for k, v in extra.items()})
    return json.dumps(payload, ensure_ascii=ensure_ascii, separators=separators).encode()


def conversation_bytes(texts: Sequence[str], *, framing: str = "chunked", newline: bytes = b"\n",
                       **event_options: Any) -> bytes:
    """A whole HTTP response streaming the cumulative `texts`, then [DONE]."""
    events = [assistant_event(t, **event_options) for t in texts] + [b"[DONE]"]
    body = b"".join(b"data: " + e + newline + newline for e in events)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    if framing == "chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%b\r\n" % (len(e) + 2 * len(newline) + 6, b"data: " + e + newline + newline) for e in events
        ) + b"0\r\n\r\n"
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    return head + b"\r\n" + body


def pipeline(chunks: Sequence[bytes]) -> str:
    """The text the three pure layers make of a response; raises what they raise."""
    sse, conversation = SSEDecoder(), ConversationDecoder()
    pieces: List[str] = []
    for event in reader_events(chunks):
        if isinstance(event, EndOfMessage):
            raise fakegpt.TruncatedStreamError("ended before [DONE]")
        if isinstance(event, Data):
            for sse_event in sse.feed(event.data):
                chat = conversation.feed(sse_event)
                if conversation.done:
                    return "".join(pieces)
                if chat is not None:
                    pieces.append(chat.delta)
    raise AssertionError("unreachable: EOF always ends the response")


def reference_deltas(datas: Sequence[bytes]) -> List[str]:
    """What decoding every event in full gives, the rule written out plainly."""
    given, deltas = "", []
    for data in datas:
        message = json.loads(data.decode("utf-8", "replace"))["message"]
        text = message["content"]["parts"][0]
        if text.startswith(given):
            deltas.append(text[len(given):])
            given = text
        elif given.startswith(text):
            deltas.append("")
        else:
            raise fakegpt.ProtocolError("rewrite")
    return deltas


def chat_tuple(event: ChatEvent) -> Tuple[Any, ...]:
    return (event.delta, event.reasoning, event.text, event.status, event.finish_reason, event.conversation_id, event.message_id)


def decode(datas: Sequence[bytes]) -> Tuple[List[str], ConversationDecoder]:
    decoder = ConversationDecoder()
    deltas = []
    for data in datas:
        event = decoder.feed(E(raw=data))
        if event is not None:
            deltas.append(event.delta)
    return deltas, decoder


def full_decoder() -> ConversationDecoder:
    """A decoder that never learns a shape: every event decoded in full, the reference."""
    return ConversationDecoder(fast_path=False)


def decoder_outcome(decoder: ConversationDecoder, datas: Sequence[bytes]) -> Tuple[List[Any], Optional[str], Tuple[Any, ...]]:
    events: List[Any] = []
    try:
        for data in datas:
            event = decoder.feed(E(raw=data))
            events.append(None if event is None else chat_tuple(event))
    except fakegpt.FakeGptError as exc:
        return events, f"{type(exc).__name__}: {exc}", ()
    return events, None, (decoder.text, decoder.status, decoder.finish_reason, decoder.conversation_id, decoder.message_id)


def layered_outcome(chunks: Sequence[bytes], limits: Limits,
                    conversation: Optional[ConversationDecoder] = None) -> Tuple[List[Tuple[Any, ...]], Optional[str]]:
    """The events and the error of the event stream decoded by the two decoders in turn."""
    sse, events = SSEDecoder(limits=limits), []
    conversation = conversation or ConversationDecoder()
    try:
        for chunk in chunks:
            for sse_event in sse.feed(chunk):
                event = conversation.feed(sse_event)
                if conversation.done:
                    return events, None
                if event is not None:
                    events.append(chat_tuple(event))
        sse.close()
    except fakegpt.FakeGptError as exc:
        return events, f"{type(exc).__name__}: {exc}"
    return events, None


def reply_outcome(chunks: Sequence[bytes], limits: Limits, text_only: bool = False) -> Tuple[List[Any], Optional[str]]:
    """The same through `_ReplyDecoder`, shortcut included (only the deltas if `text_only`)."""
    reply, events = fakegpt._ReplyDecoder(ConversationDecoder(), limits, text_only=text_only), []
    batch: List[Any] = []
    try:
        for chunk in chunks:
            batch = []
            reply.feed(chunk, batch)
            events += batch if text_only else [chat_tuple(e) for e in batch]
            if reply.done:
                return events, None
        reply.close()
    except fakegpt.FakeGptError as exc:
        events += batch if text_only else [chat_tuple(e) for e in batch]
        return events, f"{type(exc).__name__}: {exc}"
    return events, None


def text_only_outcome(chunks: Sequence[bytes], limits: Limits) -> Tuple[str, Optional[str]]:
    """The text `_ReplyDecoder` gives when only text is wanted (the pieces of each chunk
    joined, as `texts()` joins them), and the error; every piece must be text."""
    pieces, error = reply_outcome(chunks, limits, text_only=True)
    assert all(isinstance(piece, str) and piece for piece in pieces)
    return "".join(pieces), error


def json_sizes(run: Callable[[], Any]) -> Tuple[Any, List[int]]:
    """What `run` returns, and the size of every document fakegpt gave json to decode
    meanwhile (json.loads, or its scanner directly)."""
    loads, scan, sizes = json.loads, fakegpt._scan_json, []

    def measured(s: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(s))
        return loads(s, *args, **kwargs)

    def measured_scan(s: str, index: int) -> Any:
        value, end = scan(s, index)
        if end == len(s):  # else json.loads decodes it (and counts it)
            sizes.append(len(s))
        return value, end

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fakegpt.json, "loads", measured)
        patch.setattr(fakegpt, "_scan_json", measured_scan)
        return run(), sizes


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections while the test runs: bound, never listening,
    so that no other process (a server of another pytest-xdist worker) can take it meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


def port_for_a_server() -> int:
    """A free loopback port for a server that binds it later, below the kernel's ephemeral
    range, where no bind to port 0 and no outgoing connection of another test lands meanwhile."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            ephemeral = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768  # Linux's default
    for port in random.sample(range(10000, max(ephemeral, 10001)), 50):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


# ---------------------------------------------------------------------------------------
# HTTP/1.1 response reader
# ---------------------------------------------------------------------------------------

VALID_RESPONSES = {
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    "chunk extensions and trailers": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 ;name=value\r\nhello\r\n"
        b"0;last\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n", b"hello"),
    "chunk sizes followed by spaces and tabs, as some servers send them": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n6\t \r\n world\r\n0  \r\n\r\n", b"hello world"),
    "upper-case hex chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
    "close-delimited": (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", b"until the end"),
    "interim 100 and 103 skipped": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "204 has no body": (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    "304 has no body": (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", b""),
    "bare LF line endings in the head": (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", b"ok"),
    "repeated identical Content-Length": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "HTTP/1.0 and an empty reason": (b"HTTP/1.0 200\r\nContent-Length: 2\r\n\r\nok", b"ok"),
}


def gzip_bytes(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(data) + compressor.flush()


def deflate_bytes(data: bytes, *, raw: bool) -> bytes:
    compressor = zlib.compressobj(wbits=-15 if raw else 15)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize("name", sorted(VALID_RESPONSES))
def test_http_reader_reads_each_framing_fed_three_ways(name: str) -> None:
    data, body = VALID_RESPONSES[name]
    for chunks in three_ways(data):
        head, got = read_response(chunks)
        assert got == body
        assert 200 <= head.status < 600


def test_http_reader_ignores_trailing_garbage_after_a_framed_body() -> None:
    for data, body in (VALID_RESPONSES["content-length"], VALID_RESPONSES["chunked"]):
        for chunks in three_ways(data + b"\x00garbage HTTP/1.1 500"):
            assert read_response(chunks)[1] == body


def test_http_reader_head_request_has_no_body() -> None:
    head, body = read_response([b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"], method="HEAD")
    assert (head.status, body) == (200, b"")


def test_http_reader_keeps_headers_lower_cased_and_repeated() -> None:
    head, _ = read_response([b"HTTP/1.1 200 Fine\r\nSet-Cookie: a=1\r\nSET-COOKIE: b=2\r\nX-A:  spaced \t\r\nContent-Length: 0\r\n\r\n"])
    assert head.reason == "Fine"
    assert head.get_all("set-cookie") == ["a=1", "b=2"]
    assert head.get("X-A") == "spaced"


@pytest.mark.parametrize("data, words", [
    (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", "invalid header name 'Content-Length '"),
    (b"HTTP/1.1  200 OK\r\n\r\n", "malformed status line 'HTTP/1.1  200 OK'"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 1a\r\n", "malformed chunk size line ' 1a'"),
    (b"HTTP/1.1 200 OK\r\nNo  colon\r\n\r\n", "header line without a colon: 'No  colon'"),
])
def test_http_reader_shows_a_malformed_line_as_it_came(data: bytes, words: str) -> None:
    with pytest.raises(fakegpt.ProtocolError) as caught:
        read_response([data])
    assert str(caught.value) == words  # with the white space that makes it wrong


def test_http_reader_reads_a_later_http_1_minor_version_as_1_1() -> None:
    # RFC 9110 2.5: a recipient processes a higher minor version of a major version it
    # implements as the highest minor version it implements.
    data = b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    reader = ResponseReader(method="GET")
    reader.feed(data)
    events = [reader.next_event(), reader.next_event(), reader.next_event()]
    assert isinstance(events[0], Response) and events[0].status == 200 and events[1] == Data(b"hi")
    assert isinstance(events[2], EndOfMessage) and reader.keep_alive  # persistent, as 1.1 is


def test_http_reader_joins_a_folded_header_line_to_its_field_as_user_agents_must() -> None:
    # RFC 9112 5.2: a user agent replaces each obs-fold (CRLF, then white space) in a
    # response with space before it reads the value; in a trailer too, which is dropped.
    data = (b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two \r\n\tthree\r\nX-B:\r\n b\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\nX-T: 1\r\n 2\r\n\r\n")
    for chunks in three_ways(data):
        head, body = read_response(chunks)
        assert head.get("x-a") == "one two three" and head.get("x-b") == "b" and body == b"ok"
        assert [name for name, _ in head.headers] == ["x-a", "x-b", "transfer-encoding"]
    # Each folded line counts against the limit of header lines, as a field's would.
    many = b"HTTP/1.1 200 OK\r\nX-A: 1\r\n" + b" more\r\n" * 10 + b"Content-Length: 0\r\n\r\n"
    with pytest.raises(fakegpt.LimitExceeded):
        read_response([many], limits=Limits(max_header_count=10))


@pytest.mark.parametrize("coding, encode", [
    ("gzip", gzip_bytes),
    ("deflate", lambda d: deflate_bytes(d, raw=False)),
    ("deflate", lambda d: deflate_bytes(d, raw=True)),
])
def test_http_reader_removes_content_coding(coding: str, encode: Any) -> None:
    payload = "décodé ✓ ".encode() * 500
    body = encode(payload)
    data = b"HTTP/1.1 200 OK\r\nContent-Encoding: %b\r\nContent-Length: %d\r\n\r\n%b" % (coding.encode(), len(body), body)
    for chunks in three_ways(data):
        assert read_response(chunks)[1] == payload


def http_response(body: bytes, framing: str, *, encoding: str = "gzip", status: bytes = b"200 OK",
                  content_type: bytes = b"text/event-stream") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type + b"\r\nContent-Encoding: " + encoding.encode() + b"\r\n"
    if framing == "chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%b\r\n" % (len(body[i:i + 100]), body[i:i + 100]) for i in range(0, len(body), 100)) + b"0\r\n\r\n"
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    return head + b"\r\n" + body


@PROPERTY
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=4), st.booleans(),
       st.sampled_from(["chunked", "length", "close"]), st.lists(st.integers(0, 2000), max_size=8))
def test_property_a_body_of_several_gzip_members_gives_all_of_them_for_any_split(
        members: List[bytes], padding: bool, framing: str, cuts: List[int]) -> None:
    body = b"".join(gzip_bytes(m) for m in members) + (b"\0" * 8 if padding else b"")
    _, received = read_response(split_at(http_response(body, framing), cuts))
    assert received == b"".join(members)


def test_http_reader_counts_compressed_input_that_waits() -> None:
    compressed = gzip_bytes(b"x" * (8 * 1024 * 1024))  # inflates far past one step
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(compressed))
    assert isinstance(reader.next_event(), Response)
    reader.feed(compressed)
    first = reader.next_event()
    assert isinstance(first, Data) and len(first.data) <= 1024 * 1024
    assert 0 < reader.buffered <= len(compressed)  # what waits is still counted, for flow control
    total = len(first.data)
    while True:
        event = reader.next_event()
        if isinstance(event, EndOfMessage):
            break
        assert isinstance(event, Data)
        total += len(event.data)
    assert total == 8 * 1024 * 1024 and reader.buffered == 0


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_http_reader_counts_body_bytes_fed_and_not_yet_read(framing: str) -> None:
    # A read that ends inside the body: the next one's body bytes are taken as they are
    # fed, before anyone reads them, and are counted as waiting, for flow control.
    body = b"0123456789hello"
    if framing == "chunked":
        head, first, rest = b"Transfer-Encoding: chunked", b"a\r\n0123", b"456789\r\n5\r\nhello\r\n0\r\n\r\n"
    else:
        head, first, rest = b"Content-Length: %d" % len(body), body[:4], body[4:]
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + first)
    assert isinstance(reader.next_event(), Response)
    assert reader.next_event() == Data(b"0123")
    reader.feed(rest)
    assert reader.buffered >= len(body) - 4  # framing may be counted too
    assert reader.next_event() == Data(body[4:])
    assert isinstance(reader.next_event(), EndOfMessage) and reader.buffered == 0


def test_http_reader_bounds_a_decompression_bomb_per_event() -> None:
    bomb = gzip_bytes(b"\x00" * (64 * 1024 * 1024))
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb)
    reader.next_event()
    sizes = []
    while True:
        event = reader.next_event()
        if not isinstance(event, Data):
            break
        sizes.append(len(event.data))
    assert sum(sizes) == 64 * 1024 * 1024
    assert max(sizes) <= 1024 * 1024


MALFORMED_RESPONSES = {
    "conflicting Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "Content-Length list that disagrees": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok!",
    "negative Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "Content-Length with a sign": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "Transfer-Encoding with Content-Length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "unsupported transfer coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "chunk size 0x1a": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x1a\r\n",
    "chunk size 1_a": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_a\r\n",
    "chunk size +1a": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+1a\r\n",
    "chunk size -1": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
    "chunk size with a leading space": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 1a\r\n",
    "chunk size with a space inside": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1 a\r\n",
    "empty chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
    "chunk data without CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
    "chunk data with a bare LF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\n0\r\n\r\n",
    "bad status line": b"HTTP/1.1 OK 200\r\n\r\n",
    "HTTP/2 status line": b"HTTP/2 200 OK\r\n\r\n",
    "status out of range": b"HTTP/1.1 999 Nope\r\n\r\n",
    "not HTTP at all": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "header line without a colon": b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
    "space before the colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "white space before the first field": b"HTTP/1.1 200 OK\r\n  X-A: 1\r\nContent-Length: 0\r\n\r\n",
    "a folded line with a NUL": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n a\x00b\r\nContent-Length: 0\r\n\r\n",
    "a folded Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n 3\r\n\r\nok",
    "NUL in a header value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "bare CR in a header value": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    "EOF before the declared length": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    "EOF inside a chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    "EOF before the last chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "EOF in the head": b"HTTP/1.1 200 OK\r\nContent-Le",
    "nothing at all": b"",
    "101 Switching Protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    "unknown content coding": b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 0\r\n\r\n",
    "corrupt gzip": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 8\r\n\r\nnotgzip!",
    "truncated gzip": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n" + gzip_bytes(b"x" * 100)[:10],
}


@pytest.mark.parametrize("name", sorted(MALFORMED_RESPONSES))
def test_http_reader_rejects_malformed_responses_with_protocol_error(name: str) -> None:
    for chunks in three_ways(MALFORMED_RESPONSES[name]):
        with pytest.raises(fakegpt.ProtocolError):
            read_response(chunks)


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nX-Long: ", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1"])
def test_http_reader_refuses_an_endless_line_with_bounded_memory(head: bytes) -> None:
    limits = Limits(max_line_size=1024)
    reader = ResponseReader(limits=limits)
    reader.feed(head)
    with pytest.raises(fakegpt.LimitExceeded):
        for _ in range(10_000):  # an endless server; the reader must stop it early
            if reader.next_event() is NEED_DATA:
                reader.feed(b"a" * 100)
            assert len(reader.unconsumed) <= limits.max_line_size + 200
    assert len(reader.unconsumed) <= limits.max_line_size + 200


def test_http_reader_limits_the_header_count() -> None:
    data = b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 11 + b"\r\n"
    with pytest.raises(fakegpt.LimitExceeded):
        read_response([data], limits=Limits(max_header_count=10))
    assert read_response([data.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n")], limits=Limits(max_header_count=12))[0].status == 200


@PROPERTY
@given(st.sampled_from(sorted(VALID_RESPONSES)), st.lists(st.integers(0, 400), max_size=12))
def test_property_http_reader_any_split_gives_the_same_body(name: str, cuts: List[int]) -> None:
    data, body = VALID_RESPONSES[name]
    assert read_response(split_at(data, cuts)) == read_response([data])


HEAD_FIELDS = st.sampled_from([
    b"Content-Length: 0", b"X-A:  spaced \t", b"Set-Cookie: a=1", b"Connection: close", b"Transfer-Encoding: chunked",
    b"X-Latin: caf\xe9", b"X-Empty:", b"X-Tab:\tv\t", b"x-MIXED-case: V", b"X-Long: " + b"v" * 40,
])
ODD_HEAD_LINES = st.sampled_from([
    b" folded", b"No colon", b"Bad Name: 1", b"X-A: a\x00b", b"X-A: a\rb", b"X-A: a\nb", b"X-A\n: 1",
    b"HTTP/1.1 100 Continue", b"", b":", b"X-\x80: 1", b"X-A: 1\n",
])


def head_outcome(chunks: Sequence[bytes], limits: Limits) -> Any:
    """What a reader makes of `chunks` (then EOF): its first event, or its error."""
    reader = ResponseReader(limits=limits)
    try:
        for chunk in [*chunks, b""]:
            reader.feed(chunk)
            event = reader.next_event()
            if event is not NEED_DATA:
                return event, reader.keep_alive
    except fakegpt.FakeGptError as exc:
        return type(exc), str(exc)
    raise AssertionError("nothing after EOF")


@PROPERTY
@given(st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 204 No", b"HTTP/1.1 100 Continue", b"HTTP/1.1 2000", b"HTTP/1.1 200 \xff"]),
       st.lists(HEAD_FIELDS, max_size=8), st.one_of(st.none(), st.none(), ODD_HEAD_LINES, st.binary(max_size=12)),
       st.integers(0, 8),
       st.sampled_from([b"\r\n", b"\r\n", b"\n"]), st.integers(1, 9), st.sampled_from([30, 100, 64 * 1024]))
@example(b"HTTP/1.1 200 OK", [b"X-Long: " + b"v" * 40], None, 0, b"\r\n", 9, 30)  # a line over the limit
@example(b"HTTP/1.1 200 OK", [b"X-A:  spaced \t"] * 3, None, 0, b"\r\n", 2, 100)  # more fields than the limit
def test_property_a_head_read_whole_is_what_reading_it_line_by_line_gives(
        status: bytes, lines: List[bytes], odd: Optional[bytes], where: int, ending: bytes,
        max_header_count: int, max_line_size: int) -> None:
    if odd is not None:
        lines.insert(where, odd)
    head = b"\r\n".join([status, *lines]) + b"\r\n" + ending + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    limits = Limits(max_header_count=max_header_count, max_line_size=max_line_size)
    whole = head_outcome([head], limits)
    assert whole == head_outcome([head[i:i + 1] for i in range(len(head))], limits)


def test_http_reader_returns_chunks_before_a_malformed_one_then_raises() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\nzz\r\n")
    assert isinstance(reader.next_event(), Response)
    assert reader.next_event() == Data(b"abcde")
    with pytest.raises(fakegpt.ProtocolError, match="chunk size"):
        reader.next_event()


KEEP_ALIVE_CASES = {
    # RFC 9112 9.3: HTTP/1.1 persists unless "close"; a body ended by the close cannot.
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "GET", True),
    "chunked with trailers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", "GET", True),
    "204 without a body": (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", True),
    "HEAD": (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", "HEAD", True),
    "after an interim 100": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "GET", True),
    "gzip by length": (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(gzip_bytes(b"hi")), gzip_bytes(b"hi")), "GET", True),
    "Connection: close": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", "GET", False),
    "close among other tokens": (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: Upgrade, CLOSE\r\n\r\n", "GET", False),
    "HTTP/1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", "GET", False),
    "HTTP/1.0 asking for keep-alive": (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n", "GET", False),
    "body ended by the close": (b"HTTP/1.1 200 OK\r\n\r\nhello", "GET", False),
    "bytes after the message": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK", "GET", False),
}


@pytest.mark.parametrize("name", sorted(KEEP_ALIVE_CASES))
def test_http_reader_says_whether_the_connection_may_carry_another_request(name: str) -> None:
    data, method, expected = KEEP_ALIVE_CASES[name]
    for chunks in three_ways(data):
        reader = ResponseReader(method=method)
        ended = False
        for chunk in chunks:
            assert ended or not reader.keep_alive  # never before the message has ended
            reader.feed(chunk)
            while (event := reader.next_event()) is not NEED_DATA:
                ended = ended or isinstance(event, EndOfMessage)
                if ended:
                    break
        if not ended:  # only a body ended by the close gets here
            reader.feed(b"")
            assert isinstance(reader.next_event(), EndOfMessage)
        assert reader.keep_alive is expected


def test_http_reader_does_not_keep_a_connection_whose_peer_has_closed() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(reader.next_event(), Response) and isinstance(reader.next_event(), EndOfMessage)
    assert reader.keep_alive
    reader.feed(b"")
    assert not reader.keep_alive


# ---------------------------------------------------------------------------------------
# Server-Sent Events (WHATWG "event stream interpretation")
# ---------------------------------------------------------------------------------------

E = ServerSentEvent
WHATWG_CASES: Dict[str, Tuple[bytes, List[ServerSentEvent]]] = {
    "LF": (b"data: a\n\ndata: b\n\n", [E(raw=b"a"), E(raw=b"b")]),
    "CRLF": (b"data: a\r\n\r\ndata: b\r\n\r\n", [E(raw=b"a"), E(raw=b"b")]),
    "lone CR": (b"data: a\r\rdata: b\r\r", [E(raw=b"a"), E(raw=b"b")]),
    "mixed endings": (b"data: a\r\n\rdata: b\n\r\n", [E(raw=b"a"), E(raw=b"b")]),
    "no space after the colon": (b"data:a\n\n", [E(raw=b"a")]),
    "only one space is removed": (b"data:  a \n\n", [E(raw=b" a ")]),
    "several data lines join with LF": (b"data: a\ndata:\ndata: b\n\n", [E(raw=b"a\n\nb")]),
    "data field without a colon is empty": (b"data\n\n", [E(raw=b"")]),
    "comments are ignored": (b": ping\ndata: a\n: more\n\n", [E(raw=b"a")]),
    "event type": (b"event: ping\ndata: x\n\ndata: y\n\n", [E("ping", b"x"), E(raw=b"y")]),
    "event type resets after dispatch even without data": (b"event: ping\n\ndata: y\n\n", [E(raw=b"y")]),
    "id persists": (b"id: 7\ndata: a\n\ndata: b\n\n", [E(raw=b"a", id="7"), E(raw=b"b", id="7")]),
    "id with NUL is ignored": (b"id: 1\x002\ndata: a\n\n", [E(raw=b"a")]),
    "retry digits only": (b"retry: 3000\ndata: a\n\nretry: 1x\ndata: b\n\n", [E(raw=b"a", retry=3000), E(raw=b"b")]),
    "unknown fields ignored": (b"foo: bar\ndata: a\nbaz\n\n", [E(raw=b"a")]),
    "block without data not dispatched": (b"event: x\nid: 2\n\n\n\n", []),
    "incomplete event at EOF discarded": (b"data: a\n\ndata: b\n", [E(raw=b"a")]),
    "incomplete line at EOF discarded": (b"data: a\n\ndata: b", [E(raw=b"a")]),
    "CR as the very last byte": (b"data: a\r\r", [E(raw=b"a")]),
    "leading BOM skipped once": (b"\xef\xbb\xbfdata: a\n\n", [E(raw=b"a")]),
    "second BOM is data": (b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", []),
    "U+2028 and U+0085 stay inside data": ("data: a\u2028b\u0085c\n\n".encode(), [E(raw="a\u2028b\u0085c".encode())]),
    "field name is case-sensitive": (b"Data: a\n\n", []),
}


@pytest.mark.parametrize("name", sorted(WHATWG_CASES))
def test_sse_whatwg_table_fed_three_ways(name: str) -> None:
    data, expected = WHATWG_CASES[name]
    for chunks in three_ways(data):
        assert sse_events(chunks) == expected


def test_sse_crlf_split_between_reads_is_one_line_ending() -> None:
    assert sse_events([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == [E(raw=b"a\nb")]


def test_sse_invalid_utf8_becomes_replacement_characters() -> None:
    (event,) = sse_events([b"data: a\xff\xfeb\xe2\x82\n\n"])
    assert event.data == "a\ufffd\ufffdb\ufffd"


def test_sse_utf8_split_across_reads() -> None:
    data = "data: Привет 👋\n\n".encode()
    assert [e.data for e in sse_events([data[:9], data[9:17], data[17:]])] == ["Привет 👋"]


@pytest.mark.parametrize("limits, piece", [
    (Limits(max_sse_line_size=1024 * 1024), b"x" * 65536),  # one endless line
    (Limits(max_event_size=1024 * 1024), b"data: " + b"x" * 65530 + b"\n"),  # one endless event
])
def test_sse_limits_line_and_event_size_with_bounded_memory(limits: Limits, piece: bytes) -> None:
    # 12.5 MiB offered in 64 KiB reads against a 1 MiB limit: the decoder must refuse
    # once the limit is passed, holding no more than about the limit meanwhile.
    decoder = SSEDecoder(limits=limits)
    tracemalloc.start()
    try:
        with pytest.raises(fakegpt.LimitExceeded):
            for _ in range(200):
                decoder.feed(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * 1024 * 1024


@PROPERTY
@given(st.binary(max_size=40) | st.text(alphabet="0123456789", min_size=10, max_size=6000).map(str.encode))
def test_property_any_sse_retry_field_is_a_bounded_number_or_ignored(value: bytes) -> None:
    events = SSEDecoder().feed(b"retry: " + value.replace(b"\n", b"").replace(b"\r", b"") + b"\ndata: x\n\n")
    assert len(events) == 1 and (events[0].retry is None or 0 <= events[0].retry < 10**12)


@PROPERTY
@given(st.sampled_from(sorted(WHATWG_CASES)), st.lists(st.integers(0, 80), max_size=10))
def test_property_sse_any_split_gives_the_same_events(name: str, cuts: List[int]) -> None:
    data, expected = WHATWG_CASES[name]
    assert sse_events(split_at(data, cuts)) == expected


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(["data", "event", "id", ":", "retry"]), st.text(max_size=8)), max_size=12),
       st.sampled_from([b"\n", b"\r\n", b"\r"]), st.lists(st.integers(0, 200), max_size=8))
def test_property_sse_line_endings_and_splits_do_not_change_events(fields: List[Tuple[str, str]], newline: bytes, cuts: List[int]) -> None:
    lines = []
    for name, value in fields:
        value = value.replace("\r", "").replace("\n", "")
        lines.append(f"{name}: {value}".encode())
        lines.append(b"")
    lf_stream = b"\n".join(lines) + b"\n"
    stream = newline.join(lines) + newline
    assert sse_events(split_at(stream, cuts)) == sse_events([lf_stream])


def test_sse_returns_events_before_an_oversized_line_then_raises() -> None:
    decoder = SSEDecoder(limits=Limits(max_sse_line_size=100))
    assert decoder.feed(b"data: a\n\ndata: b\n\ndata: " + b"x" * 200 + b"\n\n") == [E(raw=b"a"), E(raw=b"b")]
    with pytest.raises(fakegpt.LimitExceeded):
        decoder.feed(b"data: c\n\n")
    with pytest.raises(fakegpt.LimitExceeded):
        decoder.close()


# ---------------------------------------------------------------------------------------
# The conversation: cumulative text to deltas
# ---------------------------------------------------------------------------------------


def test_conversation_yields_suffixes_and_ignores_echoes_moderation_and_pings() -> None:
    system = json.dumps({"message": {"id": "s", "author": {"role": "system"}, "content": {"content_type": "text", "parts": [""]}, "metadata": {}}, "conversation_id": "c1", "error": None}).encode()
    user = json.dumps({"message": {"id": "u", "author": {"role": "user"}, "content": {"content_type": "text", "parts": ["hi"]}, "metadata": {"timestamp_": "absolute", "message_type": None}}, "error": None}).encode()
    moderation = json.dumps({"conversation_id": "c1", "message_id": "m1", "is_completion": True, "moderation_response": {"flagged": False}}).encode()
    variants = json.dumps({"type": "num_variants_in_stream", "num_variants_in_stream": 1}).encode()
    decoder = ConversationDecoder()
    assert decoder.feed(E("ping", b'"2023-11-14 12:00:00"')) is None
    outputs = [decoder.feed(E(raw=d)) for d in (system, user, variants, assistant_event("Hel"), assistant_event("Hello"),
                                                  assistant_event("Hello", status="finished_successfully", finish="max_tokens"), moderation)]
    assert [o.delta if o else None for o in outputs] == [None, None, None, "Hel", "lo", "", None]
    final = outputs[5]
    assert final is not None
    assert (final.text, final.status, final.finish_reason, final.conversation_id, final.message_id) == (
        "Hello", "finished_successfully", "max_tokens", "c1", "m1")
    assert decoder.feed(E(raw=b"[DONE]")) is None and decoder.done


def test_conversation_rule_for_text_that_does_not_extend() -> None:
    deltas, decoder = decode([assistant_event("Hello wor"), assistant_event("Hello"), assistant_event("Hello world")])
    assert deltas == ["Hello wor", "", "ld"]
    with pytest.raises(fakegpt.ProtocolError, match="rewrote"):
        decode([assistant_event("Hello"), assistant_event("Help")])


def test_conversation_switching_message_after_text_raises_instead_of_duplicating() -> None:
    deltas, decoder = decode([assistant_event("", message_id="a"), assistant_event("two", message_id="b")])
    assert deltas == ["", "two"] and decoder.message_id == "b"
    with pytest.raises(fakegpt.ProtocolError, match="another message"):
        decode([assistant_event("one", message_id="a"), assistant_event("one two", message_id="b")])


@pytest.mark.parametrize("payload, error", [
    ({"message": None, "error": "Something went wrong"}, fakegpt.UpstreamError),
    ({"error": {"message": "expired", "code": "token_expired"}}, fakegpt.TokenExpiredError),
    ({"detail": {"message": "Your authentication token has expired.", "code": "token_expired"}}, fakegpt.TokenExpiredError),
    ({"detail": "rate limited."}, fakegpt.UpstreamError),
])
def test_conversation_error_events_raise(payload: Dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        decode([assistant_event("a"), json.dumps(payload).encode()])


@pytest.mark.parametrize("data", [b"not json", b"{", json.dumps({"message": {"author": {"role": "assistant"}, "metadata": {"message_type": "next"}, "content": {"parts": [1]}}}).encode()])
def test_conversation_malformed_events_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(fakegpt.ProtocolError):
        decode([data])


@pytest.mark.parametrize("fast_path", [True, False])
def test_an_assistant_message_without_parts_yet_has_no_text_yet(fast_path: bool) -> None:
    # A message begun with no parts (or none at all) is not malformed: its text comes later.
    without = message_root("m1")
    del without["message"]["content"]["parts"]
    empty = message_root("m1", text="")
    empty["message"]["content"]["parts"] = []
    records: List[Tuple[Optional[str], Any]] = [
        delta({"p": "", "o": "add", "v": empty, "c": 0}), delta({"p": PARTS, "o": "add", "v": "Hel"}),
        delta({"p": PARTS, "o": "append", "v": "lo"}), delta({"v": "!"})]
    events, decoder = feed_records(records, ConversationDecoder(fast_path=fast_path))
    assert decoder.text == "Hello!" == "".join(e.delta for e in events)
    appended = [delta({"p": "", "o": "add", "v": empty, "c": 0}), delta({"p": PARTS, "o": "append", "v": "Hel"}),
                delta({"v": "lo"})]  # an append past a list's end adds, as an append to a missing key does
    events, decoder = feed_records(appended, ConversationDecoder(fast_path=fast_path))
    assert decoder.text == "Hello" == "".join(e.delta for e in events)
    snapshots = [(None, without), (None, empty), (None, message_root("m1", text="Hi")), (None, message_root("m1", text="Hi there"))]
    events, decoder = feed_records(snapshots, ConversationDecoder(fast_path=fast_path))
    assert decoder.text == "Hi there" == "".join(e.delta for e in events)
    for parts in ([1], "text", [None]):
        bad = message_root("m1")
        bad["message"]["content"]["parts"] = parts
        with pytest.raises(fakegpt.ProtocolError, match="without text in content.parts"):
            feed_records([(None, bad)])


def test_conversation_split_surrogate_pair_is_decoded_like_the_full_json() -> None:
    first = assistant_event("a\ud83d", ensure_ascii=True)
    second = assistant_event("a\U0001F600", ensure_ascii=True)
    assert b"\\ud83d\\ude00" in second
    with pytest.raises(fakegpt.ProtocolError):
        decode([first, second])
    with pytest.raises(fakegpt.ProtocolError):
        reference_deltas([first, second])


@pytest.mark.parametrize("fast_path", [True, False])
def test_lone_surrogate_escapes_reach_the_caller_as_replacement_characters(fast_path: bool) -> None:
    datas = [assistant_event("Hi", ensure_ascii=True), assistant_event("Hi \ud800 there \udfff", ensure_ascii=True)]
    decoder = ConversationDecoder(fast_path=fast_path)
    deltas = [e.delta for e in (decoder.feed(E(raw=d)) for d in datas) if e]
    assert "".join(deltas) == decoder.text == "Hi \ufffd there \ufffd" and decoder.text.encode("utf-8")
    records = [delta({"p": "", "o": "add", "v": message_root("m1")}), delta({"p": PARTS, "o": "append", "v": "a\ud83d"}),
               delta({"v": "b"}), delta({"p": "", "o": "add", "c": 1, "v": message_root("t", content_type="thoughts",
                                                                                   text=[{"content": "x\udc00"}])})]
    body = b"".join(b"event: delta\ndata: " + json.dumps(r[1]).encode() + b"\n\n" for r in records)
    conversation, events = ConversationDecoder(fast_path=fast_path), []
    fakegpt._ReplyDecoder(conversation, Limits()).feed(body, events)
    assert conversation.text == "a\ufffdb" and conversation.reasoning == "x\ufffd"
    with pytest.raises(fakegpt.UpstreamError) as caught:
        decoder.feed(E(raw=json.dumps({"message": None, "error": "bad \udc00"}).encode()))
    assert str(caught.value).encode("utf-8")


def test_conversation_fast_path_is_taken_for_the_upstream_shape() -> None:
    texts = ["Привет", "Привет, мир", "Привет, мир \"!\" \\" + " long" * 400]
    datas = [assistant_event(t) for t in texts]
    (deltas, decoder), sizes = json_sizes(lambda: decode(datas))
    assert deltas == ["Привет", ", мир", " \"!\" \\" + " long" * 400]
    # The first event is decoded in full (and its shape proved with small probes); the
    # later ones take the fast path: their growing text is never given to json.loads.
    assert max(sizes) == len(datas[0].decode()) and sizes.count(max(sizes)) == 1
    (reference, _, _), full_sizes = json_sizes(lambda: decoder_outcome(ConversationDecoder(fast_path=False), datas))
    assert [e[0] for e in reference if e] == deltas and max(full_sizes) == len(datas[2].decode())


texts_strategy = st.lists(st.text(max_size=6), min_size=1, max_size=8)
envelope_strategy = st.fixed_dictionaries({
    "ensure_ascii": st.booleans(),
    "separators": st.sampled_from([(", ", ": "), (",", ":"), (", ", ":")]),
    "extra": st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.one_of(st.none(), st.integers(), st.text(max_size=6)), max_size=3)),
})


@PROPERTY
@given(texts_strategy, st.lists(envelope_strategy, min_size=1, max_size=3), st.lists(st.booleans(), max_size=8),
       st.lists(st.sampled_from([b"", b"", b" ", b"   ", b"\t", b" \t "]), max_size=8))
def test_property_fast_path_yields_exactly_what_full_decoding_yields(
        pieces: List[str], envelopes: List[Dict[str, Any]], repeats: List[bool], paddings: List[bytes]) -> None:
    cumulative, datas = "", []
    for index, piece in enumerate(pieces):
        cumulative += piece
        envelope = envelopes[index % len(envelopes)]
        datas.append(assistant_event(cumulative, **envelope) + (paddings[index] if index < len(paddings) else b""))
        if index < len(repeats) and repeats[index]:
            datas.append(assistant_event(cumulative[: len(cumulative) // 2], **envelope))
    deltas, decoder = decode(datas)
    assert deltas == reference_deltas(datas)
    assert "".join(deltas) == cumulative
    body = b"".join(b"data: " + data + b"\n\n" for data in datas)
    assert read_every_way(body, [len(body) // 3]) == {(cumulative, cumulative)}


def test_snapshots_padded_to_varying_lengths_take_the_fast_path() -> None:
    # ChatGPT's servers pad each snapshot's line with a different number of spaces: the
    # text must still be read without decoding the whole growing event again each time.
    texts = ["明白", "明白了！", "明白了！我们可以", "明白了！我们可以从获取你的环境信息开始。" + " long" * 400]
    datas = [assistant_event(t, ensure_ascii=True) + b" " * padding for t, padding in zip(texts, [28, 3, 0, 17])]
    (deltas, _), sizes = json_sizes(lambda: decode(datas))
    assert "".join(deltas) == texts[-1] and deltas == reference_deltas(datas)
    assert max(sizes) == len(datas[0].decode()) and sizes.count(max(sizes)) == 1  # only the first in full
    body = b"".join(b"data: " + data + b"\n\n" for data in datas) + b"data: [DONE]\n\n"
    for cuts in ([], [len(body) // 2], list(range(0, len(body), 700))):
        assert read_every_way(body, cuts) == {(texts[-1], texts[-1])}
    for text_only in (True, False):  # a run of them at once, and one by one
        reply = fakegpt._ReplyDecoder(ConversationDecoder(), Limits(), text_only=text_only)
        _, sizes = json_sizes(lambda: reply.feed(body, []))
        assert max(sizes) == len(datas[0].decode()) and sizes.count(max(sizes)) == 1


@PROPERTY
@given(st.lists(st.tuples(st.text(max_size=4), st.sampled_from(["in_progress", "finished_successfully"]),
                          st.sampled_from([None, "stop", "max_tokens"]), st.sampled_from(["m1", "m1", "m1", "m2"]),
                          st.sampled_from(["c1", "c1", "c2"]), st.sampled_from([None, None, None, "boom"]),
                          st.booleans()), min_size=1, max_size=10),
       envelope_strategy)
def test_property_events_whose_envelope_changes_decode_as_in_full(steps: List[Tuple[str, str, Optional[str], str, str, Optional[str], bool]],
                                                                   envelope: Dict[str, Any]) -> None:
    # Status, finish details, ids and errors change from one event to the next while the
    # text grows (or repeats a prefix): the shape-aware decoder must agree with full decoding.
    text, datas = "", []
    for piece, status, finish, message_id, conversation_id, error, shorter in steps:
        text += piece
        shown = text[: len(text) // 2] if shorter else text
        data = json.loads(assistant_event(shown, status=status, finish=finish, message_id=message_id, **envelope))
        data["conversation_id"], data["error"] = conversation_id, error
        separators = envelope["separators"]
        datas.append(json.dumps(data, ensure_ascii=envelope["ensure_ascii"], separators=separators).encode())
    assert decoder_outcome(ConversationDecoder(), datas) == decoder_outcome(full_decoder(), datas)


def test_another_message_id_after_the_text_is_caught_whichever_way_the_event_is_read() -> None:
    def event(text: str, message_id: str, status: str) -> bytes:  # the id after the text
        message = {"author": {"role": "assistant"}, "content": {"content_type": "text", "parts": [text]},
                   "status": status, "id": message_id, "metadata": {"message_type": "next"}, "recipient": "all"}
        return json.dumps({"message": message, "conversation_id": "c1", "error": None}).encode()

    datas = [event("Hi", "m1", "in_progress"), event("Hi there", "m2", "finished_successfully")]
    assert decoder_outcome(ConversationDecoder(), datas) == decoder_outcome(full_decoder(), datas)
    assert decoder_outcome(ConversationDecoder(), datas)[1] == "ProtocolError: the upstream switched to another message in mid-reply"


@pytest.mark.parametrize("form", ["snapshots", "deltas"])
def test_a_message_after_a_finished_one_is_another_even_if_it_starts_with_its_text(form: str) -> None:
    # A reply of two messages around a tool's call, the second beginning with the whole
    # text of the first: the first had finished, so the second is not the first under a
    # new id (which raises, as the test above shows), but more text after a blank line.
    first, tool = message_root("m1", text="1", status="finished_successfully", end_turn=False), message_root("t", role="tool", text="x")
    second = message_root("m2", text="1. First", status="finished_successfully", end_turn=True)
    if form == "snapshots":
        records: List[Tuple[Optional[str], Any]] = [(None, first), (None, tool), (None, second)]
    else:
        records = [delta({"p": "", "o": "add", "v": first, "c": 0}), delta({"p": "", "o": "add", "v": tool, "c": 1}),
                   delta({"p": "", "o": "add", "v": second, "c": 2})]
    events, decoder = feed_records(records)
    assert "".join(e.delta for e in events) == decoder.text == "1\n\n1. First" and decoder.complete


def test_a_later_duplicate_message_key_decides_the_text_on_every_path() -> None:
    # JSON's last duplicate key wins: a second "message" whose text is "" makes the reply
    # "" (nothing new), although the first message's string sits where the text was.
    duplicate = json.dumps({"id": "m1", "author": {"role": "assistant"}, "recipient": "all", "status": "finished_successfully",
                            "content": {"content_type": "text", "parts": [""]}, "metadata": {"message_type": "next"}}).encode()
    final = assistant_event("Hi there", status="finished_successfully", finish="stop")
    final = final.replace(b', "conversation_id"', b', "message": ' + duplicate + b', "conversation_id"', 1)
    datas = [assistant_event("Hi"), final]
    assert decoder_outcome(ConversationDecoder(), datas) == decoder_outcome(full_decoder(), datas)
    assert [event[0] for event in decoder_outcome(ConversationDecoder(), datas)[0]] == ["Hi", ""]


def test_final_event_is_read_without_decoding_the_text_again() -> None:
    long_text = "Привет, мир! " * 1000
    datas = [assistant_event(long_text[:10]), assistant_event(long_text),
             assistant_event(long_text, status="finished_successfully", finish="stop")]
    decoder = ConversationDecoder()
    events = [decoder.feed(E(raw=d)) for d in datas]
    decoder = ConversationDecoder()
    again, sizes = json_sizes(lambda: [decoder.feed(E(raw=d)) for d in datas])
    assert [chat_tuple(e) for e in again if e] == [chat_tuple(e) for e in events if e]
    assert again[2] is not None and (again[2].status, again[2].finish_reason) == ("finished_successfully", "stop")
    assert max(sizes[2:]) < 1000  # after the first event, only envelopes: never the 13,000-character text


@PROPERTY
@given(st.text(max_size=40), st.text(min_size=1, max_size=40))
def test_property_rewritten_text_raises_on_both_paths(prefix: str, rest: str) -> None:
    first, second = prefix + rest, prefix + "\x00" + rest[::-1]
    assume(not second.startswith(first) and not first.startswith(second))
    datas = [assistant_event(first), assistant_event(second)]
    with pytest.raises(fakegpt.ProtocolError):
        decode(datas)
    with pytest.raises(fakegpt.ProtocolError):
        reference_deltas(datas)


ENVELOPE = {"ensure_ascii": False, "separators": (", ", ": "), "extra": None}
MODERATION = json.dumps({"conversation_id": "c1", "message_id": "m1", "is_completion": True,
                         "moderation_response": {"flagged": False, "blocked": False}}).encode()
stream_part = st.one_of(
    st.tuples(st.just("grow"), st.text(max_size=5)),
    st.tuples(st.just("repeat"), st.just("")),
    st.tuples(st.just("finish"), st.just("")),
    st.tuples(st.just("unended"), st.text(max_size=5)),  # no blank line: the next line joins the event
    st.tuples(st.just("lines"), st.text(max_size=5)),  # the JSON over two data lines
    st.tuples(st.just("other"), st.text(max_size=5)),  # the text goes on in another message
    st.tuples(st.just("noise"), st.sampled_from([
        b": ping\n\n", b"event: ping\ndata: 1\n\n", b"data: " + MODERATION + b"\n\n", b"data: 42\n\n",
        b"id: 7\n", b"retry: 10\n", b"data: {\n", b"data: [DONE]\n\n", b"\r\n", b"\n", b"data:" + b'"x"' + b"\n\n",
        b"data: " + assistant_event("zz", message_id="m2") + b"\n\n",
    ])),
)


@settings(PROPERTY, max_examples=300)
@example([("grow", ""), ("grow", "0")], ENVELOPE, b"\n", [], [], (12, 0))  # the event limit, just passed
@example([("grow", ""), ("grow", "0")], ENVELOPE, b"\n", [], [], (0, 12))  # the line limit, just passed
@given(st.lists(stream_part, max_size=14), envelope_strategy, st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"]),
       st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6), st.integers(0, 255)), max_size=2),
       st.lists(st.integers(0, 2000), max_size=8),
       st.one_of(st.none(), st.tuples(st.integers(0, 12), st.integers(0, 12))))
def test_property_reply_decoder_shortcut_gives_exactly_what_the_two_decoders_give(
        parts: List[Tuple[str, Any]], envelope: Dict[str, Any], newline: bytes, edits: List[Tuple[str, int, int]],
        cuts: List[int], headroom: Optional[Tuple[int, int]]) -> None:
    text, body, boundaries = "", bytearray(), []
    for kind, value in parts:
        boundaries.append(len(body))
        if kind == "noise":
            body += value
            continue
        if kind in ("grow", "unended", "lines"):
            text += value
        status = "finished_successfully" if kind == "finish" else "in_progress"
        shown = text[: len(text) // 2] if kind == "repeat" else text
        event = assistant_event(shown + value if kind == "other" else shown, status=status,
                                finish="stop" if kind == "finish" else None,
                                message_id="m2" if kind == "other" else "m1", **envelope)
        if kind == "lines":
            event = event.replace(b'"author":', b"\ndata: " + b'"author":', 1)
        body += b"data: " + event + newline + (b"" if kind == "unended" else newline)
    body += b"data: [DONE]" + newline + newline
    body = corrupted(body, edits)
    limits = Limits()
    if headroom is not None:  # limits that the text, as it grows, soon passes
        first = len(assistant_event("", **envelope))
        limits = Limits(max_sse_line_size=first + 6 + headroom[0], max_event_size=first + 1 + headroom[1])
    # Cut at the part boundaries too: the shortcut starts where a chunk starts between events.
    chunks = split_at(bytes(body), cuts + boundaries[1::2])
    events, error = layered_outcome(chunks, limits)
    assert reply_outcome(chunks, limits) == (events, error)
    assert text_only_outcome(chunks, limits) == ("".join(event[0] for event in events), error)


line_end = st.sampled_from([b"\n", b"\r", b"\r\n"])


@settings(PROPERTY, max_examples=300)
@example([("ab", b"\r", b"id: 5", b"\n", b"\n")], True, b"", [40], None)  # a CR ends the line after the cut
@example([("", b"\r", b"id: 5", b"\n", b"\n")], True, b"", [len(assistant_event("")) + 12], None)  # cut after the field
@example([("", b"\n", b"", b"\n", b"\n")], False, b"data: " + b"x" * 900, [], (0, 0))  # a line too long at the end
@example([("abcd", b"\n", b"", b"\n", b"\n")], True, b"", [100], (0, 60))  # a line too long, cut
@example([("abcd", b"\n", b"", b"\n", b"\n")], True, b"", [100], (60, 0))  # an event too large, cut
@given(st.lists(st.tuples(st.text(max_size=4), line_end, st.sampled_from([b"", b"id: 5", b": c", b"retry: 7", b"event: message"]),
                          line_end, line_end), min_size=1, max_size=10),
       st.booleans(), st.one_of(st.just(b""), st.builds(lambda n: b"data: " + b"x" * n, st.integers(0, 1000))),
       st.lists(st.integers(0, 3000), max_size=8), st.one_of(st.none(), st.tuples(st.integers(0, 60), st.integers(0, 60))))
def test_property_an_event_cut_between_chunks_reads_as_the_event_stream_decoder_reads_it(
        events: List[Tuple[str, bytes, bytes, bytes, bytes]], done: bool, tail: bytes, cuts: List[int],
        headroom: Optional[Tuple[int, int]]) -> None:
    # Each line ends its own way (LF, CR or CRLF, a CR next to a LF being one ending), with
    # other fields in the events, and the stream may end in an unended line: wherever the
    # chunks are cut, an event begun in one chunk and ended in the next gives what the
    # event stream decoder gives, and so does a line too long that the stream ends in.
    text, body = "", bytearray()
    for grow, data_end, field, field_end, blank in events:
        text += grow
        body += b"data: " + assistant_event(text) + data_end
        if field:
            body += field + field_end
        body += blank
    if done:
        body += b"data: [DONE]\n\n"
    body += tail
    limits = Limits()
    if headroom is not None:  # limits that a longer text, or the tail, passes
        first = len(assistant_event(""))
        limits = Limits(max_sse_line_size=first + 6 + headroom[0], max_event_size=first + 1 + headroom[1])
    chunks = split_at(bytes(body), cuts)
    events_read, error = layered_outcome(chunks, limits)
    assert reply_outcome(chunks, limits) == (events_read, error)
    assert text_only_outcome(chunks, limits) == ("".join(event[0] for event in events_read), error)


def test_reply_decoder_takes_the_shortcut_for_a_long_reply() -> None:
    whole = 'Привет, мир! 你好 👋 "q" \\ ' * 40
    texts = [whole[: 4 * i] for i in range(1, 200)]
    body = b"".join(b"data: " + assistant_event(t) + b"\n\n" for t in texts) + b"data: [DONE]\n\n"
    reply = fakegpt._ReplyDecoder(ConversationDecoder(), Limits())
    events: List[ChatEvent] = []

    def feed_all() -> None:
        for chunk in split_at(body, list(range(0, len(body), 4096))):
            reply.feed(chunk, events)

    _, documents = json_sizes(feed_all)
    # A full decode gives json.loads an event with its text; the shape's probes carry "" or "x".
    full_decodes = len([size for size in documents if size > len(assistant_event("x"))])
    assert reply.done and "".join(e.delta for e in events) == texts[-1]
    assert full_decodes <= 3  # the first event, and none of the other 198


def test_reply_decoder_decodes_a_run_of_snapshots_once_when_only_text_is_wanted() -> None:
    whole = 'Привет, мир! 你好 👋 "q" \\ ' * 40
    texts = [whole[: 4 * i] for i in range(1, 200)]
    body = b"".join(b"data: " + assistant_event(t) + b"\n\n" for t in texts) + b"data: [DONE]\n\n"
    reply = fakegpt._ReplyDecoder(ConversationDecoder(), Limits(), text_only=True)
    pieces: List[str] = []
    reply.feed(body, pieces)
    # The first event is decoded in full (its text is the first piece); the other 198 are
    # checked and their new text is one piece.
    assert reply.done and pieces == [texts[0], texts[-1][len(texts[0]):]]
    assert reply.conversation.text == texts[-1]


def test_snapshot_runs_frame_each_event_a_bounded_number_of_times() -> None:
    # Snapshots with a notice after each: every run ends at a notice. Framing the rest of
    # the chunk for every run would frame its events a number of times that grows with
    # their count; each is framed at most three times.
    body, text = bytearray(), ""
    for _ in range(300):
        text += "ab "
        body += b"data: " + assistant_event(text) + b"\n\ndata: " + MODERATION + b"\n\n"
    body += b"data: [DONE]\n\n"
    reply = fakegpt._ReplyDecoder(ConversationDecoder(), Limits(), text_only=True)
    framed = 0
    data_end = fakegpt._ReplyDecoder._data_end

    def counted(self: Any, chunk: bytes, first: int, known: int) -> int:
        nonlocal framed
        framed += 1
        return data_end(self, chunk, first, known)

    pieces: List[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fakegpt._ReplyDecoder, "_data_end", counted)
        reply.feed(bytes(body), pieces)
    assert reply.done and "".join(pieces) == text
    assert framed <= 3 * 600


def test_snapshot_runs_take_new_text_with_escapes_in_their_one_pass() -> None:
    # Replies are full of quotes, backslashes, line breaks and tabs: new text with their
    # escapes (\u escapes of whole characters too) is checked in the run's one pass, not
    # scanned again for the end of its string. (A surrogate pair's escapes end the run: the
    # events with them are taken one by one.)
    pieces = ['say "hi"', " C:\\dir", "\nnext\tline", " \u00e9t\u00e9 \u0001", " and more"]
    text, body = "", bytearray()
    for piece in pieces * 20:
        text += piece
        content = json.dumps(text)[1:-1].encode()  # ensure_ascii: é as \u00e9
        body += b"data: " + assistant_event("@@").replace(b'"@@"', b'"' + content + b'"') + b"\n\n"
    body += b"data: [DONE]\n\n"
    reply = fakegpt._ReplyDecoder(ConversationDecoder(), Limits(), text_only=True)
    scans = 0
    string_end = fakegpt._string_end

    def counted(raw: bytes, pos: int) -> int:
        nonlocal scans
        scans += 1
        return string_end(raw, pos)

    out: List[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fakegpt, "_string_end", counted)
        reply.feed(bytes(body), out)
    assert reply.done and "".join(out) == text
    assert scans <= 2  # where the first event's text is, when its shape is learnt


def snapshot_run_body(text: str, cuts: Sequence[int], ascii_only: bool, end: str) -> bytes:
    """Events whose parts[0] is the JSON string of `text` cut at each of `cuts` (bytes of
    its content as sent: inside a UTF-8 sequence, an escape or a surrogate pair too), then
    the whole of it, then `end` ("finish": a final event; "done": only [DONE])."""
    content = json.dumps(text, ensure_ascii=ascii_only)[1:-1].encode("utf-8")
    template = assistant_event("@@")
    body = bytearray()
    for cut in [*sorted(min(c, len(content)) for c in cuts), len(content)]:
        body += b"data: " + template.replace(b'"@@"', b'"' + content[:cut] + b'"') + b"\n\n"
    if end == "finish":
        final = assistant_event("@@", status="finished_successfully", finish="stop")
        body += b"data: " + final.replace(b'"@@"', b'"' + content + b'"') + b"\n\n"
    return bytes(body + b"data: [DONE]\n\n")


@settings(PROPERTY, max_examples=300)
@example("Hi 😀", [3, 9], True, "finish", [], [], None)  # between a surrogate pair's halves
@example("Hi 😀", [5], True, "finish", [], [], None)  # inside an escape
@example("Привет", [1, 3, 5], False, "finish", [], [], None)  # inside a UTF-8 sequence
@example("Hello there", [1, 2, 3, 4, 5, 6, 7, 8], True, "done", [], [], 403)  # a line over the limit mid-run
@given(st.text(st.characters(blacklist_categories=["Cs"]), max_size=12), st.lists(st.integers(0, 80), max_size=10),
       st.booleans(), st.sampled_from(["finish", "done"]),
       st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6), st.integers(0, 255)), max_size=2),
       st.lists(st.integers(0, 3000), max_size=4), st.one_of(st.none(), st.integers(380, 440)))
def test_property_snapshot_runs_give_the_text_and_error_of_decoding_every_event(
        text: str, cuts: List[int], ascii_only: bool, end: str, edits: List[Tuple[str, int, int]],
        chunk_cuts: List[int], line_limit: Optional[int]) -> None:
    # `line_limit`: a longest line about the size of these events, so that a run meets it.
    limits = Limits() if line_limit is None else Limits(max_sse_line_size=line_limit)
    body = corrupted(snapshot_run_body(text, cuts, ascii_only, end), edits)
    chunks = split_at(bytes(body), chunk_cuts)
    reference, error = layered_outcome(chunks, limits, ConversationDecoder(fast_path=False))
    assert text_only_outcome(chunks, limits) == ("".join(e[0] for e in reference), error)


def test_snapshot_runs_check_long_or_hostile_new_text_in_linear_time() -> None:
    # New text that looks whole for a long way and then is not (a raw control character):
    # a check that backtracks exponentially would never return. Each body goes through
    # text-only decoding in a child process with a deadline, and must give the reference's
    # text and error; the second has thousands of escapes in a row.
    script = """if True:
        from test_fakegpt import *
        for text, cuts in (("a" * 60 + "\\x01" + "b", [1]), ("x\\n" + "\\"" * 6000 + "\\u0001", [1])):
            body = snapshot_run_body(text, cuts, False, "finish")
            hostile = body.replace(b"\\\\u0001", b"\\x01")  # a raw control character in the string
            for chunks in ([body], [hostile]):
                reference, error = layered_outcome(chunks, Limits(), ConversationDecoder(fast_path=False))
                assert text_only_outcome(chunks, Limits()) == ("".join(e[0] for e in reference), error)
        print("ok")
    """
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=HERE)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


V1_BODIES: Dict[Tuple[str, int], bytes] = {}


def v1_body(text: str, seed: int) -> bytes:
    """The event stream of the mock's delta-format reply of `text` (cached)."""
    if (text, seed) not in V1_BODIES:
        raw = mock_stream("v1", text, step=3, seed=seed)
        V1_BODIES[(text, seed)] = b"".join(e.data for e in reader_events([raw]) if isinstance(e, Data))
    return V1_BODIES[(text, seed)]


@settings(PROPERTY, max_examples=200)
@given(st.sampled_from(["", "Hi", 'Привет, "мир" \\ 👋 and more text to split', mock_server.mixed_text(90)]),
       st.integers(0, 3), st.sampled_from([b"\n", b"\r\n"]),
       st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6), st.integers(0, 255)), max_size=2),
       st.lists(st.integers(0, 3000), max_size=8))
def test_property_delta_shortcut_gives_exactly_what_the_reference_path_gives(
        text: str, seed: int, newline: bytes, edits: List[Tuple[str, int, int]], cuts: List[int]) -> None:
    body = corrupted(v1_body(text, seed).replace(b"\n", newline), edits)
    chunks = split_at(bytes(body), cuts)
    reference = layered_outcome(chunks, Limits(), ConversationDecoder(fast_path=False))
    assert reply_outcome(chunks, Limits()) == reference
    assert text_only_outcome(chunks, Limits()) == ("".join(e[0] for e in reference[0]), reference[1])
    if not edits:
        assert "".join(e[0] for e in reference[0]) == text


def test_delta_shortcut_is_taken_for_appends() -> None:
    body = v1_body(mock_server.mixed_text(300), 1)
    (_, error), documents = json_sizes(lambda: reply_outcome(split_at(body, list(range(0, len(body), 512))), Limits()))
    appends = body.count(b'event: delta\ndata: {"v": "')
    assert error is None and appends > 50 and len(documents) < body.count(b"data: ") - appends + 5


@PROPERTY
@given(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf", b"\xef\xbb", b"\xef", b"\xbb\xbf", b"\n", b":\n"]),
       st.lists(st.integers(0, 40), max_size=4))
def test_property_a_leading_bom_is_read_as_the_event_stream_decoder_reads_it(start: bytes, cuts: List[int]) -> None:
    body = start + b"data: " + assistant_event("Hi") + b"\n\ndata: " + assistant_event("Hi there") + b"\n\ndata: [DONE]\n\n"
    chunks = split_at(body, cuts)
    events, error = reply_outcome(chunks, Limits())
    assert (events, error) == layered_outcome(chunks, Limits())
    # After one BOM (or none) the first event is read; other bytes before it make its
    # field name another (one that is ignored), and only the second event is.
    first_read = start in (b"", b"\xef\xbb\xbf", b"\n", b":\n")
    assert error is None and events[0][0] == ("Hi" if first_read else "Hi there")


def test_reply_decoder_shortcut_never_reads_a_line_break_as_part_of_an_event() -> None:
    # A shape learned from an event of two data lines has a LF in it; a later "event"
    # whose second line lacks "data:" has the same bytes, but is a different event stream.
    two_lines = assistant_event("Hi").replace(b'"author":', b'\ndata: "author":', 1)
    broken = assistant_event("Hi there").replace(b'"author":', b'\n"author":', 1)
    body = b"data: " + two_lines + b"\n\n" + b"data: " + broken + b"\n\ndata: [DONE]\n\n"
    chunks = split_at(body, [len(two_lines) + 8])
    assert reply_outcome(chunks, Limits()) == layered_outcome(chunks, Limits())
    assert layered_outcome(chunks, Limits())[1] is not None  # the second event is not JSON


@pytest.mark.parametrize("before, after", [(b"data: ", b"\n\n"), (b"", b"\r\n"), (b"<", b">")])
def test_extend_run_takes_a_run_however_its_events_are_framed(before: bytes, after: bytes) -> None:
    texts = ["Hel", "Hello", 'Hello "w', 'Hello "world"']
    events = [assistant_event(text) for text in texts]
    framed = [before + event + after for event in events[1:]]
    for max_data, taken in ((10**6, 3), (len(events[-1]) - 1, 2)):  # the limit stops the run before the last
        decoder = ConversationDecoder()
        decoder.feed(E(raw=events[0]))  # decoded in full: the shape is learned
        buffer = b"".join(framed) + b"rest"
        end, text = decoder.extend_run(buffer, 0, before, after, max_data)
        assert end == sum(map(len, framed[:taken]))
        assert (text, decoder.text) == (texts[taken][len(texts[0]):], texts[taken])


DELTA_START = (b'event: delta_encoding\ndata: "v1"\n\nevent: delta\ndata: {"p": "", "o": "add", "v": {"message": '
               b'{"id": "m1", "author": {"role": "assistant"}, "content": {"content_type": "text", "parts": [""]}, '
               b'"status": "in_progress", "recipient": "all", "metadata": {}}, "conversation_id": "c1", "error": null}, '
               b'"c": 0}\n\nevent: delta\ndata: {"p": "/message/content/parts/0", "o": "append", "v": "Hi"}\n\n')


def test_extend_delta_run_takes_the_text_of_a_run_of_appends_as_extend_would() -> None:
    records = [b'event: delta\ndata: {"v": " th\xc3\xa9re"}   \n\n', b'data: {"v":"\\n\\"q\\" \\u00e9"}\n\n',
               b'event: delta\ndata: {"v": ""}\n\n', b'event: delta\ndata: {"v": "!"}\n\n']
    texts = [" thére", '\n"q" é', "", "!"]
    for stop, taken, max_data in ((b'event: delta\ndata: {"v": "\\x"}\n\n', 4, 10**6),  # a bad escape
                                  (b'event: delta\ndata: {"v": "\xff"}\n\n', 4, 10**6),  # not UTF-8
                                  (b'event: delta\ndata: {"v": "x" }\n\n', 4, 10**6),  # not this shape
                                  (b"", 1, len(records[1]) - 9)):  # the limit stops the run before the second
        decoder = ConversationDecoder()
        for event in SSEDecoder().feed(DELTA_START):
            decoder.feed(event)
        buffer = b"".join(records) + stop
        end, text = decoder.extend_delta_run(buffer, 0, max_data)
        assert end == sum(map(len, records[:taken]))
        assert (text, decoder.text) == ("".join(texts[:taken]), "Hi" + "".join(texts[:taken]))
    assert ConversationDecoder().extend_delta_run(b"".join(records), 0, 10**6) == (-1, "")  # no text to append to


@pytest.mark.parametrize("text_only", [True, False])
def test_reply_decoder_refuses_a_delta_record_over_the_event_limit(text_only: bool) -> None:
    reply = fakegpt._ReplyDecoder(ConversationDecoder(), Limits(max_event_size=400), text_only=text_only)
    events: List[Any] = []
    with pytest.raises(fakegpt.LimitExceeded):
        reply.feed(DELTA_START + b'event: delta\ndata: {"v": " there"}\n\n'
                   + b'event: delta\ndata: {"v": "' + b"x" * 500 + b'"}\n\n', events)
    assert "".join(events if text_only else [e.delta for e in events]) == "Hi there"


def test_reply_decoder_raises_in_the_call_that_meets_the_error() -> None:
    # The events before it first, and then at once: the next bytes may never come.
    reply, events = fakegpt._ReplyDecoder(ConversationDecoder(), Limits(max_sse_line_size=1000)), []
    chunk = b"data: " + assistant_event("Hi") + b"\n\n" + b"data: " + b"x" * 2000 + b"\n\n"
    with pytest.raises(fakegpt.LimitExceeded):
        reply.feed(chunk, events)
    assert [e.delta for e in events] == ["Hi"]


def feed_records(records: Sequence[Tuple[Optional[str], Any]], decoder: Optional[ConversationDecoder] = None) -> Tuple[List[ChatEvent], ConversationDecoder]:
    """Feed (event type, JSON value or raw bytes) records; the events and the decoder."""
    decoder = decoder or ConversationDecoder()
    events = []
    for kind, value in records:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        event = decoder.feed(E(event=kind or "message", raw=raw))
        if event is not None:
            events.append(event)
    return events, decoder


def message_root(message_id: str, *, role: str = "assistant", text: Any = "", recipient: str = "all",
                 channel: Optional[str] = None, content_type: str = "text", metadata: Optional[Dict[str, Any]] = None,
                 status: str = "in_progress", end_turn: Optional[bool] = None) -> Dict[str, Any]:
    content: Dict[str, Any] = {"content_type": content_type}
    if content_type == "thoughts":
        content["thoughts"] = text
    else:
        content["parts"] = [text]
    return {"message": {"id": message_id, "author": {"role": role}, "content": content, "status": status,
                        "end_turn": end_turn, "recipient": recipient, "channel": channel, "metadata": metadata or {}},
            "conversation_id": "c1", "error": None}


def delta(record: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    return ("delta", record)


PARTS = "/message/content/parts/0"


def test_delta_format_carries_c_p_and_o_forward_and_applies_every_op() -> None:
    records = [
        ("delta_encoding", b'"v1"'),
        delta({"p": "", "o": "add", "v": message_root("m1"), "c": 0}),
        delta({"p": PARTS, "o": "append", "v": "This"}),
        delta({"v": " statement"}),  # same document, path and op
        (None, b": not an event, a comment line would never get here"[:0] or b'{"type": "message_marker"}'),
        delta({"o": "patch", "v": [{"p": PARTS, "o": "append", "v": " is"}, {"p": "/message/metadata", "o": "append", "v": {"a": 1}}]}),
        delta({"v": [{"p": PARTS, "o": "append", "v": " made"}, {"p": "/message/metadata/b", "o": "add", "v": [1]}]}),  # a bare batch
        delta({"p": "/message/metadata/b", "o": "append", "v": [2, 3]}),
        delta({"p": "/message/metadata/b", "o": "truncate", "v": 2}),
        delta({"p": "/message/metadata/a", "o": "remove"}),
        delta({"p": "/message/metadata/b/0", "o": "replace", "v": 9}),
        delta({"p": "", "o": "patch", "v": [{"p": PARTS, "o": "append", "v": " of ops."},
                                           {"p": "", "o": "patch", "v": [{"p": "/message/status", "o": "replace", "v": "finished_successfully"}]},
                                           {"p": "/message/end_turn", "o": "replace", "v": True}]}),
    ]
    events, decoder = feed_records(records)
    assert "".join(e.delta for e in events) == "This statement is made of ops."
    assert decoder.status == "finished_successfully" and decoder.complete and not decoder.done
    assert decoder.finish_reason == "stop"  # finished, no finish_details: "stop"


@pytest.mark.parametrize("opening", [
    [delta({"o": "patch", "v": [{"p": "", "o": "add", "v": message_root("m1")}], "c": 0})],  # a patch first: no path yet
    [delta({"v": [{"p": "", "o": "add", "v": message_root("m1")}], "c": 0}),  # a bare batch carries no path either,
     delta({"o": "patch", "v": [{"p": PARTS, "o": "append", "v": ""}]})],  # and a patch after it needs none
])
def test_a_patch_without_a_path_needs_none_carried(opening: List[Tuple[str, Dict[str, Any]]]) -> None:
    records = [*opening, delta({"o": "patch", "v": [{"p": PARTS, "o": "append", "v": "Hi"}]}),
               delta({"p": PARTS, "o": "append", "v": " there"}), delta({"v": "!"})]
    events, decoder = feed_records(records)
    assert "".join(e.delta for e in events) == decoder.text == "Hi there!"
    with pytest.raises(fakegpt.ProtocolError, match="none to carry forward"):  # an op needs a path, though
        feed_records([delta({"o": "append", "v": "x", "c": 0})])


@pytest.mark.parametrize("form", ["snapshots", "deltas"])
def test_the_reasoning_of_several_messages_is_kept_apart_by_blank_lines(form: str) -> None:
    thoughts = [message_root("t1", content_type="thoughts", text=[{"summary": "s", "content": "First thought."}]),
                message_root("t2", content_type="thoughts", text=[{"summary": "s", "content": "Second"}]),
                message_root("a1", channel="analysis", text="Analysis.")]
    if form == "snapshots":
        second_grows = message_root("t2", content_type="thoughts", text=[{"summary": "s", "content": "Second thought."}])
        records: List[Tuple[Optional[str], Any]] = [(None, thoughts[0]), (None, thoughts[1]), (None, second_grows),
                                                    (None, thoughts[2]), (None, message_root("m", text="Answer"))]
    else:
        records = [delta({"p": "", "o": "add", "v": thoughts[0], "c": 0}), delta({"p": "", "o": "add", "v": thoughts[1], "c": 1}),
                   delta({"p": "/message/content/thoughts/0/content", "o": "append", "v": " thought."}),
                   delta({"p": "", "o": "add", "v": thoughts[2], "c": 2}),
                   delta({"p": "", "o": "add", "v": message_root("m", text="Answer"), "c": 3})]
    events, decoder = feed_records(records)
    assert decoder.reasoning == "First thought.\n\nSecond thought.\n\nAnalysis." == "".join(e.reasoning for e in events)
    assert decoder.text == "Answer"


def test_delta_documents_interleave_and_c_switches_back() -> None:
    records = [
        delta({"p": "", "o": "add", "v": message_root("m1"), "c": 0}),
        delta({"p": PARTS, "o": "append", "v": "Hel"}),
        delta({"p": "", "o": "add", "v": message_root("t1", content_type="thoughts", text=[]), "c": 1}),
        delta({"p": "/message/content/thoughts", "o": "append", "v": [{"summary": "s", "content": "Think"}]}),
        delta({"p": "/message/content/thoughts/0/content", "o": "append", "v": "ing."}),
        delta({"p": PARTS, "o": "append", "v": "lo", "c": 0}),  # back to the reply
        delta({"v": "!"}),  # and "c" carries forward too
    ]
    events, decoder = feed_records(records)
    assert "".join(e.delta for e in events) == "Hello!"
    assert decoder.reasoning == "Thinking." and "".join(e.reasoning for e in events) == "Thinking."


@pytest.mark.parametrize("hidden, why", [
    (message_root("h", channel="commentary"), "commentary, even addressed to all"),
    (message_root("h", channel="analysis"), "the analysis channel is reasoning"),
    (message_root("h", metadata={"is_thinking_preamble_message": True}), "a thinking preamble"),
    (message_root("h", metadata={"is_visually_hidden_from_conversation": True}), "the page does not show it"),
    (message_root("h", recipient="web.run"), "addressed to a tool"),
    (message_root("h", role="tool"), "a tool's answer"),
    (message_root("h", role="user"), "the user's echo"),
    (message_root("h", content_type="code"), "code"),
    (message_root("h", content_type="execution_output"), "a tool's output"),
    (message_root("h", content_type="reasoning_recap"), "a reasoning recap"),
])
@pytest.mark.parametrize("form", ["snapshots", "deltas"])
def test_only_visible_text_is_text(hidden: Dict[str, Any], why: str, form: str) -> None:
    visible = message_root("m1", channel="final")
    if form == "snapshots":
        hidden["message"]["content"].setdefault("parts", ["secret words"])[0:1] = ["secret words"]
        records: List[Tuple[Optional[str], Any]] = [(None, hidden)]
        visible["message"]["content"]["parts"] = ["Hi"]
        records.append((None, visible))
    else:
        records = [delta({"p": "", "o": "add", "v": hidden, "c": 1}),
                   delta({"p": "/message/content/parts/0" if "parts" in hidden["message"]["content"] else "/message/content/thoughts",
                          "o": "append", "v": "secret words" if "parts" in hidden["message"]["content"] else [{"content": "secret words"}]}),
                   delta({"p": "", "o": "add", "v": visible, "c": 2}), delta({"p": PARTS, "o": "append", "v": "Hi"})]
    events, decoder = feed_records(records)
    assert "".join(e.delta for e in events) == "Hi" and decoder.text == "Hi", why
    assert "secret" not in decoder.text


@pytest.mark.parametrize("form", ["snapshots", "deltas"])
def test_notices_give_title_and_model_and_the_last_title_wins(form: str) -> None:
    reply = message_root("m1", text="Hi", metadata={"model_slug": "gpt-4o"})
    records: List[Tuple[Optional[str], Any]] = [
        (None, {"type": "title_generation", "title": "First", "conversation_id": "c1"}),
        (None, {"type": "server_ste_metadata", "metadata": {"model_slug": "gpt-4o-mini"}, "conversation_id": "c1"}),
        (None, reply) if form == "snapshots" else delta({"p": "", "o": "add", "v": reply, "c": 0}),
        (None, {"type": "title_generation", "title": "Second", "conversation_id": "c1"}),
        (None, {"type": "message_stream_complete", "conversation_id": "c1"}),
        (None, {"type": "conversation_detail_metadata", "model_limits": [], "conversation_id": "c1"}),
        (None, {"type": "resume_conversation_token", "token": "t", "conversation_id": "c1"}),
        (None, {"type": "input_message", "input_message": {"content": {"parts": ["Hi?"]}}, "conversation_id": "c1"}),
    ]
    events, decoder = feed_records(records)
    assert (decoder.title, decoder.model, decoder.text, decoder.conversation_id) == ("Second", "gpt-4o", "Hi", "c1")


@pytest.mark.parametrize("records, complete", [
    ([delta({"p": "", "o": "add", "v": message_root("m1", text="Hi", status="finished_successfully", end_turn=True)})], True),
    ([delta({"p": "", "o": "add", "v": message_root("m1", text="Hi", status="finished_successfully", end_turn=False)})], False),
    ([delta({"p": "", "o": "add", "v": message_root("m1", text="Hi", status="in_progress", end_turn=True)})], False),
    ([delta({"p": "", "o": "add", "v": message_root("m1", text="Hi")}),  # a hidden message's end ends nothing
      delta({"p": "", "o": "add", "c": 1, "v": message_root("t", recipient="web.run", status="finished_successfully", end_turn=True)})], False),
    ([(None, message_root("m1", text="Hi", status="finished_successfully", end_turn=True))], True),
    ([(None, message_root("m1", text="Hi")), (None, b"[DONE]")], True),
])
def test_a_reply_is_complete_at_done_or_when_the_visible_message_finished_its_turn(records: List[Tuple[Optional[str], Any]], complete: bool) -> None:
    assert feed_records(records)[1].complete is complete


def test_finish_reason_comes_from_finish_details_in_both_formats() -> None:
    finished = message_root("m1", text="Hi", status="finished_successfully", end_turn=True,
                            metadata={"finish_details": {"type": "max_tokens"}})
    assert feed_records([(None, finished)])[1].finish_reason == "max_tokens"
    records = [delta({"p": "", "o": "add", "v": message_root("m1", text="Hi")}),
               delta({"p": "/message/metadata", "o": "append", "v": {"finish_details": {"type": "max_tokens"}}})]
    assert feed_records(records)[1].finish_reason == "max_tokens"


@pytest.mark.parametrize("op", [
    {"p": PARTS, "o": "truncate", "v": 2},
    {"p": PARTS, "o": "replace", "v": "Hallo there"},
    {"p": "", "o": "add", "v": message_root("m1", text="Bye")},
    {"p": "/message/content/parts", "o": "replace", "v": ["Hel"]},
])
def test_a_delta_that_would_change_delivered_text_raises(op: Dict[str, Any]) -> None:
    records = [delta({"p": "", "o": "add", "v": message_root("m1")}), delta({"p": PARTS, "o": "append", "v": "Hello"})]
    events, decoder = feed_records(records)
    with pytest.raises(fakegpt.ProtocolError, match="rewrote text already delivered"):
        feed_records([delta(op)], decoder)
    assert decoder.text == "Hello"


def test_ops_on_hidden_documents_may_rewrite_anything() -> None:
    records = [delta({"p": "", "o": "add", "v": message_root("m1"), "c": 0}), delta({"p": PARTS, "o": "append", "v": "Hello"}),
               delta({"p": "", "o": "add", "v": message_root("h", channel="commentary", text="Let me see"), "c": 1}),
               delta({"p": PARTS, "o": "truncate", "v": 3}), delta({"p": PARTS, "o": "replace", "v": "Other"}),
               delta({"p": "", "o": "add", "v": message_root("h2", recipient="python"), "c": 1})]
    assert feed_records(records)[1].text == "Hello"


@pytest.mark.parametrize("records, error, words", [
    ([delta({"p": "", "o": "add", "v": {"message": None, "conversation_id": "c1", "error": "Something went wrong."}})],
     fakegpt.UpstreamError, "Something went wrong."),
    ([(None, {"type": "stream_handoff", "conversation_id": "c1", "options": []})], fakegpt.ProtocolError, "websocket"),
    ([delta({"v": "text with no path to go to"})], fakegpt.ProtocolError, "without a path or an op"),
    ([delta({"p": PARTS, "o": "append", "v": "x", "c": 3})], fakegpt.ProtocolError, "before it was added"),
    ([delta({"p": "", "o": "add", "v": message_root("m1")}), delta({"p": "/message/nowhere/deep", "o": "append", "v": "x"})],
     fakegpt.ProtocolError, "leads nowhere"),
    ([delta({"p": "", "o": "add", "v": message_root("m1")}), delta({"p": PARTS, "o": "append", "v": 5})],
     fakegpt.ProtocolError, "append of int to str"),
    ([delta({"p": "", "o": "add", "v": message_root("m1")}), delta({"p": PARTS, "o": "explode", "v": 5})],
     fakegpt.ProtocolError, "unknown delta op"),
    ([("delta", b'{"p": "", "o": "patch", "v": ' + b"[" * 100000 + b"]" * 100000 + b"}")], fakegpt.ProtocolError, "not JSON"),
])
def test_delta_errors_are_clear(records: List[Tuple[Optional[str], Any]], error: type, words: str) -> None:
    with pytest.raises(error, match=re.escape(words)):
        feed_records(records)


def test_a_second_visible_message_of_the_delta_format_continues_after_a_blank_line() -> None:
    records = [delta({"p": "", "o": "add", "v": message_root("m1", text="First."), "c": 0}),
               delta({"p": "", "o": "add", "v": message_root("t", recipient="web.run"), "c": 1}),
               delta({"p": "", "o": "add", "v": message_root("m2", text="Second."), "c": 2})]
    events, decoder = feed_records(records)
    assert decoder.text == "First.\n\nSecond." and decoder.message_id == "m2"
    assert "".join(e.delta for e in events) == decoder.text  # the blank line is in the pieces too


def tool_round_trip(message_id: str) -> List[Dict[str, Any]]:
    """A call addressed to a tool and the tool's answer, as snapshot roots (both hidden)."""
    return [message_root(message_id + "-call", text="search('x')", recipient="browser", content_type="code"),
            message_root(message_id + "-out", role="tool", text="Results.", status="finished_successfully")]


def two_message_reply(form: str) -> List[Tuple[Optional[str], Any]]:
    """Text, a tool's round trip, more text, and then (in the delta format, where
    documents stay open) the first message's status again: one reply, in either format."""
    if form == "snapshots":
        return [(None, message_root("m1", text=t)) for t in ("", "Let me ", "Let me look.")] + [
            (None, message_root("m1", text="Let me look.", status="finished_successfully", end_turn=False)),
            *((None, root) for root in tool_round_trip("t")),
            *((None, message_root("m2", text=t)) for t in ("", "It is ", "It is 42.")),
            (None, message_root("m2", text="It is 42.", status="finished_successfully", end_turn=True)),
            (None, b"[DONE]")]
    call, out = tool_round_trip("t")
    return [delta({"p": "", "o": "add", "v": message_root("m1"), "c": 0}), delta({"p": PARTS, "o": "append", "v": "Let me "}),
            delta({"v": "look."}), delta({"p": "", "o": "add", "v": call, "c": 1}), delta({"p": "", "o": "add", "v": out, "c": 2}),
            delta({"p": "", "o": "add", "v": message_root("m2"), "c": 3}), delta({"p": PARTS, "o": "append", "v": "It is "}),
            delta({"p": "/message/status", "o": "replace", "v": "finished_successfully", "c": 0}),  # back to the first
            delta({"p": "/message/end_turn", "o": "replace", "v": False}),
            delta({"p": PARTS, "o": "append", "v": "42.", "c": 3}),
            delta({"p": "", "o": "patch", "v": [{"p": "/message/status", "o": "replace", "v": "finished_successfully"},
                                                 {"p": "/message/end_turn", "o": "replace", "v": True}]}),
            (None, b"[DONE]")]


@pytest.mark.parametrize("form", ["snapshots", "delta"])
@pytest.mark.parametrize("fast_path", [True, False])
def test_a_reply_of_several_visible_messages_is_their_texts_each_once_after_a_blank_line(form: str, fast_path: bool) -> None:
    # Text, a tool's round trip, then more text, in another message: in either format. A
    # document of the delta format switched back to must not give its text again.
    events, decoder = feed_records(two_message_reply(form), ConversationDecoder(fast_path=fast_path))
    assert decoder.text == "Let me look.\n\nIt is 42." == "".join(e.delta for e in events)
    assert decoder.message_id == "m2" and decoder.message_text == "It is 42." and decoder.complete
    records = two_message_reply(form)
    body = b"".join((b"event: delta\n" if kind == "delta" else b"") + b"data: "
                    + (value if isinstance(value, bytes) else json.dumps(value).encode()) + b"\n\n" for kind, value in records)
    text = "Let me look.\n\nIt is 42."
    assert read_every_way(body, []) == {(text, text)}  # through the reply decoder, its shortcut, text only


def test_a_later_message_that_never_gives_text_leaves_no_blank_line() -> None:
    records = [delta({"p": "", "o": "add", "v": message_root("m1", text="Done."), "c": 0}),
               delta({"p": "", "o": "add", "v": message_root("m2"), "c": 1}),  # visible, empty,
               delta({"p": "/message/channel", "o": "replace", "v": "commentary"})]  # then hidden
    events, decoder = feed_records(records)
    assert decoder.text == "Done." == "".join(e.delta for e in events)
    snapshots = [(None, message_root("m1", text="Done.")), (None, message_root("m2")),
                 (None, message_root("m2", text="Aside", channel="commentary"))]
    events, decoder = feed_records(snapshots)
    assert decoder.text == "Done." == "".join(e.delta for e in events)


@pytest.mark.parametrize("records", [
    [(None, message_root("m1", text="One.")), (None, message_root("m2", text="Two.")), (None, message_root("m1", text="One. More"))],
    [(None, message_root("m1", text="One.")), (None, message_root("m2", text="Two.")), (None, message_root("m1", text="On!"))],
    [delta({"p": "", "o": "add", "v": message_root("m1", text="One."), "c": 0}),
     delta({"p": "", "o": "add", "v": message_root("m2", text="Two."), "c": 1}),
     delta({"p": PARTS, "o": "append", "v": " More", "c": 0})],
    [delta({"p": "", "o": "add", "v": message_root("m1", text="One."), "c": 0}),
     delta({"p": "", "o": "add", "v": message_root("m2", text="Two."), "c": 1}),
     delta({"p": PARTS, "o": "truncate", "v": 2, "c": 0})],
])
def test_an_earlier_message_that_changes_after_a_later_one_began_is_a_protocol_error(records: List[Tuple[Optional[str], Any]]) -> None:
    # Its place in the reply is gone: neither appended out of place nor given again.
    with pytest.raises(fakegpt.ProtocolError, match="an earlier message of the reply changed"):
        feed_records(records)
    again = records[0] if records[0][0] is None else delta({"p": "", "o": "add", "v": message_root("m1", text="One."), "c": 0})
    events, decoder = feed_records(records[:2] + [again])
    assert decoder.text == "One.\n\nTwo." == "".join(e.delta for e in events)  # as it was: nothing again


@pytest.mark.parametrize("form", ["snapshots", "delta"])
def test_an_earlier_message_goes_on_while_later_ones_have_no_text(form: str) -> None:
    # A server that opens the next message (and a tool's) before the last one's text ends:
    # nothing of the later one was delivered, so no place is lost and no text either.
    if form == "snapshots":
        records: List[Tuple[Optional[str], Any]] = [
            (None, message_root("m1", text="One")), (None, message_root("m2")),
            (None, message_root("t", role="tool", text="Results.")),
            (None, message_root("m1", text="One, two.")), (None, message_root("m2", text="Three.")),
            (None, b"[DONE]")]
    else:
        records = [delta({"p": "", "o": "add", "v": message_root("m1", text="One"), "c": 0}),
                   delta({"p": "", "o": "add", "v": message_root("m2"), "c": 1}),
                   delta({"p": "", "o": "add", "v": message_root("t", role="tool", text="Results."), "c": 2}),
                   delta({"p": PARTS, "o": "append", "v": ", two.", "c": 0}),
                   delta({"p": PARTS, "o": "append", "v": "Three.", "c": 1}), (None, b"[DONE]")]
    for fast_path in (True, False):
        events, decoder = feed_records(records, ConversationDecoder(fast_path=fast_path))
        assert decoder.text == "One, two.\n\nThree." == "".join(e.delta for e in events)
        assert decoder.message_id == "m2" and decoder.message_text == "Three."
    body = b"".join((b"event: delta\n" if kind == "delta" else b"") + b"data: "
                    + (value if isinstance(value, bytes) else json.dumps(value).encode()) + b"\n\n" for kind, value in records)
    assert read_every_way(body, []) == {("One, two.\n\nThree.",) * 2}


def read_every_way(body: bytes, cuts: Sequence[int]) -> Set[Tuple[str, str]]:
    """What the reply decoder makes of `body` cut at `cuts`, on the known-shape path and
    the reference path, for events and for text only: (the pieces joined, the decoder's
    text), or ("error", its message)."""
    outcomes = set()
    for fast_path in (True, False):
        for text_only in (True, False):
            conversation, pieces = ConversationDecoder(fast_path=fast_path), []
            reply = fakegpt._ReplyDecoder(conversation, Limits(), text_only=text_only)
            try:
                for chunk in split_at(body, cuts):
                    reply.feed(chunk, pieces)
            except fakegpt.ProtocolError as exc:
                outcomes.add(("error", str(exc)))
                continue
            outcomes.add(("".join(p if text_only else p.delta for p in pieces), conversation.text))
    return outcomes


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(["m0", "m1", "m2", "tool"]), st.text('aб"\\ ', max_size=3), st.booleans()), max_size=16),
       st.lists(st.integers(0, 3000), max_size=4))
def test_property_snapshots_of_several_messages_read_alike_every_way_and_pieces_are_the_text(
        steps: List[Tuple[str, str, bool]], cuts: List[int]) -> None:
    texts: Dict[str, str] = {}
    body = b""
    for message_id, more, finished in steps:
        texts[message_id] = texts.get(message_id, "") + more
        root = message_root(message_id, role="tool" if message_id == "tool" else "assistant", text=texts[message_id],
                            status="finished_successfully" if finished else "in_progress")
        body += b"data: " + json.dumps(root, ensure_ascii=False).encode() + b"\n\n"
    outcomes = read_every_way(body + b"data: [DONE]\n\n", cuts)
    assert len(outcomes) == 1
    pieces, text = next(iter(outcomes))
    assert pieces == "error" or pieces == text


@PROPERTY
@given(st.lists(st.tuples(st.lists(st.text('1aб"\\ .', min_size=1, max_size=3), min_size=1, max_size=4), st.booleans()),
                min_size=1, max_size=4),
       st.lists(st.integers(0, 3000), max_size=4))
def test_property_a_reply_of_messages_each_finished_before_the_next_reads_as_their_texts(
        messages: List[Tuple[List[str], bool]], cuts: List[int]) -> None:
    # Each message grows by snapshots and finishes before the next begins (a tool's call
    # and answer between them, or not); whatever their texts (one may begin with the whole
    # text of the one before), the reply is theirs joined by blank lines, never an error.
    body, finals = b"", []
    for index, (growth, tool_between) in enumerate(messages):
        if index and tool_between:
            body += b"data: " + json.dumps(message_root(f"t{index}", role="tool", text="result")).encode() + b"\n\n"
        text = ""
        for more in growth:
            text += more
            body += b"data: " + json.dumps(message_root(f"m{index}", text=text), ensure_ascii=False).encode() + b"\n\n"
        last = index == len(messages) - 1
        body += b"data: " + json.dumps(message_root(f"m{index}", text=text, status="finished_successfully",
                                                    end_turn=last), ensure_ascii=False).encode() + b"\n\n"
        finals.append(text)
    expected = "\n\n".join(finals)
    assert read_every_way(body + b"data: [DONE]\n\n", cuts) == {(expected, expected)}


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(["add", "append", "terse", "status", "hide"]), st.sampled_from([0, 1, 2]),
                          st.text("ab ", min_size=1, max_size=3)), max_size=14),
       st.lists(st.integers(0, 2000), max_size=4))
def test_property_deltas_of_several_messages_read_alike_every_way_and_pieces_are_the_text(
        steps: List[Tuple[str, int, str]], cuts: List[int]) -> None:
    records: List[Dict[str, Any]] = []
    added: Set[int] = set()
    for kind, document, text in steps:
        if kind == "add":
            records.append({"p": "", "o": "add", "v": message_root(f"m{document}", text=text), "c": document})
            added.add(document)
        elif document not in added:
            continue
        elif kind == "append":
            records.append({"p": PARTS, "o": "append", "v": text, "c": document})
        elif kind == "terse" and records[-1].get("p") == PARTS:
            records.append({"v": text})  # c, p and o carried forward
        elif kind == "status":
            records.append({"p": "/message/status", "o": "replace", "v": "finished_successfully", "c": document})
        elif kind == "hide":
            records.append({"p": "/message/channel", "o": "replace", "v": "commentary", "c": document})
    body = b"".join(b"event: delta\ndata: " + json.dumps(r).encode() + b"\n\n" for r in records)
    outcomes = read_every_way(body + b"data: [DONE]\n\n", cuts)
    assert len(outcomes) == 1
    pieces, text = next(iter(outcomes))
    assert pieces == "error" or pieces == text


def test_a_continued_reply_of_several_messages_goes_on_in_its_last() -> None:
    _, first = feed_records(two_message_reply("snapshots")[:-4] + [
        (None, message_root("m2", text="It is 4", status="finished_successfully", end_turn=True,
                            metadata={"finish_details": {"type": "max_tokens"}}))])
    assert first.text == "Let me look.\n\nIt is 4" and first.message_text == "It is 4"
    events, after = feed_records([(None, message_root("m2", text="It is 42."))], ConversationDecoder(continues=first))
    assert "".join(e.delta for e in events) == "2." and after.text == "Let me look.\n\nIt is 42."


def test_a_continued_reply_goes_on_without_a_seam_in_both_formats() -> None:
    first, _ = feed_records([(None, message_root("m1", text="Hello wor"))])
    decoder = first[-1]  # the ChatEvent; the decoder itself comes next
    _, decoder1 = feed_records([(None, message_root("m1", text="Hello wor", status="finished_successfully", end_turn=True,
                                                     metadata={"finish_details": {"type": "max_tokens"}}))])
    assert decoder1.finish_reason == "max_tokens" and decoder.text == "Hello wor"
    snapshots, after = feed_records([(None, message_root("m1", text="Hello world."))], ConversationDecoder(continues=decoder1))
    assert "".join(e.delta for e in snapshots) == "ld." and after.text == "Hello world."
    deltas, after = feed_records([delta({"p": "", "o": "add", "v": message_root("m1", text="Hello wor")}),
                                  delta({"p": PARTS, "o": "append", "v": "ld."})], ConversationDecoder(continues=decoder1))
    assert "".join(e.delta for e in deltas) == "ld." and after.text == "Hello world."


def test_kept_events_share_one_copy_of_the_text() -> None:
    # Events kept while the text is asked for along the way must not each pin a copy.
    text = "я" * 12000  # two bytes a character in memory
    datas = [assistant_event(text[: i + 1]) for i in range(0, 12000, 40)]
    decoder = ConversationDecoder(fast_path=False)  # every event decoded in full
    tracemalloc.start()
    try:
        kept = []
        for data in datas:
            kept.append(decoder.feed(E(raw=data)))
            assert decoder.text  # asked for along the way, as a caller would
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < 1024 * 1024  # a copy per event would be 300 x 12 KB on average
    assert kept[5] is not None and kept[5].text == text[:201] and kept[-1] is not None and kept[-1].text == text[:11961]


def reference_documents(records: Sequence[Dict[str, Any]]) -> Dict[Any, Any]:
    """The delta format applied plainly, written apart from fakegpt: every document."""
    documents: Dict[Any, Any] = {}
    carried: Dict[str, Any] = {"c": 0, "p": None, "o": None}

    def apply(document: Any, path: str, op: str, value: Any) -> None:
        if op == "patch":
            for inner in value:
                apply(document, inner["p"], inner["o"], inner.get("v"))
            return
        if path == "":
            documents[document] = copy.deepcopy(value)
            return
        *route, last = path.split("/")[1:]
        node = documents[document]
        for key in route:
            node = node[int(key)] if isinstance(node, list) else node[key]
        where: Any = int(last) if isinstance(node, list) and last != "-" else (len(node) if isinstance(node, list) else last)
        if op in ("add", "append") and isinstance(node, list) and (op == "add" or where == len(node)):
            node.insert(where, copy.deepcopy(value))  # an append past the end adds, as to a missing key
        elif op in ("add", "replace") or (op == "append" and isinstance(node, dict) and where not in node):
            node[where] = copy.deepcopy(value)
        elif op == "append":
            old = node[where]
            if isinstance(old, str):
                node[where] = old + value
            elif isinstance(old, list):
                node[where] = old + (value if isinstance(value, list) else [value])
            else:
                node[where] = {**old, **value}
        elif op == "truncate":
            node[where] = node[where][:value]
        elif op == "remove":
            if isinstance(node, list):
                del node[where]
            else:
                node.pop(where, None)  # removing what is not there changes nothing

    for record in records:
        document = record.get("c", carried["c"])
        value = record.get("v")
        if "p" not in record and "o" not in record and isinstance(value, dict) and "message" in value:
            carried = {"c": document, "p": "", "o": "add"}
            apply(document, "", "add", value)
        elif "o" not in record and isinstance(value, list) and value and all(isinstance(op, dict) and {"p", "o"} <= op.keys() for op in value):
            carried["c"] = document
            apply(document, "", "patch", value)
        else:
            carried = {"c": document, "p": record.get("p", carried["p"]), "o": record.get("o", carried["o"])}
            apply(document, carried["p"], carried["o"], value)
    return documents


op_step = st.one_of(
    st.tuples(st.just("text"), st.text(max_size=4)),
    st.tuples(st.just("commentary"), st.text(max_size=4)),
    st.tuples(st.just("thought"), st.text(max_size=4)),
    st.tuples(st.just("meta"), st.sampled_from([0, 1, 2]), st.sampled_from(["k", "j"]), st.integers(0, 9)),
    st.tuples(st.just("unmeta"), st.sampled_from([0, 1, 2]), st.sampled_from(["k", "j"])),
    st.tuples(st.just("truncate"), st.integers(0, 6)),
    st.tuples(st.just("status"), st.sampled_from(["in_progress", "finished_successfully"]), st.booleans()),
)


@settings(PROPERTY, max_examples=300)
@example([(("text", "Hi"), "plain", False), (("commentary", "x"), "plain", False), (("commentary", "y"), "plain", True)],
         [0, 1, 2], [], "add")  # a terse append to a hidden document right after the reply's
@example([(("text", "Hi"), "patch", False)], [0, 1, 2], [], "batch")  # a patch with no path, and none carried
@given(st.lists(st.tuples(op_step, st.sampled_from(["plain"] * 4 + ["patch", "batch", "nested"]),
                          st.sampled_from([True, True, False])), max_size=25),
       st.permutations([0, 1, 2]), st.lists(st.integers(0, 400), max_size=6), st.sampled_from(["add", "patch", "batch"]))
def test_property_delta_decoder_agrees_with_a_plain_reference_applier(steps: List[Tuple[Any, str, bool]], order: List[int],
                                                                      cuts: List[int], opening: str) -> None:
    roots = {0: message_root("m1", metadata={"k": 0}), 1: message_root("h1", channel="commentary", metadata={"k": 0}),
             2: message_root("t1", content_type="thoughts", text=[{"summary": "s", "content": ""}], metadata={"k": 0})}
    # The documents begin as plain records, or inside a patch with no path or a bare batch,
    # neither of which gives a path to carry forward.
    if opening == "add":
        records: List[Dict[str, Any]] = [{"p": "", "o": "add", "v": roots[c], "c": c} if c else {"v": roots[c], "c": c} for c in order]
        cursor: Dict[str, Any] = {"c": order[-1], "p": "", "o": "add"}
    else:
        batch = {"o": "patch"} if opening == "patch" else {}
        records = [{**batch, "v": [{"p": "", "o": "add", "v": roots[c]}], "c": c} for c in order]
        cursor = {"c": order[-1], "p": None, "o": "patch" if opening == "patch" else None}
    carried_c = order[-1]
    for step, form, terse in steps:
        kind = step[0]
        if kind == "text":
            document, op = 0, {"p": PARTS, "o": "append", "v": step[1]}
        elif kind == "commentary":
            document, op = 1, {"p": PARTS, "o": "append", "v": step[1]}
        elif kind == "thought":
            document, op = 2, {"p": "/message/content/thoughts/0/content", "o": "append", "v": step[1]}
        elif kind == "meta":
            document, op = step[1], {"p": f"/message/metadata/{step[2]}", "o": "add", "v": step[3]}
        elif kind == "unmeta":
            document, op = step[1], {"p": f"/message/metadata/{step[2]}", "o": "remove"}
        elif kind == "truncate":  # only ever the hidden commentary
            document, op = 1, {"p": PARTS, "o": "truncate", "v": step[1]}
        else:
            document, op = 0, {"p": "", "o": "patch", "v": [{"p": "/message/status", "o": "replace", "v": step[1]},
                                                          {"p": "/message/end_turn", "o": "replace", "v": step[2]}]}
        if form == "plain" or op["o"] == "patch":
            record = dict(op)
            if terse and cursor["c"] == document and cursor["p"] == op["p"] and cursor["o"] == op["o"]:
                record = {"v": op["v"]} if "v" in op else record  # both carried forward
            if op["o"] != "patch":
                cursor = {"c": document, "p": op["p"], "o": op["o"]}
            else:
                cursor = {"c": document, "p": "", "o": "patch"}
        elif form == "patch":
            record = {"o": "patch", "v": [op]}  # no path: it carries forward, unused
            cursor = {"c": document, "p": cursor["p"], "o": "patch"}
        elif form == "batch":
            record = {"v": [op]}
            cursor["c"] = document
        else:
            record = {"p": "", "o": "patch", "v": [{"p": "", "o": "patch", "v": [op]}]}
            cursor = {"c": document, "p": "", "o": "patch"}
        if not (terse and document == carried_c):
            record["c"] = document
        carried_c = document
        records.append(record)
    body = b"".join(b"event: delta\ndata: " + json.dumps(r).encode() + b"\n\n" for r in records) + b"data: [DONE]\n\n"
    conversation, events = ConversationDecoder(), []
    reply = fakegpt._ReplyDecoder(conversation, Limits())
    for chunk in split_at(body, cuts):
        reply.feed(chunk, events)
    documents = reference_documents(records)
    visible = documents[0]["message"]
    assert conversation.text == visible["content"]["parts"][0] == "".join(e.delta for e in events)
    assert conversation.reasoning == documents[2]["message"]["content"]["thoughts"][0]["content"]
    assert (conversation.status, conversation.end_turn) == (visible["status"], visible["end_turn"])


def mock_stream(fmt: str, text: str, *, step: int, seed: int, finish: str = "stop", tool_use: bool = False,
                framing: str = "chunked") -> bytes:
    """The raw HTTP response of one conversation with a mock of `fmt`, read by a plain socket."""
    async def run() -> bytes:
        async with mock_server.MockServer(profile="backend-api", stream_format=fmt, reply=text, step=step,
                                          seed=seed, finish=finish, tool_use=tool_use, framing=framing) as server:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            body = json.dumps({"action": "next", "messages": [{"id": "u1", "content": {"parts": ["Hi"]}}],
                               "parent_message_id": "p", "model": "m"}).encode()
            writer.write(b"POST /backend-api/conversation HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Authorization: Bearer " + server.access_token.encode() + b"\r\n"
                         b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
            raw = await reader.read()
            writer.close()
            return raw
    return asyncio.run(run())


@settings(PROPERTY, max_examples=40)
@given(st.text(max_size=40), st.integers(1, 7), st.integers(0, 2**16), st.sampled_from(["stop", "max_tokens"]),
       st.lists(st.integers(0, 5000), max_size=8), st.booleans())
def test_property_the_delta_format_gives_what_the_snapshots_give_for_any_reply_and_split(
        text: str, step: int, seed: int, finish: str, cuts: List[int], tool_use: bool) -> None:
    outcomes = []
    for fmt in ("snapshots", "v1"):
        raw = mock_stream(fmt, text, step=step, seed=seed, finish=finish, tool_use=tool_use)
        conversation, events = ConversationDecoder(), []
        reply = fakegpt._ReplyDecoder(conversation, Limits())
        for event in reader_events(split_at(raw, cuts)):
            if isinstance(event, Data):
                reply.feed(event.data, events)
        outcomes.append(("".join(e.delta for e in events), conversation.title, conversation.finish_reason,
                         conversation.complete, conversation.model))
    assert outcomes[0] == outcomes[1]
    preamble = mock_server.TOOL_USE_PREAMBLE
    assert outcomes[0][0] == (preamble + "\n\n" + text if tool_use and text else text) and outcomes[0][3]
    assert outcomes[0][2] == finish


HIDDEN_KINDS = [{"role": "tool"}, {"role": "user"}, {"recipient": "python"}, {"channel": "commentary"},
                {"channel": "analysis"}, {"content_type": "code"}, {"metadata": {"is_visually_hidden_from_conversation": True}}]


def random_reply(rng: random.Random) -> Tuple[List[Tuple[Optional[str], Any]], List[Tuple[Optional[str], Any]], str]:
    """A reply of up to four messages, some hidden, whose documents are opened, grown and
    switched between at random in the delta format, every way a record may say it (`c`,
    `p` and `o` carried forward or not, patches with and without `p`, bare batches, text
    replaced by a longer one), notices and padding between; the same reply as a snapshot
    of each change; and its text as PROTOCOL.md section 8 has it, worked out here apart
    from the client: the visible messages' texts, in the order each began to give text,
    a blank line between. A visible message grows only while no later one has text (after
    that, its place in the reply is gone), and each begins with a mark of its own (one
    that began with the text before it would be that message under a new id)."""
    kinds = [{} if rng.random() < 0.55 else rng.choice(HIDDEN_KINDS) for _ in range(rng.randint(1, 4))]
    documents: Dict[int, Dict[str, Any]] = {}
    deltas: List[Tuple[Optional[str], Any]] = []
    snapshots: List[Tuple[Optional[str], Any]] = []
    began: List[int] = []  # visible documents, in the order their text began
    carried: Tuple[Any, Any, Any] = (None, None, None)  # the last record's c, p and o

    def visible(c: int) -> bool:
        return not kinds[c]

    def snapshot(c: int) -> None:
        snapshots.append((None, copy.deepcopy(documents[c])))

    for _ in range(rng.randint(1, 25)):
        if len(documents) < len(kinds) and (not documents or rng.random() < 0.25):
            c = len(documents)
            kind = kinds[c]
            first = rng.choice(["", "", f"<{c}>"])
            documents[c] = message_root(f"m{c}", text=first, **{k: v for k, v in kind.items() if k != "metadata"},
                                        metadata=dict(kind.get("metadata", {})))
            record = {"p": "", "o": "add", "v": copy.deepcopy(documents[c]), "c": c}
            if rng.random() < 0.3:
                del record["p"], record["o"]  # a whole message as the value opens it too
            deltas.append(delta(record))
            carried = (c, "", "add")
            snapshot(c)
            if visible(c) and first:
                began.append(c)
        else:
            open_ones = [c for c in documents if not visible(c) or not any(
                later > c and later in began for later in documents) or c == (began or [None])[-1]]
            c = rng.choice(open_ones)
            text = documents[c]["message"]["content"]["parts"][0]
            piece = "".join(rng.choice('ab é😀\n"\\') for _ in range(rng.randint(1, 4)))
            if visible(c) and not text:
                piece = f"<{c}>" + piece
            form = rng.random()
            if form < 0.45:
                record = {"v": piece}
                if carried != (c, PARTS, "append") or rng.random() < 0.2:
                    record.update({"p": PARTS, "o": "append", "c": c})
                carried = (c, PARTS, "append")
            elif form < 0.75:
                ops = [{"p": PARTS, "o": "append", "v": piece}]
                if rng.random() < 0.5:
                    ops.append({"p": "/message/metadata", "o": "append", "v": {"n": rng.randint(0, 9)}})
                if rng.random() < 0.3:
                    ops.append({"p": "/message/status", "o": "replace", "v": "in_progress"})
                rng.shuffle(ops)
                record = rng.choice([{"p": "", "o": "patch", "v": ops}, {"o": "patch", "v": ops}, {"v": ops}])
                record["c"] = c
                carried = (c, record.get("p", carried[1]), record.get("o", carried[2]))
            else:
                record = {"p": PARTS, "o": "replace", "v": text + piece, "c": c}
                carried = (c, PARTS, "replace")
            deltas.append(delta(record))
            documents[c]["message"]["content"]["parts"][0] = text + piece
            snapshot(c)
            if visible(c) and c not in began:
                began.append(c)
        if rng.random() < 0.15:
            notice = (None, {"type": "title_generation", "title": "T", "conversation_id": "c1"})
            deltas.append(notice)
            snapshots.append(notice)
    text = "\n\n".join(documents[c]["message"]["content"]["parts"][0] for c in began)
    return deltas + [(None, b"[DONE]")], snapshots + [(None, b"[DONE]")], text


def records_body(records: Sequence[Tuple[Optional[str], Any]], rng: random.Random) -> bytes:
    """An event stream of `records`, their data padded at random, as servers do."""
    return b"".join((b"event: %s\n" % kind.encode() if kind else b"") + b"data: "
                    + (value if isinstance(value, bytes) else json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
                       + b" " * rng.choice([0, 0, 1, 7, 30])) + b"\n\n"
                    for kind, value in records)


@settings(PROPERTY, max_examples=60)
@given(st.integers(0, 2**32), st.lists(st.integers(0, 4000), max_size=4))
def test_property_random_replies_read_as_the_protocol_says_in_both_formats_every_way(seed: int, cuts: List[int]) -> None:
    rng = random.Random(seed)  # (hypothesis's own randoms favour small draws: too few interleavings)
    deltas, snapshots, text = random_reply(rng)
    for records in (deltas, snapshots):
        events, decoder = feed_records(records, ConversationDecoder(fast_path=rng.random() < 0.5))
        assert decoder.text == text == "".join(e.delta for e in events) and decoder.done
        assert read_every_way(records_body(records, rng), cuts) == {(text, text)}


@pytest.mark.parametrize("fmt", ["snapshots", "v1"])
def test_the_mocks_tool_use_is_two_visible_messages_around_a_tool_round_trip(fmt: str) -> None:
    # Read without fakegpt's parsers: the body up to the close, its data lines, JSON.
    raw = mock_stream(fmt, "The answer.", step=3, seed=5, tool_use=True, framing="close")
    body = raw.split(b"\r\n\r\n", 1)[1].decode()
    records = [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: {")]

    def visible(message: Any) -> bool:
        return (isinstance(message, dict) and message["author"]["role"] == "assistant" and message["recipient"] == "all"
                and message["content"]["content_type"] == "text" and message.get("channel") in (None, "final")
                and not message["metadata"].get("is_thinking_preamble_message"))

    if fmt == "snapshots":
        messages: Dict[str, Any] = {}
        for record in records:
            if visible(record.get("message")):
                messages[record["message"]["id"]] = record["message"]  # in order of first appearance, the last kept
        roles = [r["message"]["author"]["role"] for r in records if r.get("message")]
        assert "tool" in roles and any(r["message"].get("recipient") == "browser" for r in records if r.get("message"))
    else:
        documents = reference_documents([r for r in records if "type" not in r])
        messages = {d["message"]["id"]: d["message"] for _, d in sorted(documents.items(), key=lambda kv: kv[0] != 6)
                    if visible(d.get("message"))}
    first, last = messages.values()
    assert [m["content"]["parts"][0] for m in (first, last)] == [mock_server.TOOL_USE_PREAMBLE, "The answer."]
    assert (first["status"], first["end_turn"], last["status"], last["end_turn"]) == (
        "finished_successfully", False, "finished_successfully", True)


@pytest.mark.parametrize("fmt", ["snapshots", "v1"])
def test_an_empty_reply_has_no_tool_round_trip_before_it(fmt: str) -> None:
    with mock_server.serve_in_thread(tool_use=True, stream_format=fmt, fault="empty") as server:
        raised, pieces = failure(provider_for(server.url))
    assert isinstance(raised, fakegpt.NoResponseError) and pieces == []


@pytest.mark.parametrize("fmt", ["snapshots", "v1"])
def test_a_reply_around_a_tool_round_trip_cut_at_max_tokens_is_continued_in_its_last_message(fmt: str) -> None:
    async def run() -> Tuple[str, int]:
        async with mock_server.MockServer(tool_use=True, stream_format=fmt, max_tokens=30) as server:
            text = await FakeGpt.isolated(server.url).create_async("", [{"role": "user", "content": "Hi"}], auto_continue=True)
            return text, server.count("POST", "/api/conversation")
    text, requests = asyncio.run(run())
    assert text == mock_server.TOOL_USE_PREAMBLE + "\n\n" + mock_server.default_reply("Hi") and requests == 3


@pytest.mark.parametrize("fmt", ["snapshots", "v1"])
def test_a_reply_around_a_tool_round_trip_reads_as_both_texts_and_the_next_turn_answers_it(fmt: str) -> None:
    async def run() -> Tuple[str, str]:
        async with mock_server.MockServer(tool_use=True, stream_format=fmt, write_size=7) as server:
            provider = FakeGpt.isolated(server.url)
            first = await provider.create_async("", [{"role": "user", "content": "Hi"}])
            async with provider.stream("", [{"role": "user", "content": "Hi"}]) as reply:
                async for _ in reply:
                    pass
            second = await provider.create_async("", [{"role": "user", "content": "Next"}], conversation_id=reply.conversation_id,
                                                 parent_message_id=reply.message_id)
            return first, second
    first, second = asyncio.run(run())
    preamble = mock_server.TOOL_USE_PREAMBLE + "\n\n"
    assert first == preamble + mock_server.default_reply("Hi")
    assert second.startswith(preamble + "Turn 2: before, you said “Hi”.")  # the reply's last message was the parent


# ---------------------------------------------------------------------------------------
# The three layers together: splits and corruption
# ---------------------------------------------------------------------------------------

STREAM_TEXTS = ["Пр", "Привет", "Привет 你好", 'Привет 你好 "q" \\', 'Привет 你好 "q" \\ 👋']


@PROPERTY
@given(st.sampled_from(["chunked", "length", "close"]), st.sampled_from([b"\n", b"\r\n"]), st.lists(st.integers(0, 3000), max_size=16))
def test_property_pipeline_any_split_gives_the_same_text(framing: str, newline: bytes, cuts: List[int]) -> None:
    data = conversation_bytes(STREAM_TEXTS, framing=framing, newline=newline)
    assert pipeline(split_at(data, cuts)) == STREAM_TEXTS[-1]


@PROPERTY
@given(st.sampled_from(["chunked", "length", "close"]),
       st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       st.lists(st.integers(0, 3000), max_size=6))
@example("close", [("insert", 545496, 32)], [])  # a space inside a four-byte character
def test_property_any_corruption_gives_the_text_or_a_fakegpt_error(framing: str, edits: List[Tuple[str, int, int]], cuts: List[int]) -> None:
    data = bytearray(conversation_bytes(STREAM_TEXTS, framing=framing))
    for kind, position, value in edits:
        if not data:
            break
        position %= len(data)
        if kind == "flip":
            data[position] ^= value or 1
        elif kind == "insert":
            data[position:position] = bytes([value])
        elif kind == "delete":
            del data[position]
        else:
            del data[position:]
    try:
        text = pipeline(split_at(bytes(data), cuts))
    except fakegpt.FakeGptError:
        return
    # A corruption may leave a valid stream (a byte added to the last event's text, say),
    # but it can change the text only about as much as it changed the bytes: text is
    # never duplicated or dropped wholesale. One byte changes five characters at most: a
    # byte put inside a four-byte character leaves four bytes that are no character
    # (each read as U+FFFD) and itself.
    assert edit_distance(text, STREAM_TEXTS[-1]) <= 5 * len(edits)


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


# ---------------------------------------------------------------------------------------
# End to end against the mock upstream
# ---------------------------------------------------------------------------------------


@pytest.fixture
def mock() -> Iterator[mock_server.MockServer]:
    with mock_server.serve_in_thread() as server:
        yield server


def provider_for(url: str) -> "type[FakeGpt]":
    """A FakeGpt subclass aimed at `url`, with sessions of its own."""
    provider = FakeGpt.isolated(url)
    provider.__name__ = "Provider"
    return provider


@pytest.fixture
def provider(mock: mock_server.MockServer) -> "type[FakeGpt]":
    return provider_for(mock.url)


async def gather_pieces(provider: "type[FakeGpt]", content: str = "Hello", **kwargs: Any) -> List[str]:
    return [p async for p in provider.create_async_generator("", [{"role": "user", "content": content}], **kwargs)]


def pieces_of(provider: "type[FakeGpt]", content: str = "Hello", **kwargs: Any) -> List[str]:
    return asyncio.run(gather_pieces(provider, content, **kwargs))


def failure(provider: "type[FakeGpt]", content: str = "Hello", **kwargs: Any) -> Tuple[fakegpt.FakeGptError, List[str]]:
    """The error a call raises and the pieces delivered before it."""
    pieces: List[str] = []

    async def run() -> None:
        async for piece in provider.create_async_generator("", [{"role": "user", "content": content}], **kwargs):
            pieces.append(piece)

    with pytest.raises(fakegpt.FakeGptError) as caught:
        asyncio.run(run())
    return caught.value, pieces


def run_cli(*args: str, input: Optional[str] = None, env: Optional[Dict[str, str]] = None, timeout: float = 30,
            encoding_errors: str = "strict") -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(HERE), "NO_COLOR": "1", **(env or {})}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "FAKEGPT_URL"):
        if env is None or name not in env:
            full_env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "fakegpt", *args], input=input, capture_output=True,
                          text=True, encoding="utf-8", errors=encoding_errors, env=full_env, cwd=HERE, timeout=timeout)


SEED_EXAMPLE = '''\
import asyncio
from typing import List, Dict, AsyncGenerator, Optional

from src.endpoints.gpt4free.g4f.Provider.deprecated import FakeGpt

async def main():
    messages: List[Dict[str, str]] = [{"role": "user", "content": "Hello, how are you?"}]
    model: str = "text-davinci-002-render-sha"
    proxy: Optional[str] = None

    generator: AsyncGenerator[str, None] = FakeGpt.create_async_generator(model=model, messages=messages, proxy=proxy)
    async for message in generator:
        print(message, end="")

if __name__ == "__main__":
    asyncio.run(main())
'''


def test_seed_example_runs_verbatim_with_only_the_url_changed(tmp_path: pathlib.Path, mock: mock_server.MockServer) -> None:
    package = tmp_path / "src" / "endpoints" / "gpt4free" / "g4f" / "Provider" / "deprecated"
    package.mkdir(parents=True)
    for folder in [package, *package.parents][: len(package.relative_to(tmp_path).parts)]:
        (folder / "__init__.py").touch()
    # The url is the one thing changed: the public service is gone.
    (package / "__init__.py").write_text(f"from fakegpt import FakeGpt\nFakeGpt.url = {mock.url!r}\n")
    (tmp_path / "example.py").write_text(SEED_EXAMPLE)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                            encoding="utf-8", env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}"}, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == mock_server.default_reply("Hello, how are you?")


def test_reply_streams_in_pieces_that_join_to_the_mock_reply(provider: "type[FakeGpt]") -> None:
    # Events that arrive together make one piece; spaced events make a piece each.
    pieces = pieces_of(provider, "[[fault delay_events:0.005]] Hello")
    assert len(pieces) > 5
    assert "".join(pieces) == mock_server.default_reply("[[fault delay_events:0.005]] Hello")
    assert "".join(pieces_of(provider, "Hello")) == mock_server.default_reply("Hello")


def test_provider_attributes_match_the_seed_and_gpt4free() -> None:
    assert FakeGpt.url == "https://chat-shared2.zhile.io"
    assert (FakeGpt.supports_gpt_35_turbo, FakeGpt.working, FakeGpt.supports_stream) == (True, False, True)
    assert (FakeGpt.supports_gpt_4, FakeGpt.supports_message_history, FakeGpt.needs_auth) == (False, True, False)
    assert FakeGpt.get_dict() == {"name": "FakeGpt", "url": FakeGpt.url, "label": "FakeGpt"}
    assert "messages: Messages" in FakeGpt.params and "proxy: Optional[str] = None" in FakeGpt.params


@pytest.mark.parametrize("counted", [True, False], ids=["the session's jar", "any jar"])
def test_remembered_cookie_header_is_what_the_jar_makes_as_its_cookies_change(monkeypatch: pytest.MonkeyPatch, counted: bool) -> None:
    import http.cookiejar

    def cookie(name: str, value: str, expires: Optional[int]) -> http.cookiejar.Cookie:
        return http.cookiejar.Cookie(0, name, value, None, False, "127.0.0.1", False, False, "/", True, False,
                                     expires, expires is None, None, None, {})

    def headers(jar: http.cookiejar.CookieJar, remembered: bool) -> List[Tuple[str, str]]:
        request = fakegpt._CookieRequest("http://127.0.0.1:8080/api/conversation", [("Host", "127.0.0.1:8080")])
        if remembered:
            fakegpt._add_cookie_header(jar, request)
        else:
            jar.add_cookie_header(request)  # type: ignore[arg-type]
        return request.fields[1:]

    now = time.time()
    jar = fakegpt._CookieJar() if counted else http.cookiejar.CookieJar()
    jar.set_cookie(cookie("credential", "one", int(now) + 100))
    steps: List[Callable[[], Any]] = [
        lambda: None,
        lambda: None,  # the remembered header, unchanged
        lambda: jar.set_cookie(cookie("extra", "two", None)),
        lambda: setattr(next(c for c in jar if c.name == "extra"), "value", "three"),  # changed in place
        lambda: monkeypatch.setattr(time, "time", lambda: now + 200),  # the credential has expired
        lambda: jar.clear(),
        lambda: jar.set_cookie(cookie("credential", "four", None)),
        lambda: jar.clear("127.0.0.1", "/", "credential"),
    ]
    seen = []
    for step in steps:
        step()
        remembered = headers(jar, remembered=True)
        assert remembered == headers(jar, remembered=False)
        seen.append(remembered)
    assert seen[0] == [("Cookie", "credential=one")]
    assert seen[1] == seen[0] and seen[2] == [("Cookie", "credential=one; extra=two")]
    assert seen[3] == [("Cookie", "credential=one; extra=three")]
    assert seen[4] == [("Cookie", "extra=three")] and seen[5] == []
    assert seen[6] == [("Cookie", "credential=four")] and seen[7] == []


def test_token_and_cookie_are_cached_so_a_second_call_makes_one_request(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    pieces_of(provider)
    assert [r.path for r in mock.requests] == ["/api/loads", "/auth/login", "/api/auth/session", "/api/conversation"]
    assert isinstance(provider._cookie_jar, fakegpt.http.cookiejar.CookieJar)
    assert provider._access_token
    pieces_of(provider)
    assert [r.path for r in mock.requests[4:]] == ["/api/conversation"]


def test_login_request_and_conversation_request_follow_the_protocol(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    asyncio.run(provider.create_async("gpt-3.5-turbo", messages))
    loads, login, session, conversation = mock.requests
    assert loads.method == "GET" and loads.query.startswith("t=") and abs(int(loads.query[2:]) - time.time()) < 60
    form = dict(pair.split("=") for pair in login.body.decode().split("&"))
    assert form["token_key"] in mock.token_ids
    assert len(form["session_password"]) >= 8
    assert any(c.isdigit() for c in form["session_password"]) and any(c.isalpha() for c in form["session_password"])
    assert session.header("cookie", ).startswith("credential=")
    assert conversation.header("x-authorization") == f"Bearer {provider._access_token}"
    assert conversation.header("authorization") is None
    assert conversation.header("content-type") == "application/json"
    assert conversation.header("accept") == "text/event-stream"
    assert conversation.header("referer") == f"{mock.url}/?v=2"
    assert "Chrome/118" in (conversation.header("user-agent") or "")
    body = json.loads(conversation.body)
    assert body["messages"][0]["content"]["parts"] == ["System: Be brief.\nUser: Hi\nAssistant:"]
    assert body["model"] == "text-davinci-002-render-sha" and body["action"] == "next"
    assert body["history_and_training_disabled"] is True and body["timezone_offset_min"] == -120
    assert {"plugin_ids", "suggestions", "arkose_token", "force_paragen", "parent_message_id"} <= set(body)


def test_format_prompt_has_gpt4free_semantics() -> None:
    assert fakegpt.format_prompt([{"role": "user", "content": "only"}]) == "only"
    assert fakegpt.format_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "User: a\nAssistant: b\nAssistant:"
    for bad in ([], None, [{"role": "user"}], [{"content": "x"}], ["text"]):
        with pytest.raises(fakegpt.UsageError):
            fakegpt.format_prompt(bad)  # type: ignore[arg-type]


def test_a_content_of_text_parts_is_its_text_and_any_other_part_is_a_usage_error() -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "мир"}]
    assert fakegpt.format_prompt([{"role": "user", "content": parts}]) == "Hello, мир"
    assert fakegpt.format_prompt([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                  {"role": "user", "content": parts}]) == "System: Be brief.\nUser: Hello, мир\nAssistant:"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for content, says in (([parts[0], image], "['content'][1] is a part of type 'image_url'"),
                          ([{"text": "no type"}], "['content'][0] is a part that is not a text part"),
                          (["bare"], "['content'][0] is a part that is not a text part"),
                          ([{"type": "text", "text": 5}], "['content'][0] is a text part whose 'text' is not a string"),
                          (None, "['content'] must be a string or a list of text parts, not NoneType"),
                          (7, "not int")):
        with pytest.raises(fakegpt.UsageError, match=re.escape(f"messages[1]{says}" if says.startswith("[") else says)):
            fakegpt.format_prompt([{"role": "user", "content": "first"}, {"role": "user", "content": content}])


def test_a_reply_to_text_parts_is_the_reply_to_their_text(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]

    async def ask() -> List[str]:
        return [p async for p in provider.create_async_generator("", [{"role": "user", "content": parts}])]

    assert "".join(asyncio.run(ask())) == mock_server.default_reply("Hello there")


def test_gpt4free_media_with_an_image_is_a_usage_error_and_no_image_is_fine(
    provider: "type[FakeGpt]", mock: mock_server.MockServer,
) -> None:
    image = ("data:image/png;base64,AAAA", "cat.png")

    async def ask(**kwargs: Any) -> str:
        return "".join([p async for p in provider.create_async_generator("", USER, **kwargs)])

    for empty in ({"media": None}, {"media": []}, {"images": None, "image": None, "image_name": None}):
        assert asyncio.run(ask(**empty)) == FULL_REPLY
    requests = len(mock.requests)
    # After a call with no image under the same keyword, so that remembered options do not hide it.
    for keywords in ({"media": [image]}, {"images": [image]}, {"image": b"\x89PNG"}, {"image": "cat.png"}):
        with pytest.raises(fakegpt.UsageError, match=f"{next(iter(keywords))}= holds an image.*takes text only"):
            asyncio.run(ask(**keywords))
    assert len(mock.requests) == requests  # refused before any request


def test_random_strings_and_session_passwords() -> None:
    assert len(fakegpt.get_random_string()) == 10 and len(fakegpt.get_random_string(25)) == 25
    assert set(fakegpt.get_random_string(2000)) <= set("abcdefghijklmnopqrstuvwxyz0123456789")
    for _ in range(2000):  # the original drew passwords that broke the rule about 1 time in 6
        password = fakegpt._session_password()
        assert len(password) >= 8 and any(c.isdigit() for c in password) and any(c.isalpha() for c in password)


def test_single_flight_login_for_200_concurrent_first_calls(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    async def many() -> List[List[str]]:
        return await asyncio.gather(*(gather_pieces(provider, f"call {i}") for i in range(200)))

    results = asyncio.run(many())
    assert ["".join(r) for r in results] == [mock_server.default_reply(f"call {i}") for i in range(200)]
    assert (mock.count("GET", "/api/loads"), mock.count("POST", "/auth/login"), mock.count("GET", "/api/auth/session")) == (1, 1, 1)
    assert mock.count("POST", "/api/conversation") == 200


def test_expired_token_logs_in_again_once_and_retries(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    pieces_of(provider)
    old_token = provider._access_token
    mock.expire_tokens()
    assert "".join(pieces_of(provider)) == mock_server.default_reply("Hello")
    assert mock.count("POST", "/auth/login") == 2 and mock.count("POST", "/api/conversation") == 3
    assert provider._access_token != old_token


END = calendar.timegm((2089, 8, 8, 23, 59, 59, 0, 0, 0))  # Pandora's "expires", in seconds since the epoch


@pytest.mark.parametrize("text, seconds", [
    ("2089-08-08T23:59:59.999Z", END + 0.999),  # as Pandora says it
    ("2089-08-08T23:59:59Z", END),
    ("2089-08-08 23:59:59", END),  # no offset: UTC
    ("2089-08-09T01:59:59.5+02:00", END + 0.5),
    ("2089-08-08T20:59:59-0300", END),
    (" 1970-01-01T00:00:00.123456789z ", 0.123456789),
    ("2089-02-30T00:00:00Z", None),  # no such day
    ("2089-08-08T24:00:00Z", None),
    ("2089-08-08", None),
    ("in a month", None),
    ("\uff12\uff10\uff18\uff19-08-08T23:59:59Z", None),  # digits, but not ASCII ones
    ("", None),
    (END, None),  # a number could be seconds or milliseconds: not guessed
    (None, None),
])
def test_a_sessions_expiry_is_read_as_iso_8601(text: Any, seconds: Optional[float]) -> None:
    found = fakegpt._expiry_time(text)
    assert found == seconds if seconds is None else found == pytest.approx(seconds, abs=1e-6)


@settings(PROPERTY)
@given(st.datetimes(min_value=datetime.datetime(1, 1, 2), max_value=datetime.datetime(9999, 12, 30)),
       st.integers(-(23 * 60 + 59), 23 * 60 + 59), st.sampled_from(["T", " "]))
def test_any_iso_8601_time_with_an_offset_is_read_as_the_moment_it_names(
    moment: datetime.datetime, offset_minutes: int, separator: str
) -> None:
    aware = moment.replace(tzinfo=datetime.timezone(datetime.timedelta(minutes=offset_minutes)))
    assert fakegpt._expiry_time(aware.isoformat(sep=separator)) == pytest.approx(aware.timestamp(), abs=1e-6)
    utc = aware.astimezone(datetime.timezone.utc)
    assert fakegpt._expiry_time(utc.replace(tzinfo=None).isoformat() + "Z") == pytest.approx(aware.timestamp(), abs=1e-6)


def test_a_session_that_ends_within_a_minute_is_not_used_again() -> None:
    # The upstream says when a login's session ends: one that ends within a minute is
    # replaced by a new login before the next call, instead of sending a token the
    # upstream is about to refuse (which costs a refused request, then the login).
    for lifetime, logins in ((30, 3), (3600, 1)):
        with mock_server.serve_in_thread(session_lifetime=lifetime) as server:
            provider = provider_for(server.url)
            for _ in range(3):
                assert "".join(pieces_of(provider)) == FULL_REPLY
            assert server.count("POST", "/auth/login") == logins
            assert server.count("POST", "/api/conversation") == 3  # none refused


def test_the_mock_ends_a_session_when_its_expires_says() -> None:
    lifetime = 0.8

    async def exchange() -> List[Tuple[int, bytes]]:
        async with mock_server.MockServer(mock_server.MockOptions(session_lifetime=lifetime)) as server:
            host, port = server.url.rsplit("/", 1)[1].split(":")

            async def ask(head: str, body: bytes = b"") -> Tuple[int, bytes]:
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(f"{head}\r\nHost: {host}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                answer = await reader.read()
                writer.close()
                return int(answer.split(b" ", 2)[1]), answer

            form = f"token_key={server.token_ids[0]}&session_password=abcd1234".encode()
            login = await ask("POST /auth/login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded", form)
            cookie = re.search(rb"Set-Cookie: (credential=[^;]+)", login[1]).group(1).decode()
            session = await ask(f"GET /api/auth/session HTTP/1.1\r\nCookie: {cookie}")
            token = re.search(rb'"accessToken": "([^"]+)"', session[1]).group(1).decode()
            expires = re.search(rb'"expires": "([^"]+)"', session[1]).group(1).decode()
            ends = calendar.timegm(time.strptime(expires[:19], "%Y-%m-%dT%H:%M:%S"))
            assert expires.endswith("Z") and abs(ends - (time.time() + lifetime)) < 2
            body = json.dumps({"action": "next", "messages": [{"id": "u", "content": {"parts": ["Hi"]}}],
                               "parent_message_id": "p", "model": "m"}).encode()
            converse = f"POST /api/conversation HTTP/1.1\r\nX-Authorization: Bearer {token}\r\nContent-Type: application/json"
            before = await ask(converse, body)
            await asyncio.sleep(lifetime + 0.05)  # the session has ended
            return [login, session, before, await ask(converse, body), await ask(f"GET /api/auth/session HTTP/1.1\r\nCookie: {cookie}")]

    answers = asyncio.run(exchange())
    assert [status for status, _ in answers] == [200, 200, 200, 401, 200]
    assert b"token_expired" in answers[3][1] and answers[4][1].endswith(b"\r\n\r\n{}")
    with pytest.raises(ValueError, match="session_lifetime"):
        mock_server.MockOptions(session_lifetime=-1)


@pytest.mark.parametrize("fault", ["status:401", "status:403", "expired200"])
def test_a_second_token_failure_raises(provider: "type[FakeGpt]", mock: mock_server.MockServer, fault: str) -> None:
    mock.fail_next(fault, times=2)
    error, pieces = failure(provider)
    assert isinstance(error, fakegpt.TokenExpiredError) and pieces == []
    assert mock.count("POST", "/auth/login") == 2 and mock.count("POST", "/api/conversation") == 2


@pytest.mark.parametrize("options, error, message", [
    ({"loads": "empty"}, fakegpt.AuthenticationError, "no shared token"),
    ({"loads": "malformed"}, fakegpt.AuthenticationError, "malformed"),
    ({"login": "refuse"}, fakegpt.AuthenticationError, "refused the login"),
    ({"session": "empty"}, fakegpt.AuthenticationError, "no access token"),
])
def test_login_flow_failures_each_raise_a_clear_error(options: Dict[str, Any], error: type, message: str) -> None:
    with mock_server.serve_in_thread(**options) as server:
        raised, _ = failure(provider_for(server.url))
    assert isinstance(raised, error) and message in str(raised)


FULL_REPLY = mock_server.default_reply("Hello")


@pytest.mark.parametrize("fault, error, message", [
    ("status:429:7", fakegpt.RateLimitError, "HTTP 429: Too many requests in 1 hour. Try again later. (retry after 7 s)"),
    ("cap:7", fakegpt.RateLimitError, "HTTP 429: You've reached the current usage cap for this model. Please try again later. (retry after 7 s)"),
    ("status:500", fakegpt.HTTPStatusError, "HTTP 500: Internal Server Error"),
    ("status:504", fakegpt.HTTPStatusError, "HTTP 504: 504 Gateway Time-out"),
    ("status:409", fakegpt.HTTPStatusError, "Only one message at a time"),
    ("content_type", fakegpt.ProtocolError, "expected an event stream, got text/html"),
    ("empty", fakegpt.NoResponseError, "No valid response"),
])
def test_server_errors_before_text(provider: "type[FakeGpt]", mock: mock_server.MockServer, fault: str, error: type, message: str) -> None:
    mock.fail_next(fault)
    raised, pieces = failure(provider)
    assert type(raised) is error and message in str(raised) and pieces == []
    if isinstance(raised, fakegpt.RateLimitError):
        assert raised.retry_after == 7 and raised.status == 429


@pytest.mark.parametrize("body, retry_after", [
    (b'{"detail": {"message": "capped", "clears_in": 90}}', 90.0),
    (b'{"error": {"message": "capped", "clears_in": 2.5}}', 2.5),
    (b'{"detail": {"message": "capped", "clears_in": 10000000}}', fakegpt._MAX_RETRY_AFTER),
    (b'{"detail": {"message": "capped", "clears_in": -5}}', None),
    (b'{"detail": {"message": "capped", "clears_in": "soon"}}', None),
    (b'{"detail": {"message": "capped", "clears_in": true}}', None),
    (b'{"detail": "clears_in 90"}', None),
    (b"not json", None),
])
def test_a_429_says_when_to_try_again_in_its_detail_when_it_has_no_retry_after(body: bytes, retry_after: Optional[float]) -> None:
    head = Response(429, "Too Many Requests", (("content-type", "application/json"),))
    error = fakegpt._status_error(head, body, what="POST /api/conversation")
    assert isinstance(error, fakegpt.RateLimitError) and error.retry_after == retry_after
    with_header = Response(429, "Too Many Requests", (("retry-after", "3"),))
    assert fakegpt._status_error(with_header, body, what="x").retry_after == 3.0  # type: ignore[attr-defined]


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
@pytest.mark.parametrize("fault, error, message", [
    ("cut:6", fakegpt.TruncatedStreamError, "cut off after"),
    ("reset:6", fakegpt.TruncatedStreamError, "cut off after"),
    ("garbage:6", fakegpt.ProtocolError, ""),
    ("error_event:3", fakegpt.UpstreamError, "Something went wrong"),
    ("rewrite:3", fakegpt.ProtocolError, "rewrote text"),
])
def test_faults_after_text_raise_after_the_text_without_loss_or_duplication(framing: str, fault: str, error: type, message: str) -> None:
    with mock_server.serve_in_thread(framing=framing) as server:
        server.fail_next(fault)
        raised, pieces = failure(provider_for(server.url))
    assert isinstance(raised, error) and message in str(raised)
    delivered = "".join(pieces)
    assert FULL_REPLY.startswith(delivered)
    if isinstance(raised, fakegpt.TruncatedStreamError):
        assert raised.text == delivered and delivered and delivered != FULL_REPLY


@pytest.mark.parametrize("options", [
    {"framing": "length"}, {"framing": "close"}, {"newline": "\r\n"}, {"newline": "\r"},
    {"multiline": True, "data_space": False, "comments": True, "pings": True, "bom": True},
    {"write_size": 1, "newline": "\r\n"}, {"write_size": 7, "framing": "close", "newline": "\r"},
    {"gzip": "always"}, {"gzip": "accept"}, {"ascii_json": True}, {"step": 1}, {"finish": "max_tokens"},
    {"padding": True, "ascii_json": True}, {"padding": True, "multiline": True, "newline": "\r\n"},
    {"padding": True, "profile": "backend-api"},
])
def test_every_framing_of_the_mock_end_to_end(options: Dict[str, Any]) -> None:
    with mock_server.serve_in_thread(**options) as server:
        provider = provider_for(server.url)
        gateway = {"profile": "backend-api", "access_token": server.access_token} if "profile" in options else {}

        async def run() -> fakegpt.ChatStream:
            async with provider.stream("", USER, **gateway) as stream:
                async for _ in stream:
                    pass
            return stream

        stream = asyncio.run(run())
    assert stream.text == FULL_REPLY
    assert stream.finish_reason == options.get("finish", "stop")
    assert stream.conversation_id and stream.message_id


def test_read_timeout_on_a_stalled_server_is_close_to_the_configured_time(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    mock.fail_next("hang_after:5")
    started = time.monotonic()
    raised, pieces = failure(provider, timeout=fakegpt.Timeouts(read=0.5))
    elapsed = time.monotonic() - started
    assert isinstance(raised, fakegpt.RequestTimeout) and raised.phase == "read"
    assert "sent nothing for 0.5 s" in str(raised) and 0.45 < elapsed < 3
    assert FULL_REPLY.startswith("".join(pieces))


@pytest.mark.parametrize("fmt", ["snapshots", "v1"])
@pytest.mark.parametrize("events", [False, True])
def test_a_whole_reply_is_not_held_by_a_server_that_never_ends_the_body(
    fmt: str, events: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that sends the whole reply but neither [DONE] nor the body's end: the
    call ends a short wait after the reply is whole, with all of it, instead of waiting
    out the read or total timeout; the connection is not kept."""
    monkeypatch.setattr(fakegpt, "_AFTER_REPLY_SECONDS", 0.3)
    with mock_server.serve_in_thread(profile="backend-api", stream_format=fmt) as server:
        provider = provider_for(server.url)
        options: Dict[str, Any] = {"profile": "backend-api", "access_token": server.access_token, "timeout": 20}

        async def run() -> Tuple[str, Optional[str], str]:
            prompt = [{"role": "user", "content": "[[fault hang_at_end]] Hello"}]
            if events:
                async with provider.stream("", prompt, **options) as stream:
                    text = "".join([event.delta async for event in stream])
                    assert text == stream.text
                finish = stream.finish_reason
            else:
                text, finish = "".join([p async for p in provider.create_async_generator("", prompt, **options)]), None
            after = await provider.create_async("", USER, **options)  # the next call: a new connection
            return text, finish, after

        started = time.monotonic()
        text, finish, after = asyncio.run(run())
        elapsed = time.monotonic() - started
    assert text == mock_server.default_reply("[[fault hang_at_end]] Hello") and after == FULL_REPLY
    assert finish in (None, "stop")
    assert elapsed < 5, f"the call waited {elapsed:.1f} s after the reply was whole"
    assert server.accepted_connections == 2


def test_pings_after_a_whole_reply_do_not_hold_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that, after the whole reply, sends a ping every 50 ms and never [DONE]:
    the wait after the reply is one span in all, not one per read."""
    monkeypatch.setattr(fakegpt, "_AFTER_REPLY_SECONDS", 0.3)
    event = {"message": {"id": "m1", "author": {"role": "assistant"}, "recipient": "all",
                         "content": {"content_type": "text", "parts": ["Whole."]}, "status": "finished_successfully",
                         "end_turn": True, "metadata": {}}, "conversation_id": "c1", "error": None}

    async def pinging(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *([0-9]+)", head)[1])  # type: ignore[index]
        await reader.readexactly(length)
        data = b"data: " + json.dumps(event).encode() + b"\n\n"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%b\r\n" % (len(data), data))
        try:
            while True:
                writer.write(b"e\r\n: ping - now\n\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass
        finally:
            writer.close()

    with thread_server(pinging) as (host, port):
        started = time.monotonic()
        text = asyncio.run(provider_for(f"http://{host}:{port}").create_async(
            "", USER, profile="backend-api", access_token=SENTINEL, timeout=10))
        elapsed = time.monotonic() - started
    assert text == "Whole."
    assert elapsed < 3, f"the call went on for {elapsed:.1f} s after the reply was whole"


def test_the_wait_after_a_whole_reply_is_short_by_default() -> None:
    """The default: long enough for the notices that follow a reply, short of a hang."""
    assert 0.5 <= fakegpt._AFTER_REPLY_SECONDS <= 5
    assert fakegpt._AFTER_REPLY_SECONDS < fakegpt.Timeouts().read


def test_the_command_line_ends_soon_after_a_whole_reply_from_a_server_that_never_ends_the_body(
    mock: mock_server.MockServer,
) -> None:
    started = time.monotonic()
    result = run_cli("--url", mock.url, "--no-session-cache", "--verbose", "[[fault hang_at_end]] Hi")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert f"the reply is whole; its body did not end within {fakegpt._AFTER_REPLY_SECONDS:g} s of it" in result.stderr
    assert result.stdout.rstrip("\n") == mock_server.default_reply("[[fault hang_at_end]] Hi")
    assert elapsed < fakegpt._AFTER_REPLY_SECONDS + 8


def test_total_timeout_as_gpt4free_plain_seconds(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    mock.fail_next("delay_events:0.2")
    started = time.monotonic()
    raised, _ = failure(provider, timeout=1)
    assert isinstance(raised, fakegpt.RequestTimeout) and raised.phase == "total"
    assert time.monotonic() - started < 3


@contextlib.contextmanager
def thread_server(handler: Any, ssl_context: Optional[ssl.SSLContext] = None) -> Iterator[Tuple[str, int]]:
    """An asyncio server with `handler` on a thread; yields its (host, port)."""
    ready, holder = threading.Event(), {}

    handlers: Set["asyncio.Task[Any]"] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handler(reader, writer)
        finally:  # also when the server stops before the handler ends: its connection closes with it
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()  # (its transport's last callback run while the loop still is)
            handlers.discard(task)

    async def run() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
        holder["address"], holder["loop"], holder["stop"] = server.sockets[0].getsockname()[:2], asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        async with server:
            await holder["stop"].wait()
            for task in list(handlers):  # still waiting on a client that is done: stopped, so their sockets close now
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            close_clients = getattr(server, "close_clients", None)  # 3.13: a connection whose handler never began
            if close_clients is not None:
                close_clients()
            await asyncio.sleep(0)  # the closes they began

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    ready.wait()
    try:
        yield holder["address"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(5)


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # accepts, then says nothing
    writer.close()  # Server.wait_closed() waits for this on CPython 3.12


def test_connect_timeout_covers_a_tls_handshake_that_never_answers() -> None:
    with thread_server(silent) as (host, port):
        started = time.monotonic()
        raised, _ = failure(provider_for(f"https://{host}:{port}"), timeout=fakegpt.Timeouts(connect=0.4))
    assert isinstance(raised, fakegpt.RequestTimeout) and raised.phase == "connect"
    assert time.monotonic() - started < 3


def test_a_refused_connection_is_a_connect_error() -> None:
    with refused_port() as port:
        raised, _ = failure(provider_for(f"http://127.0.0.1:{port}"))
    assert isinstance(raised, fakegpt.ConnectError) and f"127.0.0.1:{port}" in str(raised)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_abandoned_streams_close_their_connections_at_once(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    pieces_of(provider)  # log in first
    before = open_descriptors()

    async def abandon(index: int) -> str:
        generator = provider.create_async_generator("", [{"role": "user", "content": f"[[fault delay_events:0.05]] {index}"}])
        first = await generator.__anext__()
        await generator.aclose()
        return first

    async def cancelled() -> None:
        task = asyncio.ensure_future(gather_pieces(provider, "[[fault hang_after:4]]"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def many() -> List[str]:
        firsts = await asyncio.gather(*(abandon(i) for i in range(1000)))
        await cancelled()
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return firsts

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        firsts = asyncio.run(many())
        gc.collect()
    assert all(firsts)
    assert open_descriptors() <= before + 2
    deadline = time.monotonic() + 5
    while mock.open_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not mock.open_connections  # the server saw every connection close


@pytest.mark.parametrize("leave", ["aclose", "async with", "break"])
def test_leaving_a_reply_early_closes_it_before_control_returns(provider: "type[FakeGpt]", leave: str) -> None:
    pieces_of(provider)  # logged in

    async def main() -> None:
        prompt = [{"role": "user", "content": "[[fault delay_events:0.05]] Hi"}]
        if leave == "aclose":
            pieces = provider.create_async_generator("", prompt)
            await pieces.__anext__()
            await pieces.aclose()
        elif leave == "async with":
            async with provider.stream("", prompt) as reply:
                await reply.__anext__()
        else:
            async with provider.stream("", prompt) as reply:
                async for _ in reply.texts():
                    break
        # Nothing is left to the garbage collector's finalizers, which would schedule the
        # inner generators' closing for a later turn of the loop:
        assert asyncio.all_tasks() == {asyncio.current_task()}
        await asyncio.sleep(0)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        asyncio.run(main())
        gc.collect()


@pytest.mark.parametrize("read_inside", [0, 1, "all"])
def test_a_closed_stream_cannot_be_read_and_starts_no_request(
        provider: "type[FakeGpt]", mock: mock_server.MockServer, read_inside: Union[int, str]) -> None:
    """Reading a stream after its block ended raises: it neither ends as if the reply had
    (nor gives the events one read had buffered, as it did) nor sends the request anew."""
    prompt = [{"role": "user", "content": "Hi"}]  # the mock sends it all in one write: one read

    async def main() -> None:
        async with provider.stream("", prompt) as reply:
            if read_inside == "all":
                assert "".join([event.delta async for event in reply]) == mock_server.default_reply("Hi")
            elif read_inside:
                await reply.__anext__()
        asked = len(mock.requests)
        with pytest.raises(fakegpt.UsageError, match="closed"):
            await reply.__anext__()
        with pytest.raises(fakegpt.UsageError, match="closed"):
            reply.texts()
        with pytest.raises(fakegpt.UsageError, match="closed"):
            async with reply:
                await reply.__anext__()
        assert len(mock.requests) == asked
        async with provider.stream("", prompt) as other:
            pieces = other.texts()
            if read_inside:
                await pieces.__anext__()
        with pytest.raises(fakegpt.UsageError, match="closed"):
            await pieces.__anext__()  # its pieces too: they do not end as if the reply had
        assert other.closed and not provider.stream("", prompt).closed

    asyncio.run(main())


def test_a_stream_in_a_plain_with_says_async_with(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    with pytest.raises(fakegpt.UsageError, match="async with"):
        with provider.stream("", [{"role": "user", "content": "Hi"}]):
            pass  # pragma: no cover
    assert not mock.requests


@pytest.mark.parametrize("way", ["events", "texts", "create_async_generator"])
def test_a_read_cancelled_in_the_middle_leaves_the_reply_saying_it_is_cut(
        provider: "type[FakeGpt]", mock: mock_server.MockServer, way: str) -> None:
    """`asyncio.wait_for` around each read (a stall timeout) cancels the read in flight,
    which ends the reading and closes the connection; reading on must then raise, with
    the text that came, not end as if the reply had (as an async generator would: it
    gave nothing and no error)."""
    pieces_of(provider)  # logged in
    prompt = [{"role": "user", "content": "[[step 3]] [[fault delay_events:0.05]] Hi"}]

    async def main() -> Tuple[List[str], fakegpt.TruncatedStreamError, int]:
        got: List[str] = []
        async with provider.stream("", prompt) as reply:
            if way == "events":
                source: Any = reply
            elif way == "texts":
                source = reply.texts()
            else:
                source = provider.create_async_generator("", prompt)
            first = await source.__anext__()
            got.append(str(getattr(first, "delta", first)))  # (an event, or a piece)
            with pytest.raises(asyncio.TimeoutError):
                while True:
                    item = await asyncio.wait_for(source.__anext__(), 0.01)
                    got.append(str(getattr(item, "delta", item)))
            with pytest.raises(fakegpt.TruncatedStreamError, match="a read of it was cancelled") as caught:
                await source.__anext__()
            # Then the events say it again; the pieces have ended with their error, as an
            # async generator does.
            with pytest.raises(fakegpt.TruncatedStreamError if way == "events" else StopAsyncIteration):
                await source.__anext__()
        await asyncio.sleep(0.1)
        return got, caught.value, mock.open_connections

    got, error, still_open = asyncio.run(main())
    assert error.text == "".join(got) and FULL_REPLY.startswith(error.text)  # what came, and nothing more
    assert error.text != FULL_REPLY
    assert still_open == 0  # the cancelled read's connection was closed


def test_create_async_generator_is_an_async_generator_in_all_but_type(provider: "type[FakeGpt]") -> None:
    async def main() -> None:
        pieces = provider.create_async_generator("", None)  # type: ignore[arg-type]  # nothing happens yet
        assert isinstance(pieces, collections.abc.AsyncGenerator)
        with pytest.raises(fakegpt.UsageError, match="messages"):
            await pieces.__anext__()  # the first read says what is wrong
        with pytest.raises(StopAsyncIteration):
            await pieces.__anext__()  # and then it has ended, as an async generator does
        more = provider.create_async_generator("", USER)
        first = await more.asend(None)
        assert FULL_REPLY.startswith(first)
        with pytest.raises(ValueError, match="thrown in"):
            await more.athrow(ValueError("thrown in"))
        with pytest.raises(StopAsyncIteration):
            await more.__anext__()  # closed by the throw
        for args in [(KeyError,), (KeyError, "k"), (KeyError, KeyError("k"))]:  # the older forms too
            with pytest.raises(KeyError):
                await provider.create_async_generator("", USER).athrow(*args)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


def test_a_reader_that_falls_behind_pauses_the_socket_instead_of_buffering_the_reply() -> None:
    total = 32 * 1024 * 1024
    body = bytes(range(256)) * (total // 256)

    async def run() -> Tuple[int, bytes]:
        async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(flood, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clock = fakegpt._Clock(fakegpt.Timeouts.coerce(5), asyncio.get_running_loop())
        parser = ResponseReader()
        connection = await fakegpt._Connection.open(
            fakegpt._Endpoint("http", "127.0.0.1", port), proxy=None, ssl_context=None, clock=clock,
            parser=parser, limits=Limits(),
        )
        await asyncio.sleep(0.3)  # the server keeps sending; nobody parses
        held = parser.buffered
        received = bytearray()
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                await connection.receive()
            elif isinstance(event, Data):
                received += event.data
            elif isinstance(event, EndOfMessage):
                break
        clock.stop()
        connection.close()
        server.close()
        await server.wait_closed()
        return held, bytes(received)

    held, received = asyncio.run(run())
    assert received == body  # nothing lost or doubled on resuming
    assert held <= fakegpt._PAUSE_READING_AT + fakegpt._READ_BUFFER_MOST


def test_first_piece_arrives_before_the_server_pauses() -> None:
    with mock_server.serve_in_thread() as server:
        server.fail_next("pause_after:1:1.5")
        provider = provider_for(server.url)
        pieces_of(provider, "warm up")  # log in outside the measurement
        server.fail_next("pause_after:1:1.5")

        async def timed() -> Tuple[float, float]:
            started = time.monotonic()
            generator = provider.create_async_generator("", USER)
            await generator.__anext__()
            first = time.monotonic() - started
            async for _ in generator:
                pass
            return first, time.monotonic() - started

        first, total = asyncio.run(timed())
    assert total >= 1.5 and first < 1.0


def test_a_reply_holds_one_read_of_its_body_at_a_time(provider: "type[FakeGpt]", monkeypatch: pytest.MonkeyPatch) -> None:
    # A read is up to a megabyte: holding the last while the next is read doubles what a
    # long reply takes, and made the allocator give pages back and fault them in again.
    next_chunk = fakegpt._HTTPResponse.next_chunk
    last: List[bytes] = []  # the last read given out, and a count of who else holds it
    held: List[int] = []
    reads: List[int] = []

    async def watched(response: Any) -> Optional[bytes]:
        if last:
            held.append(sys.getrefcount(last.pop()) - 1)  # less the argument of this call
        chunk = await next_chunk(response)
        if chunk is None or not response.is_event_stream:  # (the login's answers are read whole)
            return chunk
        chunk = bytes(bytearray(chunk))  # an object of its own (short bytes may be shared)
        last.append(chunk)
        reads.append(len(chunk))
        return chunk

    monkeypatch.setattr(fakegpt._HTTPResponse, "next_chunk", watched)
    prompt = "[[fault delay_events:0.002]] [[chars 300]] [[step 30]]"  # ten events, each read apart
    assert "".join(pieces_of(provider, prompt)) == mock_server.default_reply(prompt)
    assert len(reads) >= 10 and held and not any(held)  # every read let go before the next one


def test_a_thread_reads_into_a_larger_buffer_only_once_a_read_fills_the_first(provider: "type[FakeGpt]") -> None:
    def buffer_after(prompt: str) -> int:  # in a thread of its own: a buffer of its own
        sizes: List[int] = []

        def run() -> None:
            expected = mock_server.default_reply(prompt)
            assert "".join(pieces_of(provider, prompt)) == expected
            sizes.append(len(fakegpt._read_buffers.view))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        assert sizes, "the thread failed"
        return sizes[0]

    assert buffer_after("Hello") <= 256 * 1024  # as before: a pool of threads keeps each as small
    assert buffer_after("[[chars 3000000]] [[step 3000000]]") == 1024 * 1024  # one event of 3 MB


def test_retry_after_as_seconds_or_as_an_http_date() -> None:
    import email.utils

    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert fakegpt._retry_after("7") == 7.0
    assert 55 <= (fakegpt._retry_after(in_a_minute) or 0) <= 60
    assert fakegpt._retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert fakegpt._retry_after("soon") is None and fakegpt._retry_after(None) is None


def test_message_ids_are_random_version_4_uuids() -> None:
    import uuid

    ids = [fakegpt._uuid4() for _ in range(2000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(str(p) == i and p.version == 4 and p.variant == uuid.RFC_4122 for p, i in zip(parsed, ids))
    assert len(set(ids)) == len(ids)
    assert {i[19] for i in ids} == set("89ab") and len({i[9] for i in ids}) == 16  # the variant and random digits


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def json_outcome(decode: Callable[[str], Any], text: str) -> Any:
    try:
        return ("value", decode(text))
    except (ValueError, RecursionError) as exc:
        return ("error", type(exc), str(exc))


@PROPERTY
@given(JSON_VALUES, st.sampled_from(["", " ", "\n", " \t\r\n"]), st.sampled_from(["", " ", "\n", "x", ",", "}", "]"]),
       st.integers(0, 40), st.booleans())
def test_property_the_json_shortcut_decodes_as_json_loads(value: Any, before: str, after: str, cut: int, truncate: bool) -> None:
    text = before + json.dumps(value) + after
    if truncate:
        text = text[:cut]
    assert json_outcome(fakegpt._loads, text) == json_outcome(json.loads, text)


@PROPERTY
@given(st.text(), st.sampled_from(["", "gpt-4o", "text-davinci-002-render-sha", "\x00slot\x00", "m\x00slot\x00", 'q"uote']),
       st.one_of(st.none(), st.text(min_size=1, max_size=12)), st.one_of(st.none(), st.text(min_size=1, max_size=12)),
       st.sampled_from(["shared", "backend-api"]), st.booleans())
def test_property_a_new_turns_body_is_its_dictionary_as_json(
        prompt: str, model: str, conversation_id: Optional[str], parent: Optional[str], profile: str, history: bool) -> None:
    options = fakegpt._options(FakeGpt, model, None, {
        "conversation_id": conversation_id, "parent_message_id": parent, "profile": profile,
        "history_and_training_disabled": history, "access_token": "token"})
    ids = iter(range(10**6))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fakegpt, "_uuid4", lambda: f"id-{next(ids)}")
        sent = json.loads(fakegpt._request_body(prompt, options))
        ids = iter(range(10**6))
        assert sent == fakegpt._conversation_body(prompt, options)
    assert sent["messages"][0]["content"]["parts"] == [prompt] and sent["model"] == options.model


FORK_AFTER_AN_ID = """
import os, fakegpt
fakegpt._uuid4()  # random bytes fetched for the ids to come
read_end, write_end = os.pipe()
child = os.fork()
if child == 0:
    os.write(write_end, fakegpt._uuid4().encode())
    os._exit(0)
os.close(write_end)
os.waitpid(child, 0)
with os.fdopen(read_end, "rb") as pipe:
    print(pipe.read().decode(), fakegpt._uuid4())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX's")
def test_a_forked_process_makes_message_ids_of_its_own() -> None:
    # Forked in a process of its own, which runs no other thread (this one may: a fork
    # then can deadlock the child).
    output = subprocess.run([sys.executable, "-c", FORK_AFTER_AN_ID], capture_output=True, text=True, check=True,
                            cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE)}, timeout=30).stdout
    in_child, in_parent = output.split()
    assert re.fullmatch("[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", in_child)
    assert in_child != in_parent  # not the parent's next one


@pytest.mark.parametrize("name, value", [("X-Authorization", "Bearer a\r\nX-Evil: 1"), ("X-A", "a\nb"), ("X-A", "a\x00"),
                                         ("Bad Name", "v"), ("", "v"), ("X:A", "v")])
def test_request_headers_cannot_be_split_or_misnamed(name: str, value: str) -> None:
    with pytest.raises(fakegpt.UsageError, match="invalid request header"):
        fakegpt._serialize_head("GET", "/", [("Host", "h"), (name, value)])
    assert fakegpt._serialize_head("GET", "/", [("Host", "h"), ("X-A", "b c")]) == b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b c\r\n\r\n"


def test_sessions_are_kept_per_upstream_url() -> None:
    with mock_server.serve_in_thread(seed=1) as one, mock_server.serve_in_thread(seed=2) as two:
        provider = provider_for(one.url)
        pieces_of(provider)
        pieces_of(provider, url=two.url)
        pieces_of(provider)
        one_token = one.requests[3].header("x-authorization")
        for request in two.requests:
            assert request.header("x-authorization") != one_token
            assert one_token and one_token[7:] not in str(request.headers)
        assert (one.count("POST", "/auth/login"), two.count("POST", "/auth/login")) == (1, 1)
        assert len(provider._sessions) == 2


def test_sync_create_completion_with_and_without_a_running_loop(provider: "type[FakeGpt]") -> None:
    assert "".join(provider.create_completion("", USER)) == FULL_REPLY
    assert provider.create_completion("", USER, stream=False) == FULL_REPLY  # a str, as gpt4free's providers give

    async def inside_a_loop() -> None:
        # It would block this loop for the whole reply (and deadlock with an in-process
        # mock): it refuses at once, naming the async API, and starts no thread.
        threads = threading.active_count()
        with pytest.raises(fakegpt.UsageError, match="create_async"):
            provider.create_completion("", USER)
        with pytest.raises(fakegpt.UsageError, match="create_async"):
            provider.create_completion("", USER, stream=False)
        assert threading.active_count() == threads

    asyncio.run(inside_a_loop())
    assert asyncio.run(provider.create_async("", USER)) == FULL_REPLY
    early = provider.create_completion("", USER)
    assert next(early)
    early.close()  # leaves no loop or thread behind
    assert threading.active_count() <= 3


def test_conversation_ids_continue_a_conversation(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    async def two_turns() -> Tuple[fakegpt.ChatStream, fakegpt.ChatStream]:
        async with provider.stream("gpt-4", USER) as first:
            events = [event async for event in first]
        assert events[-1].status == "finished_successfully" and events[-1].text == FULL_REPLY
        async with provider.stream("", USER, conversation_id=first.conversation_id,
                                   parent_message_id=first.message_id, history_and_training_disabled=False) as second:
            async for _ in second:
                pass
        return first, second

    first, second = asyncio.run(two_turns())
    body = json.loads(mock.requests[-1].body)
    assert body["conversation_id"] == first.conversation_id == second.conversation_id
    assert body["parent_message_id"] == first.message_id
    assert body["history_and_training_disabled"] is False
    assert json.loads(mock.requests[-2].body)["model"] == "gpt-4"


@pytest.mark.parametrize("kwargs, message", [
    ({"url": "ftp://example.com"}, "http:// or https://"),
    ({"url": "http://user:pw@127.0.0.1:1"}, "credentials"),
    ({"proxy": "socks5://127.0.0.1:1080"}, "socks5:// proxies are not supported"),
    ({"timeout": -1}, "timeout"),
    ({"ssl": True}, "ssl must be"),
])
def test_bad_arguments_give_usage_errors(kwargs: Dict[str, Any], message: str) -> None:
    raised, _ = failure(FakeGpt, **kwargs)
    assert isinstance(raised, fakegpt.UsageError) and message in str(raised)


@pytest.mark.parametrize("keyword", ["url", "proxy"])
@pytest.mark.parametrize("url", [
    "http://user:hunter\uff0f22@127.0.0.1:8080",  # urlsplit quotes the whole authority
    "http://user:hunter22@127.0.0.1:99999", "http://user:hunter22@[::1:8080",
    "http://user:pw@hunter22@127.0.0.1:99999",  # an @ in the password, not percent-encoded
])
def test_a_url_that_does_not_parse_is_an_error_that_keeps_its_password_secret(keyword: str, url: str) -> None:
    raised, _ = failure(FakeGpt.isolated("http://127.0.0.1:9"), **{keyword: url})
    assert isinstance(raised, fakegpt.UsageError) and "invalid" in str(raised)
    assert "hunter" not in str(raised) and "user:" not in str(raised)


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy")


@pytest.mark.parametrize("variable, value, words", [
    ("HTTPS_PROXY", "socks5://user:hunter22@127.0.0.1:1080", "socks5:// proxies are not supported"),
    ("https_proxy", "http://user:hunter22@127.0.0.1:99999", "invalid proxy URL: Port"),
    ("HTTPS_PROXY", "https://user:hunter22@127.0.0.1:3128", "must be an http://"),
])
def test_a_bad_proxy_from_the_environment_is_named_by_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, words: str,
) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    raised, _ = failure(FakeGpt.isolated("https://127.0.0.1:9"), trust_env=True)
    assert isinstance(raised, fakegpt.UsageError) and str(raised).startswith(f"{variable}: ") and words in str(raised)
    assert "hunter22" not in str(raised)


def test_a_bad_fakegpt_url_is_named_as_the_variable_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKEGPT_URL", "ftp://127.0.0.1:9")
    raised, _ = failure(FakeGpt.isolated())
    assert isinstance(raised, fakegpt.UsageError) and str(raised).startswith("FAKEGPT_URL must start with http://")
    result = run_cli("Hi", env={"FAKEGPT_URL": "http://[::1"})
    assert result.returncode == 2 and result.stderr == "fakegpt: error: invalid FAKEGPT_URL 'http://[::1': Invalid IPv6 URL\n"
    assert run_cli("--url", "ftp://x", "Hi", env={"FAKEGPT_URL": "http://[::1"}).stderr.startswith("fakegpt: error: url must")


@pytest.mark.parametrize("limits", [
    Limits(max_event_size=0), Limits(max_line_size=-5), Limits(max_header_count=True),
    Limits(max_sse_line_size="big"), Limits(max_error_body_size=1.5), Limits(max_connections=0),  # type: ignore[arg-type]
    (1, 2, 3, 4, 5),
])
def test_limits_that_are_not_positive_whole_numbers_are_a_usage_error(mock: mock_server.MockServer, limits: Any) -> None:
    raised, _ = failure(provider_for(mock.url), limits=limits)
    assert isinstance(raised, fakegpt.UsageError) and "imits" in str(raised)
    assert mock.count("GET", "/api/loads") == 0  # before any request
    for reader in (lambda: ResponseReader(limits=limits), lambda: SSEDecoder(limits=limits)):
        with pytest.raises(fakegpt.UsageError):
            reader()


def test_unknown_keywords_are_accepted(provider: "type[FakeGpt]") -> None:
    assert "".join(pieces_of(provider, stream=True, temperature=0.5, web_search=False)) == FULL_REPLY


def test_events_in_the_same_read_as_an_error_event_are_delivered_first() -> None:
    events = [assistant_event("Hel"), assistant_event("Hello"), json.dumps({"error": "model overloaded"}).encode(), b"[DONE]"]
    body = b"".join(b"data: " + e + b"\n\n" for e in events)
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)  # one write: the events and the error arrive in one read
        await writer.drain()
        writer.close()

    with thread_server(serve) as (host, port):
        provider = provider_for(f"http://{host}:{port}")
        raised, pieces = failure(provider, access_token="preset")
    assert isinstance(raised, fakegpt.UpstreamError) and "model overloaded" in str(raised)
    assert "".join(pieces) == "Hello"


def test_a_server_that_never_answers_is_a_read_timeout(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    pieces_of(provider)
    mock.fail_next("hang")
    started = time.monotonic()
    raised, pieces = failure(provider, timeout=fakegpt.Timeouts(read=0.3))
    assert isinstance(raised, fakegpt.RequestTimeout) and raised.phase == "read" and pieces == []
    assert time.monotonic() - started < 3


def test_delay_before_the_headers_within_and_beyond_the_read_timeout(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    mock.fail_next("delay_headers:0.3")
    assert "".join(pieces_of(provider, timeout=fakegpt.Timeouts(read=2))) == FULL_REPLY
    mock.fail_next("delay_headers:1")
    raised, _ = failure(provider, timeout=fakegpt.Timeouts(read=0.3))
    assert isinstance(raised, fakegpt.RequestTimeout) and raised.phase == "read"


def test_the_class_works_where_gpt4free_expects_a_provider(provider: "type[FakeGpt]") -> None:
    def chat_completion_create(model: str, messages: fakegpt.Messages, provider: Any, stream: bool = False, **kwargs: Any) -> Any:
        # gpt4free's ChatCompletion.create, reduced to what it asks of a provider.
        if stream and not provider.supports_stream:
            raise ValueError(f"{provider.__name__} does not support stream")
        result = provider.create_completion(model, messages, stream=stream, **kwargs)
        return result if stream else "".join(result)

    assert chat_completion_create("gpt-3.5-turbo", USER, provider) == FULL_REPLY
    assert "".join(chat_completion_create("", USER, provider, stream=True, timeout=30)) == FULL_REPLY
    assert provider.params.startswith("fakegpt.Provider supports: (")


def test_the_class_works_where_todays_gpt4free_client_expects_a_provider(provider: "type[FakeGpt]") -> None:
    # g4f's client (8.8.6: iter_run_tools and async_iter_run_tools), reduced to what it
    # asks of a provider: every argument by keyword, the provider itself among them, and
    # class attributes it reads and counts with.
    def iter_run_tools(provider: Any, model: str, messages: fakegpt.Messages, **kwargs: Any) -> Iterator[Any]:
        name, parent = provider.__name__, provider.get_parent()
        try:
            yield from provider.create_completion(model=model, messages=messages, provider=provider, **kwargs)
            provider.live += 1
        except Exception:
            provider.live -= 1
            raise
        assert name == parent == "Provider" and provider.get_dict()["url"] == provider.url

    async def async_iter_run_tools(provider: Any, model: str, messages: fakegpt.Messages, **kwargs: Any) -> List[Any]:
        assert provider.supports_stream
        response = provider.create_async_generator(model=model, messages=messages, provider=provider, **kwargs)
        timeout = kwargs.get("stream_timeout") if provider.use_stream_timeout else kwargs.get("timeout")
        assert timeout == 30
        pieces = [piece async for piece in response]
        provider.live += 1
        return pieces

    assert "".join(iter_run_tools(provider, model="", messages=USER, stream=True, proxy=None, api_key=None)) == FULL_REPLY
    assert "".join(asyncio.run(async_iter_run_tools(provider, "", USER, stream=True, stream_timeout=30))) == FULL_REPLY
    assert provider.live == 2 and FakeGpt.live == 0  # (an attribute of the subclass, once set there)


def test_isolated_takes_the_class_attributes_and_names_what_it_does_not_take() -> None:
    provider = FakeGpt.isolated("http://127.0.0.1:9", working=True, label="Mine")
    assert provider.working and provider.label == "Mine" and not FakeGpt.working
    for name in ("ssl_context", "timeout", "_access_token"):  # a call's option, or private state
        with pytest.raises(fakegpt.UsageError, match=f"no class attribute '{name}' \\(there are url, label, working"):
            FakeGpt.isolated("http://127.0.0.1:9", **{name: None})


def test_the_library_reads_fakegpt_url_and_a_call_or_a_subclass_url_wins(mock: mock_server.MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKEGPT_URL", mock.url)
    assert "".join(pieces_of(FakeGpt.isolated())) == FULL_REPLY  # FakeGpt's own url: the variable
    monkeypatch.setenv("FAKEGPT_URL", "http://127.0.0.1:9")
    assert "".join(pieces_of(provider_for(mock.url))) == FULL_REPLY  # a subclass's url wins
    assert "".join(pieces_of(FakeGpt.isolated(), url=mock.url)) == FULL_REPLY  # and so does url=
    with pytest.raises(fakegpt.UsageError, match="non-empty"):
        FakeGpt.stream("", USER, url="")


@pytest.mark.parametrize("name, default", [
    ("session_cache", False), ("auto_continue", False), ("trust_env", False), ("history_and_training_disabled", True),
    ("return_conversation", None),
])
def test_a_yes_or_no_keyword_takes_true_or_false_and_nothing_else(name: str, default: Optional[bool]) -> None:
    url = "http://127.0.0.1:9"
    for value in ("false", "no", 1, 0, "", []):  # true or false to bool(), but not a yes or no
        with pytest.raises(fakegpt.UsageError, match=f"{name} must be True or False"):
            FakeGpt.stream("", USER, url=url, **{name: value})
    for value, meant in ((True, True), (False, False), (None, default)):
        options = FakeGpt.stream("", USER, url=url, **{name: value})._options
        if default is not None:
            assert getattr(options, name) is meant


@pytest.mark.parametrize("value", [0, "", [], {}, False])
def test_limits_that_are_not_limits_are_an_error_even_when_false(value: Any) -> None:
    with pytest.raises(fakegpt.UsageError, match="limits must be a fakegpt.Limits"):
        FakeGpt.stream("", USER, url="http://127.0.0.1:9", limits=value)
    assert FakeGpt.stream("", USER, url="http://127.0.0.1:9", limits=None)._options.limits == Limits()


def test_a_calls_options_are_those_its_own_arguments_and_environment_give(monkeypatch: pytest.MonkeyPatch) -> None:
    # Checked options are kept for calls with the same arguments; what differs must not get them.
    url = "http://127.0.0.1:9"
    assert FakeGpt.stream("", USER, url=url, retries=1)._options.retries == 1
    with pytest.raises(fakegpt.UsageError, match="retries"):
        FakeGpt.stream("", USER, url=url, retries=True)  # equal to 1 as a key, not as a value
    assert FakeGpt.stream("", USER, url=url, timeout=5)._options.timeouts.total == 5
    assert FakeGpt.stream("", USER, url=url, timeout=5.5)._options.timeouts.total == 5.5
    monkeypatch.setenv("FAKEGPT_ACCESS_TOKEN", "token-1")
    assert FakeGpt.stream("", USER, url=url)._options.access_token == "token-1"
    monkeypatch.setenv("FAKEGPT_ACCESS_TOKEN", "token-2")
    assert FakeGpt.stream("", USER, url=url)._options.access_token == "token-2"
    monkeypatch.setenv("FAKEGPT_ACCESS_TOKEN", "two words")
    with pytest.raises(fakegpt.UsageError, match="FAKEGPT_ACCESS_TOKEN"):
        FakeGpt.stream("", USER, url=url)
    monkeypatch.delenv("FAKEGPT_ACCESS_TOKEN")
    monkeypatch.setenv("FAKEGPT_URL", "http://127.0.0.1:8")
    assert FakeGpt.stream("", USER)._options.endpoint.port == 8
    monkeypatch.setenv("FAKEGPT_URL", "http://127.0.0.1:7")
    assert FakeGpt.stream("", USER)._options.endpoint.port == 7

    class Conversation:  # as gpt4free's JsonConversation: the caller may change it between calls
        def __init__(self) -> None:
            self.conversation_id, self.message_id = "c-1", "m-1"

    conversation = Conversation()
    assert FakeGpt.stream("", USER, url=url, conversation=conversation)._options.parent_message_id == "m-1"
    conversation.message_id = "m-2"
    assert FakeGpt.stream("", USER, url=url, conversation=conversation)._options.parent_message_id == "m-2"
    # A keyword the options ignore is kept by its name only: any value, never held on to.
    for tools in ([{"name": "search"}], ({"name": "search"},)):
        assert FakeGpt.stream("", USER, url=url, tools=tools, stop=None)._options.retries == 0
    assert "tools" in {part for key in fakegpt._known_options for part in key}
    assert not [part for key in fakegpt._known_options for part in key if isinstance(part, tuple) and part[0] == "tools"]
    with pytest.raises(fakegpt.UsageError, match="did you mean 'timeout'"):
        FakeGpt.stream("", USER, url=url, tools=tools, timout=5)


@pytest.mark.parametrize("keyword, suggestion", [("timout", "timeout"), ("conversation_ID", "conversation_id"),
                                                 ("acess_token", "access_token"), ("Profile", "profile"), ("retrys", "retries")])
def test_a_keyword_close_to_a_known_one_is_a_usage_error(keyword: str, suggestion: str) -> None:
    with pytest.raises(fakegpt.UsageError, match=f"unknown keyword '{keyword}': did you mean '{suggestion}'"):
        FakeGpt.stream("", USER, url="http://127.0.0.1:9", **{keyword: 1})


def test_gpt4free_keywords_and_unrelated_ones_are_still_accepted(provider: "type[FakeGpt]") -> None:
    gpt4free = {"stream": True, "proxy": None, "timeout": 30, "web_search": False, "stream_timeout": 5, "media": None,
                "api_key": None, "max_tokens": 100, "temperature": 0.5, "tools": None, "conversation_style": "balanced",
                "frobnicate": 1}
    assert "".join(pieces_of(provider, **gpt4free)) == FULL_REPLY


def test_create_completion_without_stream_returns_the_whole_reply_as_a_string(provider: "type[FakeGpt]") -> None:
    assert provider.create_completion("", USER, stream=False) == FULL_REPLY
    assert "".join(provider.create_completion("", USER)) == FULL_REPLY


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fakegpt, "_RETRY_BASE", 0.01)


@pytest.mark.parametrize("fault", ["status:500", "status:503", "status:429", "status:429:0", "reset:0", "cut:0"])
def test_retries_try_again_after_a_transient_failure_before_text(provider: "type[FakeGpt]", mock: mock_server.MockServer,
                                                                 fault: str, quick_retries: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fakegpt")
    mock.fail_next(fault, times=2)
    assert "".join(pieces_of(provider, retries=2)) == FULL_REPLY
    assert mock.count("POST", "/api/conversation") == 3
    assert [r.levelname for r in caplog.records if "trying again" in r.getMessage()] == ["INFO", "INFO"]
    mock.fail_next(fault, times=2)
    raised, _ = failure(provider, retries=1)
    assert mock.count("POST", "/api/conversation") == 5  # two more, then the error


def test_each_retry_may_log_in_again_once(provider: "type[FakeGpt]", mock: mock_server.MockServer,
                                          quick_retries: None) -> None:
    pieces_of(provider)  # logged in
    before = mock.count("POST", "/api/conversation")
    # A 503, then a refused token (one more login, the same try), then a 503 and a
    # refused token again (the next try's own login), then the reply.
    for fault in ("status:503", "status:401", "status:503", "status:401"):
        mock.fail_next(fault)
    assert "".join(pieces_of(provider, retries=2)) == FULL_REPLY
    assert mock.count("POST", "/api/conversation") - before == 5
    assert mock.count("POST", "/auth/login") == 3
    # Two refusals in one try are the answer, whatever the retries left.
    for fault in ("status:401", "status:401"):
        mock.fail_next(fault)
    raised, pieces = failure(provider, retries=3)
    assert isinstance(raised, fakegpt.TokenExpiredError) and pieces == []
    assert mock.count("POST", "/auth/login") == 4


@pytest.mark.parametrize("fault", ["cut:5", "reset:5", "error_event:3", "status:400", "status:401", "challenge"])
def test_retries_never_repeat_text_or_a_request_that_cannot_succeed(provider: "type[FakeGpt]", mock: mock_server.MockServer,
                                                                    fault: str, quick_retries: None) -> None:
    pieces_of(provider)  # logged in
    before = mock.count("POST", "/api/conversation")
    mock.fail_next(fault, times=5)
    raised, pieces = failure(provider, retries=3)
    expected = 2 if fault == "status:401" else 1  # a refused token logs in again once, as ever
    assert mock.count("POST", "/api/conversation") - before == expected
    assert FULL_REPLY.startswith("".join(pieces))


def test_a_retry_after_is_honoured_and_one_beyond_the_cap_gives_up_at_once(
        provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    error = fakegpt.RateLimitError("x", retry_after=7200.0, status=429)
    assert fakegpt._retry_delay(error, 0) is None  # not 30 s, to be refused again
    assert fakegpt._retry_delay(fakegpt.RateLimitError("x", retry_after=2.0, status=429), 5) == 2.0
    assert fakegpt._retry_delay(fakegpt.RateLimitError("x", retry_after=fakegpt._RETRY_CAP, status=429), 0) == fakegpt._RETRY_CAP
    pieces_of(provider)  # logged in
    mock.fail_next("status:429:3600")
    started = time.monotonic()
    raised, _ = failure(provider, retries=2)
    assert isinstance(raised, fakegpt.RateLimitError) and raised.retry_after == 3600
    assert time.monotonic() - started < 5 and mock.count("POST", "/api/conversation") == 2  # asked once
    delays = [fakegpt._retry_delay(fakegpt.HTTPStatusError("x", status=502), attempt) or 0 for attempt in range(8)]
    backoffs = [min(fakegpt._RETRY_BASE * 2 ** a, fakegpt._RETRY_CAP) for a in range(8)]
    assert all(b / 2 <= d <= b for b, d in zip(backoffs, delays)) and backoffs[-1] == fakegpt._RETRY_CAP
    assert fakegpt._retry_delay(fakegpt.TLSError("x"), 0) is None
    with pytest.raises(fakegpt.UsageError, match="retries"):
        FakeGpt.stream("", USER, url="http://127.0.0.1:9", retries=-1)


@PROPERTY
@given(st.one_of(st.text(max_size=80), st.text(alphabet="0123456789٠١٢٣²³", min_size=1, max_size=500),
                 st.just("9" * 400), st.just("Fri, 31 Dec 9999 23:59:59 GMT"), st.just("Thu, 01 Jan 1970 00:00:00 GMT")))
def test_property_any_retry_after_is_none_or_bounded_seconds(value: str) -> None:
    seconds = fakegpt._retry_after(value)
    assert seconds is None or 0 <= seconds <= fakegpt._MAX_RETRY_AFTER


def test_retry_after_counts_only_ascii_digits() -> None:
    assert fakegpt._retry_after("٣") is None and fakegpt._retry_after("²") is None
    assert fakegpt._retry_after("9" * 400) == fakegpt._MAX_RETRY_AFTER and fakegpt._retry_after("30") == 30.0


def deep_json(depth: int) -> bytes:
    return b'{"detail": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("where", ["error body", "account list", "login answer"])
def test_json_nested_beyond_the_parser_is_a_fakegpt_error(where: str) -> None:
    body = deep_json(100000)
    status = b"500 Internal Server Error" if where == "error body" else b"200 OK"
    response = b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body)
    limits = Limits(max_error_body_size=len(body) + 1)
    with thread_server(answering(response)) as (host, port):
        provider = provider_for(f"http://{host}:{port}")
        raised, _ = failure(provider, limits=limits, **({"access_token": "t"} if where == "error body" else {}))
    assert isinstance(raised, fakegpt.FakeGptError) and not isinstance(raised.__cause__, RecursionError)


def test_an_error_page_of_many_unclosed_titles_is_read_in_linear_time() -> None:
    page = "<html>" + "<title>" * 100_000  # 700 KB; a backtracking regular expression takes minutes
    started = time.monotonic()
    assert fakegpt._html_title(page) is None
    assert fakegpt._html_title("<html><head><titlex><title lang=en>Gateway Time-out</TITLE>") == "Gateway Time-out"
    assert time.monotonic() - started < 5


async def read_request_path(reader: asyncio.StreamReader) -> bytes:
    """Read one request (head and body); its path, without the query."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"Content-Length: (\d+)", head)
    await reader.readexactly(int(length.group(1)) if length else 0)
    return head.split(b" ")[1].split(b"?")[0]


async def write_json(writer: asyncio.StreamWriter, body: bytes, extra_headers: bytes = b"") -> None:
    """Answer 200 with a JSON body, then close."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra_headers +
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body))
    await writer.drain()
    writer.close()


def test_a_token_the_client_cannot_send_is_a_login_failure_and_is_not_kept() -> None:
    logins = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = await read_request_path(reader)
        logins.append(path)
        answers = {b"/api/loads": b'{"loads": [{"token_id": "a", "count": 0}]}', b"/auth/login": b'{"code": 0}',
                   b"/api/auth/session": json.dumps({"accessToken": "tökén ✓"}).encode()}
        body = answers.get(path, b"{}")
        cookie = b"Set-Cookie: credential=c1; Path=/\r\n" if path == b"/auth/login" else b""
        await write_json(writer, body, cookie)

    with thread_server(upstream) as (host, port):
        provider = provider_for(f"http://{host}:{port}")
        for _ in range(2):
            raised, _ = failure(provider)
            assert isinstance(raised, fakegpt.AuthenticationError) and "cannot be sent" in str(raised)
    assert logins.count(b"/api/loads") == 2 and b"/api/conversation" not in logins  # a new login each time


@pytest.mark.parametrize("kwargs, words", [
    ({"proxy": 123}, "proxy must be an http:// URL string"),
    ({"model": ["gpt-4"]}, "model must be a string"),
    ({"timeout": fakegpt.Timeouts(connect="1")}, "Timeouts.connect must be None or a positive number"),  # type: ignore[arg-type]
    ({"timeout": fakegpt.Timeouts(read=float("nan"))}, "Timeouts.read"),
    ({"timeout": fakegpt.Timeouts(total=-1)}, "Timeouts.total"),
    ({"timeout": float("nan")}, "timeout must be a positive number"),
    ({"timeout": float("inf")}, "timeout must be a positive number"),
])
def test_bad_arguments_of_any_type_are_usage_errors(kwargs: Dict[str, Any], words: str) -> None:
    with pytest.raises(fakegpt.UsageError, match=re.escape(words)):
        FakeGpt.stream("" if "model" not in kwargs else kwargs.pop("model"), USER, url="http://127.0.0.1:9", **kwargs)


@pytest.mark.parametrize("call, words", [
    (lambda: fakegpt.ResponseReader().feed("HTTP/1.1 200 OK\r\n"), "ResponseReader.feed takes bytes, not str"),
    (lambda: fakegpt.ResponseReader(method=None), "method must be a string, not NoneType"),
    (lambda: fakegpt.SSEDecoder().feed("data: x\n\n"), "SSEDecoder.feed takes bytes, not str"),
    (lambda: fakegpt.SSEDecoder().feed_into(None, []), "SSEDecoder.feed takes bytes, not NoneType"),
    (lambda: fakegpt.ConversationDecoder().feed(b"data: {}"), "ConversationDecoder.feed takes a ServerSentEvent, not bytes"),
    (lambda: fakegpt.ConversationDecoder().feed_data("{}"), "ConversationDecoder.feed_data takes bytes, not str"),
], ids=["reader str", "reader method", "sse str", "sse None", "conversation bytes", "conversation str"])
def test_the_protocol_layers_readers_say_what_they_take(call: Callable[[], Any], words: str) -> None:
    with pytest.raises(fakegpt.UsageError, match=re.escape(words)):
        call()


def test_gzip_replies_of_several_members_or_on_a_kept_open_connection_arrive_whole() -> None:
    reply = "Hello, мир! " * 30
    events = b"".join(b"data: " + assistant_event(reply[:i]) + b"\n\n" for i in range(0, len(reply) + 1, 40))
    events += b"data: " + assistant_event(reply, status="finished_successfully").replace(b'"end_turn": null', b'"end_turn": true') + b"\n\ndata: [DONE]\n\n"
    half = len(events) // 2
    body = gzip_bytes(events[:half]) + gzip_bytes(events[half:])
    with thread_server(answering(http_response(body, "chunked"))) as (host, port):
        assert "".join(pieces_of(provider_for(f"http://{host}:{port}"), access_token="t")) == reply

    error = gzip_bytes(json.dumps({"detail": "Something broke."}).encode())

    async def keeps_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(http_response(error, "length", status=b"500 Internal Server Error", content_type=b"application/json"))
        await writer.drain()
        await reader.read()  # the connection stays open until the client closes it
        writer.close()

    with thread_server(keeps_open) as (host, port):
        started = time.monotonic()
        raised, _ = failure(provider_for(f"http://{host}:{port}"), access_token="token-1", timeout=fakegpt.Timeouts(read=5))
    assert isinstance(raised, fakegpt.HTTPStatusError) and "Something broke." in str(raised)
    assert time.monotonic() - started < 3


def test_a_shared_login_respects_each_callers_own_timeout() -> None:
    sessions = []

    async def slow_session_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = await read_request_path(reader)
        cookie = b""
        if path == b"/api/loads":
            body = b'{"loads": [{"token_id": "a", "count": 0}]}'
        elif path == b"/auth/login":
            body, cookie = b'{"code": 0}', b"Set-Cookie: credential=c1; Path=/\r\n"
        elif path == b"/api/auth/session":
            sessions.append(time.monotonic())
            await asyncio.sleep(1.0)  # a slow login
            body = b'{"accessToken": "token-1"}'
        else:
            writer.write(event_stream(assistant_event("Hi"), b"[DONE]"))
            await writer.drain()
            writer.close()
            return
        await write_json(writer, body, cookie)

    with thread_server(slow_session_upstream) as (host, port):
        provider = provider_for(f"http://{host}:{port}")

        async def call(total: Optional[float], delay: float) -> Tuple[str, float]:
            await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                text = "".join([p async for p in provider.create_async_generator("", USER, timeout=fakegpt.Timeouts(total=total))])
            except fakegpt.RequestTimeout as exc:
                text = f"timeout:{exc.phase}"
            return text, time.monotonic() - started

        async def together() -> List[Tuple[str, float]]:
            return await asyncio.gather(call(0.4, 0), call(None, 0.1), call(0.3, 0.2))

        first, patient, short = asyncio.run(together())
    assert first[0] == "timeout:total" and first[1] < 0.9  # the caller that began the login, by its clock
    assert patient[0] == "Hi"  # not failed by the first caller's timeout
    assert short[0] == "timeout:total" and short[1] < 0.8  # joined the login, left on its own clock
    assert len(sessions) == 1  # one login, shared


def test_a_call_that_joins_a_login_is_not_failed_by_the_timeouts_of_the_call_that_began_it(
    mock: mock_server.MockServer,
) -> None:
    # The login runs by the connect and read timeouts of the call that began it (capped by
    # that call's total, when it gave a plain number): a call that joined it got that
    # call's RequestTimeout ("the upstream sent nothing for 0.02 s"), though its own
    # timeouts were far from over. It logs in again by its own.
    provider = provider_for(mock.url)

    async def main() -> List[Any]:
        hasty = gather_pieces(provider, "hasty", timeout=fakegpt.Timeouts(read=1e-6))  # begins the login
        patient = gather_pieces(provider, "patient")  # joins it
        return await asyncio.gather(hasty, patient, return_exceptions=True)

    hasty, patient = asyncio.run(main())
    assert isinstance(hasty, fakegpt.RequestTimeout) and hasty.phase == "read"
    assert not isinstance(patient, BaseException), patient
    assert "".join(patient) == mock_server.default_reply("patient")
    assert mock.count("POST", "/auth/login") == 1  # the patient's own (the hasty login ran out at its first read)

    async def alike() -> List[Any]:  # no longer than the login's: the login's error is the joiner's too
        hasty = fakegpt.Timeouts(read=1e-6)
        return await asyncio.gather(gather_pieces(other, "one", timeout=hasty), gather_pieces(other, "two", timeout=hasty),
                                    return_exceptions=True)

    other = provider_for(mock.url)
    one, two = asyncio.run(alike())
    assert one is two and isinstance(one, fakegpt.RequestTimeout)  # the one login's error, not a second login's


def test_a_connection_closed_before_any_response_is_a_transport_error() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    with thread_server(hang_up) as (host, port):
        raised, _ = failure(provider_for(f"http://{host}:{port}"), access_token="t")
    assert isinstance(raised, fakegpt.TransportError) and "before a response arrived" in str(raised)


def test_connect_to_an_ipv6_upstream_names_it_in_brackets() -> None:
    seen: List[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    with thread_server(proxy) as (host, port):
        raised, _ = failure(provider_for("https://[::1]:8443"), proxy=f"http://{host}:{port}", access_token="t")
    assert isinstance(raised, fakegpt.ConnectError)
    assert seen[0].startswith(b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n")


def answering(response: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A handler that reads one request and writes `response`, then closes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()
    return handle


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("location, shown", [
    (f"https://user:{SENTINEL}@example.com/new/path?token={SENTINEL}#{SENTINEL}", "https://example.com/new/path"),
    (f"/elsewhere/api/conversation?key={SENTINEL}", "/elsewhere/api/conversation"),
])
@pytest.mark.parametrize("token", [None, "t"])  # the login's first request, or the conversation
def test_a_redirect_is_an_http_error_that_says_where_it_points_without_its_secrets(
        status: int, location: str, shown: str, token: Optional[str]) -> None:
    redirect = (f"HTTP/1.1 {status} Moved\r\nLocation: {location}\r\nContent-Type: text/html\r\n"
                f"Content-Length: 0\r\nConnection: close\r\n\r\n").encode()
    with thread_server(answering(redirect)) as (host, port):
        raised, pieces = failure(provider_for(f"http://{host}:{port}"), access_token=token, retries=0)
    assert isinstance(raised, fakegpt.HTTPStatusError) and raised.status == status and not pieces
    assert f"HTTP {status}: the upstream redirects to {shown} (redirects are not followed)" in str(raised)
    assert SENTINEL not in str(raised) and "user" not in str(raised)


@pytest.mark.parametrize("location", [None, "", "  ", "http://[x/y", f"?token={SENTINEL}"])
def test_a_redirect_that_names_nowhere_useful_is_a_plain_http_error(location: Optional[str]) -> None:
    headers = () if location is None else (("location", location),)
    error = fakegpt._status_error(Response(302, "Found", headers), b"", what="GET /x")
    assert type(error) is fakegpt.HTTPStatusError and str(error) == "GET /x: HTTP 302"


@pytest.mark.parametrize("answer, error, words", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", fakegpt.ProtocolError, "malformed status line 'SSH-2.0-OpenSSH_9.2'"),
    (b"\x00\x00\x12\x04\x00\x00", fakegpt.TransportError, "connection closed in the middle of the status line"),
])
@pytest.mark.parametrize("token, request_line", [(None, "GET /api/loads"), ("t", "POST /api/conversation")])
def test_an_answer_that_is_not_http_names_the_request_it_answered(
        answer: bytes, error: type, words: str, token: Optional[str], request_line: str) -> None:
    with thread_server(answering(answer)) as (host, port):
        raised, _ = failure(provider_for(f"http://{host}:{port}"), access_token=token, retries=0)
    assert isinstance(raised, error) and str(raised) == f"{request_line}: {words}"  # (the login's query left out)


def event_stream(*datas: bytes) -> bytes:
    body = b"".join(b"data: " + d + b"\n\n" for d in datas)
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body


@pytest.mark.parametrize("fmt", ["v1", "snapshots"])
def test_backend_api_profile_posts_with_a_bearer_token_and_reads_either_format(fmt: str) -> None:
    with mock_server.serve_in_thread(profile="backend-api", stream_format=fmt) as server:
        provider = provider_for(server.url)

        async def run() -> fakegpt.ChatStream:
            async with provider.stream("", USER, profile="backend-api", access_token=server.access_token,
                                       chatgpt_account_id="acct-7") as reply:
                async for _ in reply:
                    pass
            return reply

        reply = asyncio.run(run())
        request = server.requests[-1]
    assert reply.text == FULL_REPLY and reply.finish_reason == "stop" and reply.title == "Hello"
    assert reply.model == fakegpt.DEFAULT_MODEL and reply.conversation_id and reply.message_id
    assert (reply.reasoning != "") is (fmt == "v1")  # the mock's v1 streams carry reasoning
    assert request.path == "/backend-api/conversation" and len(server.requests) == 1  # no login
    assert request.header("authorization") == f"Bearer {server.access_token}"
    assert request.header("x-authorization") is None and request.header("chatgpt-account-id") == "acct-7"
    assert request.json()["supported_encodings"] == ["v1"]


def test_a_shared_site_with_a_token_skips_the_login_and_the_token_may_come_from_the_environment(
        mock: mock_server.MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = provider_for(mock.url)
    assert "".join(pieces_of(provider, access_token=mock.access_token)) == FULL_REPLY
    monkeypatch.setenv("FAKEGPT_ACCESS_TOKEN", mock.access_token)
    assert "".join(pieces_of(provider)) == FULL_REPLY
    assert [r.path for r in mock.requests] == ["/api/conversation"] * 2
    assert mock.requests[-1].header("x-authorization") == f"Bearer {mock.access_token}"
    assert provider._access_token is None  # a given token is the caller's, not the class's


def test_backend_api_without_a_token_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAKEGPT_ACCESS_TOKEN", raising=False)
    with pytest.raises(fakegpt.UsageError, match="access_token=.*FAKEGPT_ACCESS_TOKEN.*--access-token-file"):
        FakeGpt.stream("", USER, profile="backend-api", url="http://127.0.0.1:9")
    for bad in ({"profile": "aurora"}, {"access_token": "two words"}, {"chatgpt_account_id": 7}):
        with pytest.raises(fakegpt.UsageError):
            FakeGpt.stream("", USER, url="http://127.0.0.1:9", **bad)


def test_a_refused_given_token_raises_without_a_login(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fakegpt")
    with mock_server.serve_in_thread(profile="backend-api", access_token=SENTINEL) as server:
        server.expire_tokens()
        raised, _ = failure(provider_for(server.url), profile="backend-api", access_token=SENTINEL)
        paths = [r.path for r in server.requests]
    assert isinstance(raised, fakegpt.TokenExpiredError) and paths == ["/backend-api/conversation"]
    stream = FakeGpt.stream("", USER, url="http://127.0.0.1:9", profile="backend-api", access_token=SENTINEL)
    shown = [str(raised), repr(raised), caplog.text, repr(vars(stream)), repr(stream._options)]
    assert not any(SENTINEL in text for text in shown)


@pytest.mark.parametrize("final, complete", [
    (assistant_event("Hi there", status="finished_successfully", finish="stop").replace(b'"end_turn": null', b'"end_turn": true'), True),
    (assistant_event("Hi there", status="finished_successfully", finish="stop"), False),  # no end_turn
    (assistant_event("Hi there"), False),
])
def test_a_stream_without_done_is_whole_only_if_the_visible_message_finished_its_turn(final: bytes, complete: bool) -> None:
    with thread_server(answering(event_stream(assistant_event("Hi"), final))) as (host, port):
        provider = provider_for(f"http://{host}:{port}")
        if complete:
            assert "".join(pieces_of(provider, access_token="t")) == "Hi there"
        else:
            raised, pieces = failure(provider, access_token="t")
            assert isinstance(raised, fakegpt.TruncatedStreamError) and "".join(pieces) == "Hi there"


@pytest.mark.parametrize("content_type", ["text/plain;charset=UTF-8", "", "application/octet-stream", "application/json"])
@pytest.mark.parametrize("options", [{}, {"write_size": 1, "framing": "length"}, {"bom": True, "framing": "close"},
                                     {"stream_format": "v1", "comments": True}])
def test_an_event_stream_that_a_proxy_labels_otherwise_is_read_as_one(content_type: str, options: Dict[str, Any]) -> None:
    # A worker that builds a new response says text/plain; some proxies drop the type.
    with mock_server.serve_in_thread(stream_content_type=content_type, **options) as server:
        assert "".join(pieces_of(provider_for(server.url))) == FULL_REPLY
        assert server.requests[-1].path == "/api/conversation"


@pytest.mark.parametrize("content_type, body, error, words", [
    ("text/plain", b"hello, not a stream", fakegpt.ProtocolError, "expected an event stream, got text/plain: 'hello, not a stream'"),
    ("text/plain", b"", fakegpt.ProtocolError, "expected an event stream, got text/plain: ''"),
    ("text/plain", b"data", fakegpt.ProtocolError, "expected an event stream, got text/plain: 'data'"),
    ("", b"<html><title>Oops</title></html>", fakegpt.ProtocolError, "expected an event stream, got no Content-Type"),
    ("application/json", b'{"detail": {"message": "busy"}}', fakegpt.UpstreamError, "busy"),
    ("text/plain", b'{"detail": "rate limited."}', fakegpt.UpstreamError, "rate limited."),
])
def test_a_success_that_is_no_event_stream_is_still_an_error(content_type: str, body: bytes, error: type, words: str) -> None:
    typed = b"Content-Type: " + content_type.encode() + b"\r\n" if content_type else b""
    response = b"HTTP/1.1 200 OK\r\n" + typed + b"Content-Length: %d\r\n\r\n" % len(body) + body
    with thread_server(answering(response)) as (host, port):
        raised, pieces = failure(provider_for(f"http://{host}:{port}"), access_token="t", retries=0)
    assert isinstance(raised, error) and words in str(raised) and pieces == []


def cut_off(body: bytes, how: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A handler that sends the event stream `body` and ends the connection before the
    body's end: mid-chunk (`chunked`), short of its Content-Length (`length`), or with a
    reset after the last event (`reset`)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        if how == "length":
            writer.write(head + b"Content-Length: %d\r\n\r\n" % (len(body) + 64) + body)
        else:
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (len(body), body))
        await writer.drain()
        if how == "reset":
            await asyncio.sleep(0.1)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
    return handle


@pytest.mark.parametrize("how", ["chunked", "length", "reset"])
@pytest.mark.parametrize("whole", [True, False])
def test_a_body_cut_off_after_the_reply_was_whole_leaves_the_reply(how: str, whole: bool) -> None:
    # The visible message finished its turn: only notices and [DONE] were lost.
    final = assistant_event("Hi there", status="finished_successfully", finish="stop")
    final = final.replace(b'"end_turn": null', b'"end_turn": true') if whole else final
    body = b"".join(b"data: " + d + b"\n\n" for d in (assistant_event("Hi"), final)) + b"data: {\"conversation_id\""
    with thread_server(cut_off(body, how)) as (host, port):
        provider = provider_for(f"http://{host}:{port}")
        if whole:
            assert "".join(pieces_of(provider, access_token="t", retries=0)) == "Hi there"
        else:
            raised, pieces = failure(provider, access_token="t", retries=0)
            assert isinstance(raised, (fakegpt.TruncatedStreamError, fakegpt.TransportError)) and "".join(pieces) == "Hi there"


@pytest.mark.parametrize("data", [
    json.dumps({"message": None, "conversation_id": "c1", "error": f"bad token {SENTINEL}"}).encode(),
    b"event: delta\ndata: " + json.dumps({"p": "", "o": "add", "v": {"message": None, "error": {"message": f"no {SENTINEL}"}}}).encode(),
    b'{"broken": "' + SENTINEL.encode(),
])
def test_errors_in_the_stream_never_show_the_token(data: bytes) -> None:
    body = data if data.startswith(b"event:") else b"data: " + data
    with thread_server(answering(event_stream(assistant_event("Hi")) + body + b"\n\n")) as (host, port):
        raised, pieces = failure(provider_for(f"http://{host}:{port}"), access_token=SENTINEL)
    assert pieces == ["Hi"] and isinstance(raised, (fakegpt.UpstreamError, fakegpt.ProtocolError))
    assert SENTINEL not in str(raised) and "***" in str(raised)


def test_a_cloudflare_challenge_page_says_so_and_is_not_a_token_expiry(mock: mock_server.MockServer) -> None:
    provider = provider_for(mock.url)
    raised, _ = failure(provider, "[[fault challenge]] Hi")
    assert isinstance(raised, fakegpt.ChallengeError) and raised.status == 403
    assert "Cloudflare challenge page" in str(raised) and not isinstance(raised, fakegpt.TokenExpiredError)
    assert mock.count("POST", "/auth/login") == 1  # no second login for it
    page = mock_server._CHALLENGE_PAGE.encode()
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(page), page)
    with thread_server(answering(response)) as (host, port):
        raised, _ = failure(provider_for(f"http://{host}:{port}"), access_token="t")
    assert isinstance(raised, fakegpt.ChallengeError) and raised.status == 200


@pytest.mark.parametrize("fmt", ["snapshots", "v1"])
@pytest.mark.parametrize("fault, error, words", [
    ("handoff", fakegpt.ProtocolError, "websocket"),
    ("error_event:3", fakegpt.UpstreamError, "Something went wrong in the model."),
    ("rewrite:3", fakegpt.ProtocolError, "rewrote text already delivered"),
])
def test_in_stream_faults_of_both_formats_raise_after_the_text(fmt: str, fault: str, error: type, words: str) -> None:
    with mock_server.serve_in_thread(profile="backend-api", stream_format=fmt) as server:
        raised, pieces = failure(provider_for(server.url), f"[[fault {fault}]] Hi", profile="backend-api",
                                 access_token=server.access_token)
    assert isinstance(raised, error) and words in str(raised)
    reply = mock_server.default_reply(f"[[fault {fault}]] Hi")
    assert reply.startswith("".join(pieces)) and (fault == "handoff" or pieces)


@pytest.mark.parametrize("fmt", ["snapshots", "v1"])
def test_auto_continue_joins_a_max_tokens_reply_without_a_seam(fmt: str) -> None:
    with mock_server.serve_in_thread(profile="backend-api", stream_format=fmt, max_tokens=25) as server:
        provider = provider_for(server.url)
        options = {"profile": "backend-api", "access_token": server.access_token}

        async def run(**more: Any) -> fakegpt.ChatStream:
            async with provider.stream("", USER, **options, **more) as reply:
                async for _ in reply:
                    pass
            return reply

        cut = asyncio.run(run())
        assert (cut.text, cut.finish_reason) == (FULL_REPLY[:25], "max_tokens")
        whole = asyncio.run(run(auto_continue=True))
        bodies = [r.json() for r in server.requests]
    assert (whole.text, whole.finish_reason) == (FULL_REPLY, "stop")
    continues = [b for b in bodies[1:] if b["action"] == "continue"]
    assert len(continues) == len(FULL_REPLY) // 25 and all(b["parent_message_id"] == whole.message_id for b in continues)
    assert all(b["conversation_id"] == whole.conversation_id for b in continues)


def test_the_short_wait_after_a_whole_reply_does_not_carry_over_to_its_continuation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The continued part's events are as slow as the first part's, and slower than the
    wait after a whole reply: they are read under the read timeout, not that wait (the
    clock is the call's, in either format)."""
    monkeypatch.setattr(fakegpt, "_AFTER_REPLY_SECONDS", 0.05)
    with mock_server.serve_in_thread(profile="backend-api", stream_format="snapshots", max_tokens=8, delay=0.12,
                                     reply="Twelve chars, continued") as server:
        stream = fakegpt.FakeGpt.stream("", USER, url=server.url, profile="backend-api", access_token=server.access_token,
                                        auto_continue=True, timeout=30)

        async def run() -> str:
            async with stream:
                return "".join([event.delta async for event in stream])

        assert asyncio.run(run()) == "Twelve chars, continued" == stream.text
    assert stream.finish_reason == "stop"
    assert sum(r.json()["action"] == "continue" for r in server.requests) == 2


def test_the_mock_remembers_conversations(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    async def turn(content: str, **kwargs: Any) -> fakegpt.ChatStream:
        async with provider.stream("", [{"role": "user", "content": content}], **kwargs) as reply:
            async for _ in reply:
                pass
        return reply

    first = asyncio.run(turn("Hello"))
    assert first.text == mock_server.default_reply("Hello")  # a first turn is as it always was
    second = asyncio.run(turn("And now?", conversation_id=first.conversation_id, parent_message_id=first.message_id))
    assert second.text == "Turn 2: before, you said “Hello”. " + mock_server.default_reply("And now?")
    raised, _ = failure(provider, "Hi", conversation_id=first.conversation_id, parent_message_id="no-such-message")
    assert isinstance(raised, fakegpt.HTTPStatusError) and raised.status == 400 and "not in this conversation" in str(raised)
    raised, _ = failure(provider, "Hi", conversation_id="no-such-conversation")
    assert isinstance(raised, fakegpt.HTTPStatusError) and raised.status == 404


def test_gpt4free_return_conversation_and_conversation_continue_a_conversation(provider: "type[FakeGpt]") -> None:
    async def run(**kwargs: Any) -> List[Any]:
        return [p async for p in provider.create_async_generator("", [{"role": "user", "content": "Hello"}], **kwargs)]

    items = asyncio.run(run(return_conversation=True))
    conversation, finish = items[-2:]
    assert "".join(items[:-2]) == FULL_REPLY and all(isinstance(p, str) for p in items[:-2])
    assert finish.reason == "stop" and str(finish) == "" and str(conversation) == ""
    assert conversation.conversation_id and conversation.message_id == conversation.parent_message_id
    assert all(isinstance(p, str) for p in asyncio.run(run()))  # without the keyword: text only
    for earlier in (conversation, conversation.get_dict()):
        follow_up = "".join(p for p in asyncio.run(run(conversation=earlier)) if isinstance(p, str))
        assert follow_up.startswith("Turn 2: before, you said “Hello”.")
    with pytest.raises(fakegpt.UsageError, match="conversation"):
        asyncio.run(run(conversation={"conversation_id": 5}))


def test_idle_accounts_are_preferred_when_offered() -> None:
    with mock_server.serve_in_thread(idle_accounts=True) as server:
        loads = json.loads(urllib.request.urlopen(server.url + "/api/loads").read())["loads"]
        idle = {entry["token_id"] for entry in loads if entry["count"] == 0}
        pieces_of(provider_for(server.url))
        form = urllib.parse.parse_qs(server.requests[-3].body.decode())
    assert idle and form["token_key"][0] in idle


# ---------------------------------------------------------------------------------------
# Keep-alive connections
# ---------------------------------------------------------------------------------------


def prompted(text: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": text}]


def conversation_connections(server: mock_server.MockServer) -> Dict[str, int]:
    """Which connection each conversation request came on, by its prompt."""
    return {
        request.json()["messages"][0]["content"]["parts"][0]: request.connection
        for request in server.requests if request.method == "POST" and request.path == "/api/conversation"
    }


def wait_until(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_the_client_works_on_uvloops_event_loop(tls: bool, recwarn: pytest.WarningsRecorder) -> None:
    # uvloop (uvicorn's loop, and many applications') has transports of its own, not
    # asyncio.Transport by class.
    uvloop = pytest.importorskip("uvloop")  # (installed with the test extra where it builds)
    certs = {"certfile": str(TESTDATA / "server.pem"), "keyfile": str(TESTDATA / "server.key")} if tls else {}
    ssl_context = {"ssl": trusting_test_ca()} if tls else {}

    async def calls(provider: "type[FakeGpt]") -> List[Any]:
        first = await provider.create_async("", USER, **ssl_context)
        many = await asyncio.gather(*(provider.create_async("", prompted(f"c{n}"), **ssl_context) for n in range(20)))
        pieces = provider.create_async_generator("", prompted("[[chars 3000]] long"), **ssl_context)
        async for _ in pieces:
            break
        await pieces.aclose()
        with pytest.raises(fakegpt.RequestTimeout):
            await provider.create_async("", prompted("[[fault hang]] x"), timeout=0.3, **ssl_context)
        # A login begun by a call whose timer is due at once (uvloop gives such a timer as
        # a plain Handle, which cannot say when it is due), joined by another call.
        fresh, hasty = FakeGpt.isolated(provider.url), fakegpt.Timeouts(read=1e-6)
        one, two = await asyncio.gather(gather_pieces(fresh, "one", timeout=hasty, **ssl_context),
                                        gather_pieces(fresh, "two", timeout=hasty, **ssl_context), return_exceptions=True)
        assert one is two and isinstance(one, fakegpt.RequestTimeout) and one.phase == "read"
        await fresh.aclose()
        late = await provider.create_async("", USER, **ssl_context)
        await provider.aclose()
        return [first, many, late]

    with mock_server.MockServer(**certs) as server:
        first, many, late = uvloop.run(calls(FakeGpt.isolated(server.url)))
    assert first == late == FULL_REPLY
    assert many == [mock_server.default_reply(f"c{n}") for n in range(20)]
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


def event_loops() -> List[Any]:
    """asyncio's loop, and uvloop's where it is installed."""
    try:
        import uvloop
    except ImportError:
        return [asyncio.new_event_loop]
    return [asyncio.new_event_loop, uvloop.new_event_loop]


@pytest.mark.parametrize("new_loop", event_loops(), ids=lambda f: f.__module__)
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_prompt_the_upstream_refuses_as_too_large_is_its_413(
        new_loop: Callable[[], asyncio.AbstractEventLoop], tls: bool) -> None:
    # The mock answers 413 before it has read the body, half-closes, and reads on (as
    # nginx does, whose default limit is 1 MB): the client's transport, closed with the
    # request still to send, sent it and was gone before the reply was closed, and
    # asyncio's transport raised AttributeError when aborted then.
    options = {"certfile": str(TESTDATA / "server.pem"), "keyfile": str(TESTDATA / "server.key")} if tls else {}
    with mock_server.MockServer(**options) as mock:
        provider = provider_for(mock.url)
        tls_options = {"ssl": trusting_test_ca()} if tls else {}

        async def call() -> BaseException:
            with pytest.raises(fakegpt.HTTPStatusError) as caught:
                await provider.create_async("", [{"role": "user", "content": "a" * (17 * 1024 * 1024)}],
                                            access_token=mock.access_token, retries=0, **tls_options)
            return caught.value

        loop = new_loop()
        try:
            error = loop.run_until_complete(call())
        finally:
            loop.close()
    assert isinstance(error, fakegpt.HTTPStatusError) and error.status == 413 and "too large" in str(error)


class IdleConnection:
    """What a pool asks of a connection it keeps."""

    alive = usable = True

    def rest(self) -> None:
        pass

    def close(self) -> None:
        self.alive = self.usable = False


@pytest.mark.parametrize("new_loop", event_loops(), ids=lambda f: f.__module__)
def test_timers_due_at_once_are_kept_track_of_on_any_event_loop(new_loop: Callable[[], Any]) -> None:
    # uvloop's call_at gives a timer due now or earlier as a plain Handle, without when().
    async def waits_and_keeps() -> Tuple[List[int], List[bool]]:
        loop = asyncio.get_running_loop()
        clock = fakegpt._Clock(fakegpt.Timeouts(read=1e-9), loop)
        done = loop.create_future()
        done.set_result(1)
        values = [await clock.wait(done), await clock.wait(done)]  # the second asks when the first's timer is due
        pool, first, second = fakegpt._Pool(), IdleConnection(), IdleConnection()
        pool.reserve("key", 2)
        pool.reserve("key", 2)
        pool.put("key", first, 1e-9)  # due at once
        pool.put("key", second, 60)
        await asyncio.sleep(0.1)
        kept = [first.alive, second.alive]
        pool.close()
        return values, kept

    loop = new_loop()
    try:
        values, kept = loop.run_until_complete(waits_and_keeps())
    finally:
        loop.close()
    assert values == [1, 1] and kept == [False, True]


def test_on_uvloop_a_proxy_that_hangs_up_after_its_200_is_a_connect_error_at_once() -> None:
    # uvloop's start_tls on a connection the peer has closed fails to write its hello and
    # never ends: the call waited out its connect timeout.
    uvloop = pytest.importorskip("uvloop")

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        writer.close()

    async def call(url: str) -> BaseException:
        with pytest.raises(fakegpt.FakeGptError) as raised:
            await FakeGpt.isolated("https://example.invalid").create_async(
                "", USER, proxy=url, access_token="t", retries=0, timeout=fakegpt.Timeouts(connect=3))
        return raised.value

    with thread_server(proxy) as (host, port):
        started = time.monotonic()
        error = uvloop.run(call(f"http://{host}:{port}"))
    assert isinstance(error, fakegpt.ConnectError) and "example.invalid through the proxy" in str(error)
    assert time.monotonic() - started < 2


def test_the_login_and_later_calls_share_one_connection(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    async def three() -> List[str]:
        return [await provider.create_async("", prompted(f"call {n}")) for n in range(3)]

    replies = asyncio.run(three())
    assert replies == [mock_server.default_reply(f"call {n}") for n in range(3)]
    assert [(r.method, r.path) for r in mock.requests] == [
        ("GET", "/api/loads"), ("POST", "/auth/login"), ("GET", "/api/auth/session"),
        *[("POST", "/api/conversation")] * 3,
    ]
    assert mock.accepted_connections == 1 and {r.connection for r in mock.requests} == {1}
    assert all(r.header("connection") is None for r in mock.requests)  # HTTP/1.1 keeps it by default


async def read_partly(provider: "type[FakeGpt]") -> None:
    async for _ in provider.create_async_generator("", prompted("first")):
        break


async def fail_with_a_status(provider: "type[FakeGpt]") -> None:
    with pytest.raises(fakegpt.HTTPStatusError):
        await provider.create_async("", prompted("first [[fault status:500]]"), retries=0)


async def fail_with_an_error_event(provider: "type[FakeGpt]") -> None:
    with pytest.raises(fakegpt.UpstreamError):
        await provider.create_async("", prompted("first [[fault error_event:2]]"))


async def fail_mid_stream(provider: "type[FakeGpt]") -> None:
    with pytest.raises(fakegpt.TruncatedStreamError):
        await provider.create_async("", prompted("first [[fault cut:2]]"), retries=0)


async def time_out(provider: "type[FakeGpt]") -> None:
    with pytest.raises(fakegpt.RequestTimeout):
        await provider.create_async("", prompted("first [[fault pause_after:1:1]]"), timeout=fakegpt.Timeouts(read=0.3))


async def cancel(provider: "type[FakeGpt]") -> None:
    task = asyncio.ensure_future(provider.create_async("", prompted("first [[fault hang_after:2]]")))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("first_call", [read_partly, fail_with_a_status, fail_with_an_error_event, fail_mid_stream, time_out, cancel])
def test_a_connection_is_never_kept_after_a_partial_read_an_error_or_a_cancel(
    provider: "type[FakeGpt]", mock: mock_server.MockServer, first_call: Callable[["type[FakeGpt]"], Awaitable[None]],
) -> None:
    async def run() -> str:
        await provider.create_async("", prompted("log in"))
        await first_call(provider)
        return await provider.create_async("", prompted("second"))

    assert asyncio.run(run()) == mock_server.default_reply("second")
    used = conversation_connections(mock)
    first = next(connection for prompt, connection in used.items() if prompt.startswith("first"))
    assert used["log in"] == first  # the login's connection went on to the first call
    assert used["second"] != first
    assert wait_until(lambda: mock.open_connections == 0)


def test_a_reply_framed_by_the_close_is_not_kept_but_the_login_is() -> None:
    with mock_server.serve_in_thread(framing="close") as server:
        provider = provider_for(server.url)

        async def two() -> None:
            for n in range(2):
                await provider.create_async("", prompted(f"call {n}"))

        asyncio.run(two())
    login = {r.connection for r in server.requests if r.path != "/api/conversation"}
    assert len(login) == 1 and server.accepted_connections == 2
    assert conversation_connections(server) == {"call 0": 1, "call 1": 2}


def keep_alive_reply(text: str, extra: bytes = b"") -> bytes:
    body = b"".join(b"data: " + data + b"\n\n" for data in (assistant_event(text, status="finished_successfully"), b"[DONE]"))
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


class KeepAliveServer:
    """A raw HTTP/1.1 server that keeps its connections open; `plan(connection, request)`
    (both counted from 1) says what it does with each request: "answer", "close" (FIN,
    nothing sent), "reset" (RST, nothing sent), or bytes to send before closing."""

    def __init__(self, plan: Callable[[int, int], Union[str, bytes]], extra: bytes = b"") -> None:
        self.plan, self.extra = plan, extra
        self.requests: List[Tuple[int, int]] = []
        self.closed_after: Dict[int, float] = {}  # connection: seconds idle before the client closed it
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, count, answered = self.connections, 0, time.monotonic()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
                if length:
                    await reader.readexactly(int(length[1]))
                count += 1
                self.requests.append((number, count))
                action = self.plan(number, count)
                if action == "answer":
                    writer.write(keep_alive_reply(f"Reply {number}.{count}", self.extra))
                    await writer.drain()
                    answered = time.monotonic()
                    continue
                if action == "reset":
                    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    writer.transport.abort()
                elif isinstance(action, bytes):
                    writer.write(action)
                    await writer.drain()
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_after[number] = time.monotonic() - answered
        finally:
            writer.close()


def replies_of(url: str, prompts: Sequence[str], **kwargs: Any) -> List[str]:
    provider = provider_for(url)

    async def run() -> List[str]:
        return [await provider.create_async("", prompted(prompt), access_token="t", retries=0, **kwargs) for prompt in prompts]

    return asyncio.run(run())


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_kept_connection_the_server_closed_is_replaced_once_and_the_reply_arrives(how: str) -> None:
    # The server drops the kept connection as the second request arrives: what a server
    # whose idle timeout ran out as the request was sent does. Nothing was answered, so
    # the request goes again, once, on a new connection.
    server = KeepAliveServer(lambda connection, request: how if (connection, request) == (1, 2) else "answer")
    with thread_server(server.handle) as (host, port):
        replies = replies_of(f"http://{host}:{port}", ["one", "two", "three"])
    assert replies == ["Reply 1.1", "Reply 2.1", "Reply 2.2"]
    assert server.requests == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_a_close_waiting_unread_in_a_kept_connection_is_seen_before_a_request(caplog: pytest.LogCaptureFixture) -> None:
    # A server that closes right after its answer without saying so (tinyproxy does):
    # when the event loop has not run since, the close waits unread in the socket. It is
    # seen there, and the request goes on a new connection at once, not on the dead one
    # first (which costs a failed exchange and a retry).
    caplog.set_level(logging.DEBUG, logger="fakegpt")
    server = KeepAliveServer(lambda connection, request: keep_alive_reply(f"Reply {connection}.{request}"))
    with thread_server(server.handle) as (host, port):
        provider = provider_for(f"http://{host}:{port}")

        async def run() -> List[str]:
            first = await provider.create_async("", USER, access_token="t", retries=0)
            time.sleep(0.2)  # the loop does not run: the server's close is not read
            return [first, await provider.create_async("", USER, access_token="t", retries=0)]

        assert asyncio.run(run()) == ["Reply 1.1", "Reply 2.1"]
    assert server.requests == [(1, 1), (2, 1)]
    assert not [record for record in caplog.records if "once more" in record.getMessage()]


REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def test_a_408_on_a_kept_connection_means_once_more_on_a_new_one() -> None:
    # A server that timed the idle connection out says so with a 408 as the request
    # arrives: it processed nothing, and RFC 9110 lets the client repeat the request.
    server = KeepAliveServer(lambda connection, request: REQUEST_TIMEOUT if (connection, request) == (1, 2) else "answer")
    with thread_server(server.handle) as (host, port):
        replies = replies_of(f"http://{host}:{port}", ["one", "two", "three"])
    assert replies == ["Reply 1.1", "Reply 2.1", "Reply 2.2"]
    assert server.requests == [(1, 1), (1, 2), (2, 1), (2, 2)]


@pytest.mark.parametrize("kept", [False, True], ids=["new-connection", "after-the-repeat"])
def test_a_408_on_a_new_connection_is_the_answer(kept: bool) -> None:
    # kept: the first call's connection is kept and answers the second with a 408; the
    # request goes once more on a new connection, which answers 408 too.
    server = KeepAliveServer(lambda connection, request: "answer" if kept and (connection, request) == (1, 1) else REQUEST_TIMEOUT)
    with thread_server(server.handle) as (host, port):
        provider = provider_for(f"http://{host}:{port}")

        async def run() -> BaseException:
            if kept:
                await provider.create_async("", USER, access_token="t", retries=0)
            with pytest.raises(fakegpt.FakeGptError) as raised:
                await provider.create_async("", USER, access_token="t", retries=0)
            return raised.value

        error = asyncio.run(run())
    assert isinstance(error, fakegpt.HTTPStatusError) and error.status == 408
    assert server.requests == ([(1, 1), (1, 2), (2, 1)] if kept else [(1, 1)])


def test_a_new_connection_that_fails_before_any_answer_is_not_tried_again() -> None:
    server = KeepAliveServer(lambda connection, request: "close")
    with thread_server(server.handle) as (host, port):
        provider = provider_for(f"http://{host}:{port}")
        raised, _ = failure(provider, access_token="t", retries=0)
    assert isinstance(raised, fakegpt.TransportError) and server.requests == [(1, 1)]


@pytest.mark.parametrize("sent", [b"HTTP/1.1 200", b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 500\r\n\r\ndata: {"])
def test_a_kept_connection_that_fails_after_response_bytes_is_not_tried_again(sent: bytes) -> None:
    server = KeepAliveServer(lambda connection, request: sent if (connection, request) == (1, 2) else "answer")
    with thread_server(server.handle) as (host, port):
        provider = provider_for(f"http://{host}:{port}")

        async def run() -> BaseException:
            await provider.create_async("", USER, access_token="t", retries=0)
            with pytest.raises(fakegpt.FakeGptError) as raised:
                await provider.create_async("", USER, access_token="t", retries=0)
            return raised.value

        error = asyncio.run(run())
    assert isinstance(error, (fakegpt.TransportError, fakegpt.TruncatedStreamError))
    assert server.requests == [(1, 1), (1, 2)]


@pytest.mark.parametrize("complete", [True, False], ids=["whole answer", "answer cut off"])
def test_an_answer_that_comes_before_the_request_is_sent_is_what_the_caller_gets(complete: bool) -> None:
    """A server may refuse a request before it has read it all (a body too large) and
    close: the send then fails, and the error the caller gets is the server's answer,
    not the failed send, even when the connection ends before the answer's body does."""
    body = b'{"detail": "Request body too large."}'
    answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nConnection: close\r\n"
    answer += b"Content-Length: %d\r\n\r\n%b" % (len(body), body if complete else body[:10])

    async def answers_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()  # with most of the request unread: the peer gets a reset

    with thread_server(answers_early) as (host, port):
        provider = provider_for(f"http://{host}:{port}")
        raised, _ = failure(provider, "x" * 8_000_000, access_token="t", retries=0)
    assert isinstance(raised, fakegpt.HTTPStatusError) and raised.status == 413
    assert ("Request body too large" in str(raised)) is complete


@pytest.mark.parametrize("status, error", [
    (502, fakegpt.HTTPStatusError), (401, fakegpt.TokenExpiredError), (429, fakegpt.RateLimitError),
])
@pytest.mark.parametrize("login", [False, True], ids=["conversation", "login"])
def test_an_error_answer_whose_body_is_cut_short_is_still_its_status(status: int, error: type, login: bool) -> None:
    cut = b"HTTP/1.1 %d Oops\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"detail\": \"ov" % status
    server = KeepAliveServer(lambda connection, request: cut)
    with thread_server(server.handle) as (host, port):
        raised, _ = failure(provider_for(f"http://{host}:{port}"), retries=0, **({} if login else {"access_token": "t"}))
    assert isinstance(raised, error) and raised.status == status


def test_a_success_whose_body_is_cut_short_is_not_taken_for_a_whole_one() -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"loads\": []}"
    server = KeepAliveServer(lambda connection, request: cut)
    with thread_server(server.handle) as (host, port):
        raised, _ = failure(provider_for(f"http://{host}:{port}"), retries=0)
    assert isinstance(raised, (fakegpt.TransportError, fakegpt.TruncatedStreamError)) and "loads" in str(raised)


@pytest.mark.parametrize("header, seconds", [
    ("timeout=5", 4.0), ("timeout=5, max=100", 4.0), ("max=9, timeout=1", 0.5), ('timeout="3"', 2.0),
    ("timeout=86400", fakegpt._IDLE_MAX_SECONDS), ("timeout=0", 0.0), (None, fakegpt._IDLE_SECONDS),
    ("timeout=", fakegpt._IDLE_SECONDS), ("timeout=1.5", fakegpt._IDLE_SECONDS), ("timeout=\u0663", fakegpt._IDLE_SECONDS),
    ("timeout=" + "9" * 400, fakegpt._IDLE_SECONDS),
])
def test_the_idle_time_of_a_kept_connection_honours_the_servers_keep_alive(header: Optional[str], seconds: float) -> None:
    head = Response(200, "OK", (("keep-alive", header),) if header is not None else ())
    assert fakegpt._keep_alive_seconds(head) == seconds


def test_an_idle_connection_is_closed_before_the_server_would(monkeypatch: pytest.MonkeyPatch) -> None:
    told = KeepAliveServer(lambda connection, request: "answer", extra=b"Keep-Alive: timeout=2\r\n")
    untold = KeepAliveServer(lambda connection, request: "answer")
    monkeypatch.setattr(fakegpt, "_IDLE_SECONDS", 0.3)
    for server in (told, untold):
        with thread_server(server.handle) as (host, port):
            provider = provider_for(f"http://{host}:{port}")

            async def call_then_idle() -> None:
                await provider.create_async("", USER, access_token="t")
                await asyncio.sleep(1.6)  # within the loop: only the idle timer can close it

            asyncio.run(call_then_idle())
    assert 0.8 < told.closed_after[1] < 1.5  # 2 s said: kept a second
    assert 0.2 < untold.closed_after[1] < 0.9


def test_idle_connections_of_different_idle_times_each_close_at_theirs_by_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    # In one loop's pool: five connections kept 1 s (the server said 2), then three kept
    # 0.3 s (another server). The pool's one timer is moved earlier for the short ones,
    # then set again for the long ones once the short ones are closed.
    told = KeepAliveServer(lambda connection, request: "answer", extra=b"Keep-Alive: timeout=2\r\n")
    untold = KeepAliveServer(lambda connection, request: "answer")
    monkeypatch.setattr(fakegpt, "_IDLE_SECONDS", 0.3)
    timers: List[float] = []
    with thread_server(told.handle) as (host, port), thread_server(untold.handle) as (host2, port2):
        provider, long_kept, short_kept = provider_for(f"http://{host}:{port}"), f"http://{host}:{port}", f"http://{host2}:{port2}"

        async def run() -> None:
            loop = asyncio.get_running_loop()
            call_at = loop.call_at

            def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
                if isinstance(getattr(callback, "__self__", None), fakegpt._Pool):
                    timers.append(when)
                return call_at(when, callback, *args, **kwargs)

            monkeypatch.setattr(loop, "call_at", counted)
            await asyncio.gather(*(provider.create_async("", USER, url=long_kept, access_token="t") for _ in range(5)))
            await asyncio.gather(*(provider.create_async("", USER, url=short_kept, access_token="t") for _ in range(3)))
            await asyncio.sleep(1.6)  # within the loop: only the pool's timer can close them

        asyncio.run(run())
    assert told.connections == 5 and untold.connections == 3
    assert all(0.8 < told.closed_after[n] < 1.5 for n in range(1, 6)), told.closed_after
    assert all(0.2 < untold.closed_after[n] < 0.9 for n in range(1, 4)), untold.closed_after
    # Set for the first kept, moved for the first of the short ones, set again for the long
    # ones (once more if a slow machine spread their ends over more than the pool's margin).
    assert 3 <= len(timers) <= 4, timers


def test_a_connection_past_its_idle_time_is_not_taken_even_if_the_loop_was_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    server = KeepAliveServer(lambda connection, request: "answer")  # it would keep them for ever
    monkeypatch.setattr(fakegpt, "_IDLE_SECONDS", 0.3)
    with thread_server(server.handle) as (host, port):
        provider = provider_for(f"http://{host}:{port}")

        async def run() -> List[str]:
            first = await provider.create_async("", USER, access_token="t")
            time.sleep(0.5)  # the loop does not run: no timer closes the idle connection
            return [first, await provider.create_async("", USER, access_token="t")]

        assert asyncio.run(run()) == ["Reply 1.1", "Reply 2.1"]
    assert server.requests == [(1, 1), (2, 1)]


def test_no_connection_outlives_its_event_loop(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        assert "".join(pieces_of(provider)) == FULL_REPLY
        assert "".join(provider.create_completion("", USER)) == FULL_REPLY  # its own loop, in this thread
        gc.collect()
    assert mock.accepted_connections == 2
    assert wait_until(lambda: mock.open_connections == 0, 1.0)  # the mock keeps idle ones for 5 s


def test_aclose_closes_the_kept_connections_and_later_calls_open_new_ones(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    async def run() -> Tuple[int, int, str]:
        await provider.create_async("", USER)
        kept = mock.open_connections
        await provider.aclose()
        await asyncio.sleep(0)
        closed = wait_until(lambda: mock.open_connections == 0) and mock.open_connections
        return kept, closed, await provider.create_async("", prompted("again"))

    kept, after_aclose, reply = asyncio.run(run())
    assert (kept, after_aclose, reply) == (1, 0, mock_server.default_reply("again"))
    assert mock.accepted_connections == 2


def test_two_event_loops_never_share_a_connection(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    pieces_of(provider)  # logged in: the session is shared, the connections are not
    both_started = threading.Barrier(2)

    def calls(name: str) -> None:
        async def run() -> None:
            both_started.wait(5)
            for n in range(3):
                await provider.create_async("", prompted(f"{name} {n}"))
                await asyncio.sleep(0.01)

        asyncio.run(run())

    threads = [threading.Thread(target=calls, args=(name,)) for name in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    used = conversation_connections(mock)
    a, b = ({used[f"{name} {n}"] for n in range(3)} for name in "AB")
    assert len(a) == 1 and len(b) == 1 and a != b  # each loop kept its own, and only its own


def test_concurrent_calls_each_take_a_kept_connection_of_their_own(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    async def run() -> List[int]:
        opened = []
        for round_ in range(3):
            replies = await asyncio.gather(*(provider.create_async("", prompted(f"{round_}.{n}")) for n in range(3)))
            assert replies == [mock_server.default_reply(f"{round_}.{n}") for n in range(3)]
            opened.append(mock.accepted_connections)
        return opened

    assert asyncio.run(run()) == [3, 3, 3]  # the login's connection and two more, then only those
    used = conversation_connections(mock)
    for round_ in range(3):  # no connection carried two requests at once
        assert sorted(used[f"{round_}.{n}"] for n in range(3)) == [1, 2, 3]


def test_at_most_max_connections_are_in_use_and_later_calls_wait_to_take_theirs(
    provider: "type[FakeGpt]", mock: mock_server.MockServer,
) -> None:
    ask = functools.partial(provider.create_async, "", access_token=mock.access_token, limits=Limits(max_connections=3))

    async def run() -> List[str]:
        return await asyncio.gather(*(ask(prompted(f"c{n}")) for n in range(12)))

    assert asyncio.run(run()) == [mock_server.default_reply(f"c{n}") for n in range(12)]
    assert mock.accepted_connections == 3  # the other nine calls took one of these in turn
    assert len(set(conversation_connections(mock).values())) == 3


def test_a_call_that_waited_for_a_connection_sends_the_cookies_of_when_its_turn_came(
    provider: "type[FakeGpt]", mock: mock_server.MockServer,
) -> None:
    ask = functools.partial(provider.create_async, "", limits=Limits(max_connections=1))

    async def run() -> None:
        await ask(prompted("login"))
        first = asyncio.ensure_future(ask(prompted("[[fault delay_events:0.02]] first")))
        while not any(r.path == "/api/conversation" and b"first" in r.body for r in mock.requests):
            await asyncio.sleep(0.005)  # the first call holds the one connection now
        second = asyncio.ensure_future(ask(prompted("second")))
        await asyncio.sleep(0.05)  # it waits for its turn; meanwhile the jar gets a cookie
        assert not second.done()
        jar = provider._cookie_jar
        assert jar is not None
        jar.set_cookie(http.cookiejar.Cookie(0, "later", "1", None, False, mock.host, False, False, "/", True,
                                             False, None, True, None, None, {}))
        await asyncio.gather(first, second)

    asyncio.run(run())
    sent = [value for r in mock.requests if r.path == "/api/conversation" and b"second" in r.body
            for name, value in r.headers if name.lower() == "cookie"]
    assert len(sent) == 1 and "later=1" in sent[0] and "credential=" in sent[0]


def test_a_connection_given_back_while_calls_wait_goes_to_them_past_the_idle_bound(
    provider: "type[FakeGpt]", mock: mock_server.MockServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # More connections in use (6) than are kept idle (2): those that finish together are
    # all kept for the calls waiting their turn, not closed beyond the idle bound.
    monkeypatch.setattr(fakegpt, "_IDLE_CONNECTIONS", 2)
    ask = functools.partial(provider.create_async, "", access_token=mock.access_token, limits=Limits(max_connections=6))

    async def run() -> List[str]:
        return await asyncio.gather(*(ask(prompted(f"w{n}")) for n in range(60)))

    assert asyncio.run(run()) == [mock_server.default_reply(f"w{n}") for n in range(60)]
    assert mock.accepted_connections == 6


def test_a_request_that_fails_after_its_answer_came_gives_its_connection_back(
    mock: mock_server.MockServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The login's answer sets a cookie; taking it fails (here, by force): the request's
    # connection and its place are given back, so the next call is not left waiting.
    provider = provider_for(mock.url)
    ask = functools.partial(provider.create_async, "", USER, limits=Limits(max_connections=1))
    real = http.cookiejar.CookieJar.extract_cookies

    async def run() -> str:
        monkeypatch.setattr(http.cookiejar.CookieJar, "extract_cookies", lambda *args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            await ask()
        monkeypatch.setattr(http.cookiejar.CookieJar, "extract_cookies", real)
        return await ask(timeout=fakegpt.Timeouts(connect=2))  # in the same loop: the same pool

    assert asyncio.run(run()) == FULL_REPLY


def test_a_call_waits_for_a_connection_in_use_within_the_connect_timeout(
    provider: "type[FakeGpt]", mock: mock_server.MockServer,
) -> None:
    limits = Limits(max_connections=1)
    ask = functools.partial(provider.create_async, "", access_token=mock.access_token, limits=limits)

    async def run() -> Tuple[BaseException, str, str]:
        async with provider.stream("", prompted("held"), access_token=mock.access_token, limits=limits) as held:
            await held.__anext__()  # the stream holds the one connection
            with pytest.raises(fakegpt.RequestTimeout) as raised:
                await ask(prompted("waits"), timeout=fakegpt.Timeouts(connect=0.2))
            waiting = asyncio.ensure_future(ask(prompted("next")))
            await asyncio.sleep(0.1)
            assert not waiting.done()
        return raised.value, await waiting, await ask(prompted("after"))

    error, after_held, after = asyncio.run(run())
    assert error.phase == "connect" and "the one connection to" in str(error) and "was in use" in str(error)
    assert (after_held, after) == (mock_server.default_reply("next"), mock_server.default_reply("after"))


def test_a_call_cancelled_while_it_waits_for_a_connection_takes_no_place_with_it(
    provider: "type[FakeGpt]", mock: mock_server.MockServer,
) -> None:
    limits = Limits(max_connections=1)
    ask = functools.partial(provider.create_async, "", access_token=mock.access_token, limits=limits)

    async def run() -> List[str]:
        held = provider.stream("", prompted("held"), access_token=mock.access_token, limits=limits)
        await held.__anext__()
        calls = [asyncio.ensure_future(ask(prompted(p))) for p in "abc"]
        await asyncio.sleep(0.05)
        calls[0].cancel()  # cancelled while it waits: no place goes with it
        await asyncio.sleep(0.05)
        await held.aclose()  # the place goes to "b"...
        calls[1].cancel()  # ...which is cancelled before it runs: the place goes on to "c"
        done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert isinstance(done[0], asyncio.CancelledError)
        # (Before 3.12, asyncio.wait_for may let a task whose wait just ended go on
        # instead: then "b" has its reply, and "c" waits for its place after it.)
        assert isinstance(done[1], asyncio.CancelledError) or done[1] == mock_server.default_reply("b")
        return [done[2], await asyncio.wait_for(ask(prompted("d")), 5)]

    assert asyncio.run(run()) == [mock_server.default_reply("c"), mock_server.default_reply("d")]


def test_a_connection_the_mock_closed_while_idle_is_replaced() -> None:
    with mock_server.serve_in_thread(keep_alive_timeout=0.2) as server:
        provider = provider_for(server.url)

        async def run() -> List[str]:
            first = await provider.create_async("", prompted("one"))
            await asyncio.sleep(0.5)  # the mock has closed it meanwhile
            return [first, await provider.create_async("", prompted("two"))]

        assert asyncio.run(run()) == [mock_server.default_reply("one"), mock_server.default_reply("two")]
    assert server.accepted_connections == 2 and conversation_connections(server) == {"one": 1, "two": 2}
    assert server.count("POST", "/api/conversation") == 2  # nothing sent into the closed one


def test_a_reply_whose_body_stays_open_after_done_ends_at_once_and_its_connection_closes() -> None:
    closed = threading.Event()

    async def held_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
        await reader.readexactly(int(length[1]) if length else 0)
        body = b"".join(b"data: " + d + b"\n\n" for d in (assistant_event("Hi", status="finished_successfully"), b"[DONE]"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(body), body))  # and never the last chunk
        await writer.drain()
        await reader.read()  # until the client closes
        closed.set()
        writer.close()

    with thread_server(held_open) as (host, port):
        provider = provider_for(f"http://{host}:{port}")
        started = time.monotonic()
        reply = asyncio.run(provider.create_async("", USER, access_token="t"))
        took = time.monotonic() - started
        assert closed.wait(2)
    assert reply == "Hi" and took < 1.0


def test_a_broken_end_after_done_closes_the_connection_without_spinning() -> None:
    body = b"".join(b"data: " + d + b"\n\n" for d in (assistant_event("Hi", status="finished_successfully"), b"[DONE]"))
    broken = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"%x\r\n%s\r\nzz\r\n" % (len(body), body))  # a malformed chunk size, then the close
    with thread_server(answering(broken)) as (host, port):
        provider = provider_for(f"http://{host}:{port}")

        async def run() -> Tuple[str, float]:
            started = time.process_time()
            reply = await provider.create_async("", USER, access_token="t")
            return reply, time.process_time() - started

        reply, cpu = asyncio.run(run())
    assert reply == "Hi" and cpu < 0.15


def test_the_pool_keeps_a_bounded_number_of_idle_connections(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    many = fakegpt._IDLE_CONNECTIONS + 6

    async def run() -> Tuple[int, int]:
        await asyncio.gather(*(provider.create_async("", USER, access_token=mock.access_token) for _ in range(many)))
        opened = mock.accepted_connections
        wait_until(lambda: mock.open_connections <= fakegpt._IDLE_CONNECTIONS)
        return opened, mock.open_connections

    assert asyncio.run(run()) == (many, fakegpt._IDLE_CONNECTIONS)


def test_tunnels_through_a_proxy_are_kept_like_direct_connections() -> None:
    proxy = LoopbackProxy()
    certs = {"certfile": str(TESTDATA / "server.pem"), "keyfile": str(TESTDATA / "server.key")}
    with mock_server.serve_in_thread(**certs) as server, thread_server(proxy.handle) as (host, port):
        provider, context, other_context = provider_for(server.url), trusting_test_ca(), trusting_test_ca()

        async def run() -> List[str]:
            replies = [
                await provider.create_async("", prompted(f"call {n}"), proxy=f"http://{host}:{port}", ssl=context)
                for n in range(3)
            ]
            tunnels = proxy.seen[:]
            # Other TLS settings, or no proxy: never the same connection.
            await provider.create_async("", USER, proxy=f"http://{host}:{port}", ssl=other_context)
            await provider.create_async("", USER, ssl=context)
            return [*replies, *(method for method, _, _ in tunnels)]

        assert asyncio.run(run()) == [*(mock_server.default_reply(f"call {n}") for n in range(3)), "CONNECT"]
        assert [method for method, _, _ in proxy.seen] == ["CONNECT"] * 2
    used = [r.connection for r in server.requests if r.path == "/api/conversation"]
    assert used[:3] == [1, 1, 1] and len(set(used)) == 3


# ---------------------------------------------------------------------------------------
# Proxies and TLS
# ---------------------------------------------------------------------------------------


class LoopbackProxy:
    """A small HTTP proxy: CONNECT tunnels and absolute-form forwarding, recording both."""

    def __init__(self, credentials: Optional[str] = None) -> None:
        self.expected = None if credentials is None else "Basic " + base64.b64encode(credentials.encode()).decode()
        self.seen: List[Tuple[str, str, Optional[str]]] = []  # method, target, Proxy-Authorization

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ")
            fields = [line.split(":", 1) for line in lines[1:] if line]
            authorization = next((v.strip() for k, v in fields if k.lower() == "proxy-authorization"), None)
            self.seen.append((method, target, authorization))
            if self.expected is not None and authorization != self.expected:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                return
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                url = urllib.parse.urlsplit(target)
                upstream_reader, upstream_writer = await asyncio.open_connection(url.hostname, url.port)
                # One request per connection, as simple proxies do: the upstream's answer
                # says "Connection: close", so the client opens a new one for the next.
                kept = [line for line in lines[1:] if line and not line.lower().startswith(("proxy-authorization", "connection:"))]
                kept.append("Connection: close")
                origin_form = url.path + ("?" + url.query if url.query else "")
                upstream_writer.write(("\r\n".join([f"{method} {origin_form} HTTP/1.1", *kept]) + "\r\n\r\n").encode("latin-1"))
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def tls_context(cert: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(TESTDATA / f"{cert}.pem"), str(TESTDATA / f"{cert}.key"))
    return context


def trusting_test_ca() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(TESTDATA / "ca.pem"))


def test_http_upstream_through_a_proxy_uses_absolute_form_and_keeps_credentials_at_the_proxy(mock: mock_server.MockServer) -> None:
    proxy = LoopbackProxy("user:pa ss")
    with thread_server(proxy.handle) as (host, port):
        pieces = pieces_of(provider_for(mock.url), proxy=f"http://user:pa%20ss@{host}:{port}")
    assert "".join(pieces) == FULL_REPLY
    assert [target for _, target, _ in proxy.seen][0] == f"{mock.url}/api/loads?" + mock.requests[0].query
    assert all(auth == proxy.expected for _, _, auth in proxy.seen)
    assert all(r.header("proxy-authorization") is None for r in mock.requests)


def test_https_upstream_through_a_proxy_uses_connect() -> None:
    certfile, keyfile = str(TESTDATA / "server.pem"), str(TESTDATA / "server.key")
    proxy = LoopbackProxy("user:secret")
    with mock_server.serve_in_thread(certfile=certfile, keyfile=keyfile) as server, thread_server(proxy.handle) as (host, port):
        assert server.url.startswith("https://127.0.0.1:")
        pieces = pieces_of(provider_for(server.url), proxy=f"http://user:secret@{host}:{port}", ssl=trusting_test_ca())
    assert "".join(pieces) == FULL_REPLY
    assert {method for method, _, _ in proxy.seen} == {"CONNECT"}
    assert all(r.header("proxy-authorization") is None for r in server.requests)


class AnyHostProxy:
    """A proxy that takes every host for the one upstream it knows (as if it resolved
    names the client cannot), recording each request line and Host field."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.lines: List[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            self.lines.append(head.split("\r\n")[0])
            self.lines += [line for line in head.split("\r\n") if line.lower().startswith("host:")]
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            if head.startswith("CONNECT "):
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # as it came (absolute form): the mock reads the path out of it
                upstream_writer.write(head.encode("latin-1"))
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def test_an_internationalized_host_goes_out_in_its_idna_form(mock: mock_server.MockServer) -> None:
    port = int(mock.url.rsplit(":", 1)[1])
    proxy = AnyHostProxy(port)
    with thread_server(proxy.handle) as (host, proxy_port):
        pieces = pieces_of(provider_for(f"http://bücher.example:{port}"), proxy=f"http://{host}:{proxy_port}")
        assert "".join(pieces) == FULL_REPLY
        assert proxy.lines[:2] == [f"GET http://xn--bcher-kva.example:{port}/api/loads?{mock.requests[0].query} HTTP/1.1",
                                   f"Host: xn--bcher-kva.example:{port}"]
        # Over TLS, the tunnel's target too (here the mock answers in plain HTTP: a TLS
        # error that names the host as sent). Fullwidth letters are the same name.
        raised, _ = failure(provider_for(f"https://ｅｘａｍｐｌｅ.com:{port}"), proxy=f"http://{host}:{proxy_port}")
        assert proxy.lines[-2:] == [f"CONNECT example.com:{port} HTTP/1.1", f"Host: example.com:{port}"]
        assert isinstance(raised, fakegpt.ConnectError) and "example.com" in str(raised)


def test_a_base_path_goes_out_percent_encoded_as_browsers_send_it() -> None:
    lines: List[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines.append((await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()

    sent = {"/pä ndora/": b"/p%C3%A4%20ndora", '/a"b\\c\x7f': b"/a%22b%5Cc%7F", "/a%20b/~x;y=1": b"/a%20b/~x;y=1"}
    with thread_server(upstream) as (host, port):
        for path, wire in sent.items():
            raised, _ = failure(provider_for(f"http://{host}:{port}{path}"), access_token="t", retries=0)
            assert isinstance(raised, fakegpt.HTTPStatusError) and raised.status == 404
            assert lines.pop() == b"POST " + wire + b"/api/conversation HTTP/1.1"
    with pytest.raises(fakegpt.UsageError, match="lone surrogate"):
        FakeGpt.stream("", USER, url="http://127.0.0.1:9/\udcff")


def test_a_fully_qualified_host_is_named_without_its_last_dot_in_tls() -> None:
    names: List[Optional[str]] = []
    context = tls_context("server")  # its certificate names localhost
    context.sni_callback = lambda sock, name, ctx: names.append(name)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()

    with thread_server(upstream, context) as (_, port):
        proxy = AnyHostProxy(port)  # "localhost." does not resolve here: the proxy takes it anyway
        with thread_server(proxy.handle) as (host, proxy_port):
            raised, _ = failure(provider_for(f"https://localhost.:{port}"), proxy=f"http://{host}:{proxy_port}",
                                ssl=trusting_test_ca(), access_token="t", retries=0)
    assert proxy.lines[0] == f"CONNECT localhost.:{port} HTTP/1.1"
    assert names == ["localhost"]
    assert isinstance(raised, fakegpt.HTTPStatusError) and raised.status == 503  # the certificate was accepted


@pytest.mark.parametrize("host", ["a..b", ".", "a" * 64 + ".example", "exa mple.com", "ex%41mple.com", "\u2024.com",
                                  "\udcff.example", "a*.example"])
@pytest.mark.parametrize("where", ["url", "proxy"])
def test_a_url_whose_host_cannot_be_a_host_name_is_a_usage_error(host: str, where: str) -> None:
    url, proxy = ("http://127.0.0.1:9", f"http://{host}:3128") if where == "proxy" else (f"https://{host}/", None)
    with pytest.raises(fakegpt.UsageError, match="invalid host name") as caught:
        FakeGpt.stream("", USER, url=url, proxy=proxy)
    assert repr(host) in str(caught.value)


@pytest.mark.parametrize("scheme", ["https", "http"])  # a tunnel, or a request sent to the proxy
@pytest.mark.parametrize("credentials, words", [
    ("user:wrong@", "refused the credentials in its URL (407 Proxy Authentication Required)"),
    ("", "asks for credentials (407 Proxy Authentication Required): give them in its URL"),
])
def test_a_proxy_that_wants_other_credentials_says_so_at_once(
        mock: mock_server.MockServer, scheme: str, credentials: str, words: str) -> None:
    proxy = LoopbackProxy("user:right")
    with thread_server(proxy.handle) as (host, port):
        raised, _ = failure(provider_for(mock.url.replace("http:", f"{scheme}:")), proxy=f"http://{credentials}{host}:{port}",
                            access_token=mock.access_token, retries=2)
    assert isinstance(raised, fakegpt.ProxyError) and str(raised).startswith(f"the proxy {host}:{port} {words}")
    assert len(proxy.seen) == 1  # not tried again: the same request gets the same answer
    assert "wrong" not in str(raised) and "wrong" not in repr(raised)  # the password is never shown


@pytest.mark.parametrize("status, error, tries", [(403, fakegpt.ProxyError, 1), (502, fakegpt.ConnectError, 2)])
def test_a_proxy_that_refuses_the_tunnel_is_tried_again_only_if_the_trouble_may_pass(
        status: int, error: type, tries: int) -> None:
    seen: List[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(f"HTTP/1.1 {status} No\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    with thread_server(proxy) as (host, port):
        raised, _ = failure(provider_for("https://example.invalid"), proxy=f"http://{host}:{port}", access_token="t", retries=1)
    assert type(raised) is error and f"refused the tunnel to example.invalid: {status} No" in str(raised)
    assert len(seen) == tries


def test_a_tls_handshake_ended_by_the_peers_close_is_a_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # start_tls returns None rather than raising when the peer's end of stream comes
    # before the handshake's end (seen under load with a proxy that hangs up after its 200).
    async def closed_during_the_handshake(self: Any, transport: asyncio.BaseTransport, *args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "start_tls", closed_during_the_handshake)
    with thread_server(silent) as (host, port):
        raised, _ = failure(provider_for(f"https://{host}:{port}"), access_token="t")
    assert isinstance(raised, fakegpt.ConnectError)
    assert str(raised).endswith(f"cannot connect to {host}:{port}: the connection was closed during the TLS handshake")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_refused_connection_says_so_in_the_systems_words(scheme: str) -> None:
    port = port_for_a_server()  # free: nothing listens there
    raised, _ = failure(provider_for(f"{scheme}://127.0.0.1:{port}"), access_token="t", retries=0)
    refused = os.strerror(errno.ECONNREFUSED)
    assert isinstance(raised, fakegpt.ConnectError) and str(raised) == f"cannot connect to 127.0.0.1:{port}: {refused}"


def test_a_connect_failure_of_several_addresses_gives_each_reason_once() -> None:
    # asyncio's words for a host of several addresses, each refused or unreachable
    several = OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 9, 0, 0), "
                      "[Errno 111] Connect call failed ('127.0.0.1', 9), [Errno 101] Connect call failed ('::2', 9)")
    assert fakegpt._connect_failure(several) == f"{os.strerror(101)}; {os.strerror(111)}"
    assert fakegpt._connect_failure(OSError(111, "Connect call failed ('127.0.0.1', 9)")) == os.strerror(111)
    assert fakegpt._connect_failure(OSError("no address for x")) == "no address for x"


@pytest.mark.parametrize("answer, words", [
    (b"garbage\r\n\r\n", "did not answer the tunnel request in HTTP"),
    (b"", "closed the connection instead of answering the tunnel request"),
    (b"HTTP/1.1 200 Connection established\r\n\r\nearly bytes", "sent data before the TLS handshake"),
    (b"HTTP/1.1 200 Connection established\r\n\r\n", "example.invalid through the proxy"),  # then it hangs up
])
def test_a_proxy_that_does_not_tunnel_properly_is_a_connect_error_that_names_it(answer: bytes, words: str) -> None:
    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    with thread_server(proxy) as (host, port):
        raised, _ = failure(provider_for("https://example.invalid"), proxy=f"http://user:pa55@{host}:{port}",
                            access_token="token-1", retries=0)
    assert isinstance(raised, fakegpt.ConnectError) and words in str(raised)
    assert f"{host}:{port}" in str(raised) and "pa55" not in str(raised)


def test_environment_proxies_are_used_behind_trust_env_and_no_proxy_excludes(monkeypatch: pytest.MonkeyPatch, mock: mock_server.MockServer) -> None:
    proxy = LoopbackProxy()
    with thread_server(proxy.handle) as (host, port):
        monkeypatch.setenv("HTTP_PROXY", f"http://{host}:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        provider = provider_for(mock.url)
        pieces_of(provider)
        assert proxy.seen == []  # the library ignores the environment by default
        pieces_of(provider, trust_env=True)
        assert len(proxy.seen) == 4  # a session is per proxy: this call logs in through it too
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        pieces_of(provider, trust_env=True)
        assert len(proxy.seen) == 4


def test_a_real_proxy_tinyproxy_for_http_and_https(tmp_path: pathlib.Path) -> None:
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy is not installed here; .ci/run installs it (LoopbackProxy covers the same paths)")
    port = port_for_a_server()
    config = tmp_path / "tinyproxy.conf"
    config.write_text(f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\nLogLevel Critical\n")
    process = subprocess.Popen([binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "tinyproxy did not start"
            time.sleep(0.05)
        proxy = f"http://127.0.0.1:{port}"
        with mock_server.serve_in_thread() as plain:
            assert "".join(pieces_of(provider_for(plain.url), proxy=proxy)) == FULL_REPLY
        certs = {"certfile": str(TESTDATA / "server.pem"), "keyfile": str(TESTDATA / "server.key")}
        with mock_server.serve_in_thread(**certs) as secure:
            assert "".join(pieces_of(provider_for(secure.url), proxy=proxy, ssl=trusting_test_ca())) == FULL_REPLY
            assert secure.count("POST", "/api/conversation") == 1
    finally:
        process.terminate()
        process.wait(10)


def test_tls_with_a_trusted_test_ca_works() -> None:
    with mock_server.serve_in_thread(certfile=str(TESTDATA / "server.pem"), keyfile=str(TESTDATA / "server.key")) as server:
        assert "".join(pieces_of(provider_for(server.url), ssl=trusting_test_ca())) == FULL_REPLY


def test_a_call_cancelled_as_its_tls_handshake_ends_leaves_no_socket_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    # Cancelled there, asyncio's create_connection(ssl=...) closed its TLS transport
    # gracefully (a close_notify, then up to 30 s for the peer's) and the client closed the
    # socket under it: the next connection got the socket's number and failed with a
    # RuntimeError ("File descriptor N is used by transport"), and the transport leaked.
    # The cancel comes as asyncio wakes the handshake's waiter (on the client's side).
    wake = asyncio.sslproto.SSLProtocol._wakeup_waiter  # type: ignore[attr-defined]
    victims: List["asyncio.Task[List[str]]"] = []

    def cancelling(self: Any, exc: Optional[BaseException] = None) -> None:
        done = exc is None and self._waiter is not None and not self._server_side  # (the mock runs in a thread)
        wake(self, exc)
        if done and victims and not victims[0].done():
            victims[0].cancel()

    certs = {"certfile": str(TESTDATA / "server.pem"), "keyfile": str(TESTDATA / "server.key")}
    with mock_server.serve_in_thread(**certs) as server, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        provider, context = provider_for(server.url), trusting_test_ca()

        async def main() -> None:
            before = open_descriptors()
            for content in ("the login's connection", "the conversation's"):
                if content == "the conversation's":
                    await gather_pieces(provider, ssl=context)  # logged in: the next connection is the conversation's
                    await provider.aclose()
                with monkeypatch.context() as patch:
                    patch.setattr(asyncio.sslproto.SSLProtocol, "_wakeup_waiter", cancelling)  # type: ignore[attr-defined]
                    victims[:] = [asyncio.ensure_future(gather_pieces(provider, content, ssl=context))]
                    await asyncio.wait(victims)
                    assert victims.pop().cancelled()  # (and no reference to what it held is left)
                assert "".join(await gather_pieces(provider, ssl=context)) == FULL_REPLY
                await provider.aclose()
            deadline = time.monotonic() + 5  # (the mock's thread closes its side as it sees ours close)
            while open_descriptors() > before and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert open_descriptors() <= before

        asyncio.run(main())
        gc.collect()
    # (start_tls of CPython 3.9 and 3.10, cancelled there, closed the TCP transport and its
    # socket but not the TLS transport object it made: a ResourceWarning.)
    assert [str(w.message) for w in caught if "unclosed" in str(w.message)] == []


def test_an_ip_address_needs_no_lookup_and_a_name_gets_one() -> None:
    assert fakegpt._numeric_address(fakegpt._Endpoint("https", "127.0.0.1", 443)) == [
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 443))]
    assert fakegpt._numeric_address(fakegpt._Endpoint("https", "::1", 8443))[0][0] == socket.AF_INET6
    for name in ("localhost", "example.com", "127.0.0.1.nip.io", "1.2.3"):
        assert fakegpt._numeric_address(fakegpt._Endpoint("https", name, 443)) == []


def test_the_default_tls_context_is_built_once_and_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    built: List[int] = []
    create = ssl.create_default_context

    def recording(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(threading.get_ident())
        return create(*args, **kwargs)

    monkeypatch.setattr(fakegpt, "_default_ssl_context", None)
    monkeypatch.setattr(ssl, "create_default_context", recording)
    with mock_server.serve_in_thread(certfile=str(TESTDATA / "server.pem"), keyfile=str(TESTDATA / "server.key")) as server:
        async def twice() -> int:
            for _ in range(2):  # the test CA is not in the system's store: certificate errors
                with pytest.raises(fakegpt.TLSError):
                    await provider_for(server.url).create_async("", USER, access_token="token-1")
            return threading.get_ident()

        loop_thread = asyncio.run(twice())
    assert len(built) == 1 and built[0] != loop_thread


def test_a_session_is_per_tls_setting_a_token_got_strictly_is_not_used_loosely() -> None:
    with mock_server.serve_in_thread(certfile=str(TESTDATA / "server.pem"), keyfile=str(TESTDATA / "server.key")) as server:
        provider, strict = provider_for(server.url), trusting_test_ca()
        loose = ssl.create_default_context()
        loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE
        for context in (strict, strict, loose, loose):
            assert "".join(pieces_of(provider, ssl=context)) == FULL_REPLY
        assert server.count("GET", "/api/loads") == 2  # one login for each setting


@pytest.mark.parametrize("cert, words", [("selfsigned", "self-signed certificate"), ("wronghost", "IP address mismatch")])
def test_tls_untrusted_certificate_and_wrong_host_fail_clearly(cert: str, words: str) -> None:
    with mock_server.serve_in_thread(certfile=str(TESTDATA / f"{cert}.pem"), keyfile=str(TESTDATA / f"{cert}.key")) as server:
        raised, _ = failure(provider_for(server.url), ssl=trusting_test_ca())
        default, _ = failure(provider_for(server.url))  # the system store trusts neither
    assert isinstance(raised, fakegpt.TLSError) and words in str(raised)
    assert isinstance(default, fakegpt.TLSError)


def test_cli_honours_ssl_cert_file() -> None:
    with mock_server.serve_in_thread(certfile=str(TESTDATA / "server.pem"), keyfile=str(TESTDATA / "server.key")) as server:
        trusted = run_cli("--url", server.url, "Hello", env={"SSL_CERT_FILE": str(TESTDATA / "ca.pem")})
        untrusted = run_cli("--url", server.url, "Hello")
    assert trusted.returncode == 0 and trusted.stdout == FULL_REPLY + "\n"
    assert untrusted.returncode == 1 and "certificate" in untrusted.stderr


@pytest.mark.parametrize("no_proxy, bypassed", [
    ("*", True), ("example.com", True), (".example.com", True), ("*.example.com", True), ("api.example.com:443", True),
    ("*.other.com", False), ("*ample.com", False),
    ("api.example.com:8443", False), ("other.com", False), ("ample.com", False), ("", False),
])
def test_no_proxy_matching(no_proxy: str, bypassed: bool) -> None:
    assert fakegpt._bypasses_proxy(fakegpt._Endpoint("https", "api.example.com", 443), no_proxy) is bypassed


@pytest.mark.parametrize("url, no_proxy, bypassed", [
    # As curl, Go and requests read NO_PROXY: a network in CIDR form holds an address.
    ("http://127.0.0.1:8080", "localhost,127.0.0.0/8", True), ("http://10.1.2.3", "10.0.0.0/8", True),
    ("http://10.1.2.3", "10.0.0.0/16", False), ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
    ("http://127.0.0.1:8080", "127.0.0.1:9", False), ("http://127.0.0.1", "::1/128,127.0.0.1/33", False),
    ("http://[::1]:8443", "[::1]:8443", True), ("http://[::1]:8443", "[::1]", True), ("http://[::1]", "::1", True),
    ("http://[::1]", "0:0:0:0:0:0:0:1", True), ("http://[fd00::5]", "fd00::/8", True), ("http://[::1]", "[::1]:9", False),
    ("http://[::1]", "127.0.0.0/8", False), ("http://example.com", "93.0.0.0/8", False),
])
def test_no_proxy_names_an_address_by_a_network_or_in_brackets(url: str, no_proxy: str, bypassed: bool) -> None:
    endpoint, _ = fakegpt._parse_url(url)
    assert fakegpt._bypasses_proxy(endpoint, no_proxy) is bypassed


@pytest.mark.parametrize("no_proxy, bypassed", [
    ("bücher.example", True), (".BÜCHER.example", True), ("xn--bcher-kva.example", True), ("bucher.example", False),
    ("a..b,bücher.example", True), ("\u2024.example", False),
])
def test_no_proxy_names_an_internationalized_host_either_way(no_proxy: str, bypassed: bool) -> None:
    endpoint, _ = fakegpt._parse_url("https://api.bücher.example")
    assert endpoint.host == "api.xn--bcher-kva.example"
    assert fakegpt._bypasses_proxy(endpoint, no_proxy) is bypassed


# ---------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------



SECRET_FORMS = [lambda v: v, lambda v: json.dumps(v)[1:-1], lambda v: v.replace("/", "\\/"), lambda v: urllib.parse.quote(v, safe="")]


@PROPERTY
@given(st.integers(0, 700), st.sampled_from(range(4)), st.sampled_from(["json", "html", "text"]), st.integers(400, 599))
def test_property_a_secret_anywhere_in_an_error_body_is_never_shown(at: int, form: int, kind: str, status: int) -> None:
    secret = "tok/" + SENTINEL + "+="
    shown = SECRET_FORMS[form](secret)
    filler = "x " * 400
    text = filler[:at] + " " + shown + " " + filler[at:]
    body = {"json": '{"detail": "' + text + '"}',  # as a server writes it: the form stands in the JSON
            "html": f"<html><title>{text}</title></html>", "text": text}[kind].encode()
    head = Response(status, "", (("content-type", "text/html" if kind == "html" else "application/json"),))
    error = fakegpt._status_error(head, body, what="POST x", redact=[secret])
    for value in (str(error), error.detail, error.body):
        assert SENTINEL not in value and shown not in value


def test_a_short_secret_does_not_eat_words() -> None:
    assert fakegpt._redact("Something went wrong: t", ["t"]) == "Something went wrong: ***"
    assert fakegpt._redact("token=abc123;", ["abc123"]) == "token=***;"


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n<p>Your token " + SENTINEL.encode() + b" was used</p>",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + json.dumps({"detail": f"bad token {SENTINEL}"}).encode(),
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: " + json.dumps({"error": f"token {SENTINEL}"}).encode() + b"\n\n",
])
def test_a_secret_echoed_in_a_200_is_never_shown(response: bytes) -> None:
    with thread_server(answering(response)) as (host, port):
        raised, _ = failure(provider_for(f"http://{host}:{port}"), access_token=SENTINEL)
    assert SENTINEL not in str(raised) and SENTINEL not in repr(vars(raised))


def test_proxy_credentials_are_never_shown_in_any_form() -> None:
    password = "pr0xy-p@ss/word"
    basic = base64.b64encode(f"user:{password}".encode()).decode()
    page = f"<html><title>denied for user:{password} ({basic}) {urllib.parse.quote(password, safe='')}</title></html>".encode()
    with thread_server(answering(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(page), page))) as (host, port):
        proxy = f"http://user:{urllib.parse.quote(password, safe='')}@{host}:{port}"
        raised, _ = failure(provider_for("http://127.0.0.1:9"), proxy=proxy, access_token="token-1")
    shown = str(raised) + repr(vars(raised))
    assert password not in shown and basic not in shown and urllib.parse.quote(password, safe="") not in shown
    with pytest.raises(fakegpt.UsageError) as caught:
        FakeGpt.stream("", USER, url=f"ftp://user:{password}@example.com")
    assert password not in str(caught.value)


def test_secrets_never_appear_in_logs_errors_repr_or_cli_output(caplog: pytest.LogCaptureFixture) -> None:
    proxy = LoopbackProxy("user:PROXY-PASSWORD-77")
    shown: List[str] = []
    with mock_server.serve_in_thread(access_token=SENTINEL) as server, thread_server(proxy.handle) as (host, port):
        provider = provider_for(server.url)
        proxy_url = f"http://user:PROXY-PASSWORD-77@{host}:{port}"
        with caplog.at_level(logging.DEBUG, logger="fakegpt"):
            pieces_of(provider, proxy=proxy_url)
            for fault in ("status:429:3", "status:500", "status:401", "cut:5", "error_event:2", "expired200"):
                server.fail_next(fault, times=2)  # a token failure is retried once
                raised, _ = failure(provider, proxy=proxy_url)
                shown += [str(raised), repr(raised), str(vars(raised))]
        assert provider._access_token == SENTINEL and provider._cookie_jar is not None
        credential = next(cookie.value for cookie in provider._cookie_jar)
        shown += [record.getMessage() for record in caplog.records]
        shown += [repr(provider), repr(fakegpt._Proxy(proxy_url)), repr(provider.stream("", USER, proxy=proxy_url))]
        cli = run_cli("--verbose", "--url", server.url, "--proxy", proxy_url, "[[fault status:500]] Hello")
        shown += [cli.stdout, cli.stderr]
    assert any("POST" in line for line in shown)  # the requests were logged
    assert "fakegpt: POST" in cli.stderr and cli.returncode == 1
    for secret in (SENTINEL, credential, "PROXY-PASSWORD-77"):
        assert not [text for text in shown if secret in text]


def test_error_bodies_that_echo_a_secret_are_redacted() -> None:
    head = Response(400, "Bad Request", (("content-type", "application/json"),))
    error = fakegpt._status_error(head, json.dumps({"detail": f"bad token {SENTINEL}"}).encode(), what="POST x", redact=[SENTINEL])
    assert SENTINEL not in str(error) and SENTINEL not in error.detail and SENTINEL not in error.body
    assert "bad token ***" in str(error)


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


def test_cli_mock_hello_is_the_readme_first_command() -> None:
    result = run_cli("--mock", "Hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == FULL_REPLY + "\n" and result.stderr == ""


def test_cli_streams_from_url_prompt_from_stdin_and_json(mock: mock_server.MockServer) -> None:
    assert run_cli("--url", mock.url, "Hello").stdout == FULL_REPLY + "\n"
    assert run_cli("--url", mock.url, input="Hello").stdout == FULL_REPLY + "\n"
    assert run_cli("--url", mock.url, "-", input="Hello").stdout == FULL_REPLY + "\n"
    assert run_cli("Hello", env={"FAKEGPT_URL": mock.url}).stdout == FULL_REPLY + "\n"
    lines = [json.loads(line) for line in run_cli("--url", mock.url, "--json", "Hello").stdout.splitlines()]
    assert "".join(line["delta"] for line in lines) == FULL_REPLY
    assert lines[-1]["finish_reason"] == "stop" and lines[-1]["conversation_id"]


def test_cli_profiles_tokens_from_a_file_or_the_environment_and_continuing(tmp_path: pathlib.Path) -> None:
    assert run_cli("--mock", "--profile", "backend-api", "Hello").stdout == FULL_REPLY + "\n"
    with mock_server.serve_in_thread(profile="backend-api", access_token=SENTINEL) as server:
        token_file = tmp_path / "token"
        token_file.write_text(SENTINEL + "\n")
        result = run_cli("--url", server.url, "--profile", "backend-api", "--access-token-file", str(token_file),
                         "--json", "--verbose", "Hello")
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert "".join(line["delta"] for line in lines) == FULL_REPLY and SENTINEL not in result.stdout + result.stderr
        ids = lines[-1]["conversation_id"], lines[-1]["message_id"]
        follow_up = run_cli("--url", server.url, "--profile", "backend-api", "--conversation-id", ids[0],
                            "--parent-message-id", ids[1], "And then?", env={"FAKEGPT_ACCESS_TOKEN": SENTINEL})
        assert follow_up.stdout.startswith("Turn 2: before, you said “Hello”.")
    missing = run_cli("--url", "http://127.0.0.1:9", "--profile", "backend-api", "Hi", env={"FAKEGPT_ACCESS_TOKEN": ""})
    assert missing.returncode == 2 and "--access-token-file" in missing.stderr
    plain = run_cli("--url", "http://127.0.0.1:9", "--access-token", SENTINEL, "Hi")
    assert plain.returncode == 2 and "unrecognized arguments" in plain.stderr  # no abbreviation of --access-token-file
    unreadable = run_cli("--url", "http://127.0.0.1:9", "--access-token-file", str(tmp_path / "none"), "Hi")
    assert unreadable.returncode == 2 and "cannot read the access token file" in unreadable.stderr


@pytest.mark.parametrize("bad", ["two\nlines", "sp ace", "n\u00e9", "nul\x00"])
def test_a_bad_access_token_is_named_by_where_it_came_from(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, bad: str,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{SENTINEL}{bad}{SENTINEL}\n", encoding="utf-8")
    from_file = run_cli("--url", "http://127.0.0.1:9", "--access-token-file", str(token_file), "Hi")
    assert from_file.returncode == 2 and from_file.stderr == (
        f"fakegpt: error: the access token in {token_file} must be one line of printable ASCII without spaces\n")
    if "\x00" in bad:
        return  # an environment cannot hold a NUL
    for args in (["--url", "http://127.0.0.1:9"], ["--mock"]):
        from_environment = run_cli(*args, "Hi", env={"FAKEGPT_ACCESS_TOKEN": f"{SENTINEL}{bad}"})
        assert from_environment.returncode == 2 and from_environment.stderr == (
            "fakegpt: error: FAKEGPT_ACCESS_TOKEN must be printable ASCII without spaces\n")
    monkeypatch.setenv("FAKEGPT_ACCESS_TOKEN", f"{SENTINEL}{bad}")
    raised, _ = failure(FakeGpt.isolated("http://127.0.0.1:9"))
    assert isinstance(raised, fakegpt.UsageError) and str(raised).startswith("FAKEGPT_ACCESS_TOKEN must be")


def test_cli_continues_a_max_tokens_reply(tmp_path: pathlib.Path) -> None:
    with mock_server.serve_in_thread(max_tokens=30) as server:
        assert run_cli("--url", server.url, "Hello").stdout == FULL_REPLY + "\n"
        assert server.count("POST", "/api/conversation") == -(-len(FULL_REPLY) // 30)


def test_cli_output_is_flushed_per_piece(mock: mock_server.MockServer) -> None:
    with subprocess.Popen([sys.executable, "-m", "fakegpt", "--url", mock.url, "[[fault pause_after:2:3]] Hi"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE,
                          env={**os.environ, "PYTHONPATH": str(HERE)}) as process:
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 2.5)
            assert ready and os.read(process.stdout.fileno(), 100).decode().startswith("Прив")
        finally:
            process.kill()


@pytest.mark.parametrize("args, code, words", [
    (["--url", "ftp://x", "Hi"], 2, "http:// or https://"),
    (["--timeout", "0", "Hi"], 2, "--timeout must be a positive number of seconds"),
    (["--timeout", "inf", "Hi"], 2, "--timeout must be a positive number of seconds"),
    (["--timeout", "nan", "Hi"], 2, "--timeout must be a positive number of seconds"),
    (["--proxy", "socks5://127.0.0.1:9", "--mock", "Hi"], 2, "socks5"),
    (["--mock", ""], 2, "empty"),
    (["--no-such-flag"], 2, "unrecognized"),
    (["--mock", "--retries", "0", "[[fault status:429:7]] Hi"], 1, "HTTP 429"),
    (["--mock", "[[fault cut:5]] Hi"], 1, "cut off after"),
])
def test_cli_errors_are_one_line_without_traceback(args: List[str], code: int, words: str) -> None:
    result = run_cli(*args)
    assert result.returncode == code and words in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("fakegpt: error")]) <= 1


def test_cli_unreachable_upstream_is_one_line_and_the_default_url_points_to_mock() -> None:
    with refused_port() as port:
        result = run_cli("--url", f"http://127.0.0.1:{port}", "Hi")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "cannot connect" in result.stderr
    hint = fakegpt._explain(fakegpt.ConnectError("cannot resolve the host name"), fakegpt.DEFAULT_URL)
    assert "shut down" in hint and "--mock" in hint and "--url" in hint


def test_cli_hints_at_the_other_profile_when_the_upstream_has_no_such_route() -> None:
    with mock_server.MockServer(profile="backend-api") as gateway, mock_server.MockServer() as shared:
        login_missing = run_cli("--url", gateway.url, "Hi")
        conversation_missing = run_cli("--url", shared.url, "--profile", "backend-api", "Hi",
                                       env={"FAKEGPT_ACCESS_TOKEN": shared.access_token})
        unknown = run_cli("--url", shared.url, "--conversation-id", "no-such-conversation", "Hi")
    assert login_missing.returncode == 1 and "HTTP 404" in login_missing.stderr
    assert "use --profile backend-api and its access token" in login_missing.stderr
    assert conversation_missing.returncode == 1 and "use --profile shared" in conversation_missing.stderr
    assert unknown.returncode == 1 and "not found" in unknown.stderr and "--profile" not in unknown.stderr


def test_cli_version_and_help() -> None:
    assert run_cli("--version").stdout.strip() == f"fakegpt {fakegpt.__version__}"
    help_text = run_cli("--help").stdout
    for flag in ("--mock", "--url", "--proxy", "--model", "--timeout", "--json", "--verbose", "exit codes"):
        assert flag in help_text


def test_the_command_leaves_its_objects_out_of_the_last_collection() -> None:
    # The entry points (`fakegpt`, `python -m fakegpt`) freeze the collector's objects once
    # main returns, so the exit does not walk them; main alone, as a library calls it, not.
    script = ("import gc, runpy, sys\n"
              "before = gc.get_freeze_count()\n"
              "run, sys.argv = sys.argv[1], ['fakegpt'] + sys.argv[2:]\n"
              "try:\n"
              "    eval(run)\n"
              "except SystemExit as exit:\n"
              "    print(exit.code, gc.get_freeze_count() - before)\n")
    # The module run as a script, and the installed package's __main__ (its fakegpt is this one).
    for run in ("runpy.run_module('fakegpt', run_name='__main__')",
                "runpy.run_path('packaging/fakegpt/__main__.py', run_name='__main__')"):
        for args in (["--version"], ["--timeout", "0", "Hi"]):
            output = subprocess.run([sys.executable, "-c", script, run, *args], capture_output=True, text=True,
                                    cwd=HERE, check=True, env={**os.environ, "PYTHONPATH": str(HERE)}).stdout
            code, frozen = output.split()[-2:]
            assert code == ("0" if args == ["--version"] else "2") and int(frozen) > 1000
    plain = ("import gc, fakegpt\n"
             "before = gc.get_freeze_count()\n"
             "print(fakegpt.main(['--timeout', '0', 'Hi']), gc.get_freeze_count() - before)\n")
    output = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, cwd=HERE, check=True,
                            env={**os.environ, "PYTHONPATH": str(HERE)}).stdout
    assert output.split() == ["2", "0"]
    if sys.version_info >= (3, 10):
        scripts = list(importlib.metadata.entry_points(group="console_scripts", name="fakegpt"))
    else:
        scripts = [entry for entry in importlib.metadata.entry_points()["console_scripts"] if entry.name == "fakegpt"]
    assert {entry.value for entry in scripts} == {"fakegpt:command"}


def test_cli_ctrl_c_exits_130_without_traceback(mock: mock_server.MockServer) -> None:
    process = subprocess.Popen([sys.executable, "-m", "fakegpt", "--url", mock.url, "[[fault hang_after:4]] Hi"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE)})
    assert process.stdout is not None
    select.select([process.stdout], [], [], 10)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130 and b"Traceback" not in stderr


def read_until(fd: int, marker: bytes, timeout: float = 10) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise AssertionError(f"{marker!r} not shown; screen: {seen.decode(errors='replace')!r}")
        seen += os.read(fd, 4096)
    return seen


# Run in the child: the terminal on its standard input becomes its controlling terminal
# (the child leads a session of its own), so that Ctrl-C there signals it; then the command.
TAKE_THE_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.chdir(sys.argv[1]); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def spawn_on_a_terminal(args: Sequence[str], env: Dict[str, str]) -> Tuple[int, int]:
    """`python -m fakegpt *args` on a new pseudo-terminal, its controlling terminal: the
    child's id and the terminal's master end. Spawned, not forked: a fork of a process
    that runs threads (pytest-xdist's, the mock's) can deadlock the child."""
    master, slave = pty.openpty()  # neither is inherited: the child gets the slave as 0, 1 and 2
    try:
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-c", TAKE_THE_TERMINAL, str(HERE), sys.executable, "-m", "fakegpt", *args],
            env, file_actions=[(os.POSIX_SPAWN_DUP2, slave, fd) for fd in (0, 1, 2)], setsid=True,
        )
    finally:
        os.close(slave)
    return pid, master


def test_interactive_chat_in_a_real_terminal() -> None:
    with mock_server.serve_in_thread() as mock:
        pid, fd = spawn_on_a_terminal(["--url", mock.url], {**os.environ, "PYTHONPATH": str(HERE), "NO_COLOR": "1"})
        try:
            assert b"Ctrl-D quits" in read_until(fd, b"you> ")
            os.write(fd, b"Hello\n")
            screen = read_until(fd, b"you> ").decode()
            assert FULL_REPLY in screen.replace("\r\n", "\n")
            os.write(fd, b"[[fault delay_events:0.3]] slow\n")
            read_until(fd, "Привет".encode())
            os.write(fd, b"\x03")  # Ctrl-C stops this reply only
            assert b"[reply stopped]" in read_until(fd, b"you> ")
            os.write(fd, b"Again\n")
            read_until(fd, b"you> ")
            os.write(fd, b"\x04")  # Ctrl-D quits
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            os.close(fd)
    turns = [json.loads(r.body) for r in mock.requests if r.path == "/api/conversation"]
    assert "conversation_id" not in turns[0]
    assert turns[-1]["conversation_id"] and turns[-1]["messages"][0]["content"]["parts"] == ["Again"]
    assert turns[1]["parent_message_id"] != turns[0]["parent_message_id"]


@pytest.fixture
def mock_process() -> Iterator[str]:
    """A mock upstream in a process of its own (`python -m mock_server`), as the chat's users run it."""
    process = subprocess.Popen([sys.executable, "-m", "mock_server", "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=HERE)
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip()
    finally:
        process.terminate()
        process.communicate(timeout=10)


class Terminal:
    """fakegpt's chat on a pseudo-terminal: keys in, the screen out."""

    def __init__(self, url: str, *extra: str, env: Optional[Dict[str, str]] = None) -> None:
        self.pid, self.fd = spawn_on_a_terminal(
            ["--url", url, *extra], {**os.environ, "PYTHONPATH": str(HERE), "TERM": "xterm", **(env or {})})
        self.screen = ""

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def until(self, marker: str, timeout: float = 10) -> str:
        """The screen from now until `marker` shows (line endings as LF)."""
        seen = read_until(self.fd, marker.encode(), timeout).decode(errors="replace").replace("\r\n", "\n")
        self.screen += seen
        return seen

    def close(self) -> int:
        self.type("\x04")  # Ctrl-D
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, ChildProcessError, OSError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)


def test_fakegpt_chat_opens_the_chat_as_llm_chat_does(mock_process: str, tmp_path: pathlib.Path) -> None:
    term = Terminal(mock_process, "chat", env={"XDG_STATE_HOME": str(tmp_path / "state")})
    try:
        assert "/help" in term.until("you> ")  # the banner: a chat, not a reply to "chat"
        term.type("Hello\n")
        assert mock_server.default_reply("Hello") in term.until("you> ")
        assert term.close() == 0
    finally:
        term.kill()
    assert "You said “chat”" not in term.screen


def test_fakegpt_double_dash_chat_sends_the_word_and_chat_needs_a_terminal(mock: mock_server.MockServer) -> None:
    sent = run_cli("--url", mock.url, "--no-session-cache", "--", "chat", input="")
    assert sent.returncode == 0 and sent.stdout == mock_server.default_reply("chat") + "\n"
    piped = run_cli("--url", mock.url, "chat", input="Hello\n")  # standard input not a terminal
    assert piped.returncode == 2 and piped.stdout == ""
    assert "fakegpt chat needs a terminal; to send the word chat as a prompt: fakegpt -- chat" in piped.stderr
    assert not [r for r in mock.requests if r.path == "/api/conversation" and b'"Hello"' in r.body]


def test_chat_history_multiline_and_commands(mock_process: str, tmp_path: pathlib.Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    term = Terminal(mock_process, env=env)
    try:
        banner = term.until("you> ")
        assert mock_process in banner and "profile shared" in banner and f"model {fakegpt.DEFAULT_MODEL}" in banner
        assert "/help" in banner
        term.type("Hello\n")
        assert mock_server.default_reply("Hello") in term.until("you> ")
        assert "[Hello]" in term.screen  # the title, once the upstream gives one
        term.type("\x1b[A\n")  # Up: the last line again
        assert "Turn 2: before, you said “Hello”." in term.until("you> ")
        term.type('"""\nline one\nline two\n"""\n')
        assert "line one\nline two" in term.until("you> ")
        term.type("first \\\nsecond\n")
        assert "first \nsecond" in term.until("you> ")
        term.type("/help\n")
        assert "/save FILE" in term.until("you> ")
        term.type("/unknown\n")
        assert "unknown command /unknown" in term.until("you> ")
        term.type("//slash\n")
        assert "You said “/slash”" in term.until("you> ")
        term.type("/retry\n")
        assert "You said “/slash”" in term.until("you> ")
        term.type(f"/save {tmp_path / 'chat.md'}\n")
        assert "saved" in term.until("you> ")
        term.type(f"/save {tmp_path / 'chat.json'}\n")
        term.until("you> ")
        term.type("/new\n")
        term.until("you> ")
        term.type("After new\n")
        assert mock_server.default_reply("After new") in term.until("you> ")  # a first turn again
        assert term.close() == 0  # Ctrl-D
    finally:
        term.kill()
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 5 and saved["title"] == "Hello"
    assert saved["messages"][-2]["content"] == "/slash" and saved["messages"][-4]["content"] == "first \nsecond"  # /retry
    markdown = (tmp_path / "chat.md").read_text()
    assert markdown.startswith("# Hello\n") and "**You:**\n\nline one\nline two" in markdown
    history = tmp_path / "state" / "fakegpt" / "history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600 and "Hello" in history.read_text()
    again = Terminal(mock_process, env=env)  # the history outlives the chat
    try:
        again.until("you> ")
        again.type("\x1b[A\n")  # Up: the last line of the chat before
        assert mock_server.default_reply("After new") in again.until("you> ")
        again.type("/quit\n")
        _, status = os.waitpid(again.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        again.kill()
    none = Terminal(mock_process, "--no-history", env={"XDG_STATE_HOME": str(tmp_path / "other")})
    try:
        none.until("you> ")
        none.type("Hi\n")
        none.until("you> ")
        assert none.close() == 0
    finally:
        none.kill()
    assert not (tmp_path / "other").exists()


def test_chat_ctrl_c_keeps_the_text_and_the_next_turn_answers_the_last_complete_reply(mock_process: str, tmp_path: pathlib.Path) -> None:
    term = Terminal(mock_process, "--no-history")
    try:
        term.until("you> ")
        term.type("First\n")
        term.until("you> ")
        term.type("[[fault delay_events:0.3]] slow\n")
        assert "waiting for the upstream" in term.until("waiting for the upstream")  # a sign while nothing came
        term.until("Привет")
        term.type("\x03")  # Ctrl-C stops this reply only
        assert "[reply stopped]" in term.until("you> ")
        term.type("Next\n")
        assert "Turn 2: before, you said “First”." in term.until("you> ")  # not the stopped one
        term.type(f"/save {tmp_path / 'chat.md'}\n")
        term.until("you> ")
        term.type("/exit\n")
        _, status = os.waitpid(term.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        term.kill()
    plain = Terminal(mock_process, "--no-history")
    try:
        plain.until("you> ")
        plain.type("quit\n")  # a plain word leaves too, and is not sent
        _, status = os.waitpid(plain.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        plain.kill()
    markdown = (tmp_path / "chat.md").read_text()
    stopped = markdown.split("**Assistant (stopped):**\n\n")[1].split("\n")[0]
    assert stopped.startswith("Turn 2: before, you said “First”. Привет") and not stopped.endswith("fine.")


def test_chat_ctrl_d_inside_a_block_or_a_continued_line_sends_what_was_typed(mock_process: str) -> None:
    term = Terminal(mock_process, "--no-history")
    try:
        term.until("you> ")
        term.type('"""\nblock one\nblock two\n\x04')  # Ctrl-D where the closing """ would be
        assert "You said “block one\nblock two”" in term.until("you> ")
        term.type("first \\\n\x04")  # Ctrl-D after a line that goes on
        assert "You said “first ”" in term.until("you> ")
        term.type('"""\n\x04')  # an empty block: nothing to send, and the chat goes on
        term.until("you> ")
        term.type("Last\n")
        assert "Turn 3: before, you said “first ”" in term.until("you> ")
        assert term.close() == 0  # Ctrl-D at the prompt quits
    finally:
        term.kill()


def test_chat_save_never_replaces_a_file_it_did_not_write(mock_process: str, tmp_path: pathlib.Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    term = Terminal(mock_process, "--no-history")
    try:
        term.until("you> ")
        term.type("Hello\n")
        term.until("you> ")
        term.type(f"/save {notes}\n")
        assert "exists already" in term.until("you> ")
        term.type(f"/save {tmp_path / 'chat.md'}\n")
        assert "saved 2 messages" in term.until("you> ")
        term.type("More\n")
        term.until("you> ")
        term.type(f"/save {tmp_path / 'chat.md'}\n")  # this chat's own file: brought up to date
        assert "saved 4 messages" in term.until("you> ")
        assert term.close() == 0
    finally:
        term.kill()
    assert notes.read_text() == "my notes\n"
    assert (tmp_path / "chat.md").read_text().count("**You:**") == 2


def test_chat_with_options_a_call_refuses_says_so_before_it_begins(mock_process: str) -> None:
    environ = {name: value for name, value in os.environ.items() if name != "FAKEGPT_ACCESS_TOKEN"}
    pid, fd = spawn_on_a_terminal(["--url", mock_process, "--profile", "backend-api", "--no-history"],
                                  {**environ, "PYTHONPATH": str(HERE)})
    try:
        screen = read_until(fd, b"needs an access token").decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 2 and "you> " not in screen
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_chat_says_to_start_anew_when_the_upstream_does_not_know_the_conversation(mock_process: str) -> None:
    unknown = str(uuid.uuid4())
    term = Terminal(mock_process, "--no-history", "--conversation-id", unknown, "--parent-message-id", unknown)
    try:
        term.until("you> ")
        term.type("Hello\n")
        screen = term.until("you> ")
        assert "HTTP 404" in screen and "/new starts a new one" in screen
        term.type("/new\n")
        term.until("you> ")
        term.type("Hello\n")
        assert mock_server.default_reply("Hello") in term.until("you> ")
        assert term.close() == 0
    finally:
        term.kill()


def test_a_retried_answer_takes_the_place_of_the_earlier_one_and_a_stopped_retry_leaves_it(
        mock_process: str, tmp_path: pathlib.Path) -> None:
    term = Terminal(mock_process, "--no-history")
    try:
        term.until("you> ")
        term.type("[[step 30]] [[fault delay_events:0.2]] Slow\n")
        term.until("you> ")
        term.type("/retry\n")
        term.until("Привет")
        term.type("\x03")  # the answer asked again is stopped: the first one stands
        assert "[reply stopped]" in term.until("you> ")
        term.type("Next\n")
        assert "Turn 2: before, you said “[[step 30]] [[fault delay_events:0.2]] Slow”." in term.until("you> ")
        term.type("/retry\n")
        assert "Turn 2: before, you said “[[step 30]]" in term.until("you> ")
        term.type(f"/save {tmp_path / 'chat.json'}\n")
        assert "saved 6 messages" in term.until("you> ")
        term.type("/exit\n")
        _, status = os.waitpid(term.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        term.kill()
    messages = json.loads((tmp_path / "chat.json").read_text())["messages"]
    slow = "[[step 30]] [[fault delay_events:0.2]] Slow"
    assert [(m["role"], m["content"] if m["role"] == "user" else m.get("stopped", False)) for m in messages] == [
        ("user", slow), ("assistant", False), ("user", slow), ("assistant", True), ("user", "Next"), ("assistant", False)]
    assert messages[1]["content"] == mock_server.default_reply(slow)  # the complete first answer, kept
    assert messages[-1]["content"].startswith("Turn 2: before, you said")  # the retried "Next", once


def test_chat_turns_share_a_connection_and_a_stopped_turn_closes_its_own(mock_process: str) -> None:
    term = Terminal(mock_process, "--no-history", "--verbose")
    try:
        term.until("you> ")
        for prompt in ("First", "Second", "Third"):
            term.type(prompt + "\n")
            term.until("you> ")
        assert term.screen.count("connected to 127.0.0.1") == 1  # the login's connection, for every turn
        term.type("[[fault delay_events:0.3]] slow\n")
        term.until("Привет")
        term.type("\x03")
        term.until("you> ")
        term.type("Next\n")
        assert "Turn 4: before, you said “Third”. Привет! You said “Next”." in term.until("you> ")
        assert term.screen.count("connected to 127.0.0.1") == 2  # the stopped turn's was not kept
        term.type("/exit\n")
        _, status = os.waitpid(term.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        term.kill()


def test_a_fifo_in_place_of_the_chat_history_does_not_hang_the_chat(mock_process: str, tmp_path: pathlib.Path) -> None:
    history = tmp_path / "state" / "fakegpt" / "history"
    history.parent.mkdir(parents=True)
    os.mkfifo(history)
    term = Terminal(mock_process, env={"XDG_STATE_HOME": str(tmp_path / "state")})
    try:
        term.until("you> ", timeout=5)
        term.type("Hello\n")
        assert FULL_REPLY in term.until("you> ", timeout=5)
        assert term.close() == 0 and stat.S_ISFIFO(history.stat().st_mode)  # left as it was
    finally:
        term.kill()


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_a_chat_line_that_is_not_text_is_refused_and_the_chat_goes_on(mock_process: str, errors: str) -> None:
    term = Terminal(mock_process, "--no-history", env={"PYTHONIOENCODING": f"utf-8:{errors}"})
    try:
        term.until("you> ")
        os.write(term.fd, b"bad \xff\xfe bytes\n")
        assert "the prompt is not utf-8 text (it holds the byte 0xFF)" in term.until("you> ")
        term.type("Hello\n")
        assert FULL_REPLY in term.until("you> ")
        assert "Traceback" not in term.screen
        assert term.close() == 0
    finally:
        term.kill()


def test_a_chat_turn_leaves_no_task_behind_for_the_next(caplog: pytest.LogCaptureFixture) -> None:
    turns = fakegpt._Turns()
    finished: List[str] = []

    async def leave_a_task() -> str:
        async def background() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                finished.append("cancelled")

        asyncio.ensure_future(background())
        await asyncio.sleep(0)
        return "turn"

    try:
        assert turns.run(leave_a_task()) == "turn"
        assert finished == ["cancelled"] and not asyncio.all_tasks(turns.loop)
    finally:
        turns.close()
    gc.collect()
    assert "destroyed but it is pending" not in caplog.text


@pytest.mark.parametrize("args, words", [
    (["--mock", "--url", "http://127.0.0.1:9", "Hi"], "--mock and --url exclude each other"),
    (["--url", "", "Hi"], "--url is empty"),
    (["--mock", "--conversation-id", "", "Hi"], "--conversation-id is empty (an unset shell variable?)"),
    (["--mock", "--conversation-id", "c1", "--parent-message-id", " ", "Hi"], "--parent-message-id is empty"),
    (["--mock", "--parent-message-id", "m1", "Hi"], "give --conversation-id too"),
])
def test_cli_url_and_conversation_mistakes_are_usage_errors(args: List[str], words: str) -> None:
    """An empty value (a shell variable not set) would start a new conversation unseen."""
    result = run_cli(*args)
    assert result.returncode == 2 and words in result.stderr and result.stdout == ""


def test_cli_one_shot_loose_ends(mock: mock_server.MockServer) -> None:
    assert run_cli("--url", mock.url, input="Hello\n").stdout == FULL_REPLY + "\n"
    assert mock.requests[-1].json()["messages"][0]["content"]["parts"] == ["Hello"]  # no trailing newline
    failed = run_cli("--url", mock.url, "--json", "--retries", "0", "[[fault status:500]] Hi")
    assert failed.returncode == 1 and json.loads(failed.stdout.splitlines()[-1]) == {
        "error": "POST /api/conversation: HTTP 500: Internal Server Error", "type": "HTTPStatusError"}
    assert "waiting" not in failed.stderr  # no sign when stderr is not a terminal
    verbose = run_cli("--url", mock.url, "--verbose", "Hi").stderr
    for words in ("connected to 127.0.0.1", "first piece after", "total", f"model {fakegpt.DEFAULT_MODEL}",
                  "finish stop", "conversation "):
        assert words in verbose, words


def test_cli_notes_a_max_tokens_finish() -> None:
    with mock_server.serve_in_thread(finish="max_tokens") as server:
        result = run_cli("--url", server.url, "Hi")
    assert result.returncode == 0 and "max_tokens" in result.stderr and result.stdout.startswith("Привет")


def test_https_to_a_plain_http_server_fails_at_once_saying_so(mock: mock_server.MockServer) -> None:
    started = time.monotonic()
    result = run_cli("--url", mock.url.replace("http://", "https://"), "--retries", "0", "Hi")
    assert result.returncode == 1 and "answered in plain HTTP, not TLS: use http://" in result.stderr
    assert time.monotonic() - started < 5


HOSTILE_UPSTREAM = r"""
import http.server, json
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.dumps({"detail": "bad \x1b]0;pwned\x07\x1b[2J news \x9b31m end"}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_port, flush=True)
server.serve_forever()
"""


def test_a_terminal_shows_server_text_without_control_characters() -> None:
    with subprocess.Popen([sys.executable, "-c", HOSTILE_UPSTREAM], stdout=subprocess.PIPE, text=True) as upstream:
        try:
            assert upstream.stdout is not None
            url = f"http://127.0.0.1:{upstream.stdout.readline().strip()}"
            term = Terminal(url, "--profile", "backend-api", "--retries", "0", "Hi", env={"FAKEGPT_ACCESS_TOKEN": "token-1"})
            try:
                screen = term.until("end")
                _, status = os.waitpid(term.pid, 0)
                assert os.waitstatus_to_exitcode(status) == 1
            finally:
                term.kill()
        finally:
            upstream.terminate()
    assert "HTTP 500: bad ]0;pwned[2J news 31m end" in screen  # the words, without what steers a terminal
    assert not any(sequence in screen for sequence in ("\x1b]", "\x07", "\x1b[2J", "\x9b"))


def test_a_tls_end_of_stream_during_the_handshake_says_why() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    with thread_server(hang_up) as (host, port):
        raised, _ = failure(provider_for(f"https://{host}:{port}"), access_token="token-1", retries=0)
    assert isinstance(raised, fakegpt.TransportError)
    reason = str(raised).rsplit(":", 1)[-1].strip()
    assert reason and reason != "None"


def test_the_cli_keeps_its_session_between_commands(mock: mock_server.MockServer, tmp_path: pathlib.Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FAKEGPT_NO_SESSION_CACHE": ""}
    assert run_cli("--url", mock.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
    assert run_cli("--url", mock.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
    assert mock.count("GET", "/api/loads") == 1  # the second command made no login
    kept = tmp_path / "cache" / "fakegpt" / "sessions.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    kept.chmod(0o644)  # copied or restored with looser modes: made the owner's alone when read
    assert run_cli("--url", mock.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and mock.count("GET", "/api/loads") == 1
    first = json.loads(kept.read_text())
    mock.expire_tokens()  # a token the upstream no longer takes: dropped, and a new login kept
    assert run_cli("--url", mock.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
    assert mock.count("GET", "/api/loads") == 2
    second = json.loads(kept.read_text())
    [(key, old)], [(_, new)] = first.items(), second.items()
    assert mock.url in key and old["access_token"] != new["access_token"]
    assert any(c["name"] == "credential" for c in new["cookies"])
    for off in ({"FAKEGPT_NO_SESSION_CACHE": "1"}, {"FAKEGPT_NO_SESSION_CACHE": "yes"}, {}):
        args = ["--url", mock.url, "Hello"] + ([] if off else ["--no-session-cache"])
        run_cli(*args, env={**env, **off})
    assert mock.count("GET", "/api/loads") == 5  # each of these logged in
    for on in ("0", "false", " No ", "off"):  # what a variable set to "no" says
        run_cli("--url", mock.url, "Hello", env={**env, "FAKEGPT_NO_SESSION_CACHE": on})
    assert mock.count("GET", "/api/loads") == 5  # each used the kept session


def test_a_login_after_a_refused_token_is_kept_even_when_it_gives_the_same_token(tmp_path: pathlib.Path) -> None:
    # A shared account's token is the account's: a login after the upstream refused it
    # (a token_expired sent by mistake, say) may give the same token back.
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FAKEGPT_NO_SESSION_CACHE": ""}
    with mock_server.serve_in_thread(access_token="the-shared-accounts-token") as mock:
        assert run_cli("--url", mock.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
        mock.expire_tokens()
        assert run_cli("--url", mock.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
        assert mock.count("GET", "/api/loads") == 2  # refused, then a new login
        [entry] = json.loads((tmp_path / "cache" / "fakegpt" / "sessions.json").read_text()).values()
        assert entry["access_token"] == "the-shared-accounts-token"
        assert run_cli("--url", mock.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
        assert mock.count("GET", "/api/loads") == 2  # the new login was kept


def test_each_login_is_kept_with_its_own_expiry(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kept = tmp_path / "fakegpt" / "sessions.json"
    # Sessions that end within the minute the client allows: each call logs in again, and
    # gets the same (the account's) token with a later expiry.
    with mock_server.serve_in_thread(access_token="the-shared-accounts-token", session_lifetime=30) as mock:
        provider = provider_for(mock.url)
        expiries = []
        for _ in range(2):
            assert "".join(pieces_of(provider, session_cache=True)) == FULL_REPLY
            [entry] = json.loads(kept.read_text()).values()
            expiries.append(entry["expires"])
            time.sleep(0.01)  # (the upstream says when to the millisecond)
        assert mock.count("GET", "/api/loads") == 2
    assert entry["access_token"] == "the-shared-accounts-token" and expiries[1] > expiries[0]


def test_cli_continue_takes_up_the_last_conversation_and_system_begins_one(
        mock: mock_server.MockServer, tmp_path: pathlib.Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    turns = lambda: [json.loads(r.body) for r in mock.requests if r.path == "/api/conversation"]  # noqa: E731
    nothing = run_cli("--url", mock.url, "-c", "Again", env=env)
    assert nothing.returncode == 2 and f"no earlier conversation with {mock.url} (profile shared)" in nothing.stderr
    assert run_cli("--url", mock.url, "-s", "Be brief.", "Hello", env=env).returncode == 0
    first = turns()[-1]
    assert first["messages"][0]["content"]["parts"] == ["System: Be brief.\nUser: Hello\nAssistant:"]
    kept = tmp_path / "state" / "fakegpt" / "conversations.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    [entry] = json.loads(kept.read_text()).values()
    assert entry["title"]  # the upstream named it
    second = run_cli("--url", mock.url + "/", "--continue", "And then?", env=env)  # the same upstream
    assert second.stdout.startswith("Turn 2: before, you said “System: Be brief.")
    assert turns()[-1]["conversation_id"] == entry["conversation_id"]
    assert turns()[-1]["parent_message_id"] == entry["message_id"]
    assert turns()[-1]["messages"][0]["content"]["parts"] == ["And then?"]  # no system prompt: it began already
    [later] = json.loads(kept.read_text()).values()
    assert later["conversation_id"] == entry["conversation_id"] and later["message_id"] != entry["message_id"]
    assert later["title"] == entry["title"]  # named once, kept
    assert run_cli("--url", mock.url, "--no-history", "Elsewhere", env=env).returncode == 0
    assert list(json.loads(kept.read_text()).values()) == [later]  # that one was not kept
    assert run_cli("--url", mock.url, "-c", "Third", env=env).stdout.startswith("Turn 3: before, you said “And then?”")
    other = run_cli("--url", mock.url, "--profile", "backend-api", "-c", "Hi", env={**env, "FAKEGPT_ACCESS_TOKEN": "t"})
    assert other.returncode == 2 and "(profile backend-api)" in other.stderr  # kept by profile and URL
    for args, words in [
        (["-c", "--conversation-id", "x"], "--continue and --conversation-id exclude each other"),
        (["-c", "-s", "Terse."], "--system begins a new conversation"),
        (["--conversation-id", "x", "--system", "Terse."], "--system begins a new conversation"),
        (["-s", " "], "--system is empty"),
    ]:
        result = run_cli("--url", mock.url, *args, "Hi", env=env)
        assert result.returncode == 2 and words in result.stderr, args
    assert run_cli("--mock", "-c", "Hi", env=env).returncode == 2


def test_chat_continues_the_last_conversation(mock_process: str, tmp_path: pathlib.Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    assert run_cli("--url", mock_process, "Hello", env=env).returncode == 0
    term = Terminal(mock_process, "-c", env=env)
    try:
        assert "[continuing “Hello”]" in term.until("you> ")
        term.type("More\n")
        assert "Turn 2: before, you said “Hello”." in term.until("you> ")
        assert term.close() == 0
    finally:
        term.kill()
    assert run_cli("--url", mock_process, "-c", "Last", env=env).stdout.startswith("Turn 3: before, you said “More”.")


def test_the_cli_does_not_use_a_kept_session_that_has_ended(tmp_path: pathlib.Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FAKEGPT_NO_SESSION_CACHE": ""}
    kept = tmp_path / "cache" / "fakegpt" / "sessions.json"
    with mock_server.serve_in_thread(session_lifetime=3600) as server:
        for _ in range(2):
            assert run_cli("--url", server.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
        assert server.count("POST", "/auth/login") == 1
        [entry] = json.loads(kept.read_text()).values()
        assert abs(entry["expires"] - (time.time() + 3600)) < 60
    with mock_server.serve_in_thread(session_lifetime=30) as server:
        for _ in range(2):
            assert run_cli("--url", server.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
        # Each command logged in: the kept session ends within a minute, so it was not
        # tried (no request refused).
        assert server.count("POST", "/auth/login") == 2 and server.count("POST", "/api/conversation") == 2


KEY = "shared {url} via direct"


@pytest.mark.parametrize("kept", [
    '{"KEY": {"access_token": "eyJkept", "cookies": 5}}',
    '{"KEY": {"access_token": "eyJkept", "cookies": {"name": "credential"}}}',
    '{"KEY": {"access_token": "eyJkept", "cookies": [5]}}',
    '{"KEY": {"access_token": "eyJkept", "cookies": [{"name": "credential", "value": "v", "domain": "127.0.0.1",'
    ' "domain_specified": false, "path": "/", "secure": false, "expires": "soon"}]}}',
    '{"KEY": {"access_token": "eyJkept", "cookies": [{"name": 5, "value": {}, "domain": "127.0.0.1",'
    ' "domain_specified": false, "path": "/", "secure": false, "expires": null}]}}',
    '{"KEY": {"access_token": "eyJkept", "cookies": [{"name": "a", "value": "b", "domain": "127.0.0.1",'
    ' "domain_specified": "no", "path": 5, "secure": false, "expires": 1e400}]}}',
    '{"KEY": {"access_token": ["eyJkept"]}}',
    '{"KEY": {"access_token": "eyJkept", "expires": "2089-08-08T23:59:59.999Z", "cookies": []}}',
    '{"KEY": {"access_token": "eyJkept", "expires": NaN, "cookies": []}}',
    '{"KEY": "eyJkept"}',
    '[1, 2]',
    'not JSON',
    '{"KEY": {"access_token": "eyJ',
])
def test_a_session_file_the_cli_did_not_write_means_a_new_login(mock: mock_server.MockServer, tmp_path: pathlib.Path, kept: str) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FAKEGPT_NO_SESSION_CACHE": ""}
    path = tmp_path / "cache" / "fakegpt" / "sessions.json"
    path.parent.mkdir(parents=True)
    path.write_text(kept.replace("KEY", KEY.format(url=mock.url)))
    first = run_cli("--url", mock.url, "Hello", env=env)
    assert (first.returncode, first.stdout, first.stderr) == (0, FULL_REPLY + "\n", "")
    assert mock.count("GET", "/api/loads") == 1  # the kept entry was not used
    assert mock.count("POST", "/api/conversation") == 1  # (not even tried)
    assert run_cli("--url", mock.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
    assert mock.count("GET", "/api/loads") == 1  # and the file now keeps the new login


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="only root can give a file to another user")
def test_a_session_file_someone_else_owns_is_not_used(mock: mock_server.MockServer, tmp_path: pathlib.Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FAKEGPT_NO_SESSION_CACHE": ""}
    assert run_cli("--url", mock.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
    kept = tmp_path / "cache" / "fakegpt" / "sessions.json"
    os.chown(kept, 65534, 65534)
    assert run_cli("--url", mock.url, "Hello", env=env).stdout == FULL_REPLY + "\n"
    assert mock.count("GET", "/api/loads") == 2 and kept.stat().st_uid == 0  # a new login, kept in a file of its own


def test_a_fifo_in_place_of_the_session_file_does_not_hang_the_command(mock: mock_server.MockServer, tmp_path: pathlib.Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FAKEGPT_NO_SESSION_CACHE": ""}
    path = tmp_path / "cache" / "fakegpt" / "sessions.json"
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    result = run_cli("--url", mock.url, "Hello", env=env, timeout=15)
    assert (result.returncode, result.stdout) == (0, FULL_REPLY + "\n")
    assert stat.S_ISREG(path.stat().st_mode) and mock.count("GET", "/api/loads") == 1  # replaced by a kept login


def test_a_relative_xdg_directory_is_ignored(mock: mock_server.MockServer, tmp_path: pathlib.Path) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(HERE), "HOME": str(home), "XDG_CACHE_HOME": "relative-cache",
           "XDG_STATE_HOME": "relative-state", "FAKEGPT_NO_SESSION_CACHE": ""}
    result = subprocess.run([sys.executable, "-m", "fakegpt", "--url", mock.url, "Hello"], capture_output=True,
                            text=True, encoding="utf-8", env=env, cwd=work, timeout=30)
    assert result.stdout == FULL_REPLY + "\n"
    assert list(work.iterdir()) == []  # as the XDG specification says: a relative path is not a base
    assert (home / ".cache" / "fakegpt" / "sessions.json").is_file()


def test_without_a_home_directory_nothing_is_kept_where_the_command_runs(
    mock: mock_server.MockServer, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No home (here a relative $HOME, as "~" is when the account has no entry) and no XDG
    # variables: the session and the chat's history are not kept, rather than written
    # under the working directory, where a token could end up in a repository.
    env = {name: value for name, value in os.environ.items() if not name.startswith("XDG_")}
    env.update({"PYTHONPATH": str(HERE), "HOME": "relative-home", "FAKEGPT_NO_SESSION_CACHE": ""})
    result = subprocess.run([sys.executable, "-m", "fakegpt", "--url", mock.url, "Hello"], capture_output=True,
                            text=True, encoding="utf-8", env=env, cwd=tmp_path, timeout=30)
    assert (result.returncode, result.stdout) == (0, FULL_REPLY + "\n")
    assert list(tmp_path.iterdir()) == []
    for name in ("XDG_STATE_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", "relative-home")
    assert fakegpt._state_directory() is None and fakegpt._SessionFile.default() is None


def test_a_kept_session_never_holds_a_proxy_password(mock: mock_server.MockServer, tmp_path: pathlib.Path) -> None:
    proxy = LoopbackProxy("user:pr0xy-secret")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FAKEGPT_NO_SESSION_CACHE": ""}
    with thread_server(proxy.handle) as (host, port):
        result = run_cli("--url", mock.url, "--proxy", f"http://user:pr0xy-secret@{host}:{port}", "Hello", env=env)
    assert result.stdout == FULL_REPLY + "\n"
    kept = (tmp_path / "cache" / "fakegpt" / "sessions.json").read_text()
    assert "pr0xy-secret" not in kept and base64.b64encode(b"user:pr0xy-secret").decode() not in kept
    assert f"via http://{host}:{port}" in kept  # the proxy is known by its address


def test_the_library_keeps_a_session_only_when_asked(mock: mock_server.MockServer, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pieces_of(provider_for(mock.url))
    assert not (tmp_path / "fakegpt").exists()  # off by default
    pieces_of(provider_for(mock.url), session_cache=True)
    assert "".join(pieces_of(provider_for(mock.url), session_cache=True)) == FULL_REPLY  # a new class: no session in memory
    assert mock.count("GET", "/api/loads") == 2  # the third call used the kept one


def test_the_cli_writes_the_text_once_for_each_read_not_for_each_event(mock: mock_server.MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    class Out(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    prompt = "[[chars 2000]] [[step 4]] a reply of 500 events, sent in a few writes"
    for json_lines in (False, True):
        out = Out()
        monkeypatch.setattr(sys, "stdout", out)
        assert fakegpt.main(["--url", mock.url, "--no-session-cache", *(["--json"] if json_lines else []), prompt]) == 0
        if json_lines:  # an event a line, as before
            deltas = [json.loads(line)["delta"] for line in out.getvalue().splitlines()]
            assert "".join(deltas) == mock_server.default_reply(prompt) and len(deltas) >= 500
        else:
            assert out.getvalue() == mock_server.default_reply(prompt) + "\n"
            assert out.writes <= 20  # one for each read of the socket, and the last line's end


def test_a_prompt_that_is_not_text_is_a_usage_error_before_any_request(mock: mock_server.MockServer) -> None:
    # Bytes that are not UTF-8, from the command line (Python keeps them as surrogates) or
    # from standard input (read strictly, or with surrogates kept), and a library call
    # with a lone surrogate: each is refused, saying why, and nothing is sent.
    runs = [run_cli("--url", mock.url, "bad \udcff\udcfe bytes")]
    for errors in ("strict", "surrogateescape"):
        for json_out in ([], ["--json"]):
            runs.append(run_cli("--url", mock.url, *json_out, input="bad \udcff bytes",
                                env={"PYTHONIOENCODING": f"utf-8:{errors}"}, encoding_errors="surrogateescape"))
    for result in runs:
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "the prompt is not utf-8 text (it holds the byte 0xFF)" in result.stderr
    assert json.loads(runs[-1].stdout)["type"] == "UsageError"
    raised, _ = failure(provider_for(mock.url), "a \ud800 b")
    assert isinstance(raised, fakegpt.UsageError) and "U+D800" in str(raised)
    with pytest.raises(fakegpt.UsageError, match="the model is not Unicode text"):
        asyncio.run(provider_for(mock.url).create_async_generator("gpt-\udcff", [{"role": "user", "content": "Hi"}]).__anext__())
    assert mock.count("POST", "/api/conversation") == 0 and mock.count("GET", "/api/loads") == 0


def test_concurrent_calls_of_a_session_write_its_file_once(mock: mock_server.MockServer, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    saved: List[str] = []
    save = fakegpt._SessionFile.save
    monkeypatch.setattr(fakegpt._SessionFile, "save", lambda self, key, session: saved.append(key) or save(self, key, session))
    provider = provider_for(mock.url)

    async def calls() -> List[str]:
        replies = await asyncio.gather(*(gather_pieces(provider, "Hello", session_cache=True) for _ in range(20)))
        return ["".join(pieces) for pieces in replies]

    assert asyncio.run(calls()) == [FULL_REPLY] * 20
    assert len(saved) == 1 and mock.count("GET", "/api/loads") == 1  # one login, kept once
    assert asyncio.run(calls()) == [FULL_REPLY] * 20 and len(saved) == 1


SAVING_PROCESS = """
import sys, fakegpt
kept = fakegpt._SessionFile(sys.argv[1])
for turn in range(40):
    kept.save(sys.argv[2], fakegpt._Session("eyJ" + sys.argv[2] + str(turn)))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX locks (without them the file is replaced unlocked)")
def test_commands_that_keep_their_sessions_at_once_keep_each(tmp_path: pathlib.Path) -> None:
    # Each process keeps its own upstream's session, over and over, all at once: the file
    # ends holding every upstream's last session (no read, change and replace of one
    # process lost in another's).
    path = str(tmp_path / "fakegpt" / "sessions.json")
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    savers = [subprocess.Popen([sys.executable, "-c", SAVING_PROCESS, path, f"upstream{i}"], env=env) for i in range(4)]
    assert [saver.wait(60) for saver in savers] == [0] * 4
    kept = json.loads(pathlib.Path(path).read_text())
    assert {key: entry["access_token"] for key, entry in kept.items()} == {f"upstream{i}": f"eyJupstream{i}39" for i in range(4)}
    assert sorted(os.listdir(tmp_path / "fakegpt")) == [".sessions.lock", "sessions.json"]
    assert stat.S_IMODE((tmp_path / "fakegpt" / ".sessions.lock").stat().st_mode) == 0o600


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX locks, FIFOs")
@pytest.mark.parametrize("lock", ["held", "fifo", "directory"])
def test_a_session_lock_that_cannot_be_had_delays_the_file_at_most_briefly(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, lock: str,
) -> None:
    import fcntl

    path = tmp_path / "fakegpt" / ".sessions.lock"
    path.parent.mkdir(mode=0o700)
    monkeypatch.setattr(fakegpt._SessionFile, "_LOCK_WAIT", 0.3)
    holder = None
    if lock == "held":  # by a process that stopped (here: this one, through another descriptor)
        holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(holder, fcntl.LOCK_EX)
    elif lock == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    try:
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="fakegpt"):
            fakegpt._SessionFile(str(path.parent / "sessions.json")).save("upstream", fakegpt._Session("eyJkept"))
        waited = time.monotonic() - started
    finally:
        if holder is not None:
            os.close(holder)
    assert json.loads((path.parent / "sessions.json").read_text())["upstream"]["access_token"] == "eyJkept"
    assert (0.3 <= waited < 5) if lock == "held" else waited < 0.3
    reason = {"held": "another process has held it for 0.3 s", "fifo": "it is not a regular file",
              "directory": "Is a directory"}[lock]
    assert f"the session file is replaced without its lock: {reason}" in caplog.text


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_cli_says_when_standard_output_is_closed_or_refuses_the_reply(mock: mock_server.MockServer) -> None:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    command = [sys.executable, "-m", "fakegpt", "--url", mock.url, "--no-session-cache"]
    closed = subprocess.run(["sh", "-c", '"$@" >&-', "sh", *command, "Hello"], capture_output=False, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=HERE, timeout=30)
    assert closed.returncode == 2 and "standard output is closed" in closed.stderr and "Traceback" not in closed.stderr
    for json_out in ([], ["--json"]):
        with open("/dev/full", "w") as full:
            refused = subprocess.run([*command, *json_out, "Hello"], stdout=full, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=HERE, timeout=30)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr and "Exception ignored" not in refused.stderr
        assert refused.stderr == "fakegpt: error: cannot write the reply to standard output: No space left on device\n"
    quiet = subprocess.run(["sh", "-c", '"$@" 2>&-', "sh", *command, "--timeout", "0", "Hello"], capture_output=True,
                           text=True, env=env, cwd=HERE, timeout=30)
    assert quiet.returncode == 2 and quiet.stdout == ""  # errors go nowhere; the exit code says it


def test_cli_timeout_flag(mock: mock_server.MockServer) -> None:
    started = time.monotonic()
    result = run_cli("--url", mock.url, "--timeout", "1", "[[fault hang_after:4]] Hi")
    assert result.returncode == 1 and "total timeout" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 10


def test_cli_honours_proxy_environment_and_no_proxy(mock: mock_server.MockServer) -> None:
    proxy = LoopbackProxy()
    with thread_server(proxy.handle) as (host, port):
        proxied = run_cli("--url", mock.url, "Hello", env={"HTTP_PROXY": f"http://{host}:{port}", "NO_PROXY": ""})
        assert proxied.stdout == FULL_REPLY + "\n" and len(proxy.seen) == 4
        bypassed = run_cli("--url", mock.url, "Hello", env={"HTTP_PROXY": f"http://{host}:{port}", "NO_PROXY": "localhost,127.0.0.1"})
        assert bypassed.stdout == FULL_REPLY + "\n" and len(proxy.seen) == 4
        network = run_cli("--url", mock.url, "Hello", env={"HTTP_PROXY": f"http://{host}:{port}", "NO_PROXY": "127.0.0.0/8"})
        assert network.stdout == FULL_REPLY + "\n" and len(proxy.seen) == 4
        schemeless = run_cli("--url", mock.url, "Hello", env={"HTTP_PROXY": f"{host}:{port}", "NO_PROXY": ""})
        assert schemeless.stdout == FULL_REPLY + "\n" and len(proxy.seen) == 8  # host:port, as curl and pip take it


# ---------------------------------------------------------------------------------------
# The mock server itself, checked with the standard library's own HTTP client
# ---------------------------------------------------------------------------------------


def test_mock_server_runs_on_a_thread_of_its_own_in_a_plain_with_block() -> None:
    server = mock_server.MockServer()
    with server as same:
        assert same is server and server.url.startswith("http://127.0.0.1:")
        with pytest.raises(RuntimeError, match="already running"):
            server.__enter__()
        server.fail_next("cut:2")
        with pytest.raises(fakegpt.TruncatedStreamError):
            FakeGpt.isolated(server.url).create_completion("", USER, stream=False)
        assert server.count("POST", "/api/conversation") == 1
        address = (server.host, server.port)
    with pytest.raises(ConnectionRefusedError):  # stopped when the block ends
        socket.create_connection(address, timeout=2).close()
    with server:  # and can run again
        assert FakeGpt.isolated(server.url).create_completion("", USER, stream=False) == FULL_REPLY
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):  # a failure to start is the caller's, not the thread's
            with mock_server.MockServer(port=taken.getsockname()[1]):
                pass
    assert not [t for t in threading.enumerate() if t.name == "mock_server"]


def test_mock_server_command_line_prints_its_url_and_stops_quietly_on_sigterm() -> None:
    process = subprocess.Popen([sys.executable, "-m", "mock_server", "--port", "0", "--quiet"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=HERE)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        connection = http.client.HTTPConnection(url[7:].split(":")[0], int(url.rsplit(":", 1)[1]), timeout=5)
        with contextlib.closing(connection):
            connection.request("GET", "/api/loads?t=1")
            loads = json.loads(connection.getresponse().read())["loads"]
        assert len(loads) == 5 and all(len(entry["token_id"]) == 32 for entry in loads)
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 0 and stderr == "" and stdout == ""


def independent_conversation(server: mock_server.MockServer, prompt: str, path: str = "/api/conversation",
                             **body: Any) -> Tuple[int, Dict[str, str], bytes]:
    """POST a conversation with http.client: the status, the headers and the raw body."""
    parts = urllib.parse.urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    payload = {"action": "next", "messages": [{"id": "u1", "author": {"role": "user"},
                                                "content": {"content_type": "text", "parts": [prompt]}}],
               "parent_message_id": "p0", "model": "text-davinci-002-render-sha", **body}
    connection.request("POST", path, json.dumps(payload),
                       {"Authorization": f"Bearer {server.access_token}", "Content-Type": "application/json"})
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, raw


def split_events(body: bytes) -> List[Tuple[Optional[str], str]]:
    """(event type, data) of each event, by plain byte splitting, not fakegpt's decoder."""
    body = body[3:] if body.startswith(b"\xef\xbb\xbf") else body
    text = body.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    events = []
    for block in text.split("\n\n"):
        kind, datas = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                datas.append(line[6:] if line.startswith("data: ") else line[5:])
        if datas and kind != "ping":
            events.append((kind, "\n".join(datas)))
    return events


@pytest.mark.parametrize("options", [
    {}, {"framing": "length"}, {"framing": "close"}, {"newline": "crlf"}, {"newline": "\r"},
    {"data_space": False}, {"multiline": True}, {"comments": True}, {"pings": True}, {"bom": True},
    {"write_size": 7}, {"gzip": "always"}, {"ascii_json": True},
    {"bom": True, "gzip": "always", "framing": "length", "newline": "cr", "multiline": True}, {"padding": True},
])
def test_mock_framings_read_by_an_independent_reader(options: Dict[str, Any]) -> None:
    prompt = "Framings, read by http.client"
    with mock_server.serve_in_thread(**options) as server:
        status, headers, raw = independent_conversation(server, prompt)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    if options.get("gzip") == "always":
        assert headers["content-encoding"] == "gzip"
        raw = zlib.decompress(raw, 16 + zlib.MAX_WBITS)
    assert raw.startswith(b"\xef\xbb\xbf") == bool(options.get("bom"))
    events = split_events(raw)
    assert events[-1] == (None, "[DONE]")
    texts = []
    for _, data in events[:-1]:
        message = json.loads(data).get("message") or {}
        if message.get("author", {}).get("role") == "assistant":
            texts.append(message["content"]["parts"][0])
    assert texts and texts[-1] == mock_server.default_reply(prompt)
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))  # cumulative
    paddings = {len(data) - len(data.rstrip(" ")) for _, data in events[:-1]}
    assert (len(paddings) > 5) == bool(options.get("padding")) and events[-1][1] == "[DONE]"


@pytest.mark.parametrize("options", [{}, {"framing": "length", "profile": "backend-api"}])
def test_mock_hang_at_end_sends_all_but_done_and_keeps_the_connection_open(options: Dict[str, Any]) -> None:
    prompt = "[[fault hang_at_end]] Held open"
    with mock_server.serve_in_thread(**options) as server:
        body = json.dumps({"action": "next", "messages": [{"id": "u1", "author": {"role": "user"},
                           "content": {"content_type": "text", "parts": [prompt]}}],
                           "parent_message_id": "p0", "model": "m"}).encode()
        path = "/backend-api/conversation" if options else "/api/conversation"
        with socket.create_connection((server.host, server.port), timeout=1) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.access_token}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            received = b""
            with pytest.raises(socket.timeout):  # the end never comes: the connection stays open
                while True:
                    data = sock.recv(65536)
                    assert data, "the mock closed the connection"
                    received += data
    head, _, raw = received.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        chunks, rest = [], raw
        while rest:  # every chunk is whole, and none is the last (size 0)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            assert size > 0 and rest[size:size + 2] == b"\r\n"
            chunks.append(rest[:size])
            rest = rest[size + 2:]
        raw = b"".join(chunks)
    else:
        declared = int(re.search(rb"(?i)content-length: *([0-9]+)", head)[1])  # type: ignore[index]
        assert len(raw) < declared
    events = split_events(raw)
    assert events and all(data != "[DONE]" for _, data in events)
    if options:  # the delta format: the reply's text is its appends, and the turn ends
        assert any('{"p": "/message/end_turn", "o": "replace", "v": true}' in data for _, data in events)
    else:
        finals = [json.loads(data)["message"] for _, data in events if '"assistant"' in data]
        assert finals[-1]["content"]["parts"][0] == mock_server.default_reply(prompt)
        assert finals[-1]["status"] == "finished_successfully" and finals[-1]["end_turn"] is True


@pytest.mark.parametrize("options", [{}, {"write_size": 100}, {"fault": "delay_events:0"}])
@pytest.mark.parametrize("tls", [False, True])
def test_mock_stops_writing_to_a_client_that_reset_its_connection(options: Dict[str, Any], tls: bool,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # Over TLS, asyncio tells the stream of a lost connection only once the loop runs: a
    # mock that wrote on without yielding wrote the whole reply into the dead connection,
    # logging "socket.send() raised exception." for each write (millions of lines).
    certs = {"certfile": str(TESTDATA / "server.pem"), "keyfile": str(TESTDATA / "server.key")} if tls else {}
    body = json.dumps({"action": "next", "messages": [{"id": "u1", "content": {"parts": ["Long one"]}}],
                       "parent_message_id": "p0", "model": "m"}).encode()
    caplog.set_level(logging.WARNING, logger="asyncio")
    with mock_server.serve_in_thread(reply="x" * 6000, step=3, **certs, **options) as server:
        for _ in range(3):
            raw = socket.create_connection((server.host, server.port), timeout=5)
            sock = ssl.create_default_context(cafile=str(TESTDATA / "ca.pem")).wrap_socket(
                raw, server_hostname="127.0.0.1") if tls else raw
            with sock:
                sock.sendall(f"POST /api/conversation HTTP/1.1\r\nHost: x\r\nX-Authorization: Bearer {server.access_token}\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                assert sock.recv(100).startswith(b"HTTP/1.1 200")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, at once
        context = ssl.create_default_context(cafile=str(TESTDATA / "ca.pem")) if tls else None
        with urllib.request.urlopen(server.url + "/api/loads", timeout=5, context=context) as answer:
            assert answer.status == 200  # the mock is still up, and answers
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


@pytest.mark.parametrize("options, words", [
    ({"fault": "nonsense"}, "unknown fault 'nonsense'"), ({"fault": "status:1e3"}, "CODE must be an HTTP error status"),
    ({"fault": "cut:1.5"}, "N must be a whole number"), ({"fault": "cut"}, "write it as cut:N"),
    ({"fault": "delay_events:nan"}, "SECONDS must be a number of seconds"), ({"fault": "status:429:-1"}, "RETRY_AFTER"),
    ({"newline": "crlf"}, None), ({"newline": "\n\n"}, "newline must be one of"), ({"framing": "lines"}, "framing must be one of"),
    ({"step": 0}, "step must be a whole number of at least 1"), ({"delay": -1}, "delay must be a number of seconds"),
    ({"bom": "yes"}, "bom must be True or False"), ({"stream_format": "v2"}, "stream_format must be one of"),
    ({"profile": "aurora"}, "profile must be one of"), ({"access_token": "a b"}, "access_token must be printable"),
    ({"stream_content_type": "text/plain\r\nX-A: 1"}, "stream_content_type must be printable ASCII"),
    ({"stream_content_type": None}, "stream_content_type must be printable ASCII"),
])
def test_mock_options_and_faults_are_checked_where_given(options: Dict[str, Any], words: Optional[str]) -> None:
    if words is None:
        assert mock_server.MockOptions(**options).newline == "\r\n"  # the command line's spelling works too
        return
    with pytest.raises(ValueError, match=re.escape(words)):
        mock_server.MockServer(**options)
    if "fault" in options:
        with pytest.raises(ValueError, match=re.escape(words)):
            mock_server.MockServer().fail_next(options["fault"])


@pytest.mark.parametrize("call, words", [
    (lambda: mock_server.MockServer("cut:3"), "options must be a MockOptions, not str"),  # (a fault meant as fault=)
    (lambda: mock_server.MockServer(host=None), "host must be an address or a host name"),
    (lambda: mock_server.MockServer(framng="close"), "unknown option 'framng': did you mean 'framing'?"),
    (lambda: mock_server.MockServer(bogus=1), "unknown option 'bogus'; the options: profile, stream_format,"),
    (lambda: mock_server.MockServer(log="access.log"), "log must be a function"),
    (lambda: mock_server.MockServer().fail_next("cut:1", times=0), "times must be a whole number of at least 1"),
    (lambda: mock_server.MockServer().fail_next("cut:1", times="2"), "times must be a whole number of at least 1"),
], ids=["options", "host", "typo", "unknown", "log", "times 0", "times str"])
def test_mock_server_arguments_are_checked_where_given(call: Callable[[], Any], words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        call()


def _raises(prompt: str) -> str:
    raise RuntimeError(f"no reply for {prompt}")


@pytest.mark.parametrize("reply, words", [
    (_raises, "the mock server failed: RuntimeError: no reply for Hello"),
    (lambda prompt: len(prompt), "the mock server failed: TypeError: the reply function returned int, not a string"),
], ids=["raises", "not a string"])
def test_mock_answers_a_500_that_says_why_when_its_reply_function_fails(
        reply: Callable[[str], Any], words: str, caplog: pytest.LogCaptureFixture) -> None:
    """A test's reply function that fails is the test's bug: a 500 that names it (and the
    traceback in the log), not a dropped connection the client retries as a network fault."""
    with mock_server.MockServer(reply=reply) as mock:
        with pytest.raises(fakegpt.HTTPStatusError) as caught:
            pieces_of(provider_for(mock.url), retries=0)
        assert caught.value.status == 500 and words in str(caught.value)
    assert any(record.name == "mock_server" and record.exc_info for record in caplog.records)


def test_a_running_mock_says_so_when_started_again() -> None:
    async def main() -> None:
        async with mock_server.MockServer() as server:
            with pytest.raises(RuntimeError, match=f"already running at {re.escape(server.url)}"):
                async with server:
                    pass  # pragma: no cover
            with pytest.raises(RuntimeError, match="already running"):
                with server:
                    pass  # pragma: no cover

    asyncio.run(main())


def test_mock_command_line_says_what_is_wrong_with_its_port_or_certificate(mock: mock_server.MockServer) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mock_server", "--quiet", *args], capture_output=True, text=True,
                              cwd=HERE, timeout=20)

    for args, code, words in [
        (["--port", "70000"], 2, "port must be a whole number from 0 to 65535, not 70000"),
        (["--port", "-1"], 2, "port must be a whole number from 0 to 65535"),
        (["--certfile", str(HERE / "no-such.pem")], 2, f"cannot load the certificate {HERE / 'no-such.pem'}: No such file"),
        (["--certfile", str(HERE / "README.md")], 2, f"cannot load the certificate {HERE / 'README.md'}: the file holds no certificate in PEM form"),
        (["--certfile", str(HERE / "testdata" / "server.pem")], 2, "holds no private key: give its key file too"),
        (["--certfile", str(HERE / "testdata" / "server.pem"), "--keyfile", str(HERE / "testdata" / "wronghost.key")], 2,
         "the key in " + str(HERE / "testdata" / "wronghost.key") + " is not this certificate's"),
        (["--port", str(mock.port)], 1, f"cannot listen on 127.0.0.1:{mock.port}"),  # in use
        (["--port", "0", "--profile", "backend-api"], 2, "--profile backend-api needs --access-token TOKEN"),
    ]:
        result = run(*args)
        assert result.returncode == code and words in result.stderr and "Traceback" not in result.stderr, args
    with pytest.raises(ValueError, match="port must be"):
        mock_server.MockServer(port=65536)


def test_mock_answers_a_deeply_nested_json_body_with_a_400_and_stays_up(mock: mock_server.MockServer) -> None:
    parts = urllib.parse.urlsplit(mock.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    with contextlib.closing(connection):
        connection.request("POST", "/api/conversation", b"[" * 200000 + b"]" * 200000,
                           {"Authorization": f"Bearer {mock.access_token}"})
        response = connection.getresponse()
        assert response.status == 400 and json.loads(response.read())["detail"] == "Invalid JSON body."
    assert "".join(pieces_of(provider_for(mock.url))) == FULL_REPLY  # still serving


def test_mock_fault_header_with_a_bad_fault_is_a_400(mock: mock_server.MockServer) -> None:
    parts = urllib.parse.urlsplit(mock.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    body = {"action": "next", "messages": [{"id": "u", "content": {"parts": ["hi"]}}], "parent_message_id": "p", "model": "m"}
    with contextlib.closing(connection):
        connection.request("POST", "/api/conversation", json.dumps(body),
                           {"Authorization": f"Bearer {mock.access_token}", "X-Mock-Fault": "cut:many"})
        response = connection.getresponse()
        assert response.status == 400 and "N must be a whole number" in json.loads(response.read())["detail"]


def test_mock_command_line_has_a_flag_with_help_for_every_option() -> None:
    parser = mock_server._cli_parser()
    flags = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(mock_server.MockOptions):
        assert field.name in flags and flags[field.name].help, field.name
    args = vars(parser.parse_args(["--newline", "cr", "--no-directives", "--stream-format", "v1", "--max-tokens", "9"]))
    for key in ("host", "port", "quiet"):
        args.pop(key)
    options = mock_server.MockOptions(**args)
    assert (options.newline, options.directives, options.format, options.max_tokens) == ("\r", False, "v1", 9)
    assert mock_server.MockOptions(**{**args, "newline": "lf", "directives": True}) == mock_server.MockOptions(
        stream_format="v1", max_tokens=9)  # every other default is the dataclass's own


def test_mock_access_log_names_method_path_status_and_time_but_no_secret() -> None:
    lines: List[str] = []

    async def run() -> None:
        async with mock_server.MockServer(log=lines.append, access_token=SENTINEL) as server:
            provider = provider_for(server.url)
            await gather_pieces(provider)

    asyncio.run(run())
    assert [line.split(" ")[:3] for line in lines] == [
        ["GET", "/api/loads", "200"], ["POST", "/auth/login", "200"], ["GET", "/api/auth/session", "200"],
        ["POST", "/api/conversation", "200"]]
    assert all(re.fullmatch(r"\S+ \S+ \d{3} \d+ ms", line) for line in lines)
    assert SENTINEL not in "".join(lines) and "credential" not in "".join(lines)


def test_mock_prompt_directives_can_be_turned_off() -> None:
    prompt = "[[fault hang]] [[chars 5]] as plain text"
    with mock_server.serve_in_thread(directives=False) as server:
        _, _, raw = independent_conversation(server, prompt)
    texts = [json.loads(d)["message"]["content"]["parts"][0] for k, d in split_events(raw)[:-1]
             if (json.loads(d).get("message") or {}).get("author", {}).get("role") == "assistant"]
    assert "[[fault hang]]" in texts[-1] and len(texts[-1]) > 5
    with mock_server.serve_in_thread() as server:
        status, _, raw = independent_conversation(server, "[[chars 999999999]]")
    assert status == 400 and b"at most" in raw  # bounded, not gigabytes


def test_mock_keeps_a_bounded_request_log_and_closes_idle_connections() -> None:
    with mock_server.serve_in_thread(max_recorded=3, keep_alive_timeout=0.2) as server:
        parts = urllib.parse.urlsplit(server.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        for index in range(5):
            connection.request("GET", f"/api/loads?t={index}")
            connection.getresponse().read()
        assert [request.query for request in server.requests] == ["t=2", "t=3", "t=4"]
        time.sleep(0.5)
        assert server.open_connections == 0  # closed by the server after 0.2 s idle
        connection.close()


def test_mock_remembers_a_bounded_number_of_conversations_the_most_recently_used(
        provider: "type[FakeGpt]", mock: mock_server.MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mock_server, "_MAX_CONVERSATIONS", 3)  # (10,000 in earnest)

    def turn(stream: Optional[fakegpt.ChatStream] = None) -> fakegpt.ChatStream:
        ids = {} if stream is None else {"conversation_id": stream.conversation_id, "parent_message_id": stream.message_id}
        async def read() -> fakegpt.ChatStream:
            async with provider.stream("", USER, **ids) as reply:
                async for _ in reply:
                    pass
            return reply

        return asyncio.run(read())

    first, second, third = turn(), turn(), turn()
    turn(first)  # used: the second is now the least recently used
    turn()  # a fourth: the second goes
    with pytest.raises(fakegpt.HTTPStatusError, match="not found") as raised:
        turn(second)
    assert raised.value.status == 404
    assert turn(turn(third)).conversation_id == third.conversation_id and turn(first).conversation_id == first.conversation_id


@pytest.mark.parametrize("stream_format", ["snapshots", "v1"])
def test_mock_ids_are_version_4_uuids_as_the_upstreams(stream_format: str) -> None:
    body = json.dumps({"action": "next", "parent_message_id": str(uuid.uuid4()), "model": "m", "messages": [
        {"id": str(uuid.uuid4()), "author": {"role": "user"}, "content": {"content_type": "text", "parts": ["Hi"]}}]})
    with mock_server.MockServer(stream_format=stream_format, tool_use=True) as server:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
        connection.request("POST", "/api/conversation", body, {"X-Authorization": f"Bearer {server.access_token}"})
        stream = connection.getresponse().read().decode()
        connection.close()
    ids = set(re.findall(r'"(?:id|conversation_id|message_id)": "([^"]*)"', stream))
    assert len(ids) >= 4  # the conversation's, the user's and at least two messages'
    assert all(uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value for value in ids)


def test_mock_accepts_a_chunked_request_body(mock: mock_server.MockServer) -> None:
    body = json.dumps({"action": "next", "messages": [{"id": "u", "content": {"parts": ["chunked"]}}],
                       "parent_message_id": "p", "model": "m"}).encode()
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in (body[:10], body[10:])) + b"0\r\n\r\n"
    head = (f"POST /api/conversation HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mock.access_token}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((mock.host, mock.port), timeout=5) as sock:
        sock.sendall(head + chunks)
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    assert received.startswith(b"HTTP/1.1 200") and mock.requests[-1].json()["messages"][0]["content"]["parts"] == ["chunked"]
    assert json.dumps(mock_server.default_reply("chunked"), ensure_ascii=False)[1:-1].encode() in received


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_mock_tells_a_client_that_expects_100_continue_to_send_its_body(mock: mock_server.MockServer,
                                                                         framing: str) -> None:
    # curl sends "Expect: 100-continue" before a large body and waits for the go-ahead
    # (a second, then it sends anyway); Python's and Go's servers answer at once.
    body = json.dumps({"action": "next", "messages": [{"id": "u", "content": {"parts": ["expect"]}}],
                       "parent_message_id": "p", "model": "m"}).encode()
    framed = f"Content-Length: {len(body)}" if framing == "length" else "Transfer-Encoding: chunked"
    head = (f"POST /api/conversation HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mock.access_token}\r\n"
            f"Expect: 100-continue\r\n{framed}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((mock.host, mock.port), timeout=2) as sock:
        sock.sendall(head)
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += sock.recv(1)  # a mock that waits for the body times out here
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body if framing == "length" else b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
        received = b""
        while data := sock.recv(65536):
            received += data
    assert received.startswith(b"HTTP/1.1 200") and mock.requests[-1].json()["messages"][0]["content"]["parts"] == ["expect"]
    assert json.dumps(mock_server.default_reply("expect"), ensure_ascii=False)[1:-1].encode() in received


def test_mock_speaks_http_1_0_to_an_http_1_0_client(mock: mock_server.MockServer) -> None:
    # An HTTP/1.0 client reads no chunks and expects the close unless it asked for
    # keep-alive; an HTTP/1.1 client's "Connection: close" may come in a list.
    body = json.dumps({"action": "next", "messages": [{"id": "u", "content": {"parts": ["old"]}}],
                       "parent_message_id": "p", "model": "m"}).encode()
    conversation = (f"POST /api/conversation HTTP/1.0\r\nAuthorization: Bearer {mock.access_token}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loads = b"GET /api/loads HTTP/1.0\r\n\r\n"
    listed = b"GET /api/loads HTTP/1.1\r\nConnection: TE, Close\r\n\r\n"
    bodies = []
    for request in (conversation, loads, listed):
        with socket.create_connection((mock.host, mock.port), timeout=2) as sock:
            sock.sendall(request)
            received = b""
            while data := sock.recv(65536):  # a kept connection would time out here
                received += data
        head, _, rest = received.partition(b"\r\n\r\n")
        assert b"\r\nConnection: close" in head and b"chunked" not in head.lower()
        bodies.append(rest)
    reply = json.dumps(mock_server.default_reply("old"), ensure_ascii=False)[1:-1].encode()
    assert reply in bodies[0] and bodies[0].rstrip().endswith(b"data: [DONE]")  # whole, unchunked
    with socket.create_connection((mock.host, mock.port), timeout=2) as sock:
        for _ in range(2):  # HTTP/1.0 with keep-alive: the connection carries both
            sock.sendall(b"GET /api/loads HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 200") and b"\r\nConnection: keep-alive" in head
            length = int(re.search(rb"(?i)content-length: *([0-9]+)", head)[1])  # type: ignore[index]
            while length:
                length -= len(sock.recv(length))
    assert [request.version for request in mock.requests[-2:]] == ["HTTP/1.0", "HTTP/1.0"]


def raw_exchange(url: str, request: bytes) -> Tuple[int, Any]:
    host, port = url[7:].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n", 404),
    (b"DELETE /api/loads HTTP/1.1\r\nConnection: close\r\n\r\n", 405),
    (b"GET /api/conversation HTTP/1.1\r\nConnection: close\r\n\r\n", 405),
    (b"BROKEN\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"POST /api/conversation HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", 401),
    (b"POST /api/conversation HTTP/1.1\r\nX-Authorization: Bearer nope\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", 401),
    (b"POST /auth/login HTTP/1.1\r\nConnection: close\r\nContent-Length: 7\r\n\r\ntoken_k", 400),
    (b"POST /auth/login HTTP/1.1\r\nConnection: close\r\nContent-Length: 99999999\r\n\r\n", 413),
    # Lengths that disagree: which one frames the body is anyone's guess (RFC 9112, 6.3).
    (b"GET /api/loads HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\nx", 400),
    (b"GET /api/loads HTTP/1.1\r\nConnection: close\r\nContent-Length: 0, 1\r\n\r\nx", 400),
    (b"GET /api/loads HTTP/1.1\r\nConnection: close\r\nContent-Length: 1, 1\r\nContent-Length: 1\r\n\r\nx", 200),
    (b"POST /auth/login HTTP/1.1\r\nConnection: close\r\nExpect: 200-ok\r\nContent-Length: 3\r\n\r\nabc", 417),
])
def test_mock_answers_bad_requests_with_upstream_shaped_json(mock: mock_server.MockServer, request_bytes: bytes, status: int) -> None:
    got, payload = raw_exchange(mock.url, request_bytes)
    assert got == status and ("detail" in payload or "message" in payload or "loads" in payload)


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /api/loads?t=" + b"1" * 9000 + b" HTTP/1.1\r\nConnection: close\r\n\r\n", 414),
    (b"GET /api/loads?t=" + b"1" * 300_000 + b" HTTP/1.1\r\nConnection: close\r\n\r\n", 414),
    (b"GET /api/loads HTTP/1.1\r\nConnection: close\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /api/loads HTTP/1.1\r\nConnection: close\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431),
    (b"GET /api/loads?t=" + b"1" * 8000 + b" HTTP/1.1\r\nConnection: close\r\n\r\n", 200),
])
def test_mock_says_which_part_of_a_request_head_is_too_long(mock: mock_server.MockServer, request_bytes: bytes,
                                                             status: int) -> None:
    """A request line over 8 KiB is 414, as servers answer it; the fields over 64 KiB, 431."""
    assert raw_exchange(mock.url, request_bytes)[0] == status


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /api/loads?t=" + b"1" * 4_000_000 + b" HTTP/1.1\r\nConnection: close\r\n\r\n", 414),
    (b"POST /auth/login HTTP/1.1\r\nContent-Length: 40000000\r\n\r\n" + b"t" * 4_000_000, 413),
], ids=["request line", "body"])
def test_mock_answers_a_request_it_refuses_unread_without_a_reset(mock: mock_server.MockServer, request_bytes: bytes,
                                                                   status: int) -> None:
    """Closing a socket with bytes unread makes the kernel reset the connection, and the
    reset can destroy the answer before the client reads it (RFC 9112, 9.6). The mock
    stops reading a request it refuses; it must still read what follows until the client
    is done, so that the client gets the answer and then the end, not a reset."""
    assert raw_exchange(mock.url, request_bytes)[0] == status


def test_mock_rejects_bad_json_and_weak_passwords(provider: "type[FakeGpt]", mock: mock_server.MockServer) -> None:
    pieces_of(provider)
    token = provider._access_token
    for body, status in ((b"{not json", 400), (b'{"action": "next", "messages": []}', 422)):
        request = b"POST /api/conversation HTTP/1.1\r\nX-Authorization: Bearer %b\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b" % (
            token.encode(), len(body), body)
        assert raw_exchange(mock.url, request)[0] == status
    weak = f"token_key={mock.token_ids[0]}&session_password=abcdefghij".encode()
    got, payload = raw_exchange(mock.url, b"POST /auth/login HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(weak), weak))
    assert got == 400 and "digits and letters" in payload["message"]
    assert raw_exchange(mock.url, b"GET /api/auth/session HTTP/1.1\r\nConnection: close\r\n\r\n") == (200, {})


def test_mock_reply_is_deterministic_non_ascii_and_scriptable() -> None:
    assert mock_server.default_reply("x") == mock_server.default_reply("x") != mock_server.default_reply("y")
    assert any(ord(c) > 127 for c in mock_server.default_reply("x"))
    with mock_server.serve_in_thread() as server:
        async def event_sizes() -> List[int]:
            async with provider_for(server.url).stream("", [{"role": "user", "content": "[[chars 25]] [[step 10]]"}]) as stream:
                return [len(event.delta) async for event in stream]

        assert asyncio.run(event_sizes()) == [10, 10, 5, 0]
    long = mock_server.default_reply("[[chars 1000]]")
    assert len(long) == 1000 and {"м", "你", "👋", '"', "\\"} <= set(long)
    with mock_server.serve_in_thread(reply=lambda prompt: prompt.upper() + "!", step=2) as server:
        async def deltas() -> List[str]:
            async with provider_for(server.url).stream("", [{"role": "user", "content": "abc"}]) as stream:
                return [event.delta async for event in stream]

        assert asyncio.run(deltas()) == ["AB", "C!", ""]


def test_mock_reads_a_lone_surrogate_escape_as_a_replacement_character(mock: mock_server.MockServer) -> None:
    # As the JSON decoders of Go and JavaScript servers do; the stream must not break off.
    status, _, raw = independent_conversation(mock, "a \ud800 b \ud83d\ude00")
    snapshots = [json.loads(data) for kind, data in split_events(raw) if data.startswith("{")]
    last = [s["message"]["content"]["parts"][0] for s in snapshots
            if s.get("message") and s["message"]["author"]["role"] == "assistant"][-1]
    assert status == 200 and split_events(raw)[-1][1] == "[DONE]"
    assert last == mock_server.default_reply("a \ufffd b \U0001F600")


def test_mock_serves_1000_concurrent_streams() -> None:
    with mock_server.serve_in_thread(reply="a short reply", step=6) as server:
        provider = provider_for(server.url)

        async def many() -> List[List[str]]:
            return await asyncio.gather(*(gather_pieces(provider, f"n{i}", timeout=30) for i in range(1000)))

        results = asyncio.run(many())
        assert all("".join(r) == "a short reply" for r in results)
        assert server.count("POST", "/api/conversation") == 1000


def run_pytest_in(directory: pathlib.Path, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """pytest in `directory`, as a user's project runs it, with fakegpt's plugin."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:fakegpt", "-p", "fakegpt_pytest", "-p", "no:cacheprovider", *args, str(directory)]
    return subprocess.run(command, capture_output=True, text=True, cwd=directory, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(HERE), **(env or {})})


def test_a_project_with_its_own_mock_server_module_keeps_it_and_still_has_ours(tmp_path: pathlib.Path) -> None:
    # The user's mock_server: importing it from fakegpt would break the run.
    (tmp_path / "mock_server.py").write_text("import os\nif os.environ.get('STRICT'):\n    raise RuntimeError('fakegpt imported the project mock_server')\nOURS = True\n")
    (tmp_path / "test_project.py").write_text(
        "import mock_server\n"
        "def test_their_own_module():\n"
        "    assert mock_server.OURS\n"
        "def test_our_fixture(fakegpt_provider):\n"
        "    assert fakegpt_provider.create_completion('', [{'role': 'user', 'content': 'Hi'}], stream=False).startswith('Привет')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    result = run_pytest_in(tmp_path)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout + result.stderr
    cli = subprocess.run([sys.executable, "-m", "fakegpt", "--mock", "Hello"], capture_output=True, text=True,
                         env={**env, "STRICT": "1"}, cwd=tmp_path, timeout=60)
    assert cli.returncode == 0 and cli.stdout == FULL_REPLY + "\n", cli.stderr
    unused = run_pytest_in(tmp_path, "-k", "their_own", env={"STRICT": ""})
    assert unused.returncode == 0 and "1 passed" in unused.stdout  # the plugin breaks nothing it is not asked for


def test_pytest_plugin_checks_marker_options_where_they_are_given(tmp_path: pathlib.Path) -> None:
    (tmp_path / "test_marked.py").write_text(
        "import pytest\n"
        "@pytest.mark.fakegpt_mock(fault='nonsense')\n"
        "def test_bad_fault(fakegpt_mock):\n"
        "    pass\n"
        "@pytest.mark.fakegpt_mock(newline='crlf')\n"
        "def test_crlf(fakegpt_mock, fakegpt_provider):\n"
        "    assert fakegpt_mock.options.newline == '\\r\\n'\n"
        "    assert fakegpt_provider.create_completion('', [{'role': 'user', 'content': 'Hi'}], stream=False)\n"
    )
    result = run_pytest_in(tmp_path)
    assert "1 passed, 1 error" in result.stdout, result.stdout
    assert "ValueError: unknown fault 'nonsense'" in result.stdout  # at setup, saying why


def test_load_mock_server_is_the_bundled_mock_by_its_own_location() -> None:
    module = fakegpt.load_mock_server()
    assert module.__name__ == "fakegpt.mock_server" and module is fakegpt.load_mock_server()
    assert pathlib.Path(module.__file__).resolve() == (HERE / "mock_server.py").resolve()


def test_pytest_plugin_gives_users_a_mock_fixture(tmp_path: pathlib.Path) -> None:
    (tmp_path / "test_user.py").write_text(
        "import asyncio, pytest\n"
        "def test_default(fakegpt_provider, fakegpt_mock):\n"
        "    reply = asyncio.run(fakegpt_provider.create_async('', [{'role': 'user', 'content': 'Hi'}]))\n"
        "    assert reply.startswith('Привет') and fakegpt_mock.count('POST', '/api/conversation') == 1\n"
        "@pytest.mark.fakegpt_mock(fault='status:429:5', framing='close')\n"
        "def test_marker(fakegpt_provider):\n"
        "    with pytest.raises(Exception, match='429'):\n"
        "        asyncio.run(fakegpt_provider.create_async('', [{'role': 'user', 'content': 'Hi'}]))\n"
    )
    result = run_pytest_in(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


# ---------------------------------------------------------------------------------------
# The README, run as pasted
# ---------------------------------------------------------------------------------------


def readme_python_blocks() -> List[Tuple[int, str, Optional[str]]]:
    """(line, code, the package it needs) of every ```python block of README.md; a
    ``<!-- readme-test: needs PACKAGE -->`` line just before a block names the package."""
    lines = (HERE / "README.md").read_text(encoding="utf-8").split("\n")
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            end = lines.index("```", index + 1)
            marker = re.fullmatch(r"<!-- readme-test: needs (\S+) -->", lines[index - 1].strip())
            blocks.append((index + 1, "\n".join(lines[index + 1:end]) + "\n", marker.group(1) if marker else None))
            index = end
        index += 1
    return blocks


README_BLOCKS = readme_python_blocks()


def test_the_readme_has_python_examples_to_run() -> None:
    assert len(README_BLOCKS) >= 6  # the extraction itself works: the test below is not empty


@pytest.mark.parametrize("line, code, needs", README_BLOCKS, ids=[f"README.md line {b[0]}" for b in README_BLOCKS])
def test_every_python_example_in_the_readme_runs_as_pasted(line: int, code: str, needs: Optional[str],
                                                           tmp_path: pathlib.Path, mock: mock_server.MockServer) -> None:
    if needs is not None and importlib.util.find_spec(needs) is None:
        # A third-party package the test environment does not install: the example must
        # still be complete Python; it was run by hand with the package (see the README).
        compile(code, f"README.md:{line}", "exec")
        return
    env = {**os.environ, "PYTHONPATH": str(HERE), "FAKEGPT_URL": mock.url}
    env.pop("FAKEGPT_ACCESS_TOKEN", None)
    test_shaped = re.search(r"^def test_", code, re.M) is not None
    if test_shaped:
        (tmp_path / "test_readme_example.py").write_text(code, encoding="utf-8")
        result = run_pytest_in(tmp_path, env=env)
    else:
        (tmp_path / "example.py").write_text(code, encoding="utf-8")
        result = subprocess.run([sys.executable, str(tmp_path / "example.py")], capture_output=True, text=True,
                                env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, f"README.md line {line}:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    if test_shaped:
        assert " passed" in result.stdout and "failed" not in result.stdout
