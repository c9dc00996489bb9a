"""One client, one workload, in a process of its own (so that peak memory is its own).

    python bench/worker.py CLIENT WORKLOAD URL REPEATS

Prints one JSON line: the seconds of each repeat (wall and this process's CPU), the peak
RSS and the error count.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mock_server
from peers import CLIENTS, DELTA_CLIENTS

W1_PROMPT = "[[chars 16000]] W1: a long reply of 4,000 events"
W2_STREAMS, W2_PROMPT = 1000, "[[chars 200]] W2 stream {index}"
W4_PROMPT = "[[chars 50000000]] [[step 50000000]] W4: one 50 MB event"
W6_PROMPT = "[[chars 16000]] W6: a reply of 4,000 small deltas"


async def run(client_name: str, workload: str, url: str, repeats: int) -> Dict[str, Any]:
    client = (DELTA_CLIENTS if workload == "W6" else CLIENTS)[client_name](url)
    await client.login()
    prompts = {"W1": [W1_PROMPT], "W4": [W4_PROMPT], "W6": [W6_PROMPT]}.get(
        workload, [W2_PROMPT.format(index=i) for i in range(W2_STREAMS)])
    if hasattr(client, "prepare"):
        for prompt in prompts:
            await client.prepare(prompt)
    # Every client but the limit must return the mock's exact reply to count as correct.
    expected = {} if client_name == "limit" else {p: mock_server.default_reply(p) for p in prompts}
    times: List[float] = []
    cpu: List[float] = []
    errors = 0
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        if workload == "W2":
            results = await asyncio.gather(*(client.conversation(p) for p in prompts), return_exceptions=True)
        else:
            results = [await client.conversation(prompts[0])]
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        errors += sum(isinstance(r, BaseException) or r != expected.get(p, r) for r, p in zip(results, prompts))
    await client.close()
    return {"times": times, "cpu": cpu, "errors": errors,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    name, workload, url, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    try:
        result = asyncio.run(run(name, workload, url, repeats))
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
        result = {"times": [], "cpu": [], "errors": repeats, "failure": f"{type(exc).__name__}: {exc}"[:200],
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(result))
