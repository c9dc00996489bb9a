"""The clients the benchmark compares, each a faithful implementation of the same flow.

Every client logs in once (GET /api/loads, POST /auth/login, GET /api/auth/session) and
then streams conversations, returning the reply's text. `fakegpt` is the project's
client; `aiohttp` and `httpx` are peers; `floor` and `limit` bound what any client can do.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Protocol

HEADERS = {
    "Accept-Language": "en-US",
    "User-Agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/118.0.0.0 Safari/537.36",
    "sec-ch-ua": '"Google Chrome";v="117", "Not;A=Brand";v="8", "Chromium";v="117"',
    "sec-ch-ua-platform": '"Linux"',
    "sec-ch-ua-mobile": "?0",
}
BIG_LIMITS = 256 * 1024 * 1024  # W4 sends a 50-million-character event (about 70 MB)


def password() -> str:
    return "".join(random.choice(string.ascii_lowercase) for _ in range(8)) + "42"


def conversation_body(prompt: str) -> Dict[str, Any]:
    return {
        "action": "next",
        "messages": [{"id": str(uuid.uuid4()), "author": {"role": "user"},
                      "content": {"content_type": "text", "parts": [prompt]}, "metadata": {}}],
        "parent_message_id": str(uuid.uuid4()), "model": "text-davinci-002-render-sha",
        "plugin_ids": [], "timezone_offset_min": -120, "suggestions": [],
        "history_and_training_disabled": True, "arkose_token": "", "force_paragen": False,
    }


class Client(Protocol):
    """What the benchmark asks of every client."""

    async def login(self) -> None: ...

    async def conversation(self, prompt: str) -> str: ...

    async def close(self) -> None: ...


class Done(Exception):
    """`data: [DONE]` arrived."""


def follow_line(line: bytes, last: str) -> str:
    """The reply so far after one line of the event stream; raises `Done` at the end."""
    if not line.startswith(b"data: "):
        return last
    data = line[6:].rstrip(b"\r\n")
    if data == b"[DONE]":
        raise Done
    text = new_suffix(data, last)
    return last if text is None else text


def new_suffix(data: bytes, last: str) -> Optional[str]:
    """The text an event adds, as every peer computes it: decode the whole event."""
    message = json.loads(data).get("message")
    if not message or message["author"]["role"] != "assistant" or message["metadata"].get("message_type") != "next":
        return None
    text = message["content"]["parts"][0]
    return text if text.startswith(last) else None


class FakeGptClient:
    def __init__(self, url: str) -> None:
        import fakegpt

        self.fakegpt = fakegpt
        self.provider = fakegpt.FakeGpt.isolated(url)
        self.limits = fakegpt.Limits(max_sse_line_size=BIG_LIMITS, max_event_size=BIG_LIMITS)

    async def login(self) -> None:
        await self.conversation("hi")

    async def conversation(self, prompt: str) -> str:
        pieces = [piece async for piece in self.provider.create_async_generator(
            "", [{"role": "user", "content": prompt}], limits=self.limits, timeout=600)]
        return "".join(pieces)

    async def close(self) -> None:
        pass


class AiohttpClient:
    """The original provider's way: a ClientSession per call, response.content line by line."""

    def __init__(self, url: str) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.url = url
        self.token: Optional[str] = None
        self.cookie_jar = aiohttp.CookieJar(unsafe=True)  # the mock is on an IP address

    async def login(self) -> None:
        async with self.aiohttp.ClientSession(headers=HEADERS, cookie_jar=self.cookie_jar) as session:
            await self.log_in(session)

    async def log_in(self, session: Any) -> None:
        """The three requests of the login, in `session`."""
        async with session.get(f"{self.url}/api/loads", params={"t": int(time.time())}) as response:
            response.raise_for_status()
            token_ids = [t["token_id"] for t in (await response.json())["loads"]]
        data = {"token_key": random.choice(token_ids), "session_password": password()}
        async with session.post(f"{self.url}/auth/login", data=data) as response:
            response.raise_for_status()
        async with session.get(f"{self.url}/api/auth/session") as response:
            response.raise_for_status()
            self.token = (await response.json())["accessToken"]

    async def conversation(self, prompt: str) -> str:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "X-Authorization": f"Bearer {self.token}"}
        timeout = self.aiohttp.ClientTimeout(total=600)
        last = ""
        async with self.aiohttp.ClientSession(headers=HEADERS, cookie_jar=self.cookie_jar, timeout=timeout,
                                              read_bufsize=2**16) as session:
            async with session.post(f"{self.url}/api/conversation", json=conversation_body(prompt), headers=headers) as response:
                response.raise_for_status()
                try:
                    async for line in response.content:
                        last = follow_line(line, last)
                except Done:
                    pass
        return last

    async def close(self) -> None:
        pass


