"""The pure routing decisions of issue 11: peer names, selector strategies,
their config keys.  No reactor."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import Selector, load_config_text
from llamaswap.process import ProcessState
from llamaswap.proxy.filters import replace_query_model
from llamaswap.router.peers import PeerRoute, Target, peer_routes, resolve
from llamaswap.router.selectors import NoTarget, SpilloverCounts, choose, selector_targets

from .test_config import ErrorsMixin

READY, STARTING, STOPPED, STOPPING = (ProcessState.READY, ProcessState.STARTING, ProcessState.STOPPED,
                                      ProcessState.STOPPING)

CONFIG = """
models:
  A: {cmd: "x --port ${PORT}", aliases: [a1, m3]}
  B: {cmd: "x --port ${PORT}"}
  m2: {cmd: "x --port ${PORT}"}
peers:
  p1: {proxy: "http://127.0.0.1:9", models: [m1, m2, m3, shared, m1]}
  p2: {proxy: "http://127.0.0.1:8", models: [shared, "p1/m1", "org/x"]}
"""


def local(name: str, model_id: str = "") -> Target:
    return Target(name, model_id=model_id or name)


def remote(peer: str, model: str) -> Target:
    return Target(f"{peer}/{model}", peer=PeerRoute(peer, model))


class PeerNameTests(SynchronousTestCase):
    def test_precedence(self):
        config = load_config_text(CONFIG)
        routes = peer_routes(config.peers)
        # local id, then local alias, then a peer's full name, then a bare name one peer lists
        self.assertEqual(resolve(config, routes, "m2"), Target("m2", model_id="m2"))
        self.assertEqual(resolve(config, routes, "m3"), Target("m3", model_id="A"))
        self.assertEqual(resolve(config, routes, "p1/m2"), Target("p1/m2", peer=PeerRoute("p1", "m2")))
        self.assertEqual(resolve(config, routes, "m1"), Target("m1", peer=PeerRoute("p1", "m1")))
        self.assertEqual(resolve(config, routes, "org/x").label, "p2/org/x")
        self.assertIsNone(resolve(config, routes, "shared"))  # two peers list it
        # "p1/m1" is p1's m1 by its full name, although p2 lists a bare "p1/m1" too
        self.assertEqual(resolve(config, routes, "p1/m1").peer, PeerRoute("p1", "m1"))
        self.assertEqual(resolve(config, routes, "p2/p1/m1").peer, PeerRoute("p2", "p1/m1"))
        self.assertIsNone(resolve(config, routes, "nope"))

    def test_query_model_rewrite(self):
        self.assertEqual(replace_query_model(b"model=p1%2Fm1&x=1&e=", "p1/m1", "m1"), b"model=m1&x=1&e=")
        self.assertEqual(replace_query_model(b"model=other", "p1/m1", "m1"), b"model=other")
        self.assertEqual(replace_query_model(b"", "p1/m1", "m1"), b"")


def selector(strategy: str, targets=("A", "B"), spillover: int = 1) -> Selector:
    return Selector(id="s", strategy=strategy, targets=tuple(targets), spillover=spillover)


class StrategyTests(SynchronousTestCase):
    def setUp(self):
        self.states: dict = {}
        self.down: set = set()
        self.counts = SpilloverCounts()

    def choose(self, sel: Selector, targets) -> list:
        chosen, release = choose(sel, targets, self.states.get, lambda peer: peer not in self.down, self.counts)
        return [t.label for t in chosen], release

    def test_pin_is_always_the_first(self):
        self.states = {"A": STOPPED, "B": READY}
        self.assertEqual(self.choose(selector("pin"), [local("A"), local("B")]), (["A"], None))

    def test_warm_prefers_ready_then_starting_then_first(self):
        sel = selector("warm", ("A", "B", "C"))
        targets = [local("A"), local("B"), local("C")]
        self.states = {"A": STOPPED, "B": STOPPED, "C": STOPPED}
        self.assertEqual(self.choose(sel, targets)[0], ["A"])
        self.states.update(B=STARTING, C=READY)
        self.assertEqual(self.choose(sel, targets)[0], ["C"])
        self.states.update(C=STOPPING)
        self.assertEqual(self.choose(sel, targets)[0], ["B"])

    def test_spillover_fills_each_target_up_to_its_share(self):
        sel = selector("spillover", ("A", "B", "p/m"), spillover=2)
        targets = [local("A"), local("B"), remote("p", "m")]
        self.states = {"A": STOPPED, "B": STOPPED}
        picks, releases = [], []
        for _ in range(6):  # nothing finishes: A takes two, then B two, then the peer, then least busy
            chosen, release = self.choose(sel, targets)
            picks.append(chosen[0])
            releases.append(release)
            if chosen[0] in ("A", "B"):
                self.states[chosen[0]] = STARTING
        self.assertEqual(picks, ["A", "A", "B", "B", "p/m", "p/m"])
        self.assertEqual([self.counts.count("s", t) for t in ("A", "B", "p/m")], [2, 2, 2])
        for release in releases:
            release()
        self.assertEqual([self.counts.count("s", t) for t in ("A", "B", "p/m")], [0, 0, 0])

    def test_spillover_ties_go_round_robin_and_least_busy_wins(self):
        sel = selector("spillover", ("A", "B"))
        targets = [local("A"), local("B")]
        self.states = {"A": READY, "B": READY}
        picks = []
        for _ in range(4):
            chosen, release = self.choose(sel, targets)
            picks.append(chosen[0])
            release()
        self.assertEqual(picks, ["A", "B", "A", "B"])
        held = self.counts.reserve("s", "A")
        self.assertEqual(self.choose(sel, targets)[0], ["B"])  # A holds one more
        held()

    def test_spillover_skips_stopping_models_and_unavailable_peers(self):
        sel = selector("spillover", ("A", "p/m", "B"))
        targets = [local("A"), remote("p", "m"), local("B")]
        self.states = {"A": STOPPING, "B": STOPPED}
        self.down = {"p"}
        self.assertEqual(self.choose(sel, targets)[0], ["B"])
        self.states["B"] = STOPPING
        with self.assertRaises(NoTarget) as caught:
            self.choose(sel, targets)
        self.assertEqual(str(caught.exception), 'selector "s" has no available spillover targets')
        self.down = set()
        self.assertEqual(self.choose(sel, targets)[0], ["p/m"])

    def test_failover_lists_every_available_target_in_order(self):
        sel = selector("failover", ("p/m", "A", "q/m"))
        targets = [remote("p", "m"), local("A"), remote("q", "m")]
        self.assertEqual(self.choose(sel, targets), (["p/m", "A", "q/m"], None))
        self.down = {"p"}
        self.assertEqual(self.choose(sel, targets)[0], ["A", "q/m"])
        with self.assertRaises(NoTarget):
            self.choose(sel, [remote("p", "m")])

    def test_unresolved_targets_are_left_out(self):
        config = load_config_text(CONFIG)
        routes = peer_routes(config.peers)
        sel = Selector(id="s", strategy="pin", targets=("gone", "a1", "p1/m1"))
        targets = selector_targets(sel, lambda name: resolve(config, routes, name))
        self.assertEqual([t.label for t in targets], ["A", "p1/m1"])
        self.assertEqual(targets[0].name, "a1")  # what the body's model becomes
        with self.assertRaises(NoTarget):
            self.choose(sel, [])


class ConfigTests(ErrorsMixin, SynchronousTestCase):
    def test_failover_strategy_and_peer_keys(self):
        config = load_config_text("""
