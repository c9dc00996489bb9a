"""W5's clients: time to the first piece of a reply, over TLS, through a slow link.

    python bench/latency.py calls CLIENT URL CAFILE LATER   # one JSON line: first, later
    python bench/latency.py once CLIENT URL CAFILE          # one call; pieces to stdout

`calls` times a first call (login included) and then LATER calls in one process, each
from its start to the first piece of text; every reply is read to its end. `once` is a
whole command: one call, each piece written to stdout as it arrives (the parent times the
first byte). Clients: fakegpt; aiohttp as the original provider used it (a ClientSession
per call, logging in inside it when there is no token yet); httpx with one pooled
AsyncClient for the process.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
from typing import Any, AsyncIterator, Callable, Dict, Protocol

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import HEADERS, AiohttpClient, Done, HttpxClient, conversation_body, follow_line, new_suffix

PAUSE = 0.2  # seconds between later calls, as between a reply and the next prompt


class FakeGptLatency:
    def __init__(self, url: str, context: ssl.SSLContext) -> None:
        import fakegpt

        self.provider, self.context = fakegpt.FakeGpt.isolated(url), context

    def pieces(self, prompt: str) -> AsyncIterator[str]:
        return self.provider.create_async_generator("", [{"role": "user", "content": prompt}], ssl=self.context)

    async def close(self) -> None:
        await self.provider.aclose()


class AiohttpOriginal(AiohttpClient):
    """gpt4free's FakeGpt: one ClientSession per call; the login, when there is no token,
    and the conversation in it; the reply read line by line."""

    def __init__(self, url: str, context: ssl.SSLContext) -> None:
        super().__init__(url)
        self.context = context

    async def pieces(self, prompt: str) -> AsyncIterator[str]:
        connector = self.aiohttp.TCPConnector(ssl=self.context)
        async with self.aiohttp.ClientSession(headers=HEADERS, cookie_jar=self.cookie_jar, connector=connector) as session:
            if self.token is None:
                await self.log_in(session)
            headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                       "X-Authorization": f"Bearer {self.token}"}
            async with session.post(f"{self.url}/api/conversation", json=conversation_body(prompt), headers=headers) as response:
                response.raise_for_status()
                last = ""
                try:
                    async for line in response.content:
                        text = follow_line(line, last)
                        if len(text) > len(last):
                            yield text[len(last):]
                        last = text
                except Done:
                    pass


class HttpxPooled(HttpxClient):
    """httpx and httpx-sse, one AsyncClient (its pool) for the process, each reply read to its end."""

    def __init__(self, url: str, context: ssl.SSLContext) -> None:
        super().__init__(url, verify=context)

    async def pieces(self, prompt: str) -> AsyncIterator[str]:
        if self.token is None:
            await self.login()
        last = ""
        async with self.httpx_sse.aconnect_sse(self.client, "POST", "/api/conversation", json=conversation_body(prompt),
                                               headers={"X-Authorization": f"Bearer {self.token}"}) as source:
            source.response.raise_for_status()
            async for event in source.aiter_sse():
                if event.data == "[DONE]":
                    continue  # read on to the end of the response: the connection goes back to the pool
                text = new_suffix(event.data.encode(), last)
                if text is not None and len(text) > len(last):
                    yield text[len(last):]
                    last = text


class Streaming(Protocol):
    """What W5 asks of a client: a reply's pieces as they arrive."""

    def pieces(self, prompt: str) -> AsyncIterator[str]: ...

    async def close(self) -> None: ...


CLIENTS: Dict[str, Callable[[str, ssl.SSLContext], Streaming]] = {"fakegpt": FakeGptLatency, "aiohttp": AiohttpOriginal, "httpx": HttpxPooled}


async def first_piece(client: Streaming, prompt: str) -> float:
    """Seconds from the call's start to its first piece; the reply is read to its end."""
    started = time.perf_counter()
    first = None
    async for _ in client.pieces(prompt):
        if first is None:
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the reply had no text")
    return first


async def calls(name: str, url: str, cafile: str, later: int) -> Dict[str, Any]:
    client = CLIENTS[name](url, ssl.create_default_context(cafile=cafile))
    first = await first_piece(client, "W5 first call")
    times = []
    for index in range(later):
        await asyncio.sleep(PAUSE)
        times.append(await first_piece(client, f"W5 call {index}"))
    await client.close()
    return {"first": first, "later": times}


async def once(name: str, url: str, cafile: str) -> None:
    client = CLIENTS[name](url, ssl.create_default_context(cafile=cafile))
    async for piece in client.pieces("W5 command"):
        sys.stdout.write(piece)
        sys.stdout.flush()
    await client.close()


if __name__ == "__main__":
    mode, name, url, cafile = sys.argv[1:5]
    if mode == "calls":
        print(json.dumps(asyncio.run(calls(name, url, cafile, int(sys.argv[5])))))
    else:
        asyncio.run(once(name, url, cafile))
