"""Model loads for one random workload: resource budgets vs one-at-a-time swapping.

Run from the repository root: ``python bench/budgets.py [--requests 200]
[--clients 4] [--seed 14] [--mix uniform skewed]``.

Five fake models (``llamaswap.testing.responder``) declare 4, 6, 8, 10 and
12 GiB of ``vram``.  The same seeded random sequence of requests (each held
20 ms by the upstream, sent by ``--clients`` concurrent clients) runs twice
through llamaswap, in this process as in the end-to-end tests:

* ``one-at-a-time``: the default group, as llama-swap without groups: every
  load evicts the model before it;
* ``budgets``: ``resources.capacity: {vram: 24GiB}`` and one ``swap: false``
  group, so as many models stay loaded as fit and the least recently used
  idle one is evicted.

For each it prints the loads (process starts), the wall time, and, with
budgets, the most vram the running models declared at any state change
(never above 24 GiB).  ``uniform`` draws the five models alike; ``skewed``
draws them with weights 8:4:2:1:1 (a few favourites, as on a home server).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import treq  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.web.client import HTTPConnectionPool  # noqa: E402

from llamaswap.config import load_config_text  # noqa: E402
from llamaswap.process import ChildRegistry  # noqa: E402
from llamaswap.service import build_service  # noqa: E402

PY = sys.executable
GiB = 1024 ** 3
SIZES = {"m4": 4, "m6": 6, "m8": 8, "m10": 10, "m12": 12}  # GiB
CAPACITY = 24
MIXES = {"uniform": (1, 1, 1, 1, 1), "skewed": (8, 4, 2, 1, 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(budgets: bool) -> str:
    cmd = f"{PY} -m llamaswap.testing.responder --port ${{PORT}} --id ${{MODEL_ID}} --silent"
    lines = [f"startPort: {free_port()}", "logToStdout: none", "healthCheckTimeout: 30", "models:"]
    for name, size in SIZES.items():
        extra = f", resources: {{vram: {size}GiB}}" if budgets else ""
        lines.append(f"  {name}: {{cmd: \"{cmd}\"{extra}}}")
    if budgets:
        lines += [f"resources: {{capacity: {{vram: {CAPACITY}GiB}}}}",
                  f"groups: {{all: {{swap: false, members: [{', '.join(SIZES)}]}}}}"]
    return "\n".join(lines) + "\n"


@defer.inlineCallbacks
def run(mode: str, workload: list, clients: int):
    budgets = mode == "budgets"
    port = free_port()
    config = load_config_text(config_text(budgets), environ=dict(os.environ))
    service = build_service(reactor, config, [f"tcp:{port}:interface=127.0.0.1"],
                            registry=ChildRegistry(tempfile.mkdtemp(prefix="llamaswap-budgets-")))
    service.startService()
    pool = HTTPConnectionPool(reactor, persistent=False)
    loads = []
    peak = [0]

    def on_status(kind, data):
        if data["state"] == "starting":
            loads.append(data["id"])
        used = sum(SIZES[m] for m, p in service.runtime.processes.items()
                   if str(p.state) in ("starting", "ready", "stopping"))
        peak[0] = max(peak[0], used)

    unsubscribe = service.events.subscribe(on_status, kinds=("modelStatus",))
    todo = list(reversed(workload))
    failures = []

    @defer.inlineCallbacks
    def client():
        while todo:
            model = todo.pop()
            response = yield treq.post(f"http://127.0.0.1:{port}/v1/chat/completions?wait=20ms",
                                       json.dumps({"model": model, "messages": []}).encode(),
                                       headers={"Content-Type": "application/json"}, pool=pool)
            yield response.content()
            if response.code != 200:
                failures.append(response.code)

    started = reactor.seconds()
    elapsed = 0.0
    try:
        yield defer.gatherResults([client() for _ in range(clients)], consumeErrors=True)
        elapsed = reactor.seconds() - started
    finally:
        unsubscribe()
        yield service.stopService()
        yield pool.closeCachedConnections()
    return {"loads": len(loads), "seconds": elapsed, "peak": peak[0], "failures": failures}


@defer.inlineCallbacks
def main(args):
    print(f"{args.requests} requests, {args.clients} clients, seed {args.seed}; models "
          + ", ".join(f"{m} {s} GiB" for m, s in SIZES.items()) + f"; capacity {CAPACITY} GiB", flush=True)
    for mix in args.mix:
        rng = random.Random(args.seed)
        workload = rng.choices(list(SIZES), weights=MIXES[mix], k=args.requests)
        results = {}
        for mode in ("one-at-a-time", "budgets"):
            results[mode] = result = yield run(mode, workload, args.clients)
            peak = f", peak declared vram {result['peak']} GiB" if mode == "budgets" else ""
            failed = f", FAILED: {result['failures']}" if result["failures"] else ""
            print(f"  {mix:<8} {mode:<14} loads {result['loads']:4d}  {result['seconds']:6.1f} s{peak}{failed}",
                  flush=True)
        one, budget = results["one-at-a-time"]["loads"], results["budgets"]["loads"]
        print(f"  {mix:<8} budgets need {budget / one:.2f}x the loads of one-at-a-time ({budget} vs {one})",
              flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--mix", nargs="*", default=list(MIXES), choices=list(MIXES))
    args = parser.parse_args()
    task.react(lambda _reactor: main(args))