models:
  A: {cmd: "x --port ${PORT}"}
peers:
  p1: {proxy: "http://127.0.0.1:9", models: [m1], healthCheck: {interval: 2s},
       filters: {setParamsByID: {"p1/m1": {x: 1}}}}
  p2: {proxy: "http://127.0.0.1:8", models: [m2]}
selectors:
  f: {strategy: failover, targets: [p1/m1, A, gone]}
""")
        self.assertEqual(config.selectors["f"].strategy, "failover")
        p1, p2 = config.peers["p1"], config.peers["p2"]
        self.assertEqual((p1.health_check.path, p1.health_check.interval), ("/health", 2.0))
        self.assertIsNone(p2.health_check)  # off unless configured
        self.assertEqual(dict(p1.filters.set_params_by_id["p1/m1"]), {"x": 1})
        self.assertTrue(any("'gone' is not a known model" in w for w in config.warnings))

    def test_errors_are_located(self):
        errors = self.errors("""
models:
  A: {cmd: "x --port ${PORT}"}
peers:
  p1: {proxy: "http://h:1", models: [m1], healthCheck: {path: health, interval: 0}}
  p2: {proxy: "http://h:2", models: [m2], healthCheck: {interval: soon, every: 1}}
selectors:
  s1: {strategy: failover, targets: [gone, nope]}
  s2: {strategy: fastest, targets: [A]}
""")
        self.assertEqual(errors, [
            "peers.p1.healthCheck.path (line 5): must start with '/' (got 'health')",
            "peers.p1.healthCheck.interval (line 5): must be at least 0.1s",
            "peers.p2.healthCheck.interval (line 6): invalid duration 'soon' (use e.g. 10s, 1m)",
            "selectors.s1.targets (line 8): none of the targets is a known model",
            "selectors.s2.strategy (line 9): unknown strategy 'fastest' (valid: warm, pin, spillover, failover)",
        ])
