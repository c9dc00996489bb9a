"""Offline tests of fakegpt and mock_server: pure layers on bytes, then end to end.

Every server here binds to 127.0.0.1 on an ephemeral port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import pathlib
import pty
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fakegpt
import mock_server
from fakegpt import (
    NEED_DATA,
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


# ---------------------------------------------------------------------------------------
# Helpers: feeding pure readers, building responses
# ---------------------------------------------------------------------------------------


def read_response(chunks: Sequence[bytes], **kwargs: Any) -> Tuple[Response, bytes]:
    """Feed `chunks` then EOF; the response head and the whole body."""
    reader = ResponseReader(**kwargs)
    head: Optional[Response] = None
    body = bytearray()
    for chunk in [*chunks, b""]:
        reader.feed(chunk)
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Response):
                head = event
            elif isinstance(event, Data):
                body += event.data
            else:
                assert isinstance(event, EndOfMessage)
                assert head is not None
                return head, bytes(body)
    raise AssertionError("no EndOfMessage")


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
    reader, sse, conversation = ResponseReader(), SSEDecoder(), ConversationDecoder()
    pieces: List[str] = []
    for chunk in [*chunks, b""]:
        reader.feed(chunk)
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                break
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


# ---------------------------------------------------------------------------------------
# HTTP/1.1 response reader
# ---------------------------------------------------------------------------------------

VALID_RESPONSES = {
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    "chunk extensions and trailers": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 ;name=value\r\nhello\r\n"
        b"0;last\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n", b"hello"),
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
    "chunk size with a trailing space": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1a \r\n",
    "empty chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
    "chunk data without CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
    "chunk data with a bare LF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\n0\r\n\r\n",
    "bad status line": b"HTTP/1.1 OK 200\r\n\r\n",
    "HTTP/2 status line": b"HTTP/2 200 OK\r\n\r\n",
    "status out of range": b"HTTP/1.1 999 Nope\r\n\r\n",
    "not HTTP at all": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "header line without a colon": b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
    "space before the colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  continued\r\nContent-Length: 0\r\n\r\n",
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


def test_sse_limits_line_and_event_size_with_bounded_memory() -> None:
    decoder = SSEDecoder(limits=Limits(max_sse_line_size=1000))
    with pytest.raises(fakegpt.LimitExceeded):
        for _ in range(1000):
            decoder.feed(b"data: " + b"x" * 100)
    decoder = SSEDecoder(limits=Limits(max_event_size=1000))
    with pytest.raises(fakegpt.LimitExceeded):
        for _ in range(1000):
            decoder.feed(b"data: " + b"x" * 90 + b"\n")


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


# ---------------------------------------------------------------------------------------
# The conversation: cumulative text to deltas
# ---------------------------------------------------------------------------------------


def decode(datas: Sequence[bytes]) -> Tuple[List[str], ConversationDecoder]:
    decoder = ConversationDecoder()
    deltas = []
    for data in datas:
        event = decoder.feed(E(raw=data))
        if event is not None:
            deltas.append(event.delta)
    return deltas, decoder


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


def test_conversation_split_surrogate_pair_is_decoded_like_the_full_json() -> None:
    first = assistant_event("a\ud83d", ensure_ascii=True)
    second = assistant_event("a\U0001F600", ensure_ascii=True)
    assert b"\\ud83d\\ude00" in second
    with pytest.raises(fakegpt.ProtocolError):
        decode([first, second])
    with pytest.raises(fakegpt.ProtocolError):
        reference_deltas([first, second])


def test_conversation_fast_path_is_taken_for_the_upstream_shape() -> None:
    texts = ["Привет", "Привет, мир", "Привет, мир \"!\" \\"]
    deltas, decoder = decode([assistant_event(t) for t in texts])
    assert deltas == ["Привет", ", мир", " \"!\" \\"]
    assert decoder._shape is not None  # the last event took the fast path


texts_strategy = st.lists(st.text(max_size=6), min_size=1, max_size=8)
envelope_strategy = st.fixed_dictionaries({
    "ensure_ascii": st.booleans(),
    "separators": st.sampled_from([(", ", ": "), (",", ":"), (", ", ":")]),
    "extra": st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.one_of(st.none(), st.integers(), st.text(max_size=6)), max_size=3)),
})


@PROPERTY
@given(texts_strategy, st.lists(envelope_strategy, min_size=1, max_size=3), st.lists(st.booleans(), max_size=8))
def test_property_fast_path_yields_exactly_what_full_decoding_yields(pieces: List[str], envelopes: List[Dict[str, Any]], repeats: List[bool]) -> None:
    cumulative, datas = "", []
    for index, piece in enumerate(pieces):
        cumulative += piece
        envelope = envelopes[index % len(envelopes)]
        datas.append(assistant_event(cumulative, **envelope))
        if index < len(repeats) and repeats[index]:
            datas.append(assistant_event(cumulative[: len(cumulative) // 2], **envelope))
    deltas, decoder = decode(datas)
    assert deltas == reference_deltas(datas)
    assert "".join(deltas) == cumulative


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
    # never duplicated or dropped wholesale.
    assert edit_distance(text, STREAM_TEXTS[-1]) <= 4 * len(edits)


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]