class HttpxClient:
    """httpx with httpx-sse, one AsyncClient for the run."""

    def __init__(self, url: str, verify: Any = True) -> None:
        import httpx
        import httpx_sse

        self.httpx_sse = httpx_sse
        # httpx's default limits, as its users have them: 100 connections in use, 20 kept.
        self.client = httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=600, verify=verify)
        self.token: Optional[str] = None

    async def login(self) -> None:
        response = await self.client.get("/api/loads", params={"t": int(time.time())})
        response.raise_for_status()
        token_ids = [t["token_id"] for t in response.json()["loads"]]
        response = await self.client.post("/auth/login", data={"token_key": random.choice(token_ids), "session_password": password()})
        response.raise_for_status()
        response = await self.client.get("/api/auth/session")
        self.token = response.json()["accessToken"]

    async def conversation(self, prompt: str) -> str:
        headers = {"X-Authorization": f"Bearer {self.token}"}
        last = ""
        async with self.httpx_sse.aconnect_sse(self.client, "POST", "/api/conversation", json=conversation_body(prompt), headers=headers) as source:
            source.response.raise_for_status()
            async for event in source.aiter_sse():
                if event.data == "[DONE]":
                    break
                text = new_suffix(event.data.encode(), last)
                if text is not None:
                    last = text
        return last

    async def close(self) -> None:
        await self.client.aclose()


class _Counted(asyncio.BufferedProtocol):
    """A response read into the process's one buffer, counted, its last 64 bytes kept."""

    buffer = memoryview(bytearray(1024 * 1024))  # as fakegpt's grows to; read into and looked at in one callback: one is enough

    def __init__(self) -> None:
        self.size, self.tail = 0, b""
        self.ended: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.size += nbytes
        self.tail = (self.tail + self.buffer[max(nbytes - 64, 0):nbytes])[-64:]

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


