"""The benchmark: every workload with every client, in turn, against one mock upstream.

    python -m pip install -e ".[bench]" && python bench/run.py [--rounds N]

W1: one long reply (4,000 events growing by 4 characters, about 48 MB of SSE).
W2: 1,000 concurrent conversations of 50 events each, in one event loop.
W3: cold start, the whole process, and the import time alone.
W4: peak memory in W1 and W2, and with one 50 MB event.
W5: time to the first piece over TLS and a 50 ms round trip: the first call (login
    included), later calls, and a second command line after a first.
W6: one reply in the delta format of a ChatGPT-web gateway: 4,000 small deltas.

Clients run in turn (A B C ... A B C ...), each in a process of its own. The upstream is
`replay.py` in another process: the mock's answers rendered once (in a warm-up that is
not measured) and replayed as bytes, so that the client is the bottleneck, not the
mock's JSON. It runs on a core of its own, the clients on the others. Its share of the
CPU is reported for each workload, beside the client's own CPU time. The tables are
medians and ratios from this one run, printed as Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLIENTS = ["fakegpt", "aiohttp", "httpx", "floor", "limit"]


def cpu_sets() -> Tuple[Set[int], Set[int]]:
    """The cores of the replaying upstream, and those of the clients: apart. Left to the
    scheduler, a client and the upstream it talks to often share a core (the kernel wakes
    a process where its partner ran), and each then waits for the other: the limit's W1
    conversation took 72-106 ms so and 15-26 ms on two cores. (One core: no choice.)"""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return set(), set()
    return {cpus[-1]}, set(cpus[:-1])


UPSTREAM_CPUS, CLIENT_CPUS = cpu_sets()


def start_replay(*options: str) -> "subprocess.Popen[str]":
    """`replay.py` with these mock options, on the upstream's cores; it prints its URL."""
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "replay.py"), *options], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    if UPSTREAM_CPUS:
        os.sched_setaffinity(process.pid, UPSTREAM_CPUS)
    return process


def on_client_cpus() -> None:
    """A `preexec_fn`: the process runs on the clients' cores."""
    if CLIENT_CPUS:
        os.sched_setaffinity(0, CLIENT_CPUS)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(client: str, workload: str, url: str, repeats: int, mock_pid: int) -> Tuple[Dict[str, Any], float]:
    before = cpu_seconds(mock_pid)
    output = subprocess.run([sys.executable, os.path.join(HERE, "worker.py"), client, workload, url, str(repeats)],
                            capture_output=True, text=True, cwd=ROOT, timeout=900, preexec_fn=on_client_cpus).stdout
    result = json.loads(output.strip().splitlines()[-1])
    busy = sum(result["times"])
    return result, ((cpu_seconds(mock_pid) - before) / busy if busy else float("nan"))


def measure(workload: str, clients: List[str], url: str, repeats: int, rounds: int, mock_pid: int) -> Dict[str, Dict[str, Any]]:
    worker(clients[0], workload, url, 1, mock_pid)  # warm-up: the upstream renders its answers
    table: Dict[str, Dict[str, Any]] = {c: {"times": [], "cpu": [], "errors": 0, "rss": 0.0, "mock": [], "failure": ""} for c in clients}
    for _ in range(rounds):
        for client in clients:
            result, mock_share = worker(client, workload, url, repeats, mock_pid)
            row = table[client]
            row["times"] += result["times"]
            row["cpu"] += result["cpu"]
            row["errors"] += result["errors"]
            row["rss"] = max(row["rss"], result["maxrss_mb"])
            row["mock"].append(mock_share)
            row["failure"] = row["failure"] or result.get("failure", "")
    return table


def process_seconds(commands: Dict[str, List[str]], rounds: int) -> Dict[str, float]:
    """Median wall time of each command as a whole process, the commands taking turns."""
    # As installed: bytecode cached (pip compiles aiohttp's on install; PYTHONDONTWRITEBYTECODE,
    # set on some machines, would make only fakegpt recompile its source every time).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times: Dict[str, List[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, capture_output=True, cwd=ROOT, check=True, timeout=120, env=env,
                           preexec_fn=on_client_cpus)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


