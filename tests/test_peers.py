"""Peers, selectors and failover, end to end (issue 11).

The real service on a loopback port.  Peers are in-process fake upstreams
(the responder's site, or a small broken server) or a second llamaswap
instance, all on other loopback ports; local models are ``sleep`` children
proxied to in-process responders (``checkEndpoint: none``: ready at once),
or a child that fails to start.  Every wait is bounded; no test sleeps.
"""

from __future__ import annotations

import json
import socket

from twisted.internet import defer, reactor
from twisted.logger import formatEvent
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from .test_e2e import free_port, start_service
from .test_faults_upstream import SLEEPER, FaultHarness, _Body

DEAD = "http://127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


class Broken(Resource):
    """An upstream that fails: ``"500"`` answers every path 500 with a JSON
    error; ``"cut"`` sends a 200 stream head and one event, then drops the
    connection; ``"hang"`` never answers by itself: its requests wait in
    ``held`` until the test calls ``answer`` (``"ok"``: it has recovered,
    200 to everything).  ``hits`` lists the paths asked for (health checks
    included)."""

    isLeaf = True

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.hits: list[bytes] = []
        self.held: list = []

    def render(self, request):
        self.hits.append(request.path)
        if self.mode == "500":
            return self._error(request, 500)
        if self.mode == "ok":
            return b"{}"
        if self.mode == "hang":  # read the request, leave it unanswered
            self.held.append(request)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b'data: {"choices":[{"delta":{"content":"par"}}]}\n\n')
        reactor.callLater(0.05, request.channel.transport.abortConnection)
        return NOT_DONE_YET

    @staticmethod
    def _error(request, code: int) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return b'{"error":{"message":"boom"}}'

    def answer(self, code: int) -> None:
        """Answer every held request: ``code`` with the JSON error."""
        held, self.held = self.held, []
        for request in held:
            request.write(self._error(request, code))
            request.finish()


def at(where, health: str | None = None) -> str:
    """A peer's settings listing ``m1``: ``where`` is a port on 127.0.0.1 or a
    URL; ``health``, when given, the inside of its ``healthCheck``."""
    url = where if isinstance(where, str) else f"http://127.0.0.1:{where}"
    return f'proxy: "{url}", models: [m1]' + ("" if health is None else f", healthCheck: {{{health}}}")


class PeerHarness(FaultHarness):
    timeout = 30

    def broken(self, mode: str):
        resource = Broken(mode)
        return resource, self.listen(Site(resource))

    def start_instance(self, yaml_text: str):
        """A second llamaswap on another loopback port: ``(service, port)``."""
        port = free_port()
        service = start_service(self, yaml_text, port)
        self.addCleanup(lambda: service.running and service.stopService())  # unless the test stopped it
        return service, port

    @defer.inlineCallbacks
    def ask(self, model, **extra):
        """A chat request: ``(status, decoded JSON body or raw bytes)``."""
        headers = extra.pop("headers", {})
        response, body = yield self.post("/v1/chat/completions", dict({"model": model, "messages": []}, **extra),
                                         headers=headers)
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, body

    @staticmethod
    def sent(reply) -> dict:
        """What the responder received: its echo, with the parsed body."""
        echo = dict(reply["echo"])
        echo["json"] = json.loads(echo["body"])
        return echo


