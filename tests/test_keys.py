"""API keys: config, principals, scopes, route access and limits (pure, no reactor)."""

from __future__ import annotations

import base64
import os
import sqlite3
import textwrap

from twisted.internet.defer import inlineCallbacks
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap import principal as P
from llamaswap.activity.captures import Capture, build_capture
from llamaswap.activity.query import parse_activity_query
from llamaswap.activity.store import ActivityEntry, ActivityStore
from llamaswap.config import ConfigError, load_config, load_config_text
from llamaswap.config.types import ApiKey, KeyLimits
from llamaswap.limits import Limiter, Slot
from llamaswap.principal import Access, Keyring, Principal, Refusal, authorize, model_refusal, route_access
from llamaswap.runtime import access_only, budgets_only

MODELS = """
models:
  coder: {cmd: "x --port ${PORT}", aliases: [c]}
  chat-small: {cmd: "x --port ${PORT}"}
  chat-big: {cmd: "x --port ${PORT}"}
"""


def load(text: str, environ=None, source="config"):
    return load_config_text(textwrap.dedent(text) + MODELS, source=source, environ=environ or {})


def errors_of(test, text: str, environ=None) -> list[str]:
    with test.assertRaises(ConfigError) as ctx:
        load(text, environ)
    return ctx.exception.errors


