"""Tests for llamaswap.activity.captures.

Also home of the synthetic agentic-traffic generator used by
``bench/bench_captures.py``.
"""

from __future__ import annotations

import base64
import json
import random
from typing import Iterator, Optional

import zstandard
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.activity import captures
from llamaswap.activity.captures import (
    CAPTURE_ALL,
    CAPTURE_MASKS,
    CAPTURE_REQ_BODY,
    CAPTURE_REQ_HEADERS,
    CAPTURE_RESP_BODY,
    CAPTURE_RESP_HEADERS,
    REDACTED,
    Capture,
    CaptureStore,
    build_capture,
    canonical_header_name,
    capture_mask,
)

# --- synthetic agentic traffic ----------------------------------------------------

_WORDS = (
    "the of and to in is that for it with as on be this by are from or an at not have which function file "
    "return value error test module class import data request response model server config path string "
    "list should will we can need update check run use then if when new parse read write output input "
    "buffer process thread event handler callback token stream json call tool result line code change fix "
    "issue implement method type default option argument user message context cache memory size limit "
    "bytes index key field object array number null true false status header body client proxy upstream "
    "timeout retry queue schedule swap load unload start stop health port host listen route match group "
    "profile alias filter because so but also just only first last next each all any some more most other "
    "such into over after before while where how what why about make see look find let now here there"
).split()
_WEIGHTS = [1.0 / (i + 1) ** 0.9 for i in range(len(_WORDS))]
_TOOL_NAMES = ["read_file", "write_file", "run_command", "search_code", "list_directory", "apply_patch",
               "web_fetch"]

Turn = tuple[str, dict, bytes, dict, bytes]


def _prose(rng: random.Random, nbytes: int) -> str:
    """Zipf-distributed English-like text (zstd-3 compresses it ~2.2:1, like real prose)."""
    out: list[str] = []
    size = 0
    while size < nbytes:
        words = rng.choices(_WORDS, _WEIGHTS, k=rng.randint(6, 18))
        sentence = " ".join(words).capitalize() + rng.choice(".....?:")
        if rng.random() < 0.15:
            sentence += " `%s_%s(%d)`" % (rng.choice(_WORDS), rng.choice(_WORDS), rng.randint(0, 999))
        out.append(sentence)
        size += len(sentence) + 1
    return " ".join(out)


def _code(rng: random.Random, nbytes: int) -> str:
    """Python-looking tool output (file contents)."""
    lines: list[str] = []
    size, indent = 0, ""
    while size < nbytes:
        a, b, c = rng.choice(_WORDS), rng.choice(_WORDS), rng.choice(_WORDS)
        k = rng.random()
        if k < 0.2:
            line = "def %s_%s(self, %s: int = %d) -> %s:" % (a, b, c, rng.randint(0, 99),
                                                             rng.choice(["str", "bytes", "None", "dict"]))
            indent = "    "
        elif k < 0.5:
            line = "%s%s = self.%s.get(%r, %d)" % (indent, a, b, c, rng.randint(0, 9999))
        elif k < 0.7:
            line = "%sif %s is not None and len(%s) > %d:" % (indent, a, b, rng.randint(0, 64))
        elif k < 0.85:
            line = "%s    return %s(%s, %s=%s)" % (indent, a, b, c, rng.choice(_WORDS))
        else:
            line = "%s# %s" % (indent, _prose(rng, 40))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def _tools(rng: random.Random) -> list[dict]:
    out = []
    for name in _TOOL_NAMES:
        props = {p: {"type": rng.choice(["string", "integer", "boolean"]),
                     "description": _prose(rng, rng.randint(40, 160))}
                 for p in rng.sample(_WORDS, rng.randint(2, 5))}
        out.append({"type": "function", "function": {
            "name": name, "description": _prose(rng, rng.randint(150, 450)),
            "parameters": {"type": "object", "properties": props, "required": list(props)[:1]}}})
    return out


