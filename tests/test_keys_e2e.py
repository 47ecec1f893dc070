"""API keys end to end: scopes, limits, attribution, reload, and no key material anywhere."""

from __future__ import annotations

import base64
import json
import os
import sys
import textwrap

import treq
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import HTTPConnectionPool, ResponseFailed

from llamaswap.config import load_config, load_config_text
from llamaswap.process import ChildRegistry
from llamaswap.service import build_service

from .test_e2e import Harness, free_port, free_run, responder, wait_until
from .test_observability import _Lines

ADMIN_KEY = "sk-admin-e2e-9f1c"
ALICE_KEY = "sk-alice-e2e-4b7d"
BOB_KEY = "sk-bob-e2e-77aa"
WRONG_KEY = "sk-wrong-e2e-3e3e"
SECRETS = (ADMIN_KEY, ALICE_KEY, BOB_KEY, WRONG_KEY)

TEAM = f"""
    healthCheckTimeout: 15
    includeAliasesInList: true
    apiKeys:
      - {{key: {ADMIN_KEY}, name: admin, admin: true}}
      - {{key: {ALICE_KEY}, name: alice, models: [A, bad], limits: {{concurrent: 1}}}}
      - {{key: {BOB_KEY}, name: bob, models: ["B*"], limits: {{requestsPerMinute: 2, tokensPerMinute: 30}}}}
    models:
      A: {{cmd: "{responder('--respond A')}", aliases: [a1]}}
      B: {{cmd: "{responder('--respond B')}"}}
      bad: {{cmd: "{sys.executable} -c 'import sys; sys.exit(1)'", proxy: "http://127.0.0.1:1"}}
"""


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


class KeyHarness(Harness):
    def start(self, yaml_text: str):
        port = free_port()
        text = f"startPort: {free_run()}\n" + textwrap.dedent(yaml_text).lstrip("\n")
        self.service = build_service(reactor, load_config_text(text, environ=dict(os.environ)),
                                     [f"tcp:{port}:interface=127.0.0.1"], registry=ChildRegistry(self.mktemp()))
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.base = f"http://127.0.0.1:{port}"
        return self.service

    @defer.inlineCallbacks
    def call(self, key, method, path, obj=None, **kw):
        headers = dict(auth(key), **kw.pop("headers", {})) if key else kw.pop("headers", {})
        if obj is not None:
            headers.setdefault("Content-Type", "application/json")
            kw["data"] = json.dumps(obj).encode()
        response = yield self.request(method, path, headers=headers, **kw)
        body = yield response.content()
        return response, body

    def chat_as(self, key, model, path="/v1/chat/completions", **extra):
        return self.call(key, "POST", path, dict({"model": model, "messages": []}, **extra))

    @defer.inlineCallbacks
    def rows(self, key, n, query=""):
        def page():
            return self.call(key, "GET", "/api/metrics/activity" + query).addCallback(
                lambda rb: json.loads(rb[1])["data"])
        got = yield self.wait_for(lambda: page().addCallback(lambda data: data if len(data) >= n else None))
        return got