class LimitClient:
    """What moving the bytes costs: the same request, and the response read into one
    buffer and counted, nothing parsed or kept (an asyncio buffered protocol: asyncio's
    streams copy every byte through a buffer of their own, and fall into re-copying it,
    and into fresh pages, whenever the reader is behind, which made this bound 2-3 times
    slower in some runs than in others)."""

    def __init__(self, url: str) -> None:
        self.host, port = url[len("http://"):].rsplit(":", 1)
        self.port = int(port)
        self.url = url
        self.token: Optional[str] = None

    async def login(self) -> None:
        helper = FakeGptClient(self.url)
        await helper.login()
        self.token = helper.provider._access_token

    def _request(self, prompt: str) -> bytes:
        body = json.dumps(conversation_body(prompt)).encode()
        return (f"POST /api/conversation HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"X-Authorization: Bearer {self.token}\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def raw_conversation(self, prompt: str) -> bytes:
        """The whole response, as bytes (to prepare the floor: not measured)."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(self._request(prompt))
        received = await reader.read()
        writer.close()
        return received

    async def conversation(self, prompt: str) -> str:
        transport, counted = await asyncio.get_running_loop().create_connection(_Counted, self.host, self.port)
        transport.write(self._request(prompt))
        await counted.ended
        transport.close()
        if b"data: [DONE]" not in counted.tail:  # the whole stream, or the measurement means nothing
            raise RuntimeError(f"incomplete stream after {counted.size} bytes")
        return f"{counted.size} bytes"

    async def close(self) -> None:
        pass


class FloorClient(LimitClient):
    """The least work a client that decodes every event can do: the SSE bytes already in
    memory, split into lines, each event's JSON decoded, the new suffix taken."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.streams: Dict[str, bytes] = {}

    async def prepare(self, prompt: str) -> None:
        raw = await self.raw_conversation(prompt)
        self.streams[prompt] = raw.partition(b"\r\n\r\n")[2]

    async def conversation(self, prompt: str) -> str:
        last = ""
        try:
            for line in self.streams[prompt].split(b"\n"):
                last = follow_line(line, last)
        except Done:
            pass
        return last


BENCH_TOKEN = "bench-access-token"  # the token the W6 mock accepts
PARTS = "/message/content/parts/0"


class FakeGptDeltaClient:
    """fakegpt against a ChatGPT-web gateway that streams the delta format."""

    def __init__(self, url: str) -> None:
        import fakegpt

        self.provider = fakegpt.FakeGpt.isolated(url)

    async def login(self) -> None:
        await self.conversation("hi")

    async def conversation(self, prompt: str) -> str:
        pieces = [piece async for piece in self.provider.create_async_generator(
            "", [{"role": "user", "content": prompt}], profile="backend-api", access_token=BENCH_TOKEN, timeout=600)]
        return "".join(pieces)

    async def close(self) -> None:
        pass


class DeltaReply:
    """The least a correct reader of the delta format must track: the carried c, p and o,
    which document is the visible reply, and the appends to its text (patches too)."""

    def __init__(self) -> None:
        self.c, self.p, self.o = 0, None, None
        self.visible: Any = None
        self.text: List[str] = []

    def record(self, record: Dict[str, Any]) -> None:
        self.c = record.get("c", self.c)
        value: Any = record.get("v")
        if record.get("p") == "" and record.get("o") == "add":
            message = value.get("message") or {}
            if (message.get("author", {}).get("role") == "assistant" and message.get("recipient") == "all"
                    and message.get("channel") in (None, "final") and message.get("content", {}).get("content_type") == "text"
                    and not message.get("metadata", {}).get("is_thinking_preamble_message")):
                self.visible = self.c
                self.text = [message["content"]["parts"][0]]
        if "o" not in record and isinstance(value, list):
            ops = value
        else:
            self.p, self.o = record.get("p", self.p), record.get("o", self.o)
            ops = value if self.o == "patch" else [{"p": self.p, "o": self.o, "v": value}]
        if self.c == self.visible:
            self.text += [op["v"] for op in ops if op.get("p") == PARTS and op.get("o") == "append"]


class AiohttpDeltaClient:
    """aiohttp reading the delta format line by line, json.loads on every record."""

    def __init__(self, url: str) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.url = url

    async def login(self) -> None:
        pass

    async def conversation(self, prompt: str) -> str:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "Authorization": f"Bearer {BENCH_TOKEN}"}
        reply = DeltaReply()
        async with self.aiohttp.ClientSession(headers=HEADERS, timeout=self.aiohttp.ClientTimeout(total=600)) as session:
            async with session.post(f"{self.url}/backend-api/conversation", json=conversation_body(prompt),
                                    headers=headers) as response:
                response.raise_for_status()
                kind = "message"
                async for line in response.content:
                    if line.startswith(b"event: "):
                        kind = line[7:].strip().decode()
                    elif line.startswith(b"data: "):
                        data = line[6:].rstrip()
                        if data == b"[DONE]":
                            break
                        if kind == "delta":
                            reply.record(json.loads(data))
                        else:
                            json.loads(data)  # a notice or the encoding
                    elif line in (b"\n", b"\r\n"):
                        kind = "message"
        return "".join(reply.text)

    async def close(self) -> None:
        pass


CLIENTS: Dict[str, Callable[[str], Client]] = {"fakegpt": FakeGptClient, "aiohttp": AiohttpClient, "httpx": HttpxClient,
           "floor": FloorClient, "limit": LimitClient}
DELTA_CLIENTS: Dict[str, Callable[[str], Client]] = {"fakegpt": FakeGptDeltaClient, "aiohttp": AiohttpDeltaClient}
