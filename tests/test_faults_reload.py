"""Faults around reloads: a storm of SIGHUPs against a real ``llama-swap`` process."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap

import psutil
import treq
from twisted.internet import defer, protocol, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.test_e2e import free_port, free_run, pid_alive, wait_until

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Child(protocol.ProcessProtocol):
    def __init__(self):
        self.output = []
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback((reason.value.exitCode, reason.value.signal))


class SighupStormTests(TestCase):
    timeout = 60

    def wait_for(self, predicate, timeout=15.0):
        return wait_until(self, predicate, timeout, lambda: "; llama-swap output:\n" + b"".join(
            self.child.output).decode(errors="replace")[-3000:])

    @defer.inlineCallbacks
    def get(self, path):
        try:
            response = yield treq.get(self.base + path, pool=self.pool, timeout=5)
            body = yield response.content()
        except Exception:
            return None
        return response.code, body

    def responders(self):
        """The model servers this llama-swap runs (its child processes)."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for child in children:
            try:
                if "llamaswap.testing.responder" in " ".join(child.cmdline()):
                    out.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    @defer.inlineCallbacks
    def test_twenty_sighups_in_two_seconds(self):
        port, model_port = free_port(), free_run(1)
        state = os.path.abspath(self.mktemp())
        os.makedirs(state)
        config = os.path.join(state, "config.yaml")
        cmd = f"{PY} -m llamaswap.testing.responder --port {model_port} --id A --silent"
        with open(config, "w") as f:
            f.write(textwrap.dedent(f"""
                healthCheckTimeout: 15
                hooks: {{on_startup: {{preload: [A]}}}}
                models:
                  A: {{cmd: "{cmd}", proxy: "http://127.0.0.1:{model_port}"}}
            """))
        env = dict(os.environ, XDG_RUNTIME_DIR=state, PYTHONUNBUFFERED="1")
        self.child = _Child()
        transport = reactor.spawnProcess(
            self.child, PY, [PY, "-m", "llamaswap", "--config", config, "--listen", f"127.0.0.1:{port}"],
            env=env, path=ROOT)
        self.pid = transport.pid
        self.base = f"http://127.0.0.1:{port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

        def kill():
            if pid_alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        self.addCleanup(kill)

        # preloaded and serving
        yield self.wait_for(lambda: self.get("/health"))
        yield self.wait_for(lambda: len(self.responders()) == 1)
        first = self.responders()

        for _ in range(20):
            os.kill(self.pid, signal.SIGHUP)
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(pid_alive(self.pid), "llama-swap died of the SIGHUPs")

        # the storm settles: the config did not change, so the model kept running and serves
        yield self.wait_for(lambda: b"".join(self.child.output).count(b"config reloaded") >= 1)
        self.assertEqual(self.responders(), first)
        response = yield treq.post(self.base + "/v1/chat/completions", json.dumps({"model": "A", "messages": []}).encode(),
                                   headers={"Content-Type": "application/json"}, pool=self.pool, timeout=10)
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(self.responders(), first)
        output = b"".join(self.child.output)
        # signals that arrive while a reload is pending or applied are coalesced: never more than one each
        self.assertTrue(1 <= output.count(b"config reloaded") <= 20, output.count(b"config reloaded"))
        self.assertNotIn(b"restarted=['A']", output)

        # an orderly stop leaves no model server behind
        last = self.responders()
        os.kill(self.pid, signal.SIGTERM)
        code, sig = yield self.child.ended
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)])  # twistd re-raises the signal it stopped on
        yield self.wait_for(lambda: not any(pid_alive(pid) for pid in last), timeout=5)
