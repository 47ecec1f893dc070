"""Profiles: GET /api/profiles, PUT /api/profiles/active, pins applied before aliases and routing."""

from __future__ import annotations

import json

from twisted.internet import defer

from .test_e2e import Harness, responder

MODELS = f"""
    healthCheckTimeout: 15
    groups:
      all: {{swap: false, members: [A, B]}}
    models:
      A: {{cmd: "{responder('--respond A')}", aliases: [a1]}}
      B: {{cmd: "{responder('--respond B')}"}}
"""
CONFIG = MODELS + """
    profiles:
      fast:
        description: everything on A
        pins: {chat: A, B: a1}
      quiet:
        description: B switched off
        pins: {B: ~}
"""


class ProfileTests(Harness):
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


UPSTREAM_CONFIG = MODELS + """
    selectors:
      sel: {strategy: pin, targets: [A]}
    profiles:
      p:
        pins: {zz: B, pub: a1, "pub/deep": B, A: ~, tosel: sel}
"""


class UpstreamPinTests(Harness):
    """``/upstream/<model>/...`` takes the active profile's pins too
    (reference §2.8: the longest pinned prefix; selectors do not apply there)."""

    @defer.inlineCallbacks
    def test_pins_apply_to_upstream_paths(self):
        self.start(UPSTREAM_CONFIG)
        response, _ = yield self.get("/upstream/pub/test")
        self.assertEqual(response.code, 404)  # no profile: "pub" names nothing
        self.assertEqual((yield self.put_active("p"))[0], 200)
        for path, answer in (("/upstream/pub/test", b"A"), ("/upstream/pub/deep/test", b"B"),
                             ("/upstream/B/test", b"B")):
            response, body = yield self.get(path)
            self.assertEqual((response.code, body), (200, answer), path)
        for path in ("/upstream/A/test", "/upstream/tosel/test"):  # switched off; a selector is no model here
            response, body = yield self.get(path)
            self.assertEqual((response.code, json.loads(body)["error"]["message"]), (404, "model not found"), path)
        response = yield self.request("GET", "/upstream/zz", allow_redirects=False)  # the redirect names what the pin routes to
        yield response.content()
        self.assertEqual((response.code, response.headers.getRawHeaders("location")), (301, ["/upstream/B/"]))

    @defer.inlineCallbacks
    def test_listed_pins_are_sorted(self):
        self.start(UPSTREAM_CONFIG)
        _, body = yield self.get("/api/profiles")
        self.assertEqual(list(json.loads(body)["profiles"][0]["pins"]), ["A", "pub", "pub/deep", "tosel", "zz"])
