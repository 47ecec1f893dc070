"""The ``timeouts`` block of models and peers: defaults, bodyIdle, refused values."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import defaults as D
from llamaswap.config.types import Timeouts

from .test_config import ErrorsMixin, load


class TimeoutsConfigTests(ErrorsMixin, SynchronousTestCase):
    def test_defaults(self):
        c = load("""
            models:
              m: {cmd: "srv ${PORT}"}
            peers:
              p: {proxy: "http://127.0.0.1:9", models: [x]}
        """)
        t = c.models["m"].timeouts
        self.assertEqual(t, Timeouts())
        self.assertEqual((t.connect, t.keepalive, t.response_header, t.tls_handshake, t.expect_continue,
                          t.idle_conn, t.body_idle), (30, 30, 0, 10, 1, 90, 0))
        self.assertEqual(D.MODEL_TIMEOUTS["bodyIdle"], 0)  # off: prompt processing can take minutes
        self.assertEqual((c.peers["p"].timeouts.response_header, c.peers["p"].timeouts.body_idle), (60, 0))

    def test_body_idle_numbers(self):
        c = load("""
            models:
              a: {cmd: "srv ${PORT}", timeouts: {bodyIdle: 2.5}}
              b: {cmd: "srv ${PORT}", timeouts: {bodyIdle: 30}}
              c: {cmd: "srv ${PORT}", timeouts: {bodyIdle: 0}}
            peers:
              p: {proxy: "http://127.0.0.1:9", models: [x], timeouts: {bodyIdle: 4}}
        """)
        self.assertEqual([c.models[m].timeouts.body_idle for m in "abc"], [2.5, 30.0, 0.0])
        self.assertEqual(c.peers["p"].timeouts.body_idle, 4.0)
        self.assertEqual(c.warnings, ())

    def test_body_idle_refused_values_are_located(self):
        errors = self.errors("""
            models:
              a: {cmd: "srv ${PORT}", timeouts: {bodyIdle: -1}}
              b:
                cmd: "srv ${PORT}"
                timeouts:
                  bodyIdle: soon
              c: {cmd: "srv ${PORT}", timeouts: {bodyIdle: true}}
        """)
        self.assertEqual(errors, [
            "models.a.timeouts.bodyIdle (line 3): must be >= 0",
            "models.b.timeouts.bodyIdle (line 7): must be a number, not a string",
            "models.c.timeouts.bodyIdle (line 8): must be a number, not a boolean",
        ])

    def test_other_keys_refuse_negative_and_non_integers(self):
        errors = self.errors("""
            models:
              m:
                cmd: "srv ${PORT}"
                timeouts: {connect: -1, keepalive: x, responseHeader: 1.5, tlsHandshake: -2,
                           expectContinue: -1, idleConn: -3}
        """)
        self.assertEqual(errors, [
            "models.m.timeouts.connect (line 5): must be >= 0",
            "models.m.timeouts.keepalive (line 5): must be an integer, not a string",
            "models.m.timeouts.responseHeader (line 5): must be an integer, not a number",
            "models.m.timeouts.tlsHandshake (line 5): must be >= 0",
            "models.m.timeouts.expectContinue (line 6): must be >= 0",
            "models.m.timeouts.idleConn (line 6): must be >= 0",
        ])

    def test_unknown_key_is_warned_with_its_location(self):
        c = load("""
            models:
              m: {cmd: "srv ${PORT}", timeouts: {readTimeout: 5}}
        """)
        self.assertEqual(c.warnings, ("models.m.timeouts.readTimeout (line 3): unknown key ignored",))
