"""Reloads racing requests (issue 11 review): regression tests.

The real service on a loopback port; local models are the fake upstream as
real children (or ``sleep`` children proxied to in-process responders),
peers are in-process servers on other loopback ports.  Every wait is
bounded; no test sleeps.
"""

from __future__ import annotations

import json

from twisted.internet import defer

from llamaswap.service import ConfigWatcher

from .test_e2e import pid_alive
from .test_peers import PeerHarness
from .test_faults_upstream import SLEEPER
from . import test_reload_live


class ReloadRaceTests(PeerHarness):
    timeout = 40

    @defer.inlineCallbacks
    def fail_first_after_a_reload(self, held, port_h):
        """Ask the failover selector ``f``; while its first target (peer
        ``first`` at ``port_h``, where ``held`` holds the request) has it, a
        reload leaves ``f`` that target alone; then the first target fails
        before any byte went out (a 500): ``(status, reply)`` of the request."""
        asked = self.ask("f")
        yield self.wait_for(lambda: held.held)
        self.config_file(f"""
            peers:
              first: {{proxy: "http://127.0.0.1:{port_h}", models: [m1]}}
            selectors:
              f: {{strategy: failover, targets: [first/m1]}}
        """)
        self.assertTrue(self.service.reload())
        held.answer(500)
        result = yield asked
        return result

    @defer.inlineCallbacks
    def test_failover_target_removed_by_a_reload_while_the_first_is_tried(self):
        """A failover selector's next target is a local model that a reload
        removed while the first target was being tried: the request gets a
        clear answer (the removal), not a crash."""
        held, port_h = self.broken("hang")
        _, port_b = self.responder_site("B-up")
        self.start(f"""
            models:
              B: {{cmd: "{SLEEPER}", proxy: "http://127.0.0.1:{port_b}", checkEndpoint: none}}
            peers:
              first: {{proxy: "http://127.0.0.1:{port_h}", models: [m1]}}
            selectors:
              f: {{strategy: failover, targets: [first/m1, B]}}
        """)
        code, reply = yield self.fail_first_after_a_reload(held, port_h)  # the next target is B, now gone
        self.assertEqual(code, 404, reply)
        self.assertEqual(reply["error"]["message"], "model 'B' was removed from the config")
        yield self.wait_for(lambda: self.runtime.peers.in_flight == 0)

    @defer.inlineCallbacks
    def test_failover_target_on_a_peer_removed_by_a_reload(self):
        """The same with the next target on a peer that the reload removed."""
        held, port_h = self.broken("hang")
        _, port_g = self.responder_site("gone-up")
        self.start(f"""
            peers:
              first: {{proxy: "http://127.0.0.1:{port_h}", models: [m1]}}
              gone: {{proxy: "http://127.0.0.1:{port_g}", models: [m1]}}
            selectors:
              f: {{strategy: failover, targets: [first/m1, gone/m1]}}
        """)
        code, reply = yield self.fail_first_after_a_reload(held, port_h)
        self.assertEqual(code, 404, reply)
        self.assertEqual(reply["error"]["message"], "model 'gone/m1' was removed from the config")

    @defer.inlineCallbacks
    def test_health_checks_of_replaced_peers_stop(self):
        """Peers with health checks, one check hanging, replaced by a reload,
        then the service stops: no check goes on (trial fails a test that
        leaves timers or connections behind)."""
        held, port_h = self.broken("hang")
        _, port_ok = self.responder_site("ok-up")
        self.start(f"""
            peers:
              slow: {{proxy: "http://127.0.0.1:{port_h}", models: [m1], healthCheck: {{interval: 0.2}}}}
              good: {{proxy: "http://127.0.0.1:{port_ok}", models: [m1], healthCheck: {{interval: 0.2}}}}
        """)
        yield self.wait_for(lambda: held.held)
        before = self.runtime.peers
        self.config_file(f"""
            peers:
              good: {{proxy: "http://127.0.0.1:{port_ok}", models: [m1, m2], healthCheck: {{interval: 0.2}}}}
        """)
        self.assertTrue(self.service.reload())
        self.assertIsNot(self.runtime.peers, before)
        self.assertEqual([loop for loop in before._checks.values() if loop.running], [])
        code, reply = yield self.ask("good/m2")
        self.assertEqual(code, 200, reply)
        yield self.service.stopService()
        self.assertEqual([loop for loop in self.runtime.peers._checks.values() if loop.running], [])