def _split_tokens(rng: random.Random, text: str) -> list[str]:
    toks, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        toks.append(text[i:i + n])
        i += n
    return toks


def _sse(rng: random.Random, content: str, tool_call: Optional[tuple[str, str]], model: str,
         created: list[int], cid: str) -> bytes:
    """A llama-server style chat.completion.chunk SSE stream."""
    events: list[str] = []

    def chunk(delta: dict, finish: Optional[str] = None, extra: Optional[dict] = None) -> None:
        obj = {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}], "created": created[0],
               "id": cid, "model": model, "system_fingerprint": "b6273-c6d4c0a4",
               "object": "chat.completion.chunk"}
        if extra:
            obj.update(extra)
        if rng.random() < 0.03:
            created[0] += 1
        events.append("data: " + json.dumps(obj, separators=(",", ":")) + "\n\n")

    chunk({"role": "assistant", "content": None})
    n = 0
    for tok in _split_tokens(rng, content):
        chunk({"content": tok})
        n += 1
    if tool_call:
        name, args = tool_call
        chunk({"tool_calls": [{"index": 0, "id": "call_%08x" % rng.getrandbits(32), "type": "function",
                               "function": {"name": name, "arguments": ""}}]})
        for tok in _split_tokens(rng, args):
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": tok}}]})
            n += 1
    chunk({}, "tool_calls" if tool_call else "stop", {
        "usage": {"completion_tokens": n, "prompt_tokens": rng.randint(1000, 90000), "total_tokens": n + 5000},
        "timings": {"cache_n": rng.randint(0, 80000), "prompt_n": rng.randint(10, 3000),
                    "prompt_ms": rng.random() * 900, "prompt_per_token_ms": rng.random(),
                    "prompt_per_second": rng.random() * 3000, "predicted_n": n,
                    "predicted_ms": rng.random() * 9000, "predicted_per_token_ms": rng.random() * 30,
                    "predicted_per_second": rng.random() * 80}})
    events.append("data: [DONE]\n\n")
    return "".join(events).encode()


def agentic_conversation(seed: int, turns: int, model: str = "qwen3-coder-30b") -> Iterator[Turn]:
    """``(path, req_headers, req_body, resp_headers, resp_body)`` per turn of one agent session.

    A ~4 KB system prompt and ~5 KB of tool definitions; every request carries
    all earlier turns plus a new tool result or user message of 0.5-3 KB; every
    response is an SSE stream of ~100-300 chunk events (100-300 tokens, 70% of
    them ending in a streamed tool call).
    """
    rng = random.Random(seed)
    tools = _tools(rng)
    messages: list[dict] = [{"role": "system", "content": _prose(rng, 4000)},
                            {"role": "user", "content": _prose(rng, rng.randint(300, 1500))}]
    created = [1760000000 + rng.randint(0, 10 ** 6)]
    session = "%016x" % rng.getrandbits(64)
    for turn in range(turns):
        body = json.dumps({"model": model, "messages": messages, "tools": tools, "stream": True,
                           "temperature": 0.7, "top_p": 0.8, "max_tokens": 8192,
                           "stream_options": {"include_usage": True}}).encode()
        req_headers = {"Host": "127.0.0.1:8080", "User-Agent": "OpenAI/Python 1.99.1",
                       "Content-Type": "application/json", "Accept": "application/json",
                       "Authorization": "Bearer sk-secret", "X-Session-Id": session,
                       "Content-Length": str(len(body)), "Accept-Encoding": "gzip, deflate"}
        content = _prose(rng, rng.randint(100, 300) * 4)
        tool_call = None
        if rng.random() < 0.7:
            tool_call = (rng.choice(_TOOL_NAMES[:4]), json.dumps({
                "path": "src/%s/%s.py" % (rng.choice(_WORDS), rng.choice(_WORDS)), "reason": _prose(rng, 80)}))
        cid = "chatcmpl-" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
                                    for _ in range(32))
        resp_body = _sse(rng, content, tool_call, model, created, cid)
        created[0] += rng.randint(1, 20)
        resp_headers = {"Content-Type": "text/event-stream", "Server": "llama.cpp",
                        "Access-Control-Allow-Origin": "*", "X-Accel-Buffering": "no",
                        "Keep-Alive": "timeout=5, max=100", "Content-Encoding": "gzip"}
        yield "/v1/chat/completions", req_headers, body, resp_headers, resp_body
        assistant: dict = {"role": "assistant", "content": content}
        messages.append(assistant)
        if tool_call:
            call_id = "call_%d_%08x" % (turn, rng.getrandbits(32))
            assistant["tool_calls"] = [{"id": call_id, "type": "function",
                                        "function": {"name": tool_call[0], "arguments": tool_call[1]}}]
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _code(rng, rng.randint(500, 3000))})
        else:
            messages.append({"role": "user", "content": _prose(rng, rng.randint(500, 3000))})


