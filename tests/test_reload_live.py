"""Live reload that keeps what did not change (issue 11).

Pure parts first (the config diff, residency re-planning, the scheduler
taking a new model set), then the real service on a loopback port with the
fake upstream as real children: unchanged models keep their process and
serve throughout; changed ones restart without overlapping their old
process; removed ones drain; SIGHUPs coalesce.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import textwrap

from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent

from llamaswap.config import ModelConfig, load_config_text
from llamaswap.config.diff import PROCESS_FIELDS, diff, restart_settings
from llamaswap.config.types import Group, Matrix, MatrixSet
from llamaswap.router.planners import GroupPlanner, MatrixPlanner, Usage, reachable, replan
from llamaswap.router.scheduler import MSG_NOT_FOUND, Outcome, Scheduler
from llamaswap.service import ConfigWatcher, SighupReload
from llamaswap.process import ProcessState
from tests.test_e2e import Harness, free_run, pid_alive
from tests.test_faults_upstream import _Body
from tests.test_process_machine import MachineTestCase
from tests.test_scheduler import Recorder

PY = sys.executable
REMOVED = "model {!r} was removed from the config"


def load(text: str):
    return load_config_text(textwrap.dedent(text), environ={})


class DiffTests(SynchronousTestCase):
    def test_process_settings_decide_a_restart(self) -> None:
        old = load("""
            models:
              a: {cmd: 'x --port ${PORT}', ttl: 5}
              b: {cmd: 'y --port ${PORT}'}
              c: {cmd: 'z --port ${PORT}'}
        """)
        new = load("""
            models:
              a: {cmd: 'x --port ${PORT}', ttl: 60, aliases: [a1]}
              b: {cmd: 'y2 --port ${PORT}'}
              c: {cmd: 'z --port ${PORT}'}
              d: {cmd: 'w --port ${PORT}'}
        """)
        change = diff(old, new)
        self.assertEqual((change.added, change.removed, change.changed), ({"d"}, set(), {"a", "b"}))
        self.assertEqual((change.restart, change.updated), ({"b"}, {"a"}))

    def test_a_shifted_port_is_a_change(self) -> None:
        """Macros are expanded before the comparison: removing the first model
        moves ``${PORT}`` of the next, which then needs a new process."""
        old = load("models:\n  a: {cmd: 'x --port ${PORT}'}\n  b: {cmd: 'y --port ${PORT}'}\n")
        new = load("models:\n  b: {cmd: 'y --port ${PORT}'}\n")
        change = diff(old, new)
        self.assertEqual((change.removed, change.restart), ({"a"}, {"b"}))

    def test_settings_read_at_start_up(self) -> None:
        old = load("models: {}\n")
        new = load("captureBuffer: 9\nperformance: {disabled: true}\nlogLevel: debug\nmodels: {}\n")
        self.assertEqual(restart_settings(old, new), ("captureBuffer", "performance"))
        self.assertEqual(restart_settings(old, old), ())

    def test_process_fields_are_model_fields(self) -> None:
        self.assertLessEqual(set(PROCESS_FIELDS), {f.name for f in dataclasses.fields(ModelConfig)})


class UpdateModelTests(MachineTestCase):
    """A kept model's process takes the settings that apply live."""

    def test_a_new_ttl_applies_to_an_idle_process(self) -> None:
        proc = self.ready(ttl=0)
        proc.update_model(dataclasses.replace(proc.model, ttl=5))
        self.clock.advance(4.9)
        self.assertIs(proc.state, ProcessState.READY)
        self.clock.advance(0.1)
        self.assertIs(proc.state, ProcessState.STOPPING)

    def test_a_shorter_ttl_counts_from_the_last_request(self) -> None:
        proc = self.ready(ttl=100)
        self.clock.advance(10)
        proc.update_model(dataclasses.replace(proc.model, ttl=5))
        self.clock.advance(0)
        self.assertIs(proc.state, ProcessState.STOPPING)

    def test_busy_process_keeps_running(self) -> None:
        proc = self.ready(ttl=100)
        proc.request_started()
        proc.update_model(dataclasses.replace(proc.model, ttl=1))
        self.clock.advance(50)
        self.assertIs(proc.state, ProcessState.READY)

    def test_another_model_is_refused(self) -> None:
        proc = self.ready()
        with self.assertRaises(ValueError):
            proc.update_model(dataclasses.replace(proc.model, id="other"))