class DoneWhenTests(KeyHarness):
    """The issue's "done when", as a new user would try it."""

    @defer.inlineCallbacks
    def test_two_keys_admin_and_scoped(self):
        self.start(TEAM)
        # the scoped key chats with its model...
        response, body = yield self.chat_as(ALICE_KEY, "A")
        self.assertEqual(response.code, 200)
        echo = json.loads(body)["echo"]["headers"]
        self.assertNotIn("authorization", echo)  # an object key stays with llamaswap
        # ...and through its alias; another model is 403, naming the model, not the key
        response, _ = yield self.chat_as(ALICE_KEY, "a1")
        self.assertEqual(response.code, 200)
        response, body = yield self.chat_as(ALICE_KEY, "B")
        error = json.loads(body)["error"]
        self.assertEqual((response.code, error["code"]), (403, "model_not_allowed"))
        self.assertEqual(error["message"], "model 'B' is not available to this API key")
        response, body = yield self.chat_as(ALICE_KEY, "no-such-model")
        self.assertEqual(response.code, 403)  # outside the scope: existence is not revealed
        # a second concurrent request: 429 + Retry-After
        first = self.chat_as(ALICE_KEY, "A", path="/v1/chat/completions?wait=1s")
        yield self.wait_for(lambda: self.service.api.limiter.active("alice") == 1)
        response, body = yield self.chat_as(ALICE_KEY, "A")
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (429, "concurrency_limit"))
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        response, _ = yield first
        self.assertEqual(response.code, 200)
        self.assertEqual(self.service.api.limiter.active("alice"), 0)
        # it can not read captures or logs
        for method, path in (("GET", "/api/captures/1"), ("GET", "/api/captures"), ("GET", "/logs"),
                             ("GET", "/logs/stream/A"), ("GET", "/upstream/A/health"), ("GET", "/unload"),
                             ("POST", "/api/models/unload"), ("POST", "/api/inflight/1/cancel"),
                             ("GET", "/metrics")):
            response, body = yield self.call(ALICE_KEY, method, path)
            self.assertEqual(response.code, 403, path)
            self.assertEqual(json.loads(body)["error"]["message"], "forbidden: this route needs an admin API key")
        # the admin key can
        response, _ = yield self.chat_as(ADMIN_KEY, "B")
        self.assertEqual(response.code, 200)
        for path in ("/api/captures/1", "/logs", "/metrics"):
            response, _ = yield self.call(ADMIN_KEY, "GET", path)
            self.assertEqual(response.code, 200, path)
        # its requests show its name in the activity table; it sees only its own rows
        admin_rows = yield self.rows(ADMIN_KEY, 4)
        self.assertEqual(sorted({(r["model"], r["key_name"]) for r in admin_rows}),
                         [("A", "alice"), ("B", "admin")])
        own = yield self.rows(ALICE_KEY, 3)
        self.assertEqual({r["key_name"] for r in own}, {"alice"})
        response, body = yield self.call(ALICE_KEY, "GET", "/api/metrics/activity?key=admin")
        self.assertEqual({r["key_name"] for r in json.loads(body)["data"]}, {"alice"})  # no peeking
        response, body = yield self.call(ADMIN_KEY, "GET", "/api/captures/" + str(own[0]["id"]))
        self.assertEqual(json.loads(body)["key_name"], "alice")
        # stats: own rows for alice, grouped by key for the admin
        _, body = yield self.call(ALICE_KEY, "GET", "/api/metrics/stats")
        self.assertEqual(json.loads(body)["total_requests"], 3)
        _, body = yield self.call(ADMIN_KEY, "GET", "/api/metrics/stats?group_by=key")
        by_key = {k: v["total_requests"] for k, v in json.loads(body)["by_key"].items()}
        self.assertEqual(by_key, {"admin": 1, "alice": 3})
        # lists show what the key may use
        _, body = yield self.call(ALICE_KEY, "GET", "/v1/models")
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["A", "a1", "bad"])
        _, body = yield self.call(ADMIN_KEY, "GET", "/v1/models")
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["A", "B", "a1", "bad"])
        _, body = yield self.call(ALICE_KEY, "GET", "/running")
        self.assertEqual([r["model"] for r in json.loads(body)["running"]], [])  # B runs, not hers
        # access log lines and metrics carry the name
        history = self.service.hub.proxy.history().decode()
        self.assertIn('"POST /v1/chat/completions HTTP/1.1" 200', history)
        self.assertRegex(history, r'"POST /v1/chat/completions HTTP/1.1" 429 \d+ "[^"]*" \S+ key=alice')
        _, metrics = yield self.call(ADMIN_KEY, "GET", "/metrics")
        text = metrics.decode()
        self.assertRegex(text, r'llamaswap_requests_total\{[^}]*key="alice"[^}]*\} 3')
        self.assertRegex(text, r'llamaswap_tokens_total\{[^}]*key="admin"[^}]*\} ')
        self.assertIn('llamaswap_key_refused_total{key="alice",reason="model"} 2.0', text)
        self.assertIn('llamaswap_key_refused_total{key="alice",reason="concurrency_limit"} 1.0', text)

    @defer.inlineCallbacks
    def test_plain_keys_behave_as_today(self):
        self.start(TEAM.replace(f"{{key: {ADMIN_KEY}, name: admin, admin: true}}", ADMIN_KEY))
        basic = "Basic " + base64.b64encode(f"anyone:{ADMIN_KEY}".encode()).decode()
        response, body = yield self.call(None, "POST", "/v1/chat/completions", {"model": "B"},
                                         headers={"Authorization": basic})
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["echo"]["headers"]["authorization"], basic)  # forwarded, as llama-swap
        response, _ = yield self.call(ADMIN_KEY, "GET", "/logs")
        self.assertEqual(response.code, 200)
        rows = yield self.rows(ADMIN_KEY, 1)
        self.assertEqual(rows[0]["key_name"], "apiKeys[0]")
        response, _ = yield self.call(None, "GET", "/v1/models", headers={"x-api-key": WRONG_KEY})
        self.assertEqual(response.code, 401)
        response, _ = yield self.call(None, "GET", "/health")
        self.assertEqual(response.code, 200)


