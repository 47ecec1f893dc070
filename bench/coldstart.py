"""Cold start against a real llama-server: request to first byte, beside the server's own start.

Run from the repository root with the project's virtualenv::

    python bench/coldstart.py [--rounds 9]

The llama-server binary is looked for as ``tests/integration`` does:
``$LLAMASWAP_LLAMA_SERVER``, then ``scripts/build-llama-server.sh``'s cache,
then ``PATH``; without one (or without the ``gguf`` package and the
vocabulary that ``scripts/make_tiny_gguf.py`` needs) the benchmark says why
and exits 0.  The model is the tiny random GGUF of ``make_tiny_gguf.py``
(about 9 MB, healthy about 0.1 s after exec on a CPU).

Each round, interleaved:

* **own**: llama-server exec'd directly and ``GET /health`` polled every
  millisecond on a fresh connection: the time from just before the exec to
  the first 200, the server's own exec-to-healthy time;
* **llamaswap**: llamaswap (``python -m llamaswap``, a child process) is
  told to unload every model, then a streaming chat request (one token) for
  the stopped model is sent: the time from sending it to its first byte.

It prints both per round, their median and minimum, and the difference
(llamaswap's overhead on a cold start; the issue's target: at most 30 ms).
The driver uses plain blocking sockets: it has no reactor to stall, and
they add the least to what is measured.  Not a test: nothing here gates CI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, "stream": True}


def load_tiny():
    spec = importlib.util.spec_from_file_location("make_tiny_gguf", os.path.join(ROOT, "scripts", "make_tiny_gguf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_llama_server(tiny) -> tuple[str | None, str]:
    """(binary, "") or (None, why not)."""
    binary = os.environ.get("LLAMASWAP_LLAMA_SERVER")
    if binary and not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        return None, f"LLAMASWAP_LLAMA_SERVER={binary!r} is not an executable file"
    if not binary:
        builds = tiny.cached_builds()
        binary = os.path.join(builds[0], "bin", "llama-server") if builds else shutil.which("llama-server")
    if not binary:
        return None, ("no llama-server found: set LLAMASWAP_LLAMA_SERVER, run scripts/build-llama-server.sh, "
                      "or put llama-server on PATH")
    if tiny.find_vocab(binary) is None:
        return None, f"no {tiny.VOCAB_NAME} for {binary} (see scripts/make_tiny_gguf.py)"
    try:
        tiny.import_gguf(llama_server=binary)
    except ImportError as e:
        return None, f"the gguf package is not importable ({e})"
    return binary, ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> int | None:
    """The status of ``GET /health`` on a fresh connection; None when refused."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return None
    with s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head = s.recv(64)
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def post(port: int, path: str, body: dict) -> tuple[float, bytes]:
    """POST ``body``; (seconds from sending to the first byte of the answer, the answer)."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
        started = time.perf_counter()
        s.sendall(head + data)
        chunk = s.recv(65536)
        first = time.perf_counter() - started
        answer = [chunk]
        while chunk:
            chunk = s.recv(65536)
            answer.append(chunk)
    return first, b"".join(answer)


def command(binary: str, model: str, port: str) -> list[str]:
    return [binary, "--port", port, "-m", model, "-c", "256", "-t", "1", "--host", "127.0.0.1"]


def own_start(binary: str, model: str) -> float:
    """llama-server's exec-to-healthy time, polled every millisecond."""
    port = free_port()
    started = time.perf_counter()
    child = subprocess.Popen(command(binary, model, str(port)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        while health(port) != 200:
            if child.poll() is not None:
                raise SystemExit(f"llama-server exited with {child.returncode} before it was healthy")
            time.sleep(0.001)
        return time.perf_counter() - started
    finally:
        child.terminate()
        child.wait(30)


class Llamaswap:
    """``python -m llamaswap`` with one model, the tiny GGUF on llama-server."""

    def __init__(self, binary: str, model: str) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="llamaswap-coldstart-")
        cmd = " ".join(command(binary, model, "${PORT}"))
        config = (f"startPort: {free_port()}\nhealthCheckTimeout: 60\nlogToStdout: none\nmodels:\n"
                  f"  tiny:\n    cmd: {json.dumps(cmd)}\n    proxy: \"http://127.0.0.1:${{PORT}}\"\n")
        path = os.path.join(self.dir, "config.yaml")
        with open(path, "w") as f:
            f.write(config)
        env = dict(os.environ, XDG_RUNTIME_DIR=self.dir)  # its own registry of children
        self.proc = subprocess.Popen([PY, "-m", "llamaswap", "--config", path, "--listen", f"127.0.0.1:{self.port}"],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while health(self.port) != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("llamaswap did not start")
            time.sleep(0.05)

    def cold_first_byte(self) -> float:
        post(self.port, "/api/models/unload", {})  # answers once the model has stopped
        time.sleep(0.2)  # let the machine settle, as before the direct start
        first, answer = post(self.port, "/v1/chat/completions", dict(CHAT, model="tiny"))
        if not answer.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"llamaswap answered {answer[:200]!r}")
        return first

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        shutil.rmtree(self.dir, ignore_errors=True)


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:6.1f} ms, min {min(values) * 1000:6.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    tiny = load_tiny()
    binary, why = find_llama_server(tiny)
    if binary is None:
        print(f"coldstart: skipped, {why}")
        return 0
    work = tempfile.mkdtemp(prefix="llamaswap-coldstart-model-")
    try:
        model = tiny.make_tiny_gguf(os.path.join(work, "tiny.gguf"), seed=1, llama_server=binary, name="tiny")
        print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; {binary}")
        own_start(binary, model)  # page cache and the like, for both sides
        server = Llamaswap(binary, model)
        try:
            server.cold_first_byte()
            own, cold = [], []
            for i in range(args.rounds):
                time.sleep(0.2)
                own.append(own_start(binary, model))
                cold.append(server.cold_first_byte())
                print(f"  round {i + 1}: llama-server exec to healthy {own[-1] * 1000:6.1f} ms, "
                      f"llamaswap request to first byte {cold[-1] * 1000:6.1f} ms", flush=True)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"llama-server exec to healthy (own)       {ms(own)}")
    print(f"llamaswap request to first byte (cold)   {ms(cold)}")
    print(f"difference                               median {(statistics.median(cold) - statistics.median(own)) * 1000:+6.1f} ms,"
          f" min {(min(cold) - min(own)) * 1000:+6.1f} ms (target: at most +30 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