class PeerRoutingTests(PeerHarness):
    @defer.inlineCallbacks
    def test_names_precedence_key_filters_and_model_rewrite(self):
        _, port_r = self.responder_site("remote-up")
        _, port_o = self.responder_site("other-up")
        _, port_l = self.responder_site("local-up")
        self.start(f"""
            models:
              m2: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_l}", checkEndpoint: none, aliases: [m3]}}
            peers:
              remote:
                proxy: http://127.0.0.1:{port_r}/
                apiKey: peer-key
                models: [m1, m2, m3, shared]
                filters:
                  stripParams: temperature
                  setParams: {{top_k: 5}}
                  setParamsByID: {{"remote/m1": {{x: 1}}}}
              other:
                proxy: http://127.0.0.1:{port_o}
                models: [shared]
        """)
        client_auth = {"Authorization": "Bearer client-key", "x-api-key": "client-key"}
        code, reply = yield self.ask("remote/m1", temperature=0.3, headers=dict(client_auth))
        self.assertEqual((code, reply["echo"]["id"]), (200, "remote-up"))
        sent = self.sent(reply)
        self.assertEqual(sent["json"], {"model": "m1", "messages": [], "top_k": 5, "x": 1})
        self.assertEqual(reply["h_content_length"], len(sent["body"]))
        self.assertEqual((sent["headers"]["authorization"], sent["headers"]["x-api-key"]),
                         ("Bearer peer-key", "peer-key"))  # the peer's key, never the client's
        self.assertEqual(sent["headers"]["host"], f"127.0.0.1:{port_r}")
        self.assertEqual(sent["path"], "/v1/chat/completions")

        code, reply = yield self.ask("m1")  # listed by one peer only: the bare id works
        self.assertEqual((code, self.sent(reply)["json"]), (200, {"model": "m1", "messages": [], "top_k": 5}))
        for name, served_by, model in (("m2", "local-up", "m2"), ("m3", "local-up", "m3"),
                                       ("remote/m2", "remote-up", "m2"), ("remote/m3", "remote-up", "m3"),
                                       ("remote/shared", "remote-up", "shared"),
                                       ("other/shared", "other-up", "shared")):
            code, reply = yield self.ask(name, headers=dict(client_auth))
            self.assertEqual((code, reply["echo"]["id"], self.sent(reply)["json"]["model"]),
                             (200, served_by, model), name)  # local id, then alias, before a peer's bare id
        self.assertEqual(self.sent(reply)["headers"]["authorization"], "Bearer client-key")  # no apiKey: as sent
        for name in ("shared", "remote/nope", "nope/m1"):  # two peers list "shared"
            code, reply = yield self.ask(name)
            self.assertEqual((code, reply["error"]["message"]), (404, "no router for requested model"), name)
        self.assertEqual(self.starts, ["m2"])  # peer requests start nothing

        rows = yield self.activity("remote/m1", lambda r: True)
        self.assertEqual({r["resp_status_code"] for r in rows}, {200})
        self.assertEqual(len(rows), 2)  # "remote/m1" and the bare "m1"
        self.assertEqual(self.service.prometheus.get_sample_value(
            "llamaswap_requests_total", {"model": "remote/m1", "path": "/v1/chat/completions", "status": "200",
                                         "key": "-"}), 2.0)
        _, body = yield self.get("/upstream/remote/m1/test")  # /upstream reaches peers too (passthrough)
        self.assertEqual(body, b"remote-up")

    @defer.inlineCallbacks
    def test_second_llamaswap_instance_as_peer(self):
        _, port_up = self.responder_site("b-model")
        second, port_b = self.start_instance(f"""
            apiKeys: [key-of-b]
            models:
              m1: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_up}", checkEndpoint: none}}
        """)
        _, port_a = self.responder_site("a-model")
        self.start(f"""
            models:
              A: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_a}", checkEndpoint: none}}
            peers:
              b: {{proxy: "http://127.0.0.1:{port_b}", apiKey: key-of-b, models: [m1]}}
              b-nokey: {{proxy: "http://127.0.0.1:{port_b}", models: [m1]}}
            selectors:
              any: {{strategy: failover, targets: [b/m1, A]}}
        """)
        inflight = []
        self.addCleanup(self.service.events.subscribe(
            lambda kind, data: inflight.append(data["request"]["model"]) if data.get("operation") == "upsert" else None,
            kinds=("inflight",)))
        code, reply = yield self.ask("b/m1", stream=False)
        self.assertEqual((code, reply["echo"]["id"]), (200, "b-model"))
        self.assertEqual(self.sent(reply)["json"]["model"], "m1")
        self.assertIn("b/m1", inflight)
        code, reply = yield self.ask("b-nokey/m1")
        self.assertEqual(code, 401)  # the second instance wants its key: only "b" brings it
        rows = yield self.activity("b/m1", lambda r: r["resp_status_code"] == 200)
        self.assertEqual(rows[0]["req_path"], "/v1/chat/completions")
        self.assertEqual(second.runtime.processes["m1"].state.value, "ready")  # it ran there, not here
        _, body = yield self.get("/v1/models")
        ids = [m["id"] for m in json.loads(body)["data"]]
        self.assertEqual(ids, ["A", "any", "b-nokey/m1", "b/m1"])
        code, reply = yield self.ask("any")
        self.assertEqual((code, reply["echo"]["id"]), (200, "b-model"))
        yield second.stopService()  # the second instance goes away: the failover selector goes on
        code, reply = yield self.ask("any")
        self.assertEqual((code, reply["echo"]["id"]), (200, "a-model"))

    @defer.inlineCallbacks
    def test_streaming_backpressure_and_disconnect_reach_the_peer(self):
        site, port = self.responder_site("stream-up")
        self.start(f"""
            peers:
              remote: {{proxy: "http://127.0.0.1:{port}", models: [m1]}}
        """)
        response, body = yield self.open_stream("remote/m1", max_tokens=100)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("x-accel-buffering"), ["no"])
        yield body.done.addTimeout(5, reactor)
        self.assertTrue(body.data.rstrip().endswith(b"data: [DONE]"))
        # a client that never reads a very long stream: the peer is paused, then the client leaves
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(self.base.rsplit(":", 1)[1])))
        self.addCleanup(sock.close)
        payload = json.dumps({"model": "remote/m1", "stream": True, "messages": [], "max_tokens": 2_000_000}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        yield self.wait_for(lambda: site.responder.paused > 0, timeout=15)
        self.assertEqual(site.responder.in_flight, 1)
        sock.close()
        yield self.wait_for(lambda: site.responder.cancelled == 1 and site.responder.in_flight == 0)
        yield self.wait_for(lambda: self.runtime.peers.in_flight == 0)

    @defer.inlineCallbacks
    def test_reload_replaces_changed_peers_after_their_requests(self):
        _, port_one = self.responder_site("one", tokens=20, token_delay=0.02)
        _, port_two = self.responder_site("two")

        def config(port: int) -> str:
            return f"peers:\n  remote: {{proxy: 'http://127.0.0.1:{port}', models: [m1]}}\n"

        self.start(config(port_one))
        before = self.runtime.peers
        self.config_file(config(port_two))
        response, body = yield self.open_stream("remote/m1")  # in flight on the old peer across the reload
        self.assertTrue(self.service.reload())
        self.assertIsNot(self.runtime.peers, before)
        code, reply = yield self.ask("remote/m1")
        self.assertEqual((code, reply["echo"]["id"]), (200, "two"))
        yield body.done.addTimeout(5, reactor)
        self.assertTrue(body.data.rstrip().endswith(b"data: [DONE]"))
        self.assertIn(b'"model":"m1"', body.data)
        self.assertEqual(before.in_flight, 0)
        after = self.runtime.peers
        self.assertTrue(self.service.reload())  # nothing changed: the same peers
        self.assertIs(self.runtime.peers, after)

    @defer.inlineCallbacks
    def test_timeouts_and_unreachable_peers(self):
        _, port = self.responder_site("hang", hang_before_headers=True)
        self.start(f"""
            peers:
              slow: {{proxy: "http://127.0.0.1:{port}", models: [m1], timeouts: {{responseHeader: 1}}}}
              gone: {{proxy: "{DEAD}", models: [m2]}}
        """)
        self.assertEqual(self.runtime.peers.peers["gone"].timeouts.response_header, 60)  # the peers' default
        started = reactor.seconds()
        code, reply = yield self.ask("slow/m1")
        self.assertEqual(code, 504)
        self.assertIn("upstream timed out", reply["error"]["message"])
        self.assertLess(reactor.seconds() - started, 5)
        code, reply = yield self.ask("m2")
        self.assertEqual(code, 502)
        self.assertTrue(reply["error"]["message"].startswith("peer proxy error: "), reply)


class SelectorTests(PeerHarness):
    @defer.inlineCallbacks
    def test_pin_warm_and_spillover(self):
        _, a = self.responder_site("A-up", token_delay=0.1, tokens=5)
        _, b = self.responder_site("B-up")
        _, r = self.responder_site("R-up")
        self.start(f"""
            groups:
              both: {{swap: false, members: [A, B]}}
            models:
              A: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{a}", checkEndpoint: none}}
              B: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{b}", checkEndpoint: none, aliases: [b1]}}
            peers:
              remote: {{proxy: "http://127.0.0.1:{r}", models: [m1]}}
            selectors:
              pinned: {{strategy: pin, targets: [remote/m1, A]}}
              warmest: {{strategy: warm, targets: [b1, A], name: Warm one, metadata: {{tier: 1}}}}
              spill: {{strategy: spillover, targets: [A, B, remote/m1]}}
        """)
        code, reply = yield self.ask("pinned")
        self.assertEqual((code, reply["echo"]["id"], self.sent(reply)["json"]["model"]), (200, "R-up", "m1"))
        _, body = yield self.get("/v1/models")
        listed = {m["id"]: m for m in json.loads(body)["data"]}
        self.assertEqual(listed["warmest"]["meta"]["llamaswap"],
                         {"tier": 1, "type": "selector", "strategy": "warm", "targets": ["b1", "A"]})
        self.assertEqual(listed["warmest"]["name"], "Warm one")
        self.assertEqual(listed["spill"]["meta"]["llamaswap"]["spillover"], 1)
        self.assertEqual(listed["spill"]["status"], {"value": "unloaded"})

        # spillover: nothing active -> the first cold target; A busy with 1 (spillover 1) -> B
        slow = self.ask("spill", stream=False)
        yield self.wait_for(lambda: self.in_flight("A") == 1)
        code, reply = yield self.ask("spill")
        self.assertEqual((code, reply["echo"]["id"]), (200, "B-up"))
        self.assertEqual(self.sent(reply)["json"]["model"], "B")  # the body names the target
        code, reply = yield slow
        self.assertEqual((code, reply["echo"]["id"]), (200, "A-up"))
        # both active and idle now: least busy, ties in turn
        served = []
        for _ in range(4):
            code, reply = yield self.ask("spill")
            served.append(reply["echo"]["id"])
        self.assertEqual(sorted(served), ["A-up", "A-up", "B-up", "B-up"])
        self.assertNotEqual(served[0], served[1])

        # warm: b1 (B) and A both ready: the first listed that is ready
        code, reply = yield self.ask("warmest")
        self.assertEqual((code, reply["echo"]["id"], self.sent(reply)["json"]["model"]), (200, "B-up", "b1"))
        yield self.post("/api/models/unload/B", {})
        code, reply = yield self.ask("warmest")
        self.assertEqual(reply["echo"]["id"], "A-up")  # B stopped, A ready
        _, body = yield self.get("/v1/models")
        self.assertEqual({m["id"]: m["status"]["value"] for m in json.loads(body)["data"]}["warmest"], "loaded")

        rows = yield self.activity("B", lambda r: r.get("metadata") == {"selector": "warmest"})
        self.assertEqual(rows[0]["resp_status_code"], 200)
        rows = yield self.activity("remote/m1", lambda r: r.get("metadata") == {"selector": "pinned"})
        self.assertEqual(len(rows), 1)

    @defer.inlineCallbacks
    def test_profile_pins_to_peer_models_and_selectors(self):
        _, a = self.responder_site("A-up")
        _, r = self.responder_site("R-up")
        self.start(f"""
            models:
              A: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{a}", checkEndpoint: none}}
            peers:
              remote: {{proxy: "http://127.0.0.1:{r}", models: [m1]}}
            selectors:
              best: {{strategy: failover, targets: [remote/m1, A]}}
            profiles:
              away: {{pins: {{chat: remote/m1, smart: best, A: m1}}}}
        """)
        self.assertEqual((yield self.put_active("away")), (200, {"active": "away"}))
        for name, served_by in (("chat", "R-up"), ("smart", "R-up"), ("A", "R-up")):
            code, reply = yield self.ask(name)
            self.assertEqual((code, reply["echo"]["id"], self.sent(reply)["json"]["model"]), (200, served_by, "m1"))
        _, body = yield self.get("/v1/models")
        listed = {m["id"]: m["meta"]["llamaswap"]["type"] for m in json.loads(body)["data"]}
        self.assertEqual(listed, {"A": "model", "best": "selector", "chat": "profile", "smart": "profile",
                                  "remote/m1": "peer"})
        rows = yield self.activity("remote/m1", lambda r: r.get("metadata") == {"selector": "best"})
        self.assertEqual(len(rows), 1)

    @defer.inlineCallbacks
    def test_no_target_can_serve(self):
        resource, port = self.broken("500")
        self.start(f"""
            peers:
              sick: {{proxy: "http://127.0.0.1:{port}", models: [m1], healthCheck: {{interval: 30}}}}
            selectors:
              spill: {{strategy: spillover, targets: [sick/m1]}}
              fail: {{strategy: failover, targets: [sick/m1]}}
        """)
        yield self.wait_for(lambda: not self.runtime.peers.is_available("sick"))
        for name, message in (("spill", 'selector "spill" has no available spillover targets'),
                              ("fail", 'selector "fail" has no available targets')):
            code, reply = yield self.ask(name)
            self.assertEqual((code, reply["error"]["message"]), (503, message))
        self.assertEqual(resource.hits, [b"/health"])  # the check only: no request tried the peer


class FailoverTests(PeerHarness):
    def failover_config(self, *targets: str, **peers: str) -> str:
        listed = "\n".join(f"  {name}: {{{spec}}}" for name, spec in peers.items())
        return f"peers:\n{listed}\nselectors:\n  f: {{strategy: failover, targets: [{', '.join(targets)}]}}\n"

    @defer.inlineCallbacks
    def test_dead_peer_then_5xx_peer_then_a_good_one(self):
        resource, port_500 = self.broken("500")
        site, port_ok = self.responder_site("ok-up")
        self.start(self.failover_config(
            "dead/m1", "sick/m1", "good/m1",
            dead=at(DEAD), sick=at(port_500), good=at(port_ok)))
        response, body = yield self.open_stream("f")
        self.assertEqual(response.code, 200)
        yield body.done.addTimeout(5, reactor)
        self.assertIn(b"ok-up", body.data)
        self.assertNotIn(b"boom", body.data)  # nothing of the 500 reached the client
        self.assertEqual(resource.hits, [b"/v1/chat/completions"])
        rows = yield self.activity("good/m1", lambda r: True)
        self.assertEqual((rows[0]["resp_status_code"], rows[0]["metadata"]), (200, {"selector": "f"}))

    @defer.inlineCallbacks
    def test_all_fail_gives_the_last_failure(self):
        resource, port_500 = self.broken("500")
        self.start(self.failover_config(
            "sick/m1", "dead/m1", "sick2/m1",
            dead=at(DEAD), sick=at(port_500), sick2=at(port_500)))
        code, reply = yield self.ask("f")
        self.assertEqual((code, reply), (500, {"error": {"message": "boom"}}))  # the last one's own answer
        self.assertEqual(len(resource.hits), 2)
        self.start(self.failover_config(
            "sick/m1", "dead/m1",
            dead=at(DEAD), sick=at(port_500)))
        code, reply = yield self.ask("f")
        self.assertEqual(code, 502)
        self.assertTrue(reply["error"]["message"].startswith("peer proxy error"))

    @defer.inlineCallbacks
    def test_no_failover_once_bytes_were_sent(self):
        resource, port_cut = self.broken("cut")
        site, port_ok = self.responder_site("ok-up")
        self.start(self.failover_config(
            "cut/m1", "good/m1",
            cut=at(port_cut), good=at(port_ok)))
        response, body = yield self.open_stream("f")
        self.assertEqual(response.code, 200)
        yield body.done.addTimeout(5, reactor)
        self.assertIncomplete(body.reason)
        self.assertIn(b'"par"', body.data)
        self.assertEqual(site.responder.requests, 0)  # the next target was never tried
        rows = yield self.activity("cut/m1", lambda r: r["resp_status_code"] == 502)
        self.assertIn("upstream response failed", rows[0]["error_msg"])

    @defer.inlineCallbacks
    def test_local_model_that_fails_to_start_then_a_peer(self):
        site, port_ok = self.responder_site("ok-up")
        _, port_a = self.responder_site("A-up")
        self.start(f"""
            models:
              broken: {{cmd: "sh -c 'exit 1'", proxy: "{DEAD}"}}
              A: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_a}", checkEndpoint: none}}
            peers:
              good: {{proxy: "http://127.0.0.1:{port_ok}", models: [m1]}}
            selectors:
              f: {{strategy: failover, targets: [broken, good/m1]}}
              g: {{strategy: failover, targets: [good/m1, A]}}
        """)
        code, reply = yield self.ask("f", stream=True)
        self.assertEqual(code, 200)
        self.assertIn(b"ok-up", reply)
        self.assertEqual(self.starts, ["broken"])
        code, reply = yield self.ask("g")  # the first target serves: the second is never started
        self.assertEqual((code, reply["echo"]["id"]), (200, "ok-up"))
        self.assertEqual(self.starts, ["broken"])

    @defer.inlineCallbacks
    def test_health_checks_skip_a_failing_peer_and_are_published(self):
        resource, port_500 = self.broken("500")
        site, port_ok = self.responder_site("ok-up")
        events = []
        self.start(self.failover_config(
            "sick/m1", "good/m1",
            sick=at(port_500, health="path: /ready, interval: 0.2"), good=at(port_ok, health="")))
        self.addCleanup(self.service.events.subscribe(lambda kind, data: events.append(data), kinds=("peerStatus",)))
        yield self.wait_for(lambda: events)
        self.assertEqual(events, [{"peer": "sick", "available": False}])
        code, reply = yield self.ask("f")
        self.assertEqual((code, reply["echo"]["id"]), (200, "ok-up"))
        self.assertEqual(set(resource.hits), {b"/ready"})  # only checked, never sent the request
        _, body = yield self.get("/v1/models")
        available = {m["id"]: m["meta"]["llamaswap"].get("available") for m in json.loads(body)["data"]}
        self.assertEqual(available, {"sick/m1": False, "good/m1": True, "f": None})
        response = yield Agent(reactor, pool=self.pool).request(b"GET", (self.base + "/api/events").encode())
        stream = _Body()
        response.deliverBody(stream)
        yield stream.first
        resource.mode = "ok"  # the peer recovers: available again
        yield self.wait_for(lambda: len(events) == 2)
        self.assertEqual(events[1], {"peer": "sick", "available": True})
        frame = b'{"type":"peerStatus","data":"{\\"peer\\":\\"sick\\",\\"available\\":true}"}'
        yield self.wait_for(lambda: frame in stream.data)
        statuses = [json.loads(json.loads(line[5:])["data"]) for line in stream.data.splitlines()
                    if line.startswith(b"data:") and b'"modelStatus"' in line]
        self.assertIn(False, [m.get("available") for m in statuses[0] if m["id"] == "sick/m1"])
        self.assertIn(True, [m.get("available") for m in statuses[-1] if m["id"] == "sick/m1"])
        stream.transport.stopProducing()

    @defer.inlineCallbacks
    def test_a_health_check_that_times_out_says_so(self):
        """A peer that never answers its check is unavailable, and the log says
        why in words ("health check timed out"), not as a list of failures."""
        resource, port = self.broken("hang")
        logged = self.log_events()
        self.start(self.failover_config(
            "slow/m1", slow=at(port, health="interval: 0.2")))
        yield self.wait_for(lambda: not self.runtime.peers.is_available("slow"))
        [text] = [formatEvent(e) for e in logged if "is unavailable" in e.get("log_format", "")]
        self.assertEqual(text, "peer slow is unavailable: health check timed out")