class LimitTests(KeyHarness):
    @defer.inlineCallbacks
    def test_cancelled_and_failed_requests_release_their_slot(self):
        self.start(TEAM)
        yield self.chat_as(ALICE_KEY, "A")  # loaded
        limiter = self.service.api.limiter
        waiting = self.chat_as(ALICE_KEY, "A", path="/v1/chat/completions?wait=20s")
        yield self.wait_for(lambda: self.service.inflight.entries)
        self.assertEqual(limiter.active("alice"), 1)
        waiting.cancel()  # the client goes away before its answer
        self.failureResultOf(waiting)
        yield self.wait_for(lambda: limiter.active("alice") == 0)
        response, _ = yield self.chat_as(ALICE_KEY, "A")
        self.assertEqual(response.code, 200)
        response, _ = yield self.chat_as(ALICE_KEY, "bad")  # the model fails to start
        self.assertEqual(response.code, 500)
        self.assertEqual(limiter.active("alice"), 0)
        response, _ = yield self.chat_as(ALICE_KEY, "A")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_requests_and_tokens_per_minute(self):
        self.start(TEAM)
        response, _ = yield self.chat_as(BOB_KEY, "B")  # 25 + 10 tokens: over 30 once recorded
        self.assertEqual(response.code, 200)
        yield self.rows(ADMIN_KEY, 1)
        response, body = yield self.chat_as(BOB_KEY, "B")
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (429, "rate_limit_exceeded"))
        self.assertIn("tokens", json.loads(body)["error"]["message"])
        wait = int(response.headers.getRawHeaders("retry-after")[0])
        self.assertTrue(50 <= wait <= 60, wait)
        self.service.api.limiter._keys["bob"].tokens.clear()  # as if the minute had passed
        self.service.api.limiter._keys["bob"].token_sum = 0
        response, _ = yield self.chat_as(BOB_KEY, "B")
        self.assertEqual(response.code, 200)
        self.service.api.limiter._keys["bob"].tokens.clear()
        self.service.api.limiter._keys["bob"].token_sum = 0
        response, body = yield self.chat_as(BOB_KEY, "B")  # the third in a minute: requestsPerMinute 2
        self.assertEqual(response.code, 429)
        self.assertIn("limit 2 per minute", json.loads(body)["error"]["message"])