class ReplanTests(SynchronousTestCase):
    swapping = GroupPlanner([Group("g1", ("A", "B"), swap=True, exclusive=False),
                             Group("g2", ("C",), swap=False, exclusive=False)])

    def test_one_way_gotcha_is_reachable(self) -> None:
        """A non-exclusive group's member may join an exclusive group's model
        (not the other way round): both may stay, though they cannot 'coexist'."""
        planner = GroupPlanner([Group("(default)", ("d",)), Group("side", ("n",), exclusive=False)])
        self.assertTrue(reachable(planner, {"d", "n"}))
        self.assertFalse(planner.can_coexist({"d", "n"}))
        self.assertEqual(replan(planner, {"d", "n"}, Usage(recency={"d": 2, "n": 1})), ())

    def test_many_running_models_take_polynomial_work(self) -> None:
        """Twenty running models (one in an exclusive group, the rest free to
        run together): all stay, with a few thousand plans, not 2**20."""
        free = tuple(f"m{i:02}" for i in range(19))
        planner = GroupPlanner([Group("free", free, swap=False, exclusive=False),
                                Group("x", ("x1", "x2"), swap=True, exclusive=True)])
        calls = []
        plan = planner.plan
        planner.plan = lambda model, loaded: (calls.append(model), plan(model, loaded))[1]
        running = set(free) | {"x1"}
        self.assertEqual(replan(planner, running, Usage(recency={m: i for i, m in enumerate(sorted(running))})), ())
        self.assertLess(len(calls), len(running) ** 3)
        self.assertTrue(reachable(planner, running))

    def test_least_recently_used_goes(self) -> None:
        self.assertEqual(replan(self.swapping, {"A", "B", "C"}, Usage(recency={"A": 1, "B": 2, "C": 3})), ("A",))
        self.assertEqual(replan(self.swapping, {"A", "B", "C"}, Usage(recency={"A": 3, "B": 2, "C": 1})), ("B",))

    def test_busy_and_kept_models_stay(self) -> None:
        recency = {"A": 1, "B": 2, "C": 3}
        self.assertEqual(replan(self.swapping, {"A", "B", "C"}, Usage(in_flight={"A": 1}, recency=recency)), ("B",))
        self.assertEqual(replan(self.swapping, {"A", "B", "C"}, Usage(recency=recency), keep={"A"}), ("B",))

    def test_matrix(self) -> None:
        matrix = Matrix({}, {}, (MatrixSet("s1", "A & B", (frozenset({"A", "B"}),)),
                                 MatrixSet("s2", "C", (frozenset({"C"}),))))
        planner = MatrixPlanner(matrix)
        self.assertEqual(replan(planner, {"A", "B", "C"}, Usage(recency={"A": 3, "B": 2, "C": 1})), ("C",))
        self.assertEqual(replan(planner, {"A", "B", "C"}, Usage(recency={"A": 1, "B": 2, "C": 3})), ("A", "B"))
        self.assertEqual(replan(planner, {"A", "B"}, Usage()), ())


class SchedulerApplyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.states: dict[str, str] = {}
        self.fx = Recorder()
        self.groups = [Group("all", ("r", "s", "n"), swap=False, exclusive=False),
                       Group("x", ("q", "y"), swap=True, exclusive=False)]
        self.sched = Scheduler(GroupPlanner(self.groups), self.fx, lambda m: self.states.get(m, "stopped"),
                               {"r": 0, "s": 0, "q": 0, "y": 0}, clock=Clock())

    def test_removed_models_fail_their_waiters_and_finish_in_flight(self) -> None:
        self.states.update(r="ready", y="ready")
        self.assertIs(self.sched.request(1, "r"), Outcome.GRANTED)
        self.assertIs(self.sched.request(2, "s"), Outcome.STARTED)
        self.assertIs(self.sched.request(3, "s"), Outcome.JOINED)
        self.assertIs(self.sched.request(4, "y"), Outcome.GRANTED)
        self.assertIs(self.sched.request(5, "q"), Outcome.QUEUED)  # y is busy
        self.assertIs(self.sched.request(6, "y"), Outcome.GRANTED)
        self.fx.take()
        self.sched.apply(GroupPlanner([Group("all", ("n",), swap=False, exclusive=False),
                                       Group("x", ("y",), swap=True, exclusive=False)]),
                         {"y": 0, "n": 0}, removed=REMOVED.format)
        self.assertEqual(sorted(self.fx.of("fail")), [(2, 404, REMOVED.format("s"), None),
                                                      (3, 404, REMOVED.format("s"), None),
                                                      (5, 404, REMOVED.format("q"), None)])
        self.assertEqual((self.sched.in_flight("r"), self.sched.in_flight("y")), (1, 2))  # in flight: kept
        self.sched.serve_done(1)
        self.assertEqual((self.sched.in_flight("r"), self.sched.admitted("r")), (0, 0))
        self.assertIs(self.sched.request(7, "r"), Outcome.FAILED)
        self.assertEqual(self.fx.of("fail")[-1], (7, 404, MSG_NOT_FOUND, None))
        self.assertIs(self.sched.request(8, "n"), Outcome.STARTED)  # added
        self.sched.swap_done("s")  # the cancelled load of a removed model ends quietly
        self.assertEqual(self.sched.active_swaps().keys(), {"n"})

    def test_kept_models_keep_their_queue(self) -> None:
        self.states.update(y="ready")
        self.sched.request(1, "y")
        self.assertIs(self.sched.request(2, "q"), Outcome.QUEUED)
        self.sched.apply(GroupPlanner(self.groups), {"q": 0, "y": 0, "r": 0, "s": 0}, priorities={"q": 5})
        self.assertEqual([e.req_id for e in self.sched.queue_snapshot()], [2])
        self.fx.take()
        self.sched.serve_done(1)
        self.assertEqual(self.fx.of("start_swap"), [("q", frozenset({"y"}))])