class KeyConfigTests(SynchronousTestCase):
    def test_plain_and_object_keys(self):
        c = load("""
            apiKeys:
              - plain-key
              - key: sk-team-a
                name: team-a
                models: [coder, "chat*"]
                limits: {concurrent: 2, requestsPerMinute: 60, tokensPerMinute: 200000}
              - {key: sk-ops, name: ops, admin: true}
        """)
        plain, team, ops = c.api_keys
        self.assertEqual((plain.key, plain.name, plain.admin, plain.models, plain.plain),
                         ("plain-key", "apiKeys[0]", True, ("*",), True))
        self.assertEqual((team.name, team.admin, team.models, team.plain), ("team-a", False, ("coder", "chat*"), False))
        self.assertEqual(team.limits, KeyLimits(2, 60, 200000))
        self.assertEqual((ops.admin, ops.models, ops.limits), (True, ("*",), KeyLimits()))
        self.assertFalse(c.metrics_public)
        self.assertNotIn("sk-team-a", repr(c))  # a logged config never shows a key

    def test_keys_from_env_and_macros(self):
        c = load("""
            macros: {prefix: sk}
            metricsPublic: true
            apiKeys:
              - {key: "${env.TEAM_KEY}", name: team}
              - {key: "${prefix}-macro", name: m}
        """, environ={"TEAM_KEY": "from-env"})
        self.assertEqual([k.key for k in c.api_keys], ["from-env", "sk-macro"])
        self.assertTrue(c.metrics_public)

    def test_located_errors_never_show_a_key(self):
        errors = errors_of(self, """
            apiKeys:
              - sk-secret-1
              - {key: sk-secret-1, name: again}
              - {key: sk-secret-2, name: team, colour: blue}
              - {key: sk-secret-3, name: team}
              - {key: sk-secret-4, name: bad, models: ["chat[", ""]}
              - {key: sk-secret-5, name: lim, limits: {concurrent: -1, perHour: 3}}
              - {key: sk-secret-6, name: "has space"}
              - {name: nokey}
              - {key: sk-secret-7}
              - {key: sk-secret-8, name: sk-secret-1}
              - 42.5
              - [not, a, key]
        """)
        joined = "\n".join(errors)
        for fragment in (
            "apiKeys[1] (line 4): duplicate API key (the same key as apiKeys[0])",
            "apiKeys[2].colour (line 5): unknown field 'colour'",
            "apiKeys[3] (line 6): duplicate key name 'team' (also apiKeys[2])",
            "apiKeys[4].models[0] (line 7): glob 'chat[' has a '[' without its ']'",
            "apiKeys[4].models[1] (line 7): an empty glob matches nothing",
            "apiKeys[5].limits.concurrent (line 8): must be >= 0",
            "apiKeys[5].limits.perHour (line 8): unknown limit 'perHour'",
            "apiKeys[6].name (line 9): name 'has space' must be",
            "apiKeys[7] (line 10): key is required",
            "apiKeys[8] (line 11): name is required",
            "apiKeys[9] (line 12): name must not be an API key",
            "apiKeys[11] (line 14): must be a key (a string) or a mapping",
        ):
            self.assertIn(fragment, joined)
        self.assertNotIn("sk-secret", joined)

    def test_plain_key_rules_kept(self):
        errors = errors_of(self, """
            apiKeys: ["", "has space", {key: "tab\\there", name: t}]
        """)
        self.assertEqual(errors, ["apiKeys[0] (line 2): empty api key found in apiKeys",
                                  "apiKeys[1] (line 2): api key cannot contain spaces",
                                  "apiKeys[2].key (line 2): api key cannot contain spaces"])

    def test_glob_matching_nothing_is_a_warning(self):
        c = load("""
            apiKeys: [{key: k, name: n, models: ["c", "coder", "gpt-*"]}]
        """)
        self.assertEqual(c.warnings, ("apiKeys[0].models[2] (line 2): 'gpt-*' matches no model, alias, "
                                      "peer model, selector or profile pin",))

    def write(self, name: str, text: str) -> str:
        base = self.mktemp()
        os.makedirs(base)
        with open(os.path.join(base, "config.yaml"), "w") as f:
            f.write(f"apiKeysFile: {name}\n" + MODELS)
        with open(os.path.join(base, name), "w") as f:
            f.write(textwrap.dedent(text))
        return os.path.join(base, "config.yaml")

    def test_key_file_one_object_per_line(self):
        path = self.write("keys.jsonl", """
            # team keys
            {"key": "sk-a", "name": "team-a", "models": ["coder"]}

            {key: "${env.B_KEY}", name: team-b, limits: {concurrent: 1}}
        """)
        c = load_config(path, environ={"B_KEY": "sk-b"})
        self.assertEqual([(k.key, k.name, k.admin) for k in c.api_keys],
                         [("sk-a", "team-a", False), ("sk-b", "team-b", False)])
        self.assertEqual(c.api_keys_file, os.path.join(os.path.dirname(os.path.abspath(path)), "keys.jsonl"))

    def test_key_file_yaml_list_and_its_errors(self):
        path = self.write("keys.yaml", """
            - {key: sk-a, name: team-a}
            - key: sk-a
              name: team-b
              admin: maybe
        """)
        with self.assertRaises(ConfigError) as ctx:
            load_config(path, environ={})
        joined = "\n".join(ctx.exception.errors)
        self.assertIn("apiKeysFile[1] (keys.yaml line 3): duplicate API key (the same key as apiKeysFile[0])", joined)
        self.assertIn("apiKeysFile[1].admin (keys.yaml line 5): must be true or false", joined)
        self.assertNotIn("sk-a", joined)

    def test_key_file_line_errors_and_missing_file(self):
        path = self.write("keys.txt", """
            {key: sk-a, name: a}
            {key: sk-b, name: [b
            {key: "${env.NOPE}", name: c}
        """)
        with self.assertRaises(ConfigError) as ctx:
            load_config(path, environ={})
        joined = "\n".join(ctx.exception.errors)
        self.assertIn("keys.txt line 3: ", joined)
        self.assertIn("environment variable 'NOPE' is not set", joined)
        os.remove(os.path.join(os.path.dirname(path), "keys.txt"))
        with self.assertRaises(ConfigError) as ctx:
            load_config(path, environ={})
        self.assertIn("apiKeysFile (line 1): cannot read", ctx.exception.errors[0])

    def test_keys_and_file_share_names(self):
        path = self.write("keys.yaml", "- {key: sk-b, name: team}\n")
        with open(path, "a") as f:
            f.write("apiKeys: [{key: sk-a, name: team}]\n")
        with self.assertRaises(ConfigError) as ctx:
            load_config(path, environ={})
        self.assertIn("duplicate key name 'team' (also apiKeys[0])", "\n".join(ctx.exception.errors))

    def test_access_only_reloads(self):
        old = load("apiKeys: [{key: a, name: n}]\n")
        new = load("apiKeys: [{key: b, name: n, models: [coder]}]\nmetricsPublic: true\n")
        self.assertTrue(access_only(old, new))
        self.assertFalse(access_only(old, old))
        moved = load_config_text("apiKeys: [b]\nmodels:\n  coder: {cmd: 'y --port ${PORT}'}\n", environ={})
        self.assertFalse(access_only(old, moved))
        budget = load("apiKeys: [b]\nswapPolicy: refuse\n")
        self.assertTrue(budgets_only(old, budget))  # budgets and keys together still keep the models


