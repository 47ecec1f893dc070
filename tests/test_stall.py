"""The reactor is never held for long by a big body (30 MiB through the real service).

A ``callLater`` chain every 5 ms records how late each call fires while a
child process POSTs the body (see ``llamaswap.testing.lateness``); the max
lateness is printed so it can be quoted.  The issue's target is about 20 ms;
the assertion leaves room for a loaded two-core CI box, where the client,
the fake upstream (which parses the 30 MiB too) and this process share the
CPUs.  ``bench/stall.py`` prints the same figures, with p99.
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor, task

from llamaswap.testing.lateness import LatenessProbe, post_in_child

from .test_e2e import Harness, responder

SIZE = 30 * 1024 * 1024
BOUND = 0.150  # seconds; measured 15-35 ms here (unfixed: 60-190 ms, up to 1 s for multipart)

MODELS = f"""
    healthCheckTimeout: 15
    models:
      E: {{cmd: "{responder()}"}}
      F:
        cmd: "{responder()}"
        useModelName: upstream-name
        filters: {{setParams: {{temperature: 0.5}}}}
"""


class StallTests(Harness):
    timeout = 90

    @defer.inlineCallbacks
    def measure(self, label: str, path: str, model: str, kind: str = "json", settled=None):
        port = int(self.base.rsplit(":", 1)[1])
        yield post_in_child(reactor, port, path, 10, model, kind=kind)  # the model is up first
        probe = LatenessProbe(reactor)
        probe.start()
        try:
            result = yield post_in_child(reactor, port, path, SIZE, model, kind=kind)
            yield task.deferLater(reactor, 0.05, lambda: None)  # the activity row is stored
            if settled is not None:  # and the capture compressed: the probe keeps running throughout
                yield self.wait_for(settled)
        finally:
            probe.stop()
        print(f"\n{label}: 30 MiB body, max timer lateness {probe.max * 1000:.1f} ms, "
              f"p99 {probe.percentile(99) * 1000:.1f} ms over {len(probe.lateness)} ticks")
        self.assertEqual(result["status"], 200)
        self.assertGreater(len(probe.lateness), 10)
        self.assertLess(probe.max, BOUND)
        return result

    @defer.inlineCallbacks
    def test_big_bodies(self):
        self.start(MODELS)
        yield self.measure("embeddings", "/v1/embeddings", "E")
        yield self.measure("filters", "/v1/embeddings", "F")  # the body is rewritten on its way
        yield self.measure("multipart", "/v1/audio/transcriptions", "E", kind="multipart")
        _, body = yield self.get("/api/metrics/activity")
        rows = json.loads(body)
        self.assertGreaterEqual(len(rows.get("data", rows) if isinstance(rows, dict) else rows), 6)

    @defer.inlineCallbacks
    def test_big_body_captured(self):
        self.start("\n    captureBuffer: 64" + MODELS)
        captures = self.service.api.captures
        yield self.measure("captured", "/v1/embeddings", "E", settled=lambda: captures.stats()["count"] == 2)
        stats = captures.stats()
        self.assertEqual(stats["count"], 2)
        self.assertGreater(stats["raw_bytes"], SIZE)