class EventsTests(KeyHarness):
    @defer.inlineCallbacks
    def open_stream(self, key, path="/api/events"):
        response = yield treq.get(self.base + path, headers=auth(key), pool=self.pool, unbuffered=True)
        collector = _Lines()
        response.deliverBody(collector)
        return response, collector

    @staticmethod
    def messages(collector):
        out = []
        for frame in collector.data.split(b"\n\n"):
            if frame.startswith(b"event:message\ndata:"):
                envelope = json.loads(frame[len(b"event:message\ndata:"):])
                out.append((envelope["type"], json.loads(envelope["data"])))
        return out

    @defer.inlineCallbacks
    def test_own_requests_only(self):
        self.start(TEAM)
        _, mine = yield self.open_stream(ALICE_KEY)
        _, everything = yield self.open_stream(ADMIN_KEY)
        yield self.chat_as(ADMIN_KEY, "B")
        yield self.wait_for(lambda: any(k == "activity" for k, _ in self.messages(everything)))
        yield self.chat_as(ALICE_KEY, "A")
        yield self.wait_for(lambda: any(k == "activity" for k, _ in self.messages(mine)))
        kinds = {k for k, _ in self.messages(mine)}
        self.assertEqual(kinds, {"inflight", "activity"})
        for kind, data in self.messages(mine):
            if kind == "activity":
                self.assertEqual(data["key_name"], "alice")
            elif data["operation"] == "upsert":
                self.assertEqual((data["request"]["key_name"], data["request"]["model"]), ("alice", "A"))
        ops = [d["operation"] for k, d in self.messages(mine) if k == "inflight"]
        self.assertEqual((ops[0], ops[1], ops[-1]), ("snapshot", "upsert", "remove"))
        self.assertEqual(ops.count("remove"), 1)  # admin's request came and went unseen
        admin_kinds = {k for k, _ in self.messages(everything)}
        self.assertTrue({"logData", "modelStatus", "inflight", "activity"} <= admin_kinds)
        names = {d.get("key_name") for k, d in self.messages(everything) if k == "activity"}
        self.assertEqual(names, {"admin", "alice"})
        response, _ = yield self.call(ALICE_KEY, "GET", "/logs/stream")
        self.assertEqual(response.code, 403)


class ReloadTests(KeyHarness):
    def write(self, name, text):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(textwrap.dedent(text))

    def start_file(self, text, keys=""):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.write("keys.yaml", keys)
        self.config_path = os.path.join(self.dir, "config.yaml")
        self.write("config.yaml", f"startPort: {free_run()}\n" + textwrap.dedent(text).lstrip("\n"))
        port = free_port()
        self.service = build_service(reactor, load_config(self.config_path, environ=dict(os.environ)),
                                     [f"tcp:{port}:interface=127.0.0.1"], config_path=self.config_path,
                                     registry=ChildRegistry(self.mktemp()))
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.base = f"http://127.0.0.1:{port}"

    @defer.inlineCallbacks
    def test_key_changes_apply_at_once_and_cut_nothing(self):
        carol = "sk-carol-e2e-5c5c"
        self.start_file(TEAM + "    apiKeysFile: keys.yaml\n", f"{{key: {carol}, name: carol, models: [B]}}\n")
        response, _ = yield self.chat_as(carol, "B")
        self.assertEqual(response.code, 200)
        runtime, pid = self.service.runtime, self.service.runtime.processes["B"].pid
        slow = self.chat_as(carol, "B", path="/v1/chat/completions?wait=1s")
        yield self.wait_for(lambda: self.service.inflight.entries)
        # carol's key goes, dave's comes, alice loses her limit
        self.write("keys.yaml", "- {key: sk-dave-e2e-6d6d, name: dave}\n")
        self.write("config.yaml", open(self.config_path).read().replace(", limits: {concurrent: 1}", ""))
        self.assertTrue(self.service.reload())
        self.assertIs(self.service.runtime, runtime)  # models kept running
        self.assertEqual(self.service.runtime.processes["B"].pid, pid)
        response, _ = yield self.chat_as(carol, "B")
        self.assertEqual(response.code, 401)  # new requests: the new keys
        response, _ = yield self.chat_as("sk-dave-e2e-6d6d", "B")
        self.assertEqual(response.code, 200)
        response, _ = yield slow  # the request in flight finished
        self.assertEqual(response.code, 200)
        first = self.chat_as(ALICE_KEY, "A", path="/v1/chat/completions?wait=0.5s")
        yield self.wait_for(lambda: self.service.api.limiter.active("alice") == 0 and self.service.inflight.entries)
        response, _ = yield self.chat_as(ALICE_KEY, "A")  # no concurrency limit any more
        self.assertEqual(response.code, 200)
        yield first
        # a broken key file keeps the keys in force
        self.write("keys.yaml", "- {key: x, name: dave, colour: red}\n")
        self.assertFalse(self.service.reload())
        response, _ = yield self.chat_as("sk-dave-e2e-6d6d", "B")
        self.assertEqual(response.code, 200)

    def test_watcher_sees_the_key_file(self):
        from llamaswap.service import ConfigWatcher

        self.start_file(TEAM + "    apiKeysFile: keys.yaml\n")
        watcher = ConfigWatcher(self.service)
        reloads = []
        self.patch(self.service, "reload", lambda: reloads.append(1))
        self.write("keys.yaml", "- {key: sk-erin-e2e-1234, name: erin}\n# longer now\n")
        watcher.check()
        self.assertEqual(reloads, [1])


