"""Config loader: keys, defaults, macros, validation errors with lines, merge, diff."""

from __future__ import annotations

import os
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError, diff, load_config, load_config_text, parse_duration, thaw
from llamaswap.config.dsl import DSLError, expand_sets, parse

HERE = os.path.dirname(os.path.abspath(__file__))
# copies of the reference example configs, so a clone of this repository alone runs the tests
DATA = os.path.join(HERE, "data")
EXAMPLE_ENV = {"HOME": "/home/u", "API_KEY_1": "k1", "API_KEY_2": "k2", "OPENROUTER_API_KEY": "or-key"}


def load(text: str, environ=None):
    return load_config_text(textwrap.dedent(text), environ=environ or {})


class ErrorsMixin:
    def errors(self, text: str, environ=None) -> list[str]:
        with self.assertRaises(ConfigError) as ctx:
            load(text, environ)
        return ctx.exception.errors

    def assertError(self, text: str, *fragments: str, environ=None) -> list[str]:
        errors = self.errors(text, environ)
        joined = "\n".join(errors)
        for fragment in fragments:
            self.assertIn(fragment, joined)
        return errors


class DefaultsTests(SynchronousTestCase):
    def test_minimal_model_defaults(self):
        c = load("""
            models:
              m:
                cmd: server --port ${PORT}
        """)
        self.assertEqual(c.health_check_timeout, 120)
        self.assertEqual(c.log_level, "info")
        self.assertEqual(c.log_to_stdout, "proxy")
        self.assertEqual(c.metrics_max_in_memory, 1000)
        self.assertEqual(c.capture_buffer, 5)
        self.assertIsNone(c.store_path)
        self.assertEqual(c.session_id_headers, ("X-Session-ID", "X-Litellm-Session-Id"))
        self.assertEqual((c.performance.disabled, c.performance.every), (False, 5.0))
        self.assertEqual((c.global_ttl, c.unload_timeout, c.start_port), (0, 10, 5800))
        self.assertEqual(c.ignore_paths, (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",))
        self.assertEqual(c.routing.router, "group")
        self.assertEqual(c.routing.scheduler, "fifo")
        self.assertEqual((c.routing.max_wait, c.routing.max_queue), (60.0, 512))
        m = c.models["m"]
        self.assertEqual(m.cmd, "server --port 5800")
        self.assertEqual(m.proxy, "http://localhost:5800")
        self.assertEqual(m.port, 5800)
        self.assertEqual(m.check_endpoint, "/health")
        self.assertEqual((m.ttl, m.unload_timeout, m.concurrency_limit), (0, 10, 10))
        self.assertEqual(m.health_check_timeout, 120)
        self.assertEqual(m.timeouts.connect, 30)
        self.assertEqual(m.timeouts.response_header, 0)
        self.assertFalse(m.send_loading_state)
        self.assertEqual([g.name for g in c.routing.groups], ["(default)"])
        self.assertEqual(c.routing.groups[0].members, ("m",))

    def test_every_model_key_round_trips(self):
        c = load("""
            healthCheckTimeout: 5
            globalTTL: 30
            unloadTimeout: 7
            sendLoadingState: true
            models:
              m:
                cmd: |
                  # a comment line, dropped
                  srv --port 9000
                cmdStop: kill ${PID}
                proxy: http://127.0.0.1:9000
                aliases: [a1, a2]
                env: ["A=1", "B=two=2"]
                checkEndpoint: none
                ttl: -1
                unloadTimeout: 3
                unlisted: true
                useModelName: upstream-name
                name: " Nice "
                description: desc
                concurrencyLimit: 2
                filters:
                  stripParams: "top_k, temperature, model, top_k"
                  setParams: {top_p: 0.5, model: ignored}
                  setParamsByID:
                    "${MODEL_ID}:hi": {x: 1}
                metadata: {k: v}
                sendLoadingState: false
                timeouts: {connect: 1, keepalive: 2, responseHeader: 3, tlsHandshake: 4, expectContinue: 5, idleConn: 6,
                           bodyIdle: 7.5}
                compat: {ignoreWebsockets: true}
                capabilities: {in: [text, image], out: [text], tools: true, reranker: true, context: 8192}
        """)
        self.assertEqual(c.health_check_timeout, 15)  # clamped
        m = c.models["m"]
        self.assertEqual(m.cmd.strip(), "srv --port 9000")
        self.assertEqual(m.cmd_stop, "kill ${PID}")
        self.assertEqual(m.proxy, "http://127.0.0.1:9000")
        self.assertEqual(m.aliases, ("a1", "a2", "m:hi"))
        self.assertEqual(m.env, ("A=1", "B=two=2"))
        self.assertTrue(m.health_check_disabled)
        self.assertEqual((m.ttl, m.unload_timeout), (30, 3))
        self.assertTrue(m.unlisted)
        self.assertEqual(m.use_model_name, "upstream-name")
        self.assertEqual((m.name, m.description), ("Nice", "desc"))
        self.assertEqual(m.concurrency_limit, 2)
        self.assertEqual(m.filters.strip_params, ("temperature", "top_k"))
        self.assertEqual(thaw(m.filters.set_params), {"top_p": 0.5})
        self.assertEqual(thaw(m.filters.set_params_by_id), {"m:hi": {"x": 1}})
        self.assertEqual(thaw(m.metadata), {"k": "v"})
        self.assertFalse(m.send_loading_state)
        self.assertEqual(tuple(m.timeouts.__dict__.values()), (1, 2, 3, 4, 5, 6, 7.5))
        self.assertTrue(m.ignore_websockets)
        self.assertEqual(m.capabilities.inputs, ("text", "image"))
        self.assertEqual(m.capabilities.context, 8192)
        self.assertEqual(c.aliases["m:hi"], "m")
        self.assertIsNone(m.port)

    def test_top_level_keys_round_trip(self):
        store = self.mktemp()
        c = load(f"""
            logLevel: DEBUG
            logTimeFormat: rfc3339
            logToStdout: both
            metricsMaxInMemory: 0
            captureBuffer: 0
            store: {{path: {store}}}
            ui: {{activity: {{session_id: [" X-A ", x-a, "", X-B]}}}}
            performance: {{disabled: true, every: 1m}}
            includeAliasesInList: true
            apiKeys: [k1, k2]
            upstream: {{ignorePaths: ['^/ws$']}}
            maxRequestBodyBytes: 1024
            hooks: {{on_startup: {{preload: [" al ", nope, m]}}}}
            models:
              m: {{cmd: "x --port ${{PORT}}", aliases: [al]}}
        """)
        self.assertEqual((c.log_level, c.log_time_format, c.log_to_stdout), ("debug", "rfc3339", "both"))
        self.assertEqual(c.metrics_max_in_memory, 1000)
        self.assertEqual(c.capture_buffer, 0)
        self.assertEqual(c.store_path, store)
        self.assertEqual(c.session_id_headers, ("X-A", "X-B"))
        self.assertEqual((c.performance.disabled, c.performance.every), (True, 60.0))
        self.assertTrue(c.include_aliases_in_list)
        self.assertEqual([k.key for k in c.api_keys], ["k1", "k2"])
        self.assertEqual(c.ignore_paths, ("^/ws$",))
        self.assertEqual(c.max_request_body_bytes, 1024)
        self.assertEqual(c.preload, ("m", "m"))
        self.assertTrue(any("nope" in w for w in c.warnings))

    def test_unknown_log_values_fall_back(self):
        c = load("logLevel: loud\nlogTimeFormat: whenever\n")
        self.assertEqual((c.log_level, c.log_time_format), ("info", ""))

    def test_unknown_keys_warn(self):
        c = load("models:\n  m:\n    cmd: x\n    proxy: http://h:1\n    tll: 5\n")
        self.assertEqual(c.warnings, ("models.m.tll (line 5): unknown key ignored",))

    def test_comfyui_limits(self):
        c = load("models:\n  comfyui_auto: {cmd: x, proxy: 'http://h:1'}\n")
        self.assertEqual(c.models["comfyui_auto"].concurrency_limit, 50)
        self.assertTrue(c.models["comfyui_auto"].ignore_websockets)


class MacroTests(ErrorsMixin, SynchronousTestCase):
    def test_nested_typed_and_order(self):
        c = load("""
            macros:
              base: srv
              ctx: 4096
              args: "--ctx ${ctx}"
              flag: true
            models:
              m:
                macros: {ctx: 8192, extra: "${args} --x"}
                cmd: ${base} ${extra} --port ${PORT} --id ${MODEL_ID}
                metadata:
                  ctx: ${ctx}
                  flag: ${flag}
                  port: ${PORT}
                  text: "p=${PORT} f=${flag}"
                  list: ["${ctx}", {inner: "${MODEL_ID}"}]
        """)
        m = c.models["m"]
        self.assertEqual(m.cmd, "srv --ctx 8192 --x --port 5800 --id m")
        self.assertEqual(thaw(m.metadata), {
            "ctx": 8192, "flag": True, "port": 5800, "text": "p=5800 f=true", "list": [8192, {"inner": "m"}]})
        self.assertEqual(c.macros, (("base", "srv"), ("ctx", 4096), ("args", "--ctx ${ctx}"), ("flag", True)))

    def test_macro_may_only_use_earlier_macros(self):
        self.assertError("""
            macros:
              a: "${b}"
              b: x
            models:
              m: {cmd: "${a} --port ${PORT}"}
        """, "models.m.cmd (line 6): unknown macro '${b}'")

    def test_env_macros(self):
        c = load("""
            # ${env.ONLY_IN_COMMENT} is ignored
            apiKeys: ["${env.KEY}"]
            macros: {home: "${env.HOME}/models"}
            models:
              m: {cmd: "srv ${home} --port ${PORT}", env: ["Q=${env.QUOTE}"]}
        """, environ={"KEY": "abc", "HOME": "/h", "QUOTE": 'say "hi"'})
        self.assertEqual([k.key for k in c.api_keys], ["abc"])
        self.assertEqual(c.models["m"].cmd, "srv /h/models --port 5800")
        self.assertEqual(c.models["m"].env, ('Q=say "hi"',))

    def test_env_errors(self):
        errors = self.errors("apiKeys: ['${env.NOPE}', '${env.BAD}']\n", environ={"BAD": "a\nb"})
        self.assertIn("environment variable 'NOPE' is not set", "\n".join(errors))
        self.assertIn("environment variable 'BAD' contains newlines", "\n".join(errors))

    def test_reserved_invalid_and_self_reference(self):
        errors = self.assertError("""
            macros:
              PORT: 1
              "bad name": 2
              me: "${me}"
              obj: {a: 1}
            models:
              m:
                macros: {MODEL_ID: x}
                cmd: "srv --port ${PORT}"
        """, "macros.PORT (line 3): macro name 'PORT' is reserved",
            "macros.bad name (line 4): macro name 'bad name' contains invalid characters",
            "macros.me (line 5): macro 'me' contains self-reference",
            "macros.obj (line 6): macro 'obj' has invalid type dict",
            "models.m.macros.MODEL_ID (line 9): macro name 'MODEL_ID' is reserved")
        self.assertEqual(len(errors), 5)

    def test_pid_only_in_cmd_stop(self):
        c = load("models:\n  m: {cmd: 'srv --port ${PORT}', cmdStop: 'kill ${PID}'}\n")
        self.assertEqual(c.models["m"].cmd_stop, "kill ${PID}")
        self.assertError("models:\n  m: {cmd: 'srv --port ${PORT} ${PID}'}\n",
                         "models.m.cmd (line 2): macro '${PID}' is only allowed in cmdStop")

    def test_comment_lines_stripped_before_expansion(self):
        c = load("""
            models:
              m:
                cmd: |
                  srv --port 9
                  # --flag ${undefined} --port ${PORT}
                proxy: http://127.0.0.1:9
        """)
        self.assertEqual(c.models["m"].cmd.strip(), "srv --port 9")
        self.assertIsNone(c.models["m"].port)

    def test_port_allocation_in_sorted_id_order(self):
        c = load("""
            startPort: ${first}
            macros: {first: 7000, srv: "srv --port ${PORT}"}
            models:
              zeta: {cmd: "${srv}"}
              alpha: {cmd: "${srv}"}
              fixed: {cmd: "srv", proxy: "http://127.0.0.1:1"}
              mid: {cmd: "srv --port ${PORT}", proxy: "http://127.0.0.1:${PORT}/base"}
        """)
        self.assertEqual({k: m.port for k, m in c.models.items()},
                         {"alpha": 7000, "fixed": None, "mid": 7001, "zeta": 7002})
        self.assertEqual(c.models["mid"].proxy, "http://127.0.0.1:7001/base")

    def test_proxy_port_without_cmd_port(self):
        errors = self.assertError("models:\n  m:\n    cmd: srv\n",
                                  "models.m.proxy (line 3): proxy uses ${PORT} but cmd does not")
        self.assertEqual(len(errors), 1)

    def test_set_params_by_id_keys(self):
        self.assertError("""
            macros: {a: x}
            models:
              m:
                cmd: "srv --port ${PORT}"
                filters:
                  setParamsByID:
                    "${a}": {p: 1}
                    "x": {p: 2}
        """, "keys 'x' and 'x' resolve to the same value")


class ValidationTests(ErrorsMixin, SynchronousTestCase):
    def test_five_mistakes_five_located_errors(self):
        errors = self.assertError("""
            healthCheckTimeout: soon
            globalTTL: -5
            logToStdout: printer
            models:
              qwen:
                cmd: "srv --port ${PORT}"
                ttl: -2
              other:
                cmd: "srv --port ${PORT}"
                aliases: [q]
              third:
                cmd: "srv --port ${PORT}"
                aliases: [q]
        """, "healthCheckTimeout (line 2): must be an integer, not a string",
            "globalTTL (line 3): must be >= 0",
            "logToStdout (line 4): must be one of: proxy, upstream, both, none",
            "models.qwen.ttl (line 8): must be >= -1",
            "models.third.aliases[0] (line 14): duplicate alias q")
        self.assertEqual(len(errors), 5)

    def test_model_rules(self):
        self.assertError("""
            models:
              a: {cmd: "", proxy: "http://h:1"}
              b: {cmd: x, proxy: "not a url"}
              c: {cmd: "x --port ${PORT}", unloadTimeout: -1, concurrencyLimit: -3, env: [NOEQUALS]}
              d: {cmd: "x --port ${PORT}", capabilities: {in: [smell], context: -1}}
              e: {cmd: "x --port ${PORT}", aliases: [a]}
              f: {cmd: "x --port ${PORT}", filters: {setParamsByID: {a: {x: 1}}}}
              g: {cmd: "x --port ${PORT}", sendLoadingState: maybe}
              h: ["not", "a", "mapping"]
        """, "models.a.cmd (line 3): is required",
            "models.b.proxy (line 4): invalid proxy URL 'not a url'",
            "models.c.unloadTimeout (line 5): must be >= 0",
            "models.c.concurrencyLimit (line 5): must be >= 0",
            "models.c.env[0] (line 5): must be NAME=value",
            "models.d.capabilities.in[0] (line 6): invalid modality 'smell'",
            "models.d.capabilities.context (line 6): must be >= 0",
            "models.e.aliases[0] (line 7): alias 'a' conflicts with an existing model ID",
            "models.f.filters.setParamsByID.a (line 8): key 'a' conflicts with an existing model ID",
            "models.g.sendLoadingState (line 9): must be true or false",
            "models.h (line 10): must be a mapping of model settings")

    def test_top_level_rules(self):
        self.assertError("""
            startPort: 0
            unloadTimeout: -1
            apiKeys: ["", "has space"]
            performance: {every: 1s}
            upstream: {ignorePaths: ["(unclosed"]}
            store: {path: ""}
            models: {}
        """, "startPort (line 2): must be greater than 1",
            "unloadTimeout (line 3): must be >= 0",
            "apiKeys[0] (line 4): empty api key found in apiKeys",
            "apiKeys[1] (line 4): api key cannot contain spaces",
            "performance.every (line 5): must be at least 5s",
            "upstream.ignorePaths[0] (line 6): invalid regular expression",
            "store.path (line 7): must not be empty")

    def test_store_path_is_directory(self):
        d = self.mktemp()
        os.makedirs(d)
        self.assertError(f"store: {{path: {d}}}\n", "is a directory")

    def test_yaml_syntax_error_is_located(self):
        self.assertError("models:\n  m: [unclosed\n", "config (line")

    def test_duplicate_keys(self):
        self.assertError("models:\n  m: {cmd: x}\n  m: {cmd: y}\n", "already defined")


class RoutingTests(ErrorsMixin, SynchronousTestCase):
    MODELS = """
        models:
          a: {cmd: "x --port ${PORT}"}
          b: {cmd: "x --port ${PORT}", aliases: [bee]}
          c: {cmd: "x --port ${PORT}"}
          d: {cmd: "x --port ${PORT}"}
    """

    def test_groups_and_default_group(self):
        c = load(self.MODELS + """
        routing:
          router:
            settings:
              groups:
                g1: {swap: false, exclusive: false, persistent: true, members: [a, b]}
          scheduler:
            settings: {fifo: {priority: {bee: 5, a: -1}, maxWait: 2.5, maxQueue: 3}}
        """)
        g1, default = c.routing.groups
        self.assertEqual((g1.name, g1.members, g1.swap, g1.exclusive, g1.persistent), ("g1", ("a", "b"), False, False, True))
        self.assertEqual((default.name, default.members, default.swap, default.exclusive), ("(default)", ("c", "d"), True, True))
        self.assertEqual(thaw(c.routing.priority), {"b": 5, "a": -1})
        self.assertEqual(c.models["b"].priority, 5)
        self.assertEqual((c.routing.max_wait, c.routing.max_queue), (2.5, 3))
        self.assertIs(c.group_of("c"), default)

    def test_group_member_rules(self):
        self.assertError(self.MODELS + """
        groups:
          g1: {members: [a, a]}
          g2: {members: [a]}
        """, "groups.g1.members[1] (line 9): duplicate model member a found in group: g1",
            "groups.g2.members[0] (line 10): model member a is used in multiple groups: g1 and g2")

    def test_legacy_and_routing_conflict(self):
        self.assertError(self.MODELS + """
        groups: {g: {members: [a]}}
        routing: {router: {use: group}}
        """, "both the legacy top-level")

    def test_matrix(self):
        c = load(self.MODELS + """
        routing:
          router:
            use: matrix
            settings:
              matrix:
                vars: {x: a, y: b}
                evict_costs: {x: 5, c: 2}
                sets:
                  pair: "x & y"
                  wide: "(x | c) & +pair | d"
        """)
        m = c.routing.matrix
        self.assertEqual(c.routing.router, "matrix")
        self.assertEqual(c.routing.groups, ())
        self.assertEqual([s.name for s in m.sets], ["pair", "wide"])
        self.assertEqual(m.sets[0].alternatives, (frozenset("ab"),))
        self.assertEqual(m.sets[1].alternatives, (frozenset("ab"), frozenset("abc"), frozenset("d")))
        self.assertEqual((m.evict_cost("a"), m.evict_cost("c"), m.evict_cost("d")), (5, 2, 1))

    def test_matrix_errors(self):
        self.assertError(self.MODELS + """
        matrix:
          vars: {"bad key!": a, z: nomodel}
          evict_costs: {a: 0, ghost: 3}
          sets:
            s1: "a & "
            s2: "+nope"
            s3: "+s4"
            s4: "+s3"
            s5: "(a | b"
            s6: "a b"
        """, "matrix.vars.bad key! (line 9): var key 'bad key!' must contain only",
            "matrix.vars.z (line 9): var key 'z' references unknown model 'nomodel'",
            "matrix.evict_costs.a (line 10): evict_cost for 'a' must be a positive integer",
            "matrix.evict_costs.ghost (line 10): unknown var or model 'ghost'",
            "matrix.sets.s1 (line 12): unexpected end of expression",
            "matrix.sets.s2 (line 13): undefined set reference '+nope'",
            "matrix.sets.s3 (line 14): circular reference",
            "matrix.sets.s5 (line 16): missing ')'",
            "matrix.sets.s6 (line 17): unexpected 'b'")

    def test_matrix_use_without_settings(self):
        self.assertError(self.MODELS + "    routing: {router: {use: matrix}}\n",
                         "routing.router.use (line 7): is 'matrix' but routing.router.settings.matrix is not set")
        self.assertError(self.MODELS + "    routing: {router: {use: magic}}\n", "routing.router.use")
        self.assertError(self.MODELS + "    routing: {scheduler: {use: lifo}}\n", "routing.scheduler.use")


class DSLTests(SynchronousTestCase):
    def test_precedence(self):
        self.assertEqual(parse("a | b & c"), ("or", [("id", "a"), ("and", [("id", "b"), ("id", "c")])]))

    def test_errors(self):
        for expr in ("", "a &", "(a", "a)", "+", "a $ b"):
            self.assertRaises(DSLError, parse, expr)

    def test_expansion_order(self):
        sets, errors = expand_sets([("s", "(a | b) & (c | d)")], lambda s: s)
        self.assertEqual(errors, {})
        self.assertEqual(sets["s"], [frozenset("ac"), frozenset("ad"), frozenset("bc"), frozenset("bd")])


class PeersSelectorsProfilesTests(ErrorsMixin, SynchronousTestCase):
    BASE = """
        models:
          a: {cmd: "x --port ${PORT}", aliases: [al]}
          b: {cmd: "x --port ${PORT}"}
        peers:
          p1: {proxy: "http://127.0.0.1:9/", models: [m1, shared], apiKey: k}
          p2: {proxy: "http://127.0.0.1:8", models: [shared, "org/m2"]}
    """

    def test_loaded(self):
        c = load(self.BASE + """
        routing: {router: {settings: {groups: {g: {swap: false, members: [a, b]}}}}}
        selectors:
          s-warm: {strategy: warm, targets: [al, b], name: Warm, metadata: {k: 1}}
          s-spill: {strategy: spillover, targets: [a, b, p1/m1], settings: {spillover: 3}}
        profiles:
          day: {description: D, pins: {chat: al, off: ~, sel: s-warm, remote: org/m2}}
        """)
        p1 = c.peers["p1"]
        self.assertEqual((p1.proxy, p1.models, p1.api_key, p1.timeouts.response_header), ("http://127.0.0.1:9", ("m1", "shared"), "k", 60))
        self.assertEqual(c.peer_model("p2/shared"), ("p2", "shared"))
        self.assertIsNone(c.peer_model("shared"))  # two peers list it
        self.assertEqual(c.peer_model("m1"), ("p1", "m1"))
        self.assertEqual(c.selectors["s-spill"].spillover, 3)
        self.assertEqual(c.selectors["s-warm"].name, "Warm")
        self.assertEqual(thaw(c.profiles["day"].pins), {"chat": "al", "off": None, "sel": "s-warm", "remote": "org/m2"})

    def test_errors(self):
        self.assertError(self.BASE + """
          p3: {models: []}
          a: {proxy: "http://h", models: [x]}
        selectors:
          a: {strategy: pin, targets: [b]}
          s1: {targets: [b]}
          s2: {strategy: warm, targets: [p1/m1]}
          s3: {strategy: pin, targets: [s1]}
          s4: {strategy: spillover, targets: [al, b]}
          s5: {strategy: fastest, targets: []}
        profiles:
          old: [a, b]
          empty: {pins: {}}
        """, "peers.p3.proxy (line 9): is required",
            "peers.p3.models (line 9): must list at least one model",
            "selectors.a (line 12): name conflicts with model ID 'a'",
            "selectors.s1.strategy (line 13): is required",
            "selectors.s2.targets[0] (line 14): must resolve to a local model for strategy 'warm'",
            "selectors.s3.targets[0] (line 15): references selector 's1'",
            "selectors.s4.targets (line 16): spillover targets must share a group with swap: false",
            "selectors.s5.strategy (line 17): unknown strategy 'fastest'",
            "selectors.s5.targets (line 17): must contain at least one entry",
            "profiles.old (line 19): the list form of profiles is no longer supported",
            "profiles.empty.pins (line 20): must contain at least one entry")

    def test_peer_namespace_conflict(self):
        self.assertError("""
            models:
              "p1/m1": {cmd: "x --port ${PORT}"}
            peers:
              p1: {proxy: "http://h:1", models: [m1]}
        """, "peers.p1.models[0] (line 5): peer model name 'p1/m1' conflicts")


class ExampleConfigTests(SynchronousTestCase):
    """The reference examples are documentation: exactly their known problems are reported."""

    def example(self, name):
        with open(os.path.join(DATA, name)) as f:
            return f.read()

    def test_current_example_errors(self):
        with self.assertRaises(ConfigError) as ctx:
            load_config(os.path.join(DATA, "config.example.yaml"), environ=EXAMPLE_ENV)
        errors = ctx.exception.errors
        self.assertTrue(errors[0].startswith("models.unlisted-model.proxy (line "))
        self.assertIn("proxy uses ${PORT} but cmd does not", errors[0])
        self.assertTrue(all(e.startswith("routing.router.settings.matrix.") for e in errors[1:]), errors)
        self.assertTrue(all(" (line " in e for e in errors))
        joined = "\n".join(errors)
        for model in ("gemma-model", "qwen-model", "mistral-model", "voxtral-model", "reranker-model",
                      "stable-diffusion", "llama-70B"):
            self.assertIn(model, joined)

    def test_seed_era_example_errors(self):
        with self.assertRaises(ConfigError) as ctx:
            load_config(os.path.join(DATA, "config.example.seed-era.yaml"), environ=EXAMPLE_ENV)
        self.assertEqual(len(ctx.exception.errors), 7)
        self.assertTrue(all(e.startswith("matrix.vars.") for e in ctx.exception.errors))

    def mend(self, text):
        text = text.replace("cmd: some-upstream-server", "cmd: some-upstream-server --port ${PORT}")
        extra = "".join(f'  "{m}":\n    cmd: server --port ${{PORT}}\n' for m in (
            "gemma-model", "qwen-model", "mistral-model", "voxtral-model", "reranker-model",
            "stable-diffusion", "llama-70B"))
        return text.replace("\nmodels:\n", "\nmodels:\n" + extra, 1)

    def test_mended_current_example_loads(self):
        c = load_config_text(self.mend(self.example("config.example.yaml")), environ=EXAMPLE_ENV)
        self.assertEqual(c.health_check_timeout, 500)
        self.assertEqual(c.start_port, 10001)
        self.assertEqual([k.key for k in c.api_keys], ["sk-hunter2", c.api_keys[1].key, "k1", "k2"])
        self.assertIn("gpt-oss-120b", c.models)
        g = c.models["gpt-oss-120b"]
        self.assertEqual(g.cmd.split()[0], "/path/to/llama-server/llama-server-ec9e0301")
        self.assertIn("--ctx-size 16384", g.cmd)
        self.assertIn("--temperature 0.7", g.cmd)
        self.assertEqual(g.metadata["port"], g.port)
        self.assertEqual(g.metadata["temperature"], 0.7)
        self.assertEqual(g.aliases, ("gpt-4o-mini", "gpt-oss-120b:high", "gpt-oss-120b:low"))
        self.assertEqual(c.models["docker-llama"].cmd_stop, "docker stop docker-llama")
        self.assertEqual(dict(c.macros)["models_dir"], "/home/u/models")
        self.assertEqual([grp.name for grp in c.routing.groups], ["group1", "group2", "forever", "(default)"])
        self.assertEqual([s.name for s in c.routing.matrix.sets], ["standard", "with_rerank", "creative", "full"])
        self.assertEqual(c.routing.matrix.evict_cost("voxtral-model"), 50)
        self.assertEqual(sorted(c.selectors), ["coding-model", "llama", "llm-plan"])
        self.assertEqual(c.selectors["llama"].spillover, 4)
        self.assertIsNone(c.profiles["coding"].pins["image-gen"])
        self.assertEqual(c.peers["openrouter"].api_key, "or-key")
        self.assertEqual(len(c.peers["openrouter"].models), 6)
        self.assertEqual(c.performance.every, 15.0)
        self.assertEqual(len(c.ignore_paths), 2)

    def test_mended_seed_era_example_loads(self):
        c = load_config_text(self.mend(self.example("config.example.seed-era.yaml")), environ=EXAMPLE_ENV)
        self.assertEqual(c.routing.router, "matrix")
        self.assertEqual(c.routing.matrix.evict_cost("llama-70B"), 30)
        self.assertTrue(c.models["qwen-unlisted"].unlisted)


class MergeTests(ErrorsMixin, SynchronousTestCase):
    def write(self, path, text):
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))

    def test_config_dir_merge(self):
        base = self.mktemp()
        os.makedirs(base)
        main = os.path.join(base, "main.yaml")
        d = os.path.join(base, "conf.d")
        os.makedirs(d)
        self.write(main, "apiKeys: [a]\nlogLevel: info\nmodels:\n  m1: {cmd: 'x --port ${PORT}'}\n")
        self.write(os.path.join(d, "10-more.yaml"), "apiKeys: [b]\nlogLevel: info\nmodels:\n  m2: {cmd: 'x --port ${PORT}'}\n")
        self.write(os.path.join(d, "20-null.yml"), "logLevel: ~\n")
        self.write(os.path.join(d, "ignored.txt"), "not: yaml: at all")
        c = load_config(main, d, environ={})
        self.assertEqual([k.key for k in c.api_keys], ["a", "b"])
        self.assertEqual(sorted(c.models), ["m1", "m2"])
        self.assertEqual(c.models["m1"].port, 5800)
        self.assertEqual(c.models["m2"].port, 5801)

    def test_config_dir_conflicts(self):
        d = self.mktemp()
        os.makedirs(d)
        self.write(os.path.join(d, "a.yaml"), "logLevel: info\nmodels:\n  m: {cmd: 'x --port ${PORT}'}\n")
        self.write(os.path.join(d, "b.yaml"), "logLevel: debug\nmodels:\n  m: {cmd: 'y --port ${PORT}'}\n")
        with self.assertRaises(ConfigError) as ctx:
            load_config(None, d, environ={})
        joined = "\n".join(ctx.exception.errors)
        self.assertIn("conflicting values 'info' and 'debug'", joined)
        self.assertIn("models.m", joined)
        self.assertIn("b.yaml line 3", joined)

    def test_missing_file(self):
        with self.assertRaises(ConfigError) as ctx:
            load_config(self.mktemp())
        self.assertIn("cannot read config", str(ctx.exception))


class DiffTests(SynchronousTestCase):
    def test_diff(self):
        old = load("models:\n  a: {cmd: 'x --port ${PORT}'}\n  b: {cmd: 'y --port ${PORT}'}\n  c: {cmd: z, proxy: 'http://h:1'}\n")
        new = load("models:\n  a: {cmd: 'x --port ${PORT}'}\n  b: {cmd: 'y2 --port ${PORT}'}\n  d: {cmd: z, proxy: 'http://h:1'}\n")
        change = diff(old, new)
        self.assertEqual((change.added, change.removed, change.changed), ({"d"}, {"c"}, {"b"}))
        self.assertTrue(diff(old, old).unchanged_models)


class DurationTests(SynchronousTestCase):
    def test_parse(self):
        self.assertEqual(parse_duration("1m30s"), 90.0)
        self.assertEqual(parse_duration("500ms"), 0.5)
        self.assertEqual(parse_duration(7), 7.0)
        self.assertIsNone(parse_duration("soon"))
