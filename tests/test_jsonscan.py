"""Big bodies read in slices: the structural JSON scan, the step runner and the filters on scanned bodies."""

from __future__ import annotations

import json
import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaswap import jsonscan
from llamaswap.config import Filters
from llamaswap.jsonscan import ObjectScan, scan_object
from llamaswap.proxy import filters
from llamaswap.proxy.filters import (
    apply_json_filters, filter_scanned, requested_model, requested_model_steps, rewrite_multipart_model,
)
from llamaswap.steps import drive, run_in_slices


def drive_counting(steps):
    """Run ``steps`` to the end: ``(its result, how many times it yielded)``."""
    yields = 0
    try:
        while True:
            next(steps)
            yields += 1
    except StopIteration as done:
        return done.value, yields


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 17, 3.25, -1e-7, 12345678901234])
    if kind in (2, 3, 4):
        alphabet = 'ab"\\/{}[],:\n\t é€😀 \u2028'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
    if kind in (5, 6):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_value(rng, 5) if rng.random() < 0.9 else "k": random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def scan(body: bytes):
    return drive(scan_object(body))


class ScanTests(SynchronousTestCase):
    def test_matches_json_loads(self):
        rng = random.Random(7)
        for i in range(400):
            doc = {f"k{j}" if rng.random() < 0.7 else str(random_value(rng, 5)): random_value(rng)
                   for j in range(rng.randrange(6))}
            text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
            body = text.encode()
            doc = json.loads(body)
            result = scan(body)
            self.assertIsInstance(result, ObjectScan, text)
            self.assertEqual({key: result.get(key) for key, *_ in result.members}, doc)
            self.assertEqual(json.loads(result.rebuild({})), doc)

    def test_mismatched_brackets_refused(self):
        for body in (b'{"a":[},"model":"x"}', b'{"a":{],"model":"x"}', b'{"a":[[]}]],"model":"x"}'):
            self.assertIsNone(scan(body), body)
        self.assertEqual(scan(b'{"a":[{"b":"]}"}],"model":"y"}').get("model"), "y")

    def test_what_json_loads_accepts(self):
        for body in (b'\xef\xbb\xbf{"model":"x"}', b'{"t":NaN,"u":-Infinity,"v":Infinity,"model":"x"}'):
            self.assertEqual(scan(body).get("model"), json.loads(body)["model"])

    def test_duplicates_last_wins_like_json_loads(self):
        body = b'{"model": "a", "x": [1, {"model": "inner"}], "model": "b"}'
        result = scan(body)
        self.assertEqual(result.get("model"), json.loads(body)["model"])
        self.assertEqual([m[0] for m in result.members], ["model", "x", "model"])
        self.assertEqual(json.loads(result.rebuild({"model": b'"c"'})), {"model": "c", "x": [1, {"model": "inner"}]})

    def test_not_an_object_or_malformed(self):
        for body in [b"", b"   ", b"[1, 2]", b'"s"', b"{", b'{"a"}', b'{"a": }', b'{"a": 1,}', b'{"a": 1 "b": 2}',
                     b'{"a": "unterminated}', b'{"a": [1, 2}', b'{"a": [1, 2]]}', b'{"a": 1} trailing',
                     b'{"a": tru}', b'{a: 1}', b'{"a": "\\"}']:
            self.assertIsNone(scan(body), body)
        self.assertEqual(scan(b" {} ").members, [])
        self.assertEqual(scan(b'{"a\\u00e9\\"": 1}').get('a\u00e9"'), 1)

    def test_big_values_are_skipped_in_steps(self):
        big = b"x" * (3 * jsonscan.STEP_BYTES)
        nested = json.dumps({"messages": [{"role": "user", "content": "hi " * 50}] * 3000}).encode()
        body = b'{"input": "' + big + b'", "numbers": [' + b"1.5," * 300000 + b'2], ' + nested[1:-1] + b', "model": "m"}'
        result, yields = drive_counting(scan_object(body))
        self.assertEqual(result.get("model"), "m")
        self.assertEqual([m[0] for m in result.members], ["input", "numbers", "messages", "model"])
        self.assertGreater(yields, len(body) // jsonscan.STEP_BYTES - 2)

    def test_escaped_quotes_in_long_strings(self):
        value = 'say \\"hi\\" ' * 5000 + "\\\\"
        body = ('{"a": "%s", "model": "m"}' % value).encode()
        self.assertEqual(scan(body).get("model"), "m")
        self.assertEqual(scan(body).get("a"), json.loads(body)["a"])


class StepClock(Clock):
    """A Clock whose ``turn`` runs only the calls already due (one reactor turn)."""

    def turn(self) -> None:
        due = [c for c in self.calls if c.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


class StepsTests(SynchronousTestCase):
    def counter(self, n: int, log: list):
        for i in range(n):
            log.append(i)
            yield
        return "done"

    def test_small_work_finishes_at_once(self):
        d = run_in_slices(self.counter(3, []), Clock())
        self.assertEqual(self.successResultOf(d), "done")

    def test_slices_leave_the_reactor_between(self):
        turns = StepClock()
        log: list = []
        d = run_in_slices(self.counter(5, log), turns, budget=0)  # one piece per slice
        self.assertNoResult(d)
        self.assertEqual(log, [0])
        for i in range(4):
            turns.turn()  # one reactor turn: one more slice
            self.assertEqual(log, list(range(i + 2)))
            self.assertNoResult(d)
        turns.turn()
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(turns.calls, [])

    def test_cancel_stops_the_work(self):
        clock = Clock()
        log: list = []
        d = run_in_slices(self.counter(100, log), clock, budget=0)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(log, [0])

    def test_errors_propagate(self):
        def fails():
            yield
            raise ValueError("boom")
        clock = Clock()
        d = run_in_slices(fails(), clock, budget=0)
        clock.advance(0)
        self.failureResultOf(d, ValueError)


class LargeBodyFilterTests(SynchronousTestCase):
    def setUp(self):
        self.patch(filters, "LARGE_BODY", 16)  # every body below counts as big

    def test_model_found_without_parsing(self):
        body = json.dumps({"messages": [{"content": "x" * 100}], "stream": True, "model": "m1"}).encode()
        model, parsed = drive(requested_model_steps(b"POST", "application/json", body, b""))
        self.assertEqual(model, "m1")
        self.assertIsInstance(parsed, ObjectScan)
        self.assertIs(parsed.get("stream"), True)
        self.assertEqual(drive(requested_model_steps(b"POST", "application/json", b'{"x": 1, "pad": "........"}',
                                                     b"model=q"))[0], "q")
        self.assertEqual(drive(requested_model_steps(b"POST", "application/json", b'{"model": 5, "pad": "......"}',
                                                     b""))[0], None)
        self.assertEqual(drive(requested_model_steps(b"POST", "application/json", b"not json at all, no", b""))[0],
                         None)

    def test_multipart_found_in_windows(self):
        self.patch(filters, "_FIND_WINDOW", 7)
        ctype = "multipart/form-data; boundary=XyZ"
        body = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + b"\0" * 500
                + b'\r\n--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--XyZ--\r\n')
        steps = requested_model_steps(b"POST", ctype, body, b"")
        self.assertEqual(drive(steps)[0], "whisper")
        self.assertEqual(requested_model(b"POST", ctype, body, b"")[0], "whisper")
        rewritten = rewrite_multipart_model(body, ctype, "up")
        self.assertEqual(requested_model(b"POST", ctype, rewritten, b"")[0], "up")
        self.assertEqual(len(rewritten), len(body) - len("whisper") + 2)

    def test_filters_match_a_full_parse(self):
        rng = random.Random(3)
        cases = [
            Filters(strip_params=("temperature", "a.b", "model"), set_params={"top_k": 5, "a.c": {"d": 1}, "model": "no"},
                    set_params_by_id={"A:hi": {"x": 1, "nested.deep.er": True}}),
            Filters(strip_params=("messages",), set_params={}, set_params_by_id={}),
            Filters(strip_params=(), set_params={"stream": False, "list.x": 1}, set_params_by_id={}),
        ]
        for case in cases:
            for use_model_name in ("", "up"):
                for requested in ("A", "A:hi"):
                    for _ in range(20):
                        doc = {"messages": [random_value(rng) for _ in range(3)], "model": requested}
                        for key in rng.sample(["temperature", "a", "top_k", "stream", "list", "x", "nested"], 3):
                            doc[key] = rng.choice([{"b": 1, "c": 2}, [1, 2], "s", 0.5, None, {"deep": {}}])
                        body = json.dumps(doc).encode()
                        expected = apply_json_filters(json.loads(body), requested, case, use_model_name)
                        got = filter_scanned(scan(body), requested, case, use_model_name)
                        self.assertEqual(json.loads(got), expected)
                        self.assertEqual(list(json.loads(got)), [k for k in expected if k in json.loads(got)])