def key(name, secret, admin=False, models=("*",), limits=KeyLimits(), plain=False):
    return ApiKey(key=secret, name=name, admin=admin, models=tuple(models), limits=limits, plain=plain)


KEYS = (key("apiKeys[0]", "plain-admin", admin=True, plain=True),
        key("ops", "sk-ops", admin=True),
        key("team-a", "sk-team-a", models=("coder", "chat*")))


class KeyringTests(SynchronousTestCase):
    def test_lookup(self):
        ring = Keyring(KEYS)
        self.assertEqual(ring.lookup("sk-team-a").name, "team-a")
        self.assertTrue(ring.lookup("plain-admin").forward_key)
        self.assertFalse(ring.lookup("sk-ops").forward_key)
        for wrong in ("", "sk-team", "sk-team-a ", "SK-TEAM-A"):
            self.assertIsNone(ring.lookup(wrong))
        self.assertEqual(ring.names, {"apiKeys[0]", "ops", "team-a"})
        self.assertFalse(Keyring(()))

    def test_every_key_is_compared(self):
        compared = []
        real = P.hmac.compare_digest

        def counting(a, b):
            compared.append((len(a), len(b)))
            return real(a, b)

        self.patch(P.hmac, "compare_digest", counting)
        ring = Keyring(KEYS)
        for given in ("plain-admin", "sk-team-a", "nope", "x" * 500):
            del compared[:]
            ring.lookup(given)
            self.assertEqual(compared, [(32, 32)] * 3)  # digests: lengths never differ


class ScopeTests(SynchronousTestCase):
    team = Principal("team-a", model_globs=("coder", "chat*"))

    def test_globs_on_requested_or_resolved(self):
        self.assertTrue(self.team.may_use("coder"))
        self.assertTrue(self.team.may_use("c", "coder"))  # an alias of an allowed model
        self.assertTrue(self.team.may_use("chat-small"))
        self.assertTrue(self.team.may_use("chat-anything", None))
        self.assertFalse(self.team.may_use("big", "big"))
        self.assertFalse(self.team.may_use("Coder"))
        self.assertTrue(Principal("x", model_globs=("peer/*",)).may_use("peer/m"))
        self.assertTrue(Principal("x", model_globs=("m?",)).may_use("m1"))
        self.assertFalse(Principal("x").may_use("anything"))
        self.assertTrue(P.OPEN.may_use("anything"))

    def test_refusal_names_the_model_not_the_key(self):
        refusal = model_refusal(self.team, "big", "big")
        self.assertEqual((refusal.status, refusal.code), (403, "model_not_allowed"))
        self.assertEqual(refusal.message, "model 'big' is not available to this API key")
        self.assertIsNone(model_refusal(self.team, "c", "coder"))
        self.assertEqual(P.visible(self.team, [("coder", None), ("big", None), ("c", "coder")]), ["coder", "c"])