def interleaved_conversations(seed: int, sessions: int, turns: int) -> Iterator[Turn]:
    """``sessions`` independent agent sessions, their turns interleaved at random."""
    rng = random.Random(seed)
    gens = [agentic_conversation(seed * 1000 + i, turns, model=rng.choice(["qwen3-coder-30b", "gpt-oss-120b"]))
            for i in range(sessions)]
    while gens:
        g = rng.choice(gens)
        try:
            yield next(g)
        except StopIteration:
            gens.remove(g)


def build_all(turns: Iterator[Turn], first_id: int = 0) -> list[Capture]:
    return [build_capture(first_id + i, *t) for i, t in enumerate(turns)]


def plain_zstd_stored(caps: list[Capture], level: int = 3) -> int:
    """Bytes llama-swap's scheme (CBOR then zstd per capture) needs for ``caps``."""
    cctx = zstandard.ZstdCompressor(level=level)
    return sum(len(cctx.compress(c.encode())) for c in caps)


# --- tests ---------------------------------------------------------------------------

def _random_capture(rng: random.Random, cid: int, size: int, path: str = "/v1/completions") -> Capture:
    """A capture with incompressible bodies of about ``size`` bytes in all."""
    return build_capture(cid, path, {"X-N": str(cid)}, rng.randbytes(size // 2), {"A": "b"},
                         rng.randbytes(size - size // 2))


class BuildCaptureTests(SynchronousTestCase):
    def test_all_parts_round_trip(self) -> None:
        cap = build_capture(7, "/v1/chat/completions",
                            {"Content-Type": "application/json", "X-Custom": "é ü"}, b'{"model":"m"}',
                            {"Content-Type": "text/event-stream"}, b"data: [DONE]\n\n\x00\xff")
        store = CaptureStore(1 << 20)
        self.assertTrue(store.add(cap))
        got = store.get(7)
        self.assertEqual(got, cap)
        assert got is not None
        self.assertEqual(got.id, 7)
        self.assertEqual(got.req_path, "/v1/chat/completions")
        self.assertEqual(got.req_headers, {"Content-Type": "application/json", "X-Custom": "é ü"})
        self.assertEqual(got.req_body, b'{"model":"m"}')
        self.assertEqual(got.resp_headers, {"Content-Type": "text/event-stream"})
        self.assertEqual(got.resp_body, b"data: [DONE]\n\n\x00\xff")

    def test_none_and_empty_are_distinct(self) -> None:
        store = CaptureStore(1 << 20)
        a = Capture(1, "/v1/x", {}, b"", None, None)
        store.add(a)
        self.assertEqual(build_capture(2, "/v1/x", None, None, None, None).resp_headers, {})  # Go: made map
        got = store.get(1)
        self.assertEqual(got, a)
        assert got is not None
        self.assertEqual(got.req_headers, {})
        self.assertEqual(got.req_body, b"")
        self.assertIsNone(got.resp_headers)
        self.assertIsNone(got.resp_body)
        self.assertEqual(got.to_json()["req_body"], "")
        self.assertIsNone(got.to_json()["resp_body"])

    def test_masks_per_path(self) -> None:
        expected = {
            "/v1/audio/speech": (True, False, True, False),
            "/v1/audio/voices": (True, False, True, True),
            "/v1/audio/transcriptions": (True, False, True, True),
            "/v1/images/generations": (True, True, True, False),
            "/v1/images/edits": (True, False, True, False),
            "/sdapi/v1/txt2img": (True, True, True, False),
            "/sdapi/v1/img2img": (True, False, True, False),
            "/v1/chat/completions": (True, True, True, True),
            "/v1/embeddings": (True, True, True, True),
            "/upstream/m/whatever": (True, True, True, True),
        }
        self.assertEqual(set(CAPTURE_MASKS), {p for p, v in expected.items() if v != (True,) * 4})
        store = CaptureStore(1 << 20)
        for i, (path, (rqh, rqb, rsh, rsb)) in enumerate(expected.items()):
            cap = build_capture(i, path, {"A": "1"}, b"req", {"B": "2"}, b"resp")
            self.assertEqual(cap.req_headers is not None, rqh, path)
            self.assertEqual(cap.req_body is not None, rqb, path)
            self.assertEqual(cap.resp_headers is not None, rsh, path)
            self.assertEqual(cap.resp_body is not None, rsb, path)
            mask = capture_mask(path)
            self.assertEqual((bool(mask & CAPTURE_REQ_HEADERS), bool(mask & CAPTURE_REQ_BODY),
                              bool(mask & CAPTURE_RESP_HEADERS), bool(mask & CAPTURE_RESP_BODY)),
                             (rqh, rqb, rsh, rsb))
            store.add(cap)
            self.assertEqual(store.get(i), cap)
        self.assertEqual(capture_mask("/anything"), CAPTURE_ALL)

    def test_redaction_case_insensitive_and_multi_valued(self) -> None:
        cap = build_capture(
            1, "/v1/chat/completions",
            {"authorization": "Bearer a", "PROXY-AUTHORIZATION": ["Basic x", "Basic y"], "Cookie": ["a=1", "b=2"],
             "x-API-key": "k", "X-Other": ["one", "two"], b"set-cookie": [b"s=1"]},
            None,
            {"Set-Cookie": ["s=1", "t=2"], "www-authenticate": "Basic", "AUTHORIZATION": "x",
             "X-Api-Key": "k2"},
            None)
        self.assertEqual(cap.req_headers, {
            "Authorization": REDACTED, "Proxy-Authorization": REDACTED, "Cookie": REDACTED,
            "X-Api-Key": REDACTED, "X-Other": "one", "Set-Cookie": REDACTED})
        self.assertEqual(cap.resp_headers, {
            "Set-Cookie": REDACTED, "Www-Authenticate": "Basic", "Authorization": REDACTED,
            "X-Api-Key": REDACTED})
        raw = json.dumps(cap.to_json())
        for secret in ("Bearer a", "Basic x", "a=1", '"k"', "s=1", "k2"):
            self.assertNotIn(secret, raw)

    def test_canonical_header_names(self) -> None:
        self.assertEqual(canonical_header_name("content-type"), "Content-Type")
        self.assertEqual(canonical_header_name("x-api-key"), "X-Api-Key")
        self.assertEqual(canonical_header_name("X-SESSION-ID"), "X-Session-Id")
        self.assertEqual(canonical_header_name(b"accept-encoding"), "Accept-Encoding")
        self.assertEqual(canonical_header_name("etag"), "Etag")
        self.assertEqual(canonical_header_name("x--y-"), "X--Y-")
        self.assertEqual(canonical_header_name("bad name"), "bad name")  # Go leaves invalid names alone
        cap = build_capture(1, "/v1/x", {"content-type": ["a", "b"], "Content-Type": "c", "user-AGENT": b"ua",
                                         "Empty": []}, None, {"x-request-id": "r"}, None)
        self.assertEqual(cap.req_headers, {"Content-Type": "a", "User-Agent": "ua"})
        self.assertEqual(cap.resp_headers, {"X-Request-Id": "r"})

    def test_response_content_encoding_dropped(self) -> None:
        cap = build_capture(1, "/v1/x", {"Content-Encoding": "gzip"}, b"q",
                            {"content-encoding": ["br"], "Content-Type": "application/json"}, b"{}")
        self.assertEqual(cap.resp_headers, {"Content-Type": "application/json"})
        self.assertEqual(cap.req_headers, {"Content-Encoding": "gzip"})  # only the response one goes

    def test_json_shape(self) -> None:
        cap = build_capture(42, "/v1/chat/completions", {"A": "1"}, b"\x00\x01req", {"B": "2"}, b"resp\xff")
        obj = cap.to_json()
        self.assertEqual(list(obj), ["id", "req_path", "req_headers", "req_body", "resp_headers", "resp_body"])
        self.assertEqual(obj["id"], 42)
        self.assertEqual(obj["req_path"], "/v1/chat/completions")
        self.assertEqual(obj["req_headers"], {"A": "1"})
        self.assertEqual(base64.b64decode(obj["req_body"]), b"\x00\x01req")
        self.assertEqual(obj["resp_body"], base64.b64encode(b"resp\xff").decode())
        self.assertEqual(json.loads(json.dumps(obj)), obj)
        masked = build_capture(1, "/v1/images/edits", {"A": "1"}, b"img", {"B": "2"}, b"png").to_json()
        self.assertIsNone(masked["req_body"])
        self.assertIsNone(masked["resp_body"])
        self.assertIn('"req_body": null', json.dumps(masked))


class CaptureStoreTests(SynchronousTestCase):
    def assertStoreConsistent(self, store: CaptureStore, originals: dict[int, Capture], order: list[int]) -> None:
        """Bound holds, stored ids are the newest contiguous run, everything stored round-trips."""
        stats = store.stats()
        self.assertLessEqual(stats["stored_bytes"], store.max_bytes)
        ids = store.ids()
        self.assertEqual(ids, order[len(order) - len(ids):] if ids else [])
        self.assertEqual(stats["count"], len(ids))
        for cid in order[:len(order) - len(ids)]:
            self.assertFalse(store.has(cid))
            self.assertIsNone(store.get(cid))
        for cid in ids:
            self.assertTrue(store.has(cid))
            self.assertEqual(store.get(cid), originals[cid])

    def test_disabled_store(self) -> None:
        store = CaptureStore(0)
        self.assertFalse(store.enabled)
        self.assertFalse(store.add(build_capture(1, "/v1/x", {}, b"a", {}, b"b")))
        self.assertFalse(store.has(1))
        self.assertIsNone(store.get(1))
        self.assertEqual(store.stats(), {"count": 0, "stored_bytes": 0, "raw_bytes": 0, "ratio": 0.0,
                                         "max_bytes": 0, "evicted": 0, "segments": 0, "skipped": 0})

    def test_eviction_by_bytes_oldest_first(self) -> None:
        rng = random.Random(1)
        store = CaptureStore(64 * 1024)
        originals: dict[int, Capture] = {}
        order: list[int] = []
        for cid in range(60):
            cap = _random_capture(rng, cid, 3000)
            originals[cid] = cap
            order.append(cid)
            self.assertTrue(store.add(cap))
            self.assertStoreConsistent(store, originals, order)
        stats = store.stats()
        self.assertGreater(stats["evicted"], 0)
        self.assertEqual(stats["evicted"] + stats["count"], 60)
        self.assertTrue(store.has(59))
        self.assertFalse(store.has(0))
        # segments are kept small relative to the store, so eviction stays fine-grained
        self.assertGreater(stats["stored_bytes"], store.max_bytes * 3 // 4)

    def test_item_larger_than_store_is_skipped(self) -> None:
        rng = random.Random(2)
        store = CaptureStore(8 * 1024)
        small = _random_capture(rng, 1, 2000)
        self.assertTrue(store.add(small))
        self.assertFalse(store.add(_random_capture(rng, 2, 20000)))
        self.assertFalse(store.has(2))
        self.assertIsNone(store.get(2))
        self.assertEqual(store.get(1), small)  # nothing evicted for it
        self.assertEqual(store.stats()["skipped"], 1)
        after = _random_capture(rng, 3, 2000)
        self.assertTrue(store.add(after))
        self.assertEqual(store.get(1), small)
        self.assertEqual(store.get(3), after)

    def test_open_segment_evicted_then_recompressed(self) -> None:
        # The open segment is the only one left and the new chunk does not fit beside it.
        rng = random.Random(3)
        store = CaptureStore(10_000)
        first = _random_capture(rng, 1, 1000)
        self.assertTrue(store.add(first))
        big = _random_capture(rng, 2, 9500)
        self.assertTrue(store.add(big))
        self.assertFalse(store.has(1))
        self.assertEqual(store.get(2), big)
        self.assertLessEqual(store.stats()["stored_bytes"], 10_000)
        self.assertEqual(store.stats()["evicted"], 1)

    def test_segments_bound_replay(self) -> None:
        caps = build_all(agentic_conversation(5, 12))
        store = CaptureStore(64 << 20, segment_bytes=256 * 1024)
        for cap in caps:
            self.assertTrue(store.add(cap))
        stats = store.stats()
        self.assertGreater(stats["segments"], 2)
        for seg in store._segments:
            self.assertLessEqual(seg.raw, max(256 * 1024, max(seg.raw_lens)))
        for cap in caps:
            self.assertEqual(store.get(cap.id), cap)

    def test_readding_an_id_keeps_newest(self) -> None:
        store = CaptureStore(1 << 20)
        a = build_capture(1, "/v1/x", {}, b"first", {}, None)
        b = build_capture(1, "/v1/x", {}, b"second", {}, None)
        store.add(a)
        store.add(build_capture(2, "/v1/x", {}, b"other", {}, None))
        store.add(b)
        self.assertEqual(store.get(1), b)
        self.assertEqual(len(store), 2)
        self.assertEqual(store.ids(), [2, 1])

    def test_clear(self) -> None:
        store = CaptureStore(1 << 20)
        for cap in build_all(agentic_conversation(6, 3)):
            store.add(cap)
        store.clear()
        self.assertEqual(store.stats()["count"], 0)
        self.assertEqual(store.stats()["stored_bytes"], 0)
        self.assertIsNone(store.get(0))
        cap = build_capture(9, "/v1/x", {}, b"x", {}, b"y")
        self.assertTrue(store.add(cap))
        self.assertEqual(store.get(9), cap)

    def test_churn_round_trips(self) -> None:
        """Property-style: random sizes, stores, compressible and incompressible captures."""
        rng = random.Random(20240601)
        for round_ in range(6):
            max_bytes = rng.choice([6_000, 30_000, 120_000, 600_000])
            store = CaptureStore(max_bytes, segment_bytes=rng.choice([64 * 1024, 512 * 1024, 4 << 20]))
            conv = agentic_conversation(round_, 40)
            originals: dict[int, Capture] = {}
            order: list[int] = []
            for cid in range(120):
                kind = rng.random()
                if kind < 0.5:
                    try:
                        cap = build_capture(cid, *next(conv))
                    except StopIteration:
                        conv = agentic_conversation(round_ * 100 + cid, 40)
                        cap = build_capture(cid, *next(conv))
                elif kind < 0.9:
                    cap = _random_capture(rng, cid, rng.randint(0, max_bytes // 3))
                else:
                    cap = _random_capture(rng, cid, rng.randint(max_bytes // 2, max_bytes * 2))
                originals[cid] = cap
                if store.add(cap):
                    order.append(cid)
                else:
                    self.assertFalse(store.has(cid))
                    # a skip never evicts others beyond what a FIFO would: the stored run is still contiguous
                if rng.random() < 0.02:
                    store.clear()
                    order = []
                self.assertLessEqual(store.stats()["stored_bytes"], max_bytes)
                if cid % 10 == 0:
                    self.assertStoreConsistent(store, originals, order)
            self.assertStoreConsistent(store, originals, order)

    def test_ratio_logged(self) -> None:
        events: list[dict] = []
        self.patch(captures, "_log", Logger(namespace="test", observer=events.append))
        store = CaptureStore(64 << 20)
        for cap in build_all(agentic_conversation(8, 12)):
            store.add(cap)
        logged = [e for e in events if "ratio" in e]
        self.assertTrue(logged)
        self.assertEqual(logged[0]["count"], captures.LOG_MIN_ADDS)
        self.assertGreater(logged[-1]["ratio"], 5)

    def test_agentic_20_turns_beats_plain_zstd(self) -> None:
        caps = build_all(agentic_conversation(1, 20))
        store = CaptureStore(5 << 20)  # llama-swap's default captureBuffer
        for cap in caps:
            self.assertTrue(store.add(cap))
        stats = store.stats()
        raw = sum(len(c.encode()) for c in caps)
        self.assertEqual(stats["raw_bytes"], raw)
        self.assertEqual(stats["count"], 20)
        plain = raw / plain_zstd_stored(caps)
        print("\n20-turn agentic conversation: %d raw bytes; plain per-capture zstd-3 %.2f:1; "
              "chained segments %d bytes, %.2f:1" % (raw, plain, stats["stored_bytes"], stats["ratio"]))
        self.assertGreaterEqual(stats["ratio"], 15.0)
        self.assertGreater(stats["ratio"], plain)
        self.assertGreater(stats["ratio"], 2 * plain)
        for cap in caps:
            self.assertEqual(store.get(cap.id), cap)

    def test_interleaved_sessions_compress(self) -> None:
        caps = build_all(interleaved_conversations(3, 4, 10))
        store = CaptureStore(64 << 20)
        for cap in caps:
            store.add(cap)
        self.assertGreater(store.stats()["ratio"], 2 * (store.stats()["raw_bytes"] / plain_zstd_stored(caps)))
        for cap in caps:
            self.assertEqual(store.get(cap.id), cap)


class CaptureLimitTests(SynchronousTestCase):
    """Size limits come before any encoding, compression or decompression; big captures go in slices."""

    def test_encoded_parts_join_to_cbor(self) -> None:
        import cbor2

        for size in (0, 1, 23, 24, 255, 256, 65535, 65536, 70000):
            for cap in (build_capture(size, "/v1/x", {"A": "1"}, b"q" * size, {"B": "2"}, b"r" * (size // 2)),
                        build_capture(size, "/v1/x", None, None, None, None)):
                self.assertEqual(cap.encode(), cbor2.dumps([cap.id, cap.req_path, cap.req_headers, cap.req_body,
                                                            cap.resp_headers, cap.resp_body]))
                self.assertEqual(Capture.decode(cap.encode()), cap)

    def test_body_larger_than_store_refused_before_encoding(self) -> None:
        store = CaptureStore(1000)
        cap = build_capture(1, "/v1/x", {}, b"a" * 1001, {}, None)  # compresses to a few bytes, still refused
        self.patch(Capture, "encoded_parts", lambda self: self.fail("encoded"))
        self.assertFalse(store.add(cap))
        self.assertEqual(store.stats()["skipped"], 1)
        self.assertEqual(store.stats()["segments"], 0)

    def test_big_capture_submitted_in_slices_and_in_order(self) -> None:
        from twisted.internet.task import Clock

        from llamaswap.steps import run_in_slices

        self.patch(captures, "PIECE", 1024)
        self.patch(captures, "run_in_slices", lambda steps, clock: run_in_slices(steps, clock, budget=0))
        clock = Clock()
        store = CaptureStore(1 << 20)
        rng = random.Random(5)
        big = build_capture(1, "/v1/x", {}, rng.randbytes(40_000), {}, b"resp")
        small = build_capture(2, "/v1/x", {}, b"small", {}, None)
        first = store.submit(big, clock)
        second = store.submit(small, clock)
        self.assertNoResult(first)  # 40 pieces: not done in the first slice
        self.assertRaises(RuntimeError, store.add, small)
        for _ in range(1000):
            if first.called and second.called:
                break
            clock.advance(0)
        self.assertTrue(self.successResultOf(first))
        self.assertTrue(self.successResultOf(second))
        self.assertEqual(store.ids(), [1, 2])
        self.assertEqual(store.get(1), big)
        self.assertEqual(store.get(2), small)
        self.assertTrue(store.add(build_capture(3, "/v1/x", {}, b"x", {}, None)))  # free again

    def test_clear_while_a_capture_is_compressed(self) -> None:
        from twisted.internet.task import Clock

        from llamaswap.steps import run_in_slices

        self.patch(captures, "PIECE", 1024)
        self.patch(captures, "run_in_slices", lambda steps, clock: run_in_slices(steps, clock, budget=0))
        clock = Clock()
        store = CaptureStore(1 << 20)
        d = store.submit(build_capture(1, "/v1/x", {}, b"z" * 50_000, {}, None), clock)
        self.assertNoResult(d)
        store.clear()
        clock.advance(0)
        self.assertFalse(self.successResultOf(d))
        self.assertEqual(store.stats()["count"], 0)
        self.assertEqual(store.stats()["stored_bytes"], 0)
        later = build_capture(2, "/v1/x", {}, b"after", {}, None)
        self.assertTrue(store.add(later))
        self.assertEqual(store.get(2), later)


class RecorderLimitTests(SynchronousTestCase):
    def recorder(self, limit: int, req_body: bytes, encoding: str = ""):
        from twisted.internet.task import Clock

        from llamaswap.activity.recorder import ActivityRecorder

        rec = ActivityRecorder(Clock(), lambda: 0.0, "m", "/v1/chat/completions", {"A": "1"}, req_body, limit)
        headers = {"Content-Type": "application/json"}
        if encoding:
            headers["Content-Encoding"] = encoding
        rec.on_headers(200, headers)
        return rec

    def test_request_body_over_the_limit_left_out(self) -> None:
        rec = self.recorder(100, b"r" * 101)
        rec.on_chunk(b'{"ok": 1}')
        cap = rec.capture(1)
        self.assertIsNone(cap.req_body)
        self.assertEqual(cap.resp_body, b'{"ok": 1}')
        self.assertEqual(self.recorder(100, b"r" * 100).capture(1).req_body, b"r" * 100)

    def test_compressed_body_inflating_past_the_limit_left_out(self) -> None:
        import gzip
        import zlib

        from llamaswap.activity import recorder as recorder_module

        self.patch(recorder_module, "PIECE", 1000)
        bomb = gzip.compress(b"0" * 1_000_000)  # ~1 KB on the wire, 1 MB inflated
        rec = self.recorder(10_000, b"{}", "gzip")
        rec.on_chunk(bomb)
        inflated = []
        real = zlib.decompressobj

        class Counting:
            def __init__(self, *args):
                self.obj = real(*args)

            def decompress(self, data, max_length=0):
                out = self.obj.decompress(data, max_length)
                inflated.append(len(out))
                return out

            def __getattr__(self, name):
                return getattr(self.obj, name)

        self.patch(recorder_module.zlib, "decompressobj", Counting)
        cap = rec.capture(1)
        self.assertIsNone(cap.resp_body)  # left out, not cut
        self.assertLessEqual(sum(inflated), 10_000 + 1000)  # stopped right past the limit
        ok = self.recorder(10_000, b"{}", "gzip")
        ok.on_chunk(gzip.compress(b"1" * 5000))
        self.assertEqual(ok.capture(2).resp_body, b"1" * 5000)
