"""The benchmark's upstream: the mock's answers, rendered once and replayed.

    python bench/replay.py [mock options...]     # prints its URL, then serves

A request is answered the first time by a mock upstream in this process (with the given
options), and the whole response, head and body as the mock framed them, is kept; every
later request for the same thing (the same method and path, and for a conversation the
same prompt) gets those bytes, a megabyte a write. So the upstream costs next to nothing
and the client under test is what is measured: generating 48 MB of JSON events took the
mock most of a core, which hid the client's own cost behind it.

Connections are kept open between requests (HTTP/1.1), unless a request says
``Connection: close``. The token, cookies and ids in replayed answers are those of the
first request: clients read them, and this server checks nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mock_server

_CLOSE = re.compile(rb"\r\nConnection: *close(?=\r\n)", re.IGNORECASE)
_LENGTH = re.compile(rb"\r\nContent-Length: *([0-9]+)", re.IGNORECASE)


class Replay:
    def __init__(self, mock: mock_server.MockServer) -> None:
        self.mock = mock
        self.answers: Dict[Tuple[bytes, bytes, str], bytes] = {}
        self.rendering: Dict[Tuple[bytes, bytes, str], "asyncio.Future[bytes]"] = {}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = _LENGTH.search(head)
                body = await reader.readexactly(int(length[1])) if length else b""
                method, target = head.split(b" ", 2)[:2]
                path = target.split(b"?", 1)[0]
                if path.startswith(b"http"):  # absolute form, from a proxy's client
                    path = b"/" + path.split(b"/", 3)[3]
                prompt = ""
                if path.endswith(b"/conversation"):
                    prompt = json.loads(body)["messages"][0]["content"]["parts"][0]
                key = (method, path, prompt)
                answer = self.answers.get(key) or await self.render(key, head, body)
                await send(writer, answer)
                if _CLOSE.search(head):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def render(self, key: Tuple[bytes, bytes, str], head: bytes, body: bytes) -> bytes:
        """The mock's answer to this request, asked once however many wait for it."""
        pending = self.rendering.get(key)
        if pending is None:
            pending = self.rendering[key] = asyncio.ensure_future(self.ask_the_mock(head, body))
        answer = await pending
        self.answers[key] = answer
        return answer

    async def ask_the_mock(self, head: bytes, body: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(self.mock.host, self.mock.port)
        asked = _CLOSE.sub(b"", head[:-2]) + b"Connection: close\r\n\r\n"
        writer.write(asked + body)
        answer = await reader.read()  # the mock closes after its answer
        writer.close()
        response_head, _, response_body = answer.partition(b"\r\n\r\n")
        return _CLOSE.sub(b"", response_head + b"\r\n") + b"\r\n" + response_body


# A megabyte a write. asyncio's transport sends what the socket takes at once and copies
# the rest into a buffer of its own: for W1's 48 MB in one write that copy (into fresh
# pages) took 25-30 ms, during which nothing was sent. The clients waited for the
# upstream, which was then what the benchmark measured.
_PIECE = 1 << 20


async def send(writer: asyncio.StreamWriter, answer: bytes) -> None:
    """`answer` on the connection, a piece at a time as the socket takes them."""
    view = memoryview(answer)
    for start in range(0, len(view), _PIECE):
        writer.write(view[start:start + _PIECE])
        await writer.drain()


async def main(argv: List[str]) -> None:
    options: Dict[str, Any] = {name.replace("-", "_"): value for name, value in zip(argv[0::2], argv[1::2])}
    async with mock_server.MockServer(**options) as mock:
        replay = Replay(mock)
        server = await asyncio.start_server(replay.serve, "127.0.0.1", 0, backlog=4096, limit=256 * 1024)
        port = server.sockets[0].getsockname()[1]
        print(f"http://127.0.0.1:{port}", flush=True)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main([arg.lstrip("-") for arg in sys.argv[1:]]))
    except KeyboardInterrupt:
        pass