#: every route family: (method, path, access)
ROUTES = [
    ("GET", "/health", Access.PUBLIC), ("GET", "/", Access.PUBLIC), ("GET", "/upstream", Access.PUBLIC),
    ("POST", "/v1/chat/completions", Access.KEY), ("POST", "/v/embeddings", Access.KEY),
    ("GET", "/props", Access.KEY), ("POST", "/audioapi/v1/tasks/run", Access.KEY),
    ("GET", "/v1/models", Access.KEY), ("GET", "/running", Access.KEY), ("GET", "/ui/", Access.KEY),
    ("GET", "/api/events", Access.KEY), ("GET", "/api/metrics/activity", Access.KEY),
    ("GET", "/api/metrics/stats", Access.KEY), ("GET", "/api/performance", Access.KEY),
    ("GET", "/unload", Access.ADMIN), ("POST", "/api/models/unload", Access.ADMIN),
    ("POST", "/api/models/unload/coder", Access.ADMIN), ("POST", "/api/profiles/dev", Access.ADMIN),
    ("POST", "/api/inflight/3/cancel", Access.ADMIN), ("GET", "/api/captures", Access.ADMIN),
    ("GET", "/api/captures/1", Access.ADMIN), ("GET", "/logs", Access.ADMIN),
    ("GET", "/logs/stream", Access.ADMIN), ("GET", "/logs/stream/coder", Access.ADMIN),
    ("POST", "/upstream/coder/v1/chat/completions", Access.ADMIN), ("GET", "/api/not-yet-written", Access.ADMIN),
    ("GET", "/%6cogs", Access.ADMIN), ("GET", "/api/%63aptures/1", Access.ADMIN),
    ("GET", "//logs", Access.ADMIN), ("GET", "/v1/../logs/stream", Access.ADMIN), ("GET", "/upstream/", Access.ADMIN),
    ("GET", "/./api/captures", Access.ADMIN), ("GET", "//health", Access.KEY),
    ("GET", "/metrics", Access.METRICS),
]


class RouteAccessTests(SynchronousTestCase):
    def test_route_families(self):
        for method, path, access in ROUTES:
            self.assertIs(route_access(method, path), access, path)

    def decide(self, path, secret=None, method="POST", metrics_public=False, header="authorization"):
        auth = x_key = None
        if secret is not None:
            if header == "authorization":
                auth = f"Bearer {secret}"
            elif header == "basic":
                auth = "Basic " + base64.b64encode(f"u:{secret}".encode()).decode()
            else:
                x_key = secret
        return authorize(Keyring(KEYS), method, path, auth, x_key, metrics_public)

    def test_scope_matrix_at_the_front(self):
        """admin / non-admin / plain / no key x every route family."""
        for method, path, access in ROUTES:
            for secret in ("plain-admin", "sk-ops", "sk-team-a", None, "wrong"):
                verdict = self.decide(path, secret, method)
                status = verdict.refusal.status if verdict.refusal else 200
                if access is Access.PUBLIC:
                    expected = 200
                elif secret in (None, "wrong"):
                    expected = 401
                elif secret == "sk-team-a" and access is not Access.KEY:
                    expected = 403
                else:
                    expected = 200
                self.assertEqual(status, expected, (path, secret))
        self.assertIsNone(self.decide("/metrics", "sk-team-a", "GET", metrics_public=True).refusal)

    def test_verdicts(self):
        verdict = self.decide("/v1/chat/completions", "sk-team-a")
        self.assertEqual((verdict.principal.name, verdict.hide, verdict.key_name), ("team-a", ("authorization",), "team-a"))
        self.assertEqual(self.decide("/v1/models", "sk-team-a", header="x-api-key").hide, ("x-api-key",))
        self.assertEqual(self.decide("/v1/models", "sk-ops", header="basic").hide, ("authorization",))
        self.assertEqual(self.decide("/v1/models", "plain-admin").hide, ())  # as llama-swap: forwarded
        refused = self.decide("/logs", "sk-team-a", "GET")
        self.assertEqual((refused.refusal.status, refused.refusal.message), (403, P.NEEDS_ADMIN))
        missing = self.decide("/v1/models", None)
        self.assertEqual((missing.refusal.status, missing.key_name), (401, "-"))
        self.assertEqual(missing.refusal.headers, {"WWW-Authenticate": 'Basic realm="llama-swap"'})
        open_ = authorize(Keyring(()), "GET", "/logs", None, None)
        self.assertIs(open_.principal, P.OPEN)
        self.assertIsNone(open_.key_name)  # no keys configured: nothing added to the access log


class LimiterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.limiter = Limiter(self.clock)

    def admit(self, limits, name="k"):
        return self.limiter.admit(name, limits)

    def test_concurrency_counted_across_models_and_released(self):
        limits = KeyLimits(concurrent=2)
        a, b = self.admit(limits), self.admit(limits)
        refused = self.admit(limits)
        self.assertIsInstance(refused, Refusal)
        self.assertEqual((refused.status, refused.code, refused.headers), (429, "concurrency_limit", {"Retry-After": "1"}))
        self.assertIsInstance(self.admit(limits, "other"), Slot)  # another key has its own slots
        a.release()
        a.release()  # twice: harmless, never frees a slot that is still held
        self.assertEqual(self.limiter.active("k"), 1)
        c = self.admit(limits)
        self.assertIsInstance(c, Slot)
        self.assertIsInstance(self.admit(limits), Refusal)
        b.release()
        c.release()
        self.assertEqual(self.limiter.active("k"), 0)
        self.assertEqual(self.limiter._keys.get("k"), None)  # nothing kept for an idle key

    def test_requests_per_minute_sliding(self):
        limits = KeyLimits(requests_per_minute=3)
        for t in (0, 10, 20):
            self.clock.advance(t - self.clock.seconds())
            self.admit(limits).release()
        self.clock.advance(5)  # t=25
        refused = self.admit(limits)
        self.assertEqual((refused.code, refused.headers["Retry-After"]), ("rate_limit_exceeded", "35"))
        self.clock.advance(34.5)  # t=59.5: the request of t=0 still counts
        self.assertIsInstance(self.admit(limits), Refusal)
        self.clock.advance(0.5)  # t=60: it has left the window
        self.assertIsInstance(self.admit(limits), Slot)
        self.assertIsInstance(self.admit(limits), Refusal)  # t=10 and 20 are still in

    def test_refused_requests_are_not_counted(self):
        limits = KeyLimits(concurrent=1, requests_per_minute=2)
        held = self.admit(limits)
        for _ in range(5):
            self.assertEqual(self.admit(limits).code, "concurrency_limit")
        held.release()
        self.assertIsInstance(self.admit(limits), Slot)

    def test_tokens_per_minute(self):
        limits = KeyLimits(tokens_per_minute=100)
        self.admit(limits).release()
        self.limiter.add_tokens("k", 60)
        self.clock.advance(10)
        self.assertIsInstance(self.admit(limits), Slot)  # 60 < 100: admitted (its use is not known yet)
        self.limiter.add_tokens("k", 70)  # 130: over
        self.clock.advance(5)  # t=15
        refused = self.admit(limits)
        self.assertEqual((refused.status, refused.headers["Retry-After"]), (429, "45"))  # the 60 of t=0 leave at 60
        self.assertIn("limit 100 per minute", refused.message)
        self.clock.advance(45)
        self.assertIsInstance(self.admit(limits), Slot)  # 70 left

    def test_tokens_are_merged_per_second(self):
        for _ in range(1000):
            self.limiter.add_tokens("k", 1)
            self.clock.advance(0.01)
        self.assertLessEqual(len(self.limiter._keys["k"].tokens), 11)
        self.assertEqual(self.limiter._keys["k"].token_sum, 1000)

    def test_new_limits_apply_at_once(self):
        held = [self.admit(KeyLimits(concurrent=3)) for _ in range(3)]
        self.assertIsInstance(self.admit(KeyLimits(concurrent=2)), Refusal)  # a reload lowered it
        self.assertIsInstance(self.admit(KeyLimits()), Slot)  # a reload lifted it
        for slot in held:
            slot.release()
        self.assertEqual(self.limiter.active("k"), 0)

    def test_no_limits_no_state(self):
        slot = self.admit(KeyLimits())
        slot.release()
        self.assertEqual(self.limiter._keys, {})


