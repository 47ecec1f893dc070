"""Resource budgets end to end: the real service on a loopback port, fake
upstreams (the responder) declaring footprints, a fake GPU where measured
footprints matter."""

from __future__ import annotations

import json
import random

from twisted.internet import defer, reactor, task

from llamaswap.testing.gpu import FakeGpu

from .test_e2e import Harness, pid_alive, responder

GiB = 1024 ** 3


def models(sizes: dict, extra: str = "") -> str:
    """``models:`` with one responder per entry, each declaring its vram."""
    lines = ["models:"]
    for name, size in sizes.items():
        lines.append(f"  {name}: {{cmd: \"{responder('--respond ' + name)}\", "
                     f"resources: {{vram: {size}}}{extra}}}")
    return "\n".join(lines) + "\n"


def one_group(*members: str) -> str:
    return f"groups:\n  g: {{swap: false, members: [{', '.join(members)}]}}\n"


ABC = ("healthCheckTimeout: 15\nresources:\n  capacity: {vram: 24}\n"
       + one_group("A", "B", "C") + models({"A": 10, "B": 10, "C": 10}))


class BudgetE2ETests(Harness):
    timeout = 60

    def used(self, sizes: dict) -> int:
        return sum(sizes[m] for m, p in self.runtime.processes.items()
                   if str(p.state) in ("starting", "ready", "stopping"))

    @defer.inlineCallbacks
    def test_a_b_a_c_evicts_the_least_recently_used(self):
        self.start(ABC)
        events = []
        self.service.events.subscribe(lambda kind, data: events.append((kind, data)), kinds=("evict",))
        for model in "ABA":
            response, body = yield self.chat(model)
            self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, model))
        pid_a = self.runtime.processes["A"].pid
        response, body = yield self.chat("C")
        self.assertEqual(json.loads(body)["responseMessage"], "C")
        self.assertEqual((yield self.running()), {"A": "ready", "C": "ready"})
        self.assertEqual(self.runtime.processes["A"].pid, pid_a)
        self.assertEqual([d["model"] for _, d in events], ["B"])
        self.assertIn("least recently used idle model", events[0][1]["reason"])
        _, body = yield self.get("/running")
        running = {r["model"]: r for r in json.loads(body)["running"]}
        self.assertEqual(running["C"]["footprint"], {"declared": {"vram": 10}, "planned": {"vram": 10}})
        _, body = yield self.get("/v1/models")
        meta = {r["id"]: r["meta"]["llamaswap"] for r in json.loads(body)["data"]}
        self.assertEqual(meta["B"]["footprint"]["declared"], {"vram": 10})
        self.assertEqual(self.service.api.model_status()[0]["footprint"]["declared"], {"vram": 10})
        _, body = yield self.get("/metrics")
        self.assertIn(b'llamaswap_resource_capacity{resource="vram"} 24.0', body)
        self.assertIn(b'llamaswap_resource_used{kind="declared",resource="vram"} 20.0', body)
        self.assertIn(b'llamaswap_model_footprint{kind="declared",model="A",resource="vram"} 10.0', body)

    @defer.inlineCallbacks
    def test_random_200_requests_never_over_budget(self):
        sizes = {"A": 6, "B": 8, "C": 10, "D": 12, "E": 14}
        self.start("healthCheckTimeout: 15\nresources:\n  capacity: {vram: 24}\n"
                   + one_group(*sizes) + models(sizes))
        worst = [0]
        over = []

        def sample(kind, data):  # every state change: starting and stopping count
            used = self.used(sizes)
            worst[0] = max(worst[0], used)
            if used > 24:
                over.append((used, {m: str(p.state) for m, p in self.runtime.processes.items()}))

        self.service.events.subscribe(sample, kinds=("modelStatus",))
        polled = []
        done = []

        @defer.inlineCallbacks
        def poll():  # what a user sees: /running never over budget
            while not done:
                state = yield self.running()
                polled.append(sum(sizes[m] for m in state))
                yield task.deferLater(reactor, 0.05, lambda: None)

        rng = random.Random(1402)
        work = [rng.choice("ABCDE") for _ in range(200)]
        codes = []

        @defer.inlineCallbacks
        def client():
            while work:
                model = work.pop()
                response, _ = yield self.post(f"/v1/chat/completions?wait={rng.choice(['0', '10ms', '30ms'])}",
                                              {"model": model})
                codes.append(response.code)

        poller = poll()
        started = reactor.seconds()
        yield defer.gatherResults([client() for _ in range(8)])
        done.append(True)
        yield poller
        print(f"\n200 random requests over 5 models under capacity 24: {len(self.starts)} loads, "
              f"{reactor.seconds() - started:.1f}s, peak use {worst[0]}, /running sampled {len(polled)} times")
        self.assertEqual(codes, [200] * 200)
        self.assertEqual(over, [])
        self.assertLessEqual(max(polled), 24)
        self.assertGreater(len(self.starts), 5)

    @defer.inlineCallbacks
    def test_measured_footprint_changes_the_next_plan(self):
        self.start("healthCheckTimeout: 15\nresources:\n  capacity: {vram: 24GiB}\n"
                   + one_group("A", "B", "C") + models({"A": "8GiB", "B": "8GiB", "C": "8GiB"}))
        processes = self.runtime.processes
        gpu = FakeGpu(lambda pgid: {0: 12 * GiB} if pgid == processes["A"].pid else {0: 7 * GiB}, linger=2)
        self.runtime.footprints.sampler = gpu
        yield self.chat("A")
        yield self.wait_for(lambda: "A" in self.runtime.footprints.measured)
        yield self.chat("B")
        _, body = yield self.get("/running")
        a = {r["model"]: r for r in json.loads(body)["running"]}["A"]["footprint"]
        self.assertEqual(a["declared"], {"vram": 8 * GiB})
        self.assertEqual(a["measured"], {"vram": 12 * GiB, "gpu0": 12 * GiB})
        self.assertEqual(a["planned"], {"vram": 12 * GiB})
        # declared, A + B + C = 24 GiB would fit; measured, A is 12: C evicts A (least recently used)
        pid_a = processes["A"].pid
        response, body = yield self.chat("C")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield self.running()), {"B": "ready", "C": "ready"})
        # C started only once the fake driver no longer listed A's process
        self.assertIn(frozenset([pid_a]), gpu.holding_calls)
        self.assertFalse(pid_alive(pid_a))
        status = {m["id"]: m for m in self.service.api.model_status()}
        self.assertEqual(status["A"]["footprint"]["measured"]["vram"], 12 * GiB)
        _, body = yield self.get("/metrics")
        self.assertIn(b'llamaswap_model_footprint{kind="measured",model="A",resource="vram"} 1.2884901888e+10',
                      body)

    @defer.inlineCallbacks
    def test_swap_policy_refuse_within_min_resident(self):
        self.start("healthCheckTimeout: 15\nswapPolicy: refuse\nresources:\n  capacity: {vram: 24}\n"
                   + one_group("A", "B", "C") + models({"A": 10, "B": 10, "C": 10}, ", minResident: 30"))
        yield self.chat("A")
        yield self.chat("B")
        response, body = yield self.chat("C")
        self.assertEqual(response.code, 503)
        retry = int(response.headers.getRawHeaders("retry-after")[0])
        self.assertTrue(25 <= retry <= 30, retry)
        self.assertIn("swapPolicy: refuse", json.loads(body)["error"]["message"])
        self.assertEqual((yield self.running()), {"A": "ready", "B": "ready"})
        response, _ = yield self.chat("A")  # a loaded model is served as ever
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_loading_stream_says_what_is_evicted_and_why(self):
        self.start("sendLoadingState: true\n" + ABC)
        yield self.chat("A")
        yield self.chat("B")
        response, body = yield self.chat("C", stream=True)
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("reasoning_content", "")
                       for line in body.decode().splitlines()
                       if line.startswith("data: {") and "reasoning_content" in line)
        self.assertIn("Evicting A: makes room for 'C' (vram 30 > 24): least recently used idle model", text)

    @defer.inlineCallbacks
    def test_reload_of_capacities_keeps_models_that_fit(self):
        path = self.mktemp()
        self.start(ABC)
        self.service.config_path = path

        def write(capacity: int) -> None:
            with open(path, "w") as f:
                f.write(f"startPort: {self.service.config.start_port}\n" + ABC.replace("24", str(capacity)))

        yield self.chat("A")
        yield self.chat("B")
        pids = {m: self.runtime.processes[m].pid for m in "AB"}
        runtime = self.runtime
        write(30)
        self.assertTrue(self.service.reload())
        self.assertIs(self.runtime, runtime)  # the same models, queue and processes
        self.assertEqual(self.service.config.resources.capacity["vram"], 30)
        self.assertEqual((yield self.running()), {"A": "ready", "B": "ready"})
        write(12)  # only one fits now: the least recently used idle one goes
        self.assertTrue(self.service.reload())
        yield self.wait_for(lambda: not pid_alive(pids["A"]))
        self.assertEqual((yield self.running()), {"B": "ready"})
        self.assertEqual(self.runtime.processes["B"].pid, pids["B"])
        response, body = yield self.chat("C")
        self.assertEqual(json.loads(body)["responseMessage"], "C")
        self.assertEqual((yield self.running()), {"C": "ready"})