class RedefinitionTests(PeerHarness):
    """The real service with the fake upstream as real children, each model
    on a fixed port of its own (``LiveReloadTests``' helpers)."""

    timeout = 60
    _live = test_reload_live.LiveReloadTests  # (not a module global: trial would run it here too)
    setUp, text, begin, write, model_settings = _live.setUp, _live.text, _live.begin, _live.write, _live.model_settings
    reload, pid, no_overlap, answer, slow_request = (_live.reload, _live.pid, _live.no_overlap, _live.answer,
                                                     _live.slow_request)

    @defer.inlineCallbacks
    def test_a_swap_waits_for_the_old_process_of_a_restarted_model_it_evicts(self):
        """A and B swap (one at a time).  A reload changes A's cmd while a
        request is in flight on A's old process; a request for B waits for
        it, and B starts only once that old process is gone, as a swap away
        from A always waits for A's process to be gone.  (A's concurrency
        limit of 1 keeps the reload from loading A again at once: that load
        would otherwise stand between the two.)"""
        groups = "g: {swap: true, exclusive: true, members: [A, B]}"
        self.model_settings = "concurrencyLimit: 1"
        self.begin({"A": "A", "B": "B"}, groups)
        self.assertEqual((yield self.answer("A")), "A")
        old_a = self.pid("A")
        overlaps = self.no_overlap("B", of="A")
        (slow,) = yield self.slow_request("A")
        self.reload({"A": "A2", "B": "B"}, groups)
        self.assertEqual(self.runtime.router.retiring("A")[0].pid, old_a)
        self.assertEqual((yield self.answer("B")), "B")  # waits for the request in flight on A's old process
        response, body = yield slow
        self.assertEqual(response.code, 200)
        self.assertEqual(overlaps, [])  # B did not start while A's old process was still there

    @defer.inlineCallbacks
    def test_a_model_redefined_twice_while_its_old_process_drains(self):
        self.begin({"A": "A", "B": "B"})
        yield self.answer("A")
        old = self.pid("A")
        overlaps = self.no_overlap("A")
        (slow,) = yield self.slow_request("A")
        self.reload({"A": "A2", "B": "B"})
        queued = self.answer("A")
        self.reload({"A": "A3", "B": "B"})
        response, body = yield slow
        self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "A"))
        self.assertEqual((yield queued), "A3")
        self.assertFalse(pid_alive(old))
        self.assertEqual(overlaps, [])
        yield self.wait_for(lambda: not self.runtime.router.retiring("A"))

    @defer.inlineCallbacks
    def test_a_removed_model_added_again_while_its_old_process_drains(self):
        self.begin({"A": "A", "B": "B"})
        yield self.answer("A")
        old = self.pid("A")
        overlaps = self.no_overlap("A")
        (slow,) = yield self.slow_request("A")
        self.reload({"B": "B"})
        self.reload({"A": "A", "B": "B"})  # the same definition as before: a new process all the same
        queued = self.answer("A")
        response, body = yield slow
        self.assertEqual((response.code, json.loads(body)["responseMessage"]), (200, "A"))
        self.assertEqual((yield queued), "A")
        self.assertNotEqual(self.pid("A"), old)
        self.assertFalse(pid_alive(old))
        self.assertEqual(overlaps, [])
        self.assertEqual(self.runtime.router.scheduler.in_flight("A"), 0)
        self.assertEqual(self.runtime.router.scheduler.admitted("A"), 0)

    @defer.inlineCallbacks
    def test_a_config_yaml_cannot_read_is_logged_and_watching_goes_on(self):
        """A watched config that YAML refuses to read at all (a NUL byte) is
        an invalid config like any other: logged, the old one keeps serving,
        and the next edit is still seen."""
        self.begin({"A": "A"})
        logged = self.log_events()
        watcher = ConfigWatcher(self.service, interval=0.05)
        watcher.setServiceParent(self.service)
        with open(self.path, "a") as f:
            f.write("\x00\n")
        yield self.wait_for(lambda: [e for e in logged if "config reload failed" in e.get("log_format", "")])
        self.assertEqual(sorted(self.service.config.models), ["A"])
        self.write({"A": "A", "B": "B"})
        yield self.wait_for(lambda: "B" in self.service.config.models)
        self.assertEqual((yield self.answer("B")), "B")

    @defer.inlineCallbacks
    def test_shutdown_drains_the_requests_of_a_removed_model(self):
        """Stopping the service waits for requests in flight before it stops
        the models: those on the old process of a model a reload removed too."""
        self.begin({"A": "A", "R": "R"})
        yield self.answer("R")
        (slow,) = yield self.slow_request("R")
        self.reload({"A": "A"})
        yield self.service.stopService()
        response, body = yield slow
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["responseMessage"], "R")