class AttributionStoreTests(TestCase):
    @inlineCallbacks
    def test_key_name_round_trip_filter_and_stats(self):
        store = ActivityStore(reactor)
        yield store.start()
        self.addCleanup(store.close)
        for i, name in enumerate(["team-a", "team-b", "team-a", ""]):
            entry = ActivityEntry(timestamp=1_750_000_000 + i, model="m", req_path="/v1/chat/completions",
                                  resp_status_code=200, key_name=name)
            entry.tokens.input_tokens, entry.tokens.output_tokens = 10, i
            yield store.add(entry)
        page = yield store.query(parse_activity_query({"key": ["team-a"]}))
        self.assertEqual([r["key_name"] for r in page["data"]], ["team-a", "team-a"])
        page = yield store.query(parse_activity_query({"key": ["-"]}))
        self.assertEqual([(r["id"], "key_name" in r) for r in page["data"]], [(4, False)])
        page = yield store.query(parse_activity_query({"sort": ["key"], "order": ["asc"]}))
        self.assertEqual([r.get("key_name", "") for r in page["data"]], ["", "team-a", "team-a", "team-b"])
        stats = yield store.stats(None, ["team-a"])
        self.assertEqual((stats["total_requests"], stats["total_output_tokens"]), (2, 2))
        stats = yield store.stats(None, by_key=True)
        self.assertEqual(stats["total_requests"], 4)
        self.assertEqual({k: v["total_requests"] for k, v in stats["by_key"].items()}, {"-": 1, "team-a": 2, "team-b": 1})

    @inlineCallbacks
    def test_old_store_gets_the_column(self):
        path = os.path.abspath(self.mktemp())
        conn = sqlite3.connect(path)  # a store written before remote_ip and key_name existed
        conn.execute("CREATE TABLE activity (id INTEGER PRIMARY KEY AUTOINCREMENT, ts_created INTEGER NOT NULL,"
                     " model_id TEXT NOT NULL, req_path TEXT NOT NULL DEFAULT '', resp_content_type TEXT NOT NULL"
                     " DEFAULT '', resp_status_code INTEGER NOT NULL DEFAULT 0, cache_tokens INTEGER NOT NULL"
                     " DEFAULT 0, draft_tokens INTEGER NOT NULL DEFAULT 0, draft_acc_tokens INTEGER NOT NULL"
                     " DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL"
                     " DEFAULT 0, prompt_per_second REAL NOT NULL DEFAULT 0, tokens_per_second REAL NOT NULL"
                     " DEFAULT 0, duration_ms INTEGER NOT NULL DEFAULT 0, error_msg TEXT NOT NULL DEFAULT '',"
                     " metadata_json TEXT NOT NULL DEFAULT '')")
        conn.execute("INSERT INTO activity (ts_created, model_id) VALUES (1750000000, 'old')")
        conn.commit()
        conn.close()
        store = ActivityStore(reactor, path)
        yield store.start()
        self.addCleanup(store.close)
        yield store.add(ActivityEntry(timestamp=1_750_000_001, model="new", key_name="team-a"))
        page = yield store.query(parse_activity_query({}))
        self.assertEqual([(r["model"], r.get("key_name")) for r in page["data"]], [("new", "team-a"), ("old", None)])


class CaptureKeyNameTests(SynchronousTestCase):
    def test_key_name_travels_with_the_capture(self):
        cap = build_capture(1, "/v1/chat/completions", {"authorization": "Bearer sk-x"}, b"{}", {}, b"ok",
                            key_name="team-a")
        self.assertEqual(cap.req_headers, {"Authorization": "[REDACTED]"})
        self.assertEqual(Capture.decode(cap.encode()), cap)
        self.assertEqual(cap.to_json()["key_name"], "team-a")
        plain = build_capture(2, "/v1/chat/completions", {}, b"{}", {}, b"ok")
        self.assertNotIn("key_name", plain.to_json())
        self.assertEqual(plain.encode()[:1], b"\x86")  # unchanged encoding without a key name
