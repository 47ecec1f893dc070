"""Profiles: GET /api/profiles, PUT /api/profiles/active, pins applied before aliases and routing."""

from __future__ import annotations

import json

from twisted.internet import defer

from .test_e2e import Harness, responder

CONFIG = f"""
    healthCheckTimeout: 15
    groups:
      all: {{swap: false, members: [A, B]}}
    models:
      A: {{cmd: "{responder('--respond A')}", aliases: [a1]}}
      B: {{cmd: "{responder('--respond B')}"}}
    profiles:
      fast:
        description: everything on A
        pins: {{chat: A, B: a1}}
      quiet:
        description: B switched off
        pins: {{B: ~}}
"""


class ProfileTests(Harness):
    @defer.inlineCallbacks
    def put_active(self, name):
        response = yield self.request("PUT", "/api/profiles/active", data=json.dumps({"name": name}).encode(),
                                      headers={"Content-Type": "application/json"})
        body = yield response.content()
        return response.code, json.loads(body)

    @defer.inlineCallbacks
    def test_list_switch_and_pins(self):
        self.start(CONFIG)
        response, body = yield self.get("/api/profiles")
        self.assertEqual(json.loads(body), {"active": None, "profiles": [
            {"id": "fast", "description": "everything on A", "pins": {"chat": "A", "B": "a1"}},
            {"id": "quiet", "description": "B switched off", "pins": {"B": ""}},
        ]})
        response, body = yield self.chat("chat")
        self.assertEqual(response.code, 404)  # no profile: "chat" is nothing

        events = []
        self.addCleanup(self.service.events.subscribe(lambda kind, data: events.append(data),
                                                      kinds=("profileChanged",)))
        self.assertEqual((yield self.put_active("fast")), (200, {"active": "fast"}))
        self.assertEqual(events, [{"active": "fast"}])
        for name in ("chat", "B", "A"):  # pins first, then aliases: B -> a1 -> A
            response, body = yield self.chat(name)
            self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "A"), name)
        self.assertNotIn("B", (yield self.running()))
        _, body = yield self.get("/api/profiles")
        self.assertEqual(json.loads(body)["active"], "fast")

        self.assertEqual((yield self.put_active("quiet"))[0], 200)
        response, body = yield self.chat("B")
        self.assertEqual(response.code, 404)
        self.assertIn("disabled by profile", json.loads(body)["error"]["message"])

        self.assertEqual((yield self.put_active(None)), (200, {"active": None}))
        response, body = yield self.chat("B")
        self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "B"))
        self.assertEqual(events[-1], {"active": None})

    @defer.inlineCallbacks
    def test_bad_requests(self):
        self.start(CONFIG)
        code, body = yield self.put_active("nope")
        self.assertEqual(code, 404)
        self.assertEqual(body["error"]["message"], 'profile "nope" not found')
        code, body = yield self.put_active(3)
        self.assertEqual((code, body["error"]["message"]), (400, "profile name must be a string or null"))
        response = yield self.request("PUT", "/api/profiles/active", data=b"{}")
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads((yield response.content()))["error"]["message"], "profile name is required")
        response = yield self.request("PUT", "/api/profiles/active", data=b"not json")
        self.assertEqual(response.code, 400)
        yield response.content()

    @defer.inlineCallbacks
    def test_no_profile_after_a_reload(self):
        import textwrap

        from .test_e2e import free_run

        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"startPort: {free_run()}\n" + textwrap.dedent(CONFIG))
        self.start(CONFIG)
        self.service.config_path = path
        yield self.put_active("fast")
        self.assertTrue(self.service.reload())
        _, body = yield self.get("/api/profiles")
        self.assertIsNone(json.loads(body)["active"])
        response, _ = yield self.chat("chat")
        self.assertEqual(response.code, 404)
