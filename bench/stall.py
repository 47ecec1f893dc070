"""How long does a 30 MiB request body hold llamaswap's reactor?

Run from the repository root: ``python bench/stall.py [--mib 30] [--runs 3]``.
The service runs in this process (as in the end-to-end tests) with the fake
upstream (``llamaswap.testing.responder``) as its model; a child process POSTs
the body, so building and sending it costs the measured reactor nothing.  A
``callLater`` chain every 5 ms records how late each call fires; the max and
p99 lateness over the whole request are printed per scenario:

* ``embeddings``: ``/v1/embeddings`` with one big ``input`` string, ``model``
  last (as the OpenAI SDK orders it), no filters, no captures;
* ``captures``: the same with ``captureBuffer: 64`` (the body is captured);
* ``filters``: the same through a model with ``useModelName`` and ``setParams``
  (the body is rewritten);
* ``multipart``: ``/v1/audio/transcriptions`` with a 30 MiB file field.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor, task  # noqa: E402

from llamaswap.config import load_config_text  # noqa: E402
from llamaswap.process import ChildRegistry  # noqa: E402
from llamaswap.service import build_service  # noqa: E402
from llamaswap.testing.lateness import LatenessProbe, post_in_child  # noqa: E402

PY = sys.executable
SCENARIOS = ("embeddings", "captures", "filters", "multipart")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(captures: int) -> str:
    cmd = f"{PY} -m llamaswap.testing.responder --port ${{PORT}} --id ${{MODEL_ID}} --silent"
    return f"startPort: {free_port()}\ncaptureBuffer: {captures}\n" + textwrap.dedent(f"""
        logToStdout: none
        models:
          E: {{cmd: "{cmd}"}}
          F:
            cmd: "{cmd}"
            useModelName: upstream-name
            filters: {{setParams: {{temperature: 0.5}}}}
    """)


@defer.inlineCallbacks
def scenario(name: str, size: int, runs: int):
    port = free_port()
    captures = 64 if name == "captures" else 0
    config = load_config_text(config_text(captures), environ=dict(os.environ))
    service = build_service(reactor, config, [f"tcp:{port}:interface=127.0.0.1"],
                            registry=ChildRegistry(tempfile.mkdtemp(prefix="llamaswap-stall-")))
    service.startService()
    try:
        model = "F" if name == "filters" else "E"
        path, kind = ("/v1/audio/transcriptions", "multipart") if name == "multipart" else ("/v1/embeddings", "json")
        # load the model first: the measurement is about the body, not the start
        yield post_in_child(reactor, port, path, 10, model, kind=kind)
        for _ in range(runs):
            store = service.api.captures
            def added() -> int:
                stats = store.stats()
                return stats["count"] + stats["evicted"] + stats["skipped"]
            before = added()
            probe = LatenessProbe(reactor)
            probe.start()
            result = yield post_in_child(reactor, port, path, size, model, kind=kind)
            yield task.deferLater(reactor, 0.05, lambda: None)  # the activity row
            for _ in range(1000 if captures else 0):  # and the capture, compressed in slices meanwhile
                if added() > before:
                    break
                yield task.deferLater(reactor, 0.01, lambda: None)
            probe.stop()
            stored = ""
            if captures:
                stats = store.stats()
                stored = f" captures={stats['count']} raw={stats['raw_bytes']} stored={stats['stored_bytes']}"
            print(f"{name:<11} status={result['status']} request={result['seconds'] * 1000:7.1f} ms  "
                  f"max lateness={probe.max * 1000:6.1f} ms  p99={probe.percentile(99) * 1000:5.1f} ms  "
                  f"ticks={len(probe.lateness)}{stored}", flush=True)
    finally:
        yield service.stopService()


@defer.inlineCallbacks
def main(args):
    for name in args.scenarios or SCENARIOS:
        yield scenario(name, args.mib << 20, args.runs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("scenarios", nargs="*", help="any of: " + ", ".join(SCENARIOS))
    args = parser.parse_args()
    if set(args.scenarios) - set(SCENARIOS):
        parser.error("unknown scenario")
    task.react(lambda _reactor: main(args))
