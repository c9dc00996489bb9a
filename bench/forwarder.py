"""A TCP forwarder that adds latency: a long link, on loopback (netem is not available).

    python bench/forwarder.py UPSTREAM_HOST UPSTREAM_PORT [ONE_WAY_MS]   # prints its port

Every byte takes ONE_WAY_MS (default 25) to cross, each way, in order. A new connection
behaves as if its TCP handshake had taken a round trip too: the client's connect returns
at once here, so what it sends first is held until a real handshake would have let it
arrive (three one-way trips after the connect). TLS and HTTP pass through untouched.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Optional, Tuple


async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, not_before: float) -> None:
    """Copy `reader` to `writer`, each piece `delay` seconds late, none before `not_before`."""
    loop = asyncio.get_running_loop()
    queue: "asyncio.Queue[Tuple[float, Optional[bytes]]]" = asyncio.Queue()

    async def deliver() -> None:
        while True:
            when, data = await queue.get()
            wait = when - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    delivery = asyncio.ensure_future(deliver())
    try:
        while True:
            try:
                data = await reader.read(256 * 1024)
            except OSError:  # a reset, say
                data = b""
            queue.put_nowait((max(loop.time() + delay, not_before), data or None))
            if not data:
                break
        await delivery
    except (OSError, asyncio.CancelledError):  # OSError: the other side is gone (ENOTCONN at its end too)
        delivery.cancel()


def nodelay(writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def main(host: str, port: int, delay: float) -> None:
    async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        accepted = asyncio.get_running_loop().time()
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
        except OSError:
            client_writer.close()
            return
        nodelay(client_writer)
        nodelay(upstream_writer)
        try:
            await asyncio.gather(
                carry(client_reader, upstream_writer, delay, accepted + 3 * delay),
                carry(upstream_reader, client_writer, delay, 0.0),
            )
        finally:
            client_writer.close()
            upstream_writer.close()

    server = await asyncio.start_server(forward, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    one_way = float(sys.argv[3]) / 1000 if len(sys.argv) > 3 else 0.025
    try:
        asyncio.run(main(sys.argv[1], int(sys.argv[2]), one_way))
    except KeyboardInterrupt:
        pass