ONE_WAY_MS = 25  # W5's forwarder: a 50 ms round trip
RTT = 2 * ONE_WAY_MS / 1000
LATER_CALLS = 7


def first_byte_seconds(command: List[str], env: Dict[str, str]) -> float:
    """Seconds from starting `command` to the first byte it writes on stdout."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT, env=env)
    assert process.stdout is not None
    first = process.stdout.read(1)
    elapsed = time.perf_counter() - started
    rest = process.stdout.read()
    if process.wait(60) != 0 or not first + rest:
        raise RuntimeError(f"{command} failed")
    return elapsed


def call_seconds(command: List[str], env: Dict[str, str]) -> float:
    """Seconds from the call's start to its first piece, as `command --verbose` reports
    them: the command less the interpreter's start and imports."""
    output = subprocess.run([*command[:3], "--verbose", *command[3:]], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=60, check=True)
    found = re.search(r"first piece after (\d+) ms", output.stderr)
    if found is None:
        raise RuntimeError(f"{command}: no timing in its log")
    return int(found.group(1)) / 1000


def echo_round_trip(port: int, pings: int = 20) -> float:
    """The median seconds a small message takes to come back from an echo at `port`."""
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(pings + 1):
            started = time.perf_counter()
            sock.sendall(b"x" * 100)
            received = 0
            while received < 100:
                received += len(sock.recv(100))
            if index:  # the first one waits out the emulated TCP handshake
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def link_round_trips() -> Tuple[float, float]:
    """What W5's link takes for a round trip, measured: an echo's, through the forwarder
    and without it (the rest of W5's round trips also cross the TLS mock)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        for _ in range(2):  # the forwarder's connection, then the direct one
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)

    echoing = threading.Thread(target=echo, daemon=True)
    echoing.start()
    port = listener.getsockname()[1]
    forwarder = subprocess.Popen([sys.executable, os.path.join(HERE, "forwarder.py"), "127.0.0.1", str(port), str(ONE_WAY_MS)],
                                 stdout=subprocess.PIPE, text=True)
    try:
        assert forwarder.stdout is not None
        through = echo_round_trip(int(forwarder.stdout.readline()))
        direct = echo_round_trip(port)
    finally:
        forwarder.terminate()
        forwarder.wait(10)
    echoing.join(10)
    listener.close()
    return through, direct


def w5(rounds: int) -> None:
    """W5: a TLS mock behind a forwarder that adds 25 ms each way."""
    ca = os.path.join(ROOT, "testdata", "ca.pem")
    upstream = subprocess.Popen([sys.executable, "-m", "mock_server", "--port", "0", "--quiet", "--certfile",
                                 os.path.join(ROOT, "testdata", "server.pem"), "--keyfile",
                                 os.path.join(ROOT, "testdata", "server.key")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    forwarder = None
    try:
        assert upstream.stdout is not None
        port = upstream.stdout.readline().strip().rsplit(":", 1)[1]
        forwarder = subprocess.Popen([sys.executable, os.path.join(HERE, "forwarder.py"), "127.0.0.1", port, str(ONE_WAY_MS)],
                                     stdout=subprocess.PIPE, text=True)
        assert forwarder.stdout is not None
        url = f"https://127.0.0.1:{forwarder.stdout.readline().strip()}"
        calls: Dict[str, Dict[str, List[float]]] = {c: {"first": [], "later": []} for c in ("fakegpt", "aiohttp", "httpx")}
        commands: Dict[str, List[float]] = {}
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "FAKEGPT_NO_SESSION_CACHE")}
        env["SSL_CERT_FILE"] = ca  # the command line trusts the test CA as it would the system's
        cli = [sys.executable, "-m", "fakegpt", "--url", url, "W5 command"]
        for _ in range(rounds):
            for client, row in calls.items():
                output = subprocess.run([sys.executable, os.path.join(HERE, "latency.py"), "calls", client, url, ca,
                                         str(LATER_CALLS)], capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
                result = json.loads(output.stdout.strip().splitlines()[-1])
                row["first"].append(result["first"])
                row["later"] += result["later"]
            with tempfile.TemporaryDirectory() as cache:
                env["XDG_CACHE_HOME"] = cache  # a fresh user: the first command logs in, the second not
                commands.setdefault("fakegpt, first command (logs in)", []).append(first_byte_seconds(cli, env))
                commands.setdefault("fakegpt, second command", []).append(first_byte_seconds(cli, env))
                commands.setdefault("fakegpt, a later command, from the call's start (its --verbose log)", []).append(
                    call_seconds(cli, env))
            for peer in ("aiohttp", "httpx"):
                command = [sys.executable, os.path.join(HERE, "latency.py"), "once", peer, url, ca]
                commands.setdefault(f"{peer} as a command (logs in: no session kept)", []).append(first_byte_seconds(command, env))
            commands.setdefault("fakegpt --version (interpreter start and imports)", []).append(
                first_byte_seconds([sys.executable, "-m", "fakegpt", "--version"], env))
    finally:
        for process in (forwarder, upstream):
            if process is not None:
                process.terminate()
                process.wait(10)
    through, direct = link_round_trips()
    print(f"\nW5: time to the first piece over TLS, {2 * ONE_WAY_MS} ms round trip (RTT), medians\n")
    print("| client | first call (login included) | later calls |")
    print("| --- | ---: | ---: |")
    for client, row in calls.items():
        first, later = statistics.median(row["first"]), statistics.median(row["later"])
        print(f"| {client} | {first * 1000:.0f} ms ({first / RTT:.2f} RTT) | {later * 1000:.0f} ms ({later / RTT:.2f} RTT) |")
    print("\n| command, from its start to the first piece on stdout | median |")
    print("| --- | ---: |")
    for name, values in commands.items():
        value = statistics.median(values)
        print(f"| {name} | {value * 1000:.0f} ms ({value / RTT:.2f} RTT) |")
    print(f"\nThe link, measured: an echo's round trip took {through * 1000:.2f} ms through the forwarder, "
          f"{direct * 1000:.2f} ms without it (medians of 20).")


def median_ms(row: Dict[str, Any]) -> float:
    return statistics.median(row["times"]) * 1000 if row["times"] else float("nan")


def print_table(title: str, table: Dict[str, Dict[str, Any]]) -> None:
    limit = median_ms(table["limit"]) if "limit" in table else float("nan")
    aiohttp = median_ms(table["aiohttp"])
    print(f"\n{title}\n")
    print("| client | median | x limit | x aiohttp | client CPU | peak RSS | errors | upstream CPU share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for client, row in table.items():
        ms = median_ms(row)
        failure = " ".join(row["failure"].split())[:60]
        failure = f" ({failure})" if failure else ""
        mock = statistics.median(row["mock"])
        cpu = statistics.median(row["cpu"]) * 1000 if row["cpu"] else float("nan")
        print(f"| {client} | {number(ms, '{:.1f} ms')} | {number(ms / limit, '{:.2f}')} | "
              f"{number(ms / aiohttp, '{:.2f}')} | {number(cpu, '{:.1f} ms')} | {row['rss']:.0f} MB | "
              f"{row['errors']}{failure} | {number(mock * 100, '{:.0f}%')} |")


def number(value: float, form: str) -> str:
    return "-" if math.isnan(value) else form.format(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Five turns: on a shared VM a slow second can land on any one process; a median of
    # five shrugs off two of them, a median of three only one.
    parser.add_argument("--rounds", type=int, default=5, help="turns of every client (default 5)")
    parser.add_argument("--workloads", default="W1,W2,W3,W4,W5,W6",
                        help="which workloads to run, comma-separated (default: all)")
    args = parser.parse_args()
    wanted = set(args.workloads.upper().split(","))
    mock = start_replay()
    try:
        assert mock.stdout is not None
        url = mock.stdout.readline().strip()
        print(f"fakegpt benchmark, {datetime.date.today()}, Python {platform.python_version()}, "
              f"{os.cpu_count()} cores, {platform.machine()}; replayed mock answers at {url}, in its own process")
        if "W1" in wanted:
            w1 = measure("W1", CLIENTS, url, repeats=5, rounds=args.rounds, mock_pid=mock.pid)
            print_table("W1: one reply of 4,000 events (about 48 MB), per conversation", w1)
        if "W2" in wanted:
            w2 = measure("W2", ["fakegpt", "aiohttp", "httpx", "floor", "limit"], url, repeats=1, rounds=args.rounds, mock_pid=mock.pid)
            print_table("W2: 1,000 concurrent conversations of 50 events, wall time", w2)
        if "W6" in wanted:
            gateway = start_replay("--profile", "backend-api", "--access-token", "bench-access-token")
            try:
                assert gateway.stdout is not None
                gateway_url = gateway.stdout.readline().strip()
                w6 = measure("W6", ["fakegpt", "aiohttp"], gateway_url, repeats=10, rounds=args.rounds, mock_pid=gateway.pid)
            finally:
                gateway.terminate()
                gateway.wait(10)
            print_table("W6: one reply of 4,000 small deltas (the delta format), per conversation", w6)
            cpu = {name: statistics.median(row["cpu"]) if row["cpu"] else float("nan") for name, row in w6.items()}
            print(f"\nW6 client CPU per conversation, fakegpt / aiohttp: {number(cpu['fakegpt'] / cpu['aiohttp'], '{:.2f}')}")
        if "W4" in wanted:
            w4 = measure("W4", ["fakegpt", "aiohttp", "httpx", "limit"], url, repeats=1, rounds=1, mock_pid=mock.pid)
            print_table("W4: one 50 MB event (peak RSS is the point)", w4)
        if "W5" in wanted:
            w5(args.rounds)
        if "W3" not in wanted:
            return 0
        subprocess.run([sys.executable, "-m", "compileall", "-q", "fakegpt.py", "mock_server.py"], cwd=ROOT, check=True)
        cold = process_seconds({
            # A login each time, as the aiohttp flow does (the session cache would skip it).
            "fakegpt CLI (python -m fakegpt --url URL hi)": [sys.executable, "-m", "fakegpt", "--url", url,
                                                           "--no-session-cache", "hi"],
            "aiohttp flow (bench/aiohttp_cli.py URL hi)": [sys.executable, os.path.join(HERE, "aiohttp_cli.py"), url, "hi"],
            "import fakegpt": [sys.executable, "-c", "import fakegpt"],
            "import aiohttp": [sys.executable, "-c", "import aiohttp"],
            "import httpx, httpx_sse": [sys.executable, "-c", "import httpx, httpx_sse"],
            "python": [sys.executable, "-c", "pass"],
        }, rounds=max(args.rounds * 7, 5))
        python = cold.pop("python")
        for name in cold:
            if name.startswith("import"):
                cold[name] -= python
        print("\nW3: cold start, median of whole processes (imports: less a bare `python -c pass`)\n")
        print("| what | median |")
        print("| --- | ---: |")
        for what, seconds in cold.items():
            print(f"| {what} | {seconds * 1000:.0f} ms |")
        ratio = cold["fakegpt CLI (python -m fakegpt --url URL hi)"] / cold["aiohttp flow (bench/aiohttp_cli.py URL hi)"]
        print(f"\nW3 ratio fakegpt / aiohttp, whole process: {ratio:.2f}")
    finally:
        mock.terminate()
        mock.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