class LiveReloadTests(Harness):
    """The real service: each model on a fixed port of its own (so adding or
    removing one does not move the others' ``${PORT}``)."""

    timeout = 60
    model_settings = ""  # more settings for every model of ``text``

    def setUp(self):
        base = free_run(10)
        self.ports = {name: base + i for i, name in enumerate("ABCDURSXY")}
        self.path = os.path.abspath(self.mktemp())

    def text(self, models: dict, groups: str = "") -> str:
        """Config text: ``models`` maps ids to ``--respond`` text (plus any other responder flags)."""
        lines = ["healthCheckTimeout: 15", "models:"]
        for name, extra in models.items():
            port = self.ports[name]
            cmd = f"{PY} -m llamaswap.testing.responder --port {port} --id {name} --silent --respond {extra}"
            settings = f", {self.model_settings}" if self.model_settings else ""
            lines.append(f'  {name}: {{cmd: "{cmd}", proxy: "http://127.0.0.1:{port}"{settings}}}')
        lines.append("groups:")
        lines.append(textwrap.indent(textwrap.dedent(groups).strip("\n"), "  ") if groups else
                     f"  all: {{swap: false, exclusive: false, members: [{', '.join(models)}]}}")
        return "\n".join(lines) + "\n"

    def begin(self, models: dict, groups: str = ""):
        self.start(self.text(models, groups))
        self.write(models, groups)
        self.service.config_path = self.path
        self.events = []
        self.addCleanup(self.service.events.subscribe(lambda kind, data: self.events.append((kind, data))))

    def write(self, models: dict, groups: str = "") -> None:
        with open(self.path, "w") as f:
            f.write(f"startPort: {self.service.config.start_port}\n" + self.text(models, groups))

    def reload(self, models: dict, groups: str = ""):
        self.write(models, groups)
        self.assertTrue(self.service.reload())
        [reloaded] = [data for kind, data in self.events if kind == "configReloaded"][-1:]
        return reloaded

    def pid(self, model):
        return self.runtime.processes[model].pid

    def no_overlap(self, model, of=None):
        """Record a start of ``model`` while the process that ``of`` (by
        default ``model`` itself) runs now is still alive."""
        old = [self.pid(of or model)]
        overlaps = []

        def on_event(kind, data):
            if kind == "modelStatus" and data["id"] == model and data["state"] == "starting":
                overlaps.extend(pid for pid in old if pid_alive(pid))

        self.addCleanup(self.service.events.subscribe(on_event))
        return overlaps

    @defer.inlineCallbacks
    def answer(self, model, **extra):
        response, body = yield self.chat(model, **extra)
        self.assertEqual(response.code, 200, body)
        return json.loads(body)["responseMessage"]

    @defer.inlineCallbacks
    def slow_request(self, model):
        """A request that ``model``'s responder answers after 1 s, once it is
        in flight there: ``(its Deferred,)`` (in a tuple: yielding this must
        not wait for the answer)."""
        slow = self.post("/v1/chat/completions?wait=1s", {"model": model})
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight(model) == 1)
        return (slow,)

    @defer.inlineCallbacks
    def test_unchanged_kept_changed_restarted(self):
        self.begin({"A": "A", "B": "B"})
        self.assertEqual((yield self.answer("A")), "A")
        self.assertEqual((yield self.answer("B")), "B")
        pid_a, pid_b = self.pid("A"), self.pid("B")
        overlaps = self.no_overlap("B")
        reloaded = self.reload({"A": "A", "B": "B2", "C": "C"})
        self.assertEqual((reloaded["added"], reloaded["changed"], reloaded["restarted"]), (["C"], ["B"], ["B"]))
        self.assertEqual(self.pid("A"), pid_a)
        self.assertEqual((yield self.answer("A")), "A")
        # B was loaded: it is loaded again with its new definition, once the old process is gone
        yield self.wait_for(lambda: self.pid("B") not in (None, pid_b) and str(self.runtime.processes["B"].state) == "ready")
        self.assertFalse(pid_alive(pid_b))
        self.assertEqual(overlaps, [])
        self.assertEqual((yield self.answer("B")), "B2")
        self.assertEqual((yield self.answer("C")), "C")
        self.assertEqual(self.pid("A"), pid_a)

    @defer.inlineCallbacks
    def test_changed_model_finishes_in_flight_and_queued_wait_for_it(self):
        self.begin({"A": "A"})
        yield self.answer("A")
        old = self.pid("A")
        overlaps = self.no_overlap("A")
        (slow,) = yield self.slow_request("A")
        self.reload({"A": "A2"})
        queued = self.answer("A")  # waits for the new definition
        response, body = yield slow
        self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "A"))
        self.assertEqual((yield queued), "A2")
        self.assertNotEqual(self.pid("A"), old)
        self.assertFalse(pid_alive(old))
        self.assertEqual(overlaps, [])

    @defer.inlineCallbacks
    def test_removed_model_drains_and_its_waiters_get_a_clear_error(self):
        self.begin({"A": "A", "R": "R", "S": "S --start-delay 30"})
        yield self.answer("R")
        pid_r = self.pid("R")
        in_flight = self.post("/v1/chat/completions?wait=1s", {"model": "R"})
        waiting = self.post("/v1/chat/completions", {"model": "S"})  # S takes 30 s to come up
        yield self.wait_for(lambda: self.runtime.router.scheduler.in_flight("R") == 1
                            and str(self.runtime.processes["S"].state) == "starting")
        pid_s = self.pid("S")
        reloaded = self.reload({"A": "A"})
        self.assertEqual(reloaded["removed"], ["R", "S"])
        response, body = yield waiting
        self.assertEqual((response.code, json.loads(body)["error"]["message"]), (404, REMOVED.format("S")))
        response, body = yield in_flight  # a request in flight finishes
        self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "R"))
        yield self.wait_for(lambda: not pid_alive(pid_r) and not pid_alive(pid_s))
        self.assertEqual(self.runtime.router.retiring("R"), [])
        response, body = yield self.chat("R")
        self.assertEqual((response.code, json.loads(body)["error"]["message"]), (404, "no router for requested model"))
        self.assertEqual((yield self.answer("A")), "A")

    @defer.inlineCallbacks
    def test_invalid_config_keeps_the_old_one_and_logs_every_error(self):
        self.begin({"A": "A"})
        yield self.answer("A")
        pid = self.pid("A")
        logged = self.log_events()
        proxy_b = f'proxy: "http://127.0.0.1:{self.ports["B"]}"'
        with open(self.path, "w") as f:  # two errors, both in B
            f.write(self.text({"A": "A2", "B": "B"}).replace(proxy_b, proxy_b + ", concurrencyLimit: -3, ttl: -5"))
        self.assertFalse(self.service.reload())
        errors = "".join(e.get("error", "") for e in logged if "config reload failed" in e.get("log_format", ""))
        self.assertIn("models.B.concurrencyLimit", errors)
        self.assertIn("models.B.ttl", errors)
        self.assertEqual(sorted(self.service.config.models), ["A"])
        self.assertEqual((yield self.answer("A")), "A")
        self.assertEqual(self.pid("A"), pid)

    @defer.inlineCallbacks
    def test_streams_to_an_unchanged_model_see_no_error_across_five_reloads(self):
        self.begin({"U": "U", "B": "B"})
        yield self.answer("U")
        pid_u = self.pid("U")
        results, stop = [], []

        @defer.inlineCallbacks
        def client():
            while not stop:
                response, body = yield self.post("/v1/chat/completions", {"model": "U", "stream": True})
                results.append((response.code, body.rstrip().endswith(b"data: [DONE]")))

        clients = [client() for _ in range(4)]

        def progressed(n=8):
            target = len(results) + n
            return self.wait_for(lambda: len(results) >= target)

        yield progressed()
        steps = [({"U": "U", "B": "B", "C": "C"}, "C"),             # added
                 ({"U": "U", "B": "B2", "C": "C"}, "B"),            # changed (B is in use)
                 ({"U": "U", "B": "B2", "D": "D"}, "D"),            # C removed, D added
                 ({"U": "U", "B": "B3", "D": "D2"}, "D"),           # both changed
                 ({"U": "U", "D": "D2"}, "D")]                      # B removed
        slow = self.post("/v1/chat/completions?wait=0.5s", {"model": "B"})
        for models, use in steps:
            self.reload(models)
            self.assertEqual(self.pid("U"), pid_u)
            self.assertEqual((yield self.answer(use)), models[use])
            yield progressed()
        stop.append(True)
        yield defer.gatherResults(clients)
        response, _ = yield slow
        self.assertEqual(response.code, 200)
        self.assertGreater(len(results), 40)
        self.assertEqual({r for r in results}, {(200, True)})
        self.assertEqual(self.pid("U"), pid_u)

    @defer.inlineCallbacks
    def test_group_change_stops_only_what_may_not_stay(self):
        together = "g: {swap: false, exclusive: false, members: [A, B, C]}"
        self.begin({"A": "A", "B": "B", "C": "C"}, together)
        for model in "ABC":
            yield self.answer(model)
        pids = {m: self.pid(m) for m in "ABC"}
        reloaded = self.reload({"A": "A", "B": "B", "C": "C"}, """
            g1: {swap: true, exclusive: false, members: [A, B]}
            g2: {swap: false, exclusive: false, members: [C]}
        """)
        self.assertEqual((reloaded["evicted"], reloaded["changed"], reloaded["restarted"]), (["A"], [], []))
        yield self.wait_for(lambda: not pid_alive(pids["A"]))
        self.assertEqual((yield self.running()), {"B": "ready", "C": "ready"})
        self.assertEqual({m: self.pid(m) for m in "BC"}, {m: pids[m] for m in "BC"})
        self.assertEqual((yield self.answer("A")), "A")  # the new rules: A replaces B
        self.assertEqual((yield self.running()), {"A": "ready", "C": "ready"})

    @defer.inlineCallbacks
    def test_sighups_coalesce(self):
        self.begin({"A": "A"})
        [sighup] = [s for s in self.service if isinstance(s, SighupReload)]
        reloads = []

        def reloaded(kind, data):
            reloads.append(data)
            if len(reloads) == 1:  # three more signals while this one is being applied
                for _ in range(3):
                    sighup._handler(signal.SIGHUP, None)
                    self.service.request_reload()

        self.addCleanup(self.service.events.subscribe(reloaded, kinds=("configReloaded",)))
        for _ in range(10):  # a burst, before the reactor gets to any of them
            sighup._handler(signal.SIGHUP, None)
        yield self.wait_for(lambda: len(reloads) == 2)
        for _ in range(3):  # let anything still queued run
            yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(len(reloads), 2)
        self.assertFalse(self.service._reload_again)

    @defer.inlineCallbacks
    def test_watched_edit_of_one_cmd_restarts_that_model_only(self):
        self.begin({"A": "A", "B": "B"})
        watcher = ConfigWatcher(self.service, interval=0.1)
        watcher.setServiceParent(self.service)
        yield self.answer("A")
        yield self.answer("B")
        pid_a, pid_b = self.pid("A"), self.pid("B")
        results, stop = [], []

        @defer.inlineCallbacks
        def client():
            while not stop:
                response, body = yield self.chat("A")
                results.append(response.code)

        loop = client()
        yield self.wait_for(lambda: len(results) >= 3)
        self.write({"A": "A", "B": "B-edited"})
        yield self.wait_for(lambda: self.pid("B") not in (None, pid_b)
                            and str(self.runtime.processes["B"].state) == "ready")
        self.assertEqual((yield self.answer("B")), "B-edited")
        stop.append(True)
        yield loop
        self.assertEqual(self.pid("A"), pid_a)
        self.assertFalse(pid_alive(pid_b))
        self.assertEqual(set(results), {200})

    @defer.inlineCallbacks
    def test_config_reloaded_reaches_the_event_stream(self):
        """``/api/events`` carries ``configReloaded`` (as the README says), then the new model list."""
        self.begin({"A": "A", "B": "B"})
        response = yield Agent(reactor, pool=self.pool).request(b"GET", (self.base + "/api/events").encode())
        stream = _Body()
        response.deliverBody(stream)
        yield stream.first
        self.reload({"A": "A", "C": "C"})

        def frames(kind: bytes) -> list:
            return [json.loads(json.loads(line[5:])["data"]) for line in stream.data.splitlines()
                    if line.startswith(b"data:") and b'"type":"' + kind + b'"' in line]

        yield self.wait_for(lambda: frames(b"configReloaded"))
        self.assertEqual(frames(b"configReloaded"), [
            {"added": ["C"], "removed": ["B"], "changed": [], "restarted": [], "evicted": []}])
        yield self.wait_for(lambda: any({m["id"] for m in f} == {"A", "C"} for f in frames(b"modelStatus")))
        stream.transport.stopProducing()
