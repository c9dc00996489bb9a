"""A TCP forwarder that adds latency: a long link, on loopback (netem is not available).

    python bench/forwarder.py UPSTREAM_HOST UPSTREAM_PORT [ONE_WAY_MS]   # prints its port

Every byte takes ONE_WAY_MS (default 25) to cross, each way, in order. A new connection
behaves as if its TCP handshake had taken a round trip too: the client's connect returns
at once here, so what it sends first is held until a real handshake would have let it
arrive (three one-way trips after the connect). TLS and HTTP pass through untouched.

Each direction of a connection is two threads: one reads and notes when each piece
arrived, the other sends it when its time comes, sleeping until a millisecond before and
polling the clock for the rest. `time.sleep` wakes a fifth of a millisecond late on
these VMs, and an event loop's timers up to a millisecond late (epoll counts in
milliseconds): the asyncio forwarder before this one made an echo's 50 ms round trip
take 51.8 ms; this one, 50.6-50.7 (`bench/run.py` prints it).
"""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time
from typing import Optional, Tuple

SPIN = 0.001  # the last seconds of a wait, spent polling the clock


def carry(source: socket.socket, target: socket.socket, delay: float, not_before: float) -> None:
    """Copy `source` to `target`, each piece `delay` seconds after it arrived, none before
    `not_before` (a `time.monotonic()` time); then end `target`'s sending side."""
    pieces: "queue.SimpleQueue[Tuple[float, Optional[bytes]]]" = queue.SimpleQueue()

    def deliver() -> None:
        try:
            while True:
                when, data = pieces.get()
                wait = when - time.monotonic()
                if wait > SPIN:
                    time.sleep(wait - SPIN)
                while time.monotonic() < when:
                    time.sleep(0)  # lets the other threads run
                if data is None:
                    target.shutdown(socket.SHUT_WR)
                    return
                target.sendall(data)
        except OSError:  # the other side is gone
            pass

    sender = threading.Thread(target=deliver, daemon=True)
    sender.start()
    while True:
        try:
            data = source.recv(256 * 1024)
        except OSError:  # a reset, say
            data = b""
        pieces.put((max(time.monotonic() + delay, not_before), data or None))
        if not data:
            break
    sender.join()


def forward(client: socket.socket, host: str, port: int, delay: float) -> None:
    accepted = time.monotonic()
    try:
        upstream = socket.create_connection((host, port))
    except OSError:
        client.close()
        return
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=carry, args=(upstream, client, delay, 0.0), daemon=True)
    back.start()
    carry(client, upstream, delay, accepted + 3 * delay)
    back.join()
    client.close()
    upstream.close()


def main(host: str, port: int, delay: float) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=forward, args=(client, host, port, delay), daemon=True).start()


if __name__ == "__main__":
    one_way = float(sys.argv[3]) / 1000 if len(sys.argv) > 3 else 0.025
    try:
        main(sys.argv[1], int(sys.argv[2]), one_way)
    except KeyboardInterrupt:
        pass