class NoKeyMaterialTests(KeyHarness):
    @defer.inlineCallbacks
    def test_keys_never_leave(self):
        """Everything a run produces: every event, every log event, the log
        histories, response bodies and headers (errors included), activity
        rows, captures, metrics: no key anywhere."""
        seen: list[str] = []
        observer = lambda event: seen.append(formatEvent(event) + repr(sorted(event.items(), key=str)))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.start(TEAM)
        self.service.events.subscribe(lambda kind, data: seen.append(kind + json.dumps(data, default=str)))

        def keep(result):
            response, body = result
            seen.append(repr(list(response.headers.getAllRawHeaders())) + body.decode("utf-8", "replace"))
            return result

        basic = "Basic " + base64.b64encode(f"user:{ALICE_KEY}".encode()).decode()
        calls = [  # one at a time: alice may have one request at once
            lambda: self.chat_as(ALICE_KEY, "A"), lambda: self.chat_as(ALICE_KEY, "B"),
            lambda: self.chat_as(ADMIN_KEY, "B", stream=True),
            lambda: self.call(None, "POST", "/v1/chat/completions", {"model": "A"}, headers={"Authorization": basic}),
            lambda: self.call(None, "POST", "/v1/chat/completions", {"model": "A"}, headers={"x-api-key": ALICE_KEY}),
            lambda: self.chat_as(WRONG_KEY, "A"), lambda: self.chat_as(BOB_KEY, "B"),
            lambda: self.chat_as(BOB_KEY, "A"), lambda: self.call(ALICE_KEY, "GET", "/logs"),
            lambda: self.call(WRONG_KEY, "GET", "/api/captures/1"),
        ]
        for call in calls:
            yield call().addCallback(keep)
        rows = yield self.rows(ADMIN_KEY, 5)
        for row in rows:
            _, body = yield self.call(ADMIN_KEY, "GET", f"/api/captures/{row['id']}")
            capture = json.loads(body)
            for part in ("req_body", "resp_body"):
                if capture.get(part):
                    seen.append(base64.b64decode(capture[part]).decode("utf-8", "replace"))
            seen.append(body.decode())
        for path in ("/api/metrics/activity", "/api/metrics/stats?group_by=key", "/metrics", "/logs", "/running",
                     "/v1/models", "/api/captures"):
            yield self.call(ADMIN_KEY, "GET", path).addCallback(keep)
        hub = self.service.hub
        seen.extend(m.history().decode("utf-8", "replace") for m in (hub.proxy, hub.upstream, hub.combined))
        seen.append(repr(self.service.config))
        everything = "\n".join(seen)
        self.assertIn("key=alice", everything)  # the names are there...
        self.assertIn('"key_name": "alice"', everything)
        for secret in SECRETS:  # ...the keys are not
            for form in (secret, base64.b64encode(f"user:{secret}".encode()).decode()):
                at = everything.find(form)
                if at >= 0:
                    self.fail(f"key material in the output: ...{everything[max(0, at - 300):at + 100]}...")

    @defer.inlineCallbacks
    def test_admin_cancels_a_request_in_flight(self):
        self.start(TEAM)
        d = self.chat_as(ALICE_KEY, "A", path="/v1/chat/completions?wait=20s")
        d.addErrback(lambda f: f.trap(ResponseFailed))  # its connection is cut
        yield wait_until(self, lambda: self.service.inflight.entries)
        (entry_id,) = self.service.inflight.entries
        response, _ = yield self.call(ALICE_KEY, "POST", f"/api/inflight/{entry_id}/cancel")
        self.assertEqual(response.code, 403)
        response, _ = yield self.call(ADMIN_KEY, "POST", f"/api/inflight/{entry_id}/cancel")
        self.assertEqual(response.code, 200)
        yield d
        yield self.wait_for(lambda: self.service.api.limiter.active("alice") == 0)
        response, _ = yield self.chat_as(ALICE_KEY, "A")
        self.assertEqual(response.code, 200)
