"""Tests for llamaswap.activity.parse: token/timing extraction as response bytes pass."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.test_jsonscan import drive_counting

from llamaswap.activity.parse import (
    ParseResult,
    ResponseParser,
    Tokens,
    duration_ms,
    error_message,
    filter_accept_encoding,
)

SSE = "text/event-stream"
JSON = "application/json"


def sse(*events: Any, done: bool = True, event_names: bool = False) -> bytes:
    """An SSE body of ``data:`` lines (dicts JSON-encoded), optionally with ``event:`` lines."""
    out = []
    for item in events:
        if event_names and isinstance(item, dict) and "type" in item:
            out.append(f"event: {item['type']}\n")
        data = item if isinstance(item, str) else json.dumps(item)
        out.append(f"data: {data}\n\n")
    if done:
        out.append("data: [DONE]\n\n")
    return "".join(out).encode()


def parse(
    body: bytes,
    content_type: str = JSON,
    path: str = "/v1/chat/completions",
    encoding: str = "",
    chunk: int = 0,
    **kwargs: Any,
) -> ParseResult:
    parser = ResponseParser(content_type, encoding, path, **kwargs)
    step = chunk or max(len(body), 1)
    for i in range(0, len(body), step):
        parser.feed(body[i : i + step])
    return parser.finish()


def raw_deflate(data: bytes) -> bytes:
    comp = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return comp.compress(data) + comp.flush()


def tokens(**kw: Any) -> dict[str, Any]:
    """Expected ``tokens`` JSON: the "parsed but absent" defaults overridden by ``kw``."""
    base: dict[str, Any] = {
        "cache_tokens": -1,
        "draft_tokens": -1,
        "draft_acc_tokens": -1,
        "input_tokens": 0,
        "output_tokens": 0,
        "prompt_per_second": -1.0,
        "tokens_per_second": -1.0,
    }
    base.update(kw)
    return base


ZERO = Tokens().to_json()

# --------------------------------------------------------------------------- fixtures

LLAMA_TIMINGS = {
    "cache_n": 5,
    "prompt_n": 20,
    "prompt_ms": 40.5,
    "prompt_per_token_ms": 2.025,
    "prompt_per_second": 493.8,
    "predicted_n": 10,
    "predicted_ms": 100.25,
    "predicted_per_token_ms": 10.025,
    "predicted_per_second": 99.75,
}

CHAT_JSON = json.dumps(
    {
        "choices": [{"finish_reason": "stop", "index": 0, "message": {"role": "assistant", "content": "Hello!"}}],
        "created": 1750000000,
        "model": "qwen",
        "system_fingerprint": "b6000-abc",
        "object": "chat.completion",
        "usage": {
            "completion_tokens": 10,
            "prompt_tokens": 25,
            "total_tokens": 35,
            "prompt_tokens_details": {"cached_tokens": 5},
        },
        "id": "chatcmpl-1",
        "timings": LLAMA_TIMINGS,
    }
).encode()


def _chat_chunk(content: str | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    chunk = {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": 1750000000,
        "id": "chatcmpl-2",
        "model": "qwen",
        "object": "chat.completion.chunk",
    }
    chunk.update(extra)
    return chunk


CHAT_STREAM = sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant"}}], "object": "chat.completion.chunk", "usage": None},
    _chat_chunk("Hel", usage=None),
    _chat_chunk("lo", usage=None),
    _chat_chunk(None, "stop", timings=dict(LLAMA_TIMINGS, draft_n=8, draft_n_accepted=6)),
    {
        "choices": [],
        "object": "chat.completion.chunk",
        "usage": {"completion_tokens": 10, "prompt_tokens": 25, "total_tokens": 35},
        "timings": dict(LLAMA_TIMINGS, draft_n=8, draft_n_accepted=6),
    },
)

COMPLETIONS_JSON = json.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [{"text": " world", "index": 0, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19},
    }
).encode()

RESPONSES_USAGE = {
    "input_tokens": 30,
    "input_tokens_details": {"cached_tokens": 12},
    "output_tokens": 40,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 70,
}
RESPONSES_JSON = json.dumps(
    {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi"}]}],
        "usage": RESPONSES_USAGE,
    }
).encode()
RESPONSES_STREAM = sse(
    {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1", "status": "in_progress", "usage": None}},
    {"type": "response.in_progress", "sequence_number": 1, "response": {"id": "resp_1", "status": "in_progress"}},
    {"type": "response.output_text.delta", "sequence_number": 2, "delta": "Hi"},
    {"type": "response.output_text.done", "sequence_number": 3, "text": "Hi"},
    {"type": "response.completed", "sequence_number": 4, "response": {"id": "resp_1", "status": "completed", "usage": RESPONSES_USAGE}},
    done=False,
    event_names=True,
)

ANTHROPIC_STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "usage": {"input_tokens": 50, "cache_read_input_tokens": 20, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 77}},
    {"type": "message_stop"},
    done=False,
    event_names=True,
)
ANTHROPIC_JSON = json.dumps(
    {
        "id": "msg_2",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "Hi"}],
        "usage": {"input_tokens": 50, "cache_read_input_tokens": 0, "output_tokens": 12},
    }
).encode()

INFILL_JSON = json.dumps(
    [
        {"index": 0, "content": "def"},
        {"index": 0, "content": " f():", "timings": dict(LLAMA_TIMINGS, cache_n=0)},
    ]
).encode()

VLLM_JSON = (
    b'{"id":"chatcmpl-abc123","object":"chat.completion","usage":{"prompt_tokens":42,"completion_tokens":128,'
    b'"total_tokens":170,"prompt_tokens_details":{"cached_tokens":20}},"metrics":{"time_to_first_token_ms":85.2,'
    b'"generation_time_ms":1240.5,"queue_time_ms":12.3,"mean_itl_ms":9.1,"tokens_per_second":103.2}}'
)
VLLM_SPEC_JSON = (
    b'{"usage":{"prompt_tokens":42,"completion_tokens":128},"metrics":{"mean_itl_ms":9.1,'
    b'"speculative_decoding":{"mean_acceptance_length":1.7,"draft_acceptance_rate":0.7,'
    b'"num_spec_steps":20,"num_accepted_draft_tokens":14,"num_draft_tokens":20,"num_spec_tokens":1}}}'
)
VLLM_STREAM = (
    b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    b'data: {"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":11742,"completion_tokens":35},'
    b'"metrics":{"time_to_first_token_ms":70,"mean_itl_ms":17.209908293272534,"speculative_decoding":'
    b'{"num_accepted_draft_tokens":14,"num_draft_tokens":20}}}\n\n'
    b"data: [DONE]\n\n"
)


# --------------------------------------------------------------------------- endpoint shapes


class EndpointShapeTests(SynchronousTestCase):
    """Each upstream response shape, streaming and not."""

    def assertTokens(self, result: ParseResult, expected: dict[str, Any]) -> None:
        self.assertTrue(result.parsed)
        self.assertIsNone(result.error_msg)
        got = result.tokens.to_json()
        for key in ("prompt_per_second", "tokens_per_second"):
            self.assertAlmostEqual(got.pop(key), expected[key], places=6)
        self.assertEqual(got, {k: v for k, v in expected.items() if not k.endswith("_second")})

    def test_chat_json_llama_server_timings_override_usage(self) -> None:
        result = parse(CHAT_JSON)
        self.assertTokens(
            result,
            tokens(input_tokens=20, output_tokens=10, cache_tokens=5, prompt_per_second=493.8, tokens_per_second=99.75),
        )
        self.assertEqual((result.tokens.prompt_ms, result.tokens.predicted_ms), (40.5, 100.25))

    def test_chat_stream_llama_server_usage_timings_and_drafts(self) -> None:
        result = parse(CHAT_STREAM, SSE)
        self.assertTokens(
            result,
            tokens(
                input_tokens=20,
                output_tokens=10,
                cache_tokens=5,
                draft_tokens=8,
                draft_acc_tokens=6,
                prompt_per_second=493.8,
                tokens_per_second=99.75,
            ),
        )

    def test_tokens_json_has_llama_swap_keys_only(self) -> None:
        self.assertEqual(
            sorted(parse(CHAT_JSON).tokens.to_json()),
            sorted(
                [
                    "cache_tokens",
                    "draft_tokens",
                    "draft_acc_tokens",
                    "input_tokens",
                    "output_tokens",
                    "prompt_per_second",
                    "tokens_per_second",
                ]
            ),
        )

    def test_completions_usage_only(self) -> None:
        self.assertTokens(parse(COMPLETIONS_JSON, path="/v1/completions"), tokens(input_tokens=3, output_tokens=16))

    def test_completions_stream_usage_only(self) -> None:
        body = sse({"choices": [{"text": "a"}]}, {"choices": [], "usage": {"prompt_tokens": 15, "completion_tokens": 33}})
        self.assertTokens(parse(body, SSE, "/v1/completions"), tokens(input_tokens=15, output_tokens=33))

    def test_responses_json(self) -> None:
        self.assertTokens(
            parse(RESPONSES_JSON, path="/v1/responses"), tokens(input_tokens=30, output_tokens=40, cache_tokens=12)
        )

    def test_responses_stream(self) -> None:
        self.assertTokens(
            parse(RESPONSES_STREAM, SSE, "/v1/responses"),
            tokens(input_tokens=30, output_tokens=40, cache_tokens=12),
        )

    def test_anthropic_stream_merges_message_start_and_delta(self) -> None:
        self.assertTokens(
            parse(ANTHROPIC_STREAM, SSE, "/v1/messages"), tokens(input_tokens=50, output_tokens=77, cache_tokens=20)
        )

    def test_anthropic_json(self) -> None:
        self.assertTokens(
            parse(ANTHROPIC_JSON, path="/v1/messages"), tokens(input_tokens=50, output_tokens=12, cache_tokens=0)
        )

    def test_infill_array_uses_last_element_timings(self) -> None:
        self.assertTokens(
            parse(INFILL_JSON, path="/infill"),
            tokens(input_tokens=20, output_tokens=10, cache_tokens=0, prompt_per_second=493.8, tokens_per_second=99.75),
        )

    def test_infill_array_without_timings_not_parsed(self) -> None:
        result = parse(b'[{"content":"a"},{"content":"b"}]', path="/infill")
        self.assertEqual((result.parsed, result.tokens.to_json()), (False, ZERO))

    def test_array_outside_infill_not_parsed(self) -> None:
        self.assertFalse(parse(INFILL_JSON, path="/v1/completions").parsed)

    def test_vllm_metrics_rates_from_ttft_and_itl(self) -> None:
        self.assertTokens(
            parse(VLLM_JSON),
            tokens(
                input_tokens=42,
                output_tokens=128,
                cache_tokens=20,
                prompt_per_second=(42 - 20) / 0.0852,
                tokens_per_second=1000 / 9.1,
            ),
        )

    def test_vllm_speculative_decoding(self) -> None:
        self.assertTokens(
            parse(VLLM_SPEC_JSON),
            tokens(input_tokens=42, output_tokens=128, draft_tokens=20, draft_acc_tokens=14, tokens_per_second=1000 / 9.1),
        )

    def test_vllm_half_filled_speculative_decoding_ignored(self) -> None:
        body = b'{"usage":{"prompt_tokens":42,"completion_tokens":128},"metrics":{"speculative_decoding":{"num_draft_tokens":20}}}'
        self.assertTokens(parse(body), tokens(input_tokens=42, output_tokens=128))

    def test_vllm_empty_spec_keeps_llama_timings_drafts(self) -> None:
        body = b'{"timings":{"prompt_n":20,"predicted_n":50,"draft_n":30,"draft_n_accepted":12},"metrics":{"speculative_decoding":{}}}'
        self.assertTokens(
            parse(body),
            tokens(
                input_tokens=20,
                output_tokens=50,
                draft_tokens=30,
                draft_acc_tokens=12,
                prompt_per_second=0.0,
                tokens_per_second=0.0,
            ),
        )

    def test_vllm_stream(self) -> None:
        self.assertTokens(
            parse(VLLM_STREAM, SSE),
            tokens(
                input_tokens=11742,
                output_tokens=35,
                draft_tokens=20,
                draft_acc_tokens=14,
                prompt_per_second=11742 / 0.07,
                tokens_per_second=1000 / 17.209908293272534,
            ),
        )

    def test_metrics_only_body_is_parsed(self) -> None:
        self.assertTokens(parse(b'{"metrics":{"mean_itl_ms":10}}'), tokens(tokens_per_second=100.0))


class CachedTokenTests(SynchronousTestCase):
    """The cached-token source precedence and defaults."""

    def cached(self, usage: dict[str, Any], content_type: str = JSON) -> int:
        body = json.dumps({"usage": usage}).encode()
        if content_type == SSE:
            body = sse({"usage": usage})
        return parse(body, content_type).tokens.cache_tokens

    def test_precedence(self) -> None:
        usage = {
            "prompt_tokens": 9,
            "cache_read_input_tokens": 1,
            "input_tokens_details": {"cached_tokens": 2},
            "prompt_tokens_details": {"cached_tokens": 3},
        }
        self.assertEqual(self.cached(usage), 1)
        del usage["cache_read_input_tokens"]
        self.assertEqual(self.cached(usage), 2)
        del usage["input_tokens_details"]
        self.assertEqual(self.cached(usage), 3)
        del usage["prompt_tokens_details"]
        self.assertEqual(self.cached(usage), -1)

    def test_stream_variants(self) -> None:
        self.assertEqual(self.cached({"prompt_tokens_details": {"cached_tokens": 7}}, SSE), 7)
        self.assertEqual(self.cached({"input_tokens": 4}, SSE), -1)

    def test_timings_cache_n_overrides_usage(self) -> None:
        body = b'{"usage":{"prompt_tokens_details":{"cached_tokens":3}},"timings":{"cache_n":11}}'
        self.assertEqual(parse(body).tokens.cache_tokens, 11)

    def test_timings_without_cache_n_keeps_usage_cache(self) -> None:
        body = b'{"usage":{"prompt_tokens_details":{"cached_tokens":3}},"timings":{"prompt_n":4}}'
        self.assertEqual(parse(body).tokens.cache_tokens, 3)

    def test_prompt_tokens_preferred_over_input_tokens(self) -> None:
        result = parse(b'{"usage":{"prompt_tokens":5,"input_tokens":6,"completion_tokens":7,"output_tokens":8}}')
        self.assertEqual((result.tokens.input_tokens, result.tokens.output_tokens), (5, 7))


class StreamMergeTests(SynchronousTestCase):
    """Merging of usage across SSE events."""

    def test_zero_values_do_not_overwrite_and_cached_zero_does(self) -> None:
        body = sse(
            {"usage": {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 4}},
            {"usage": {"input_tokens": 0, "output_tokens": 9, "cache_read_input_tokens": 0}},
        )
        self.assertEqual(
            parse(body, SSE).tokens.to_json(), tokens(input_tokens=10, output_tokens=9, cache_tokens=0)
        )

    def test_last_timings_wins(self) -> None:
        body = sse({"timings": {"prompt_n": 1, "predicted_n": 1}}, {"timings": {"prompt_n": 2, "predicted_n": 3}})
        self.assertEqual((parse(body, SSE).tokens.input_tokens, parse(body, SSE).tokens.output_tokens), (2, 3))

    def test_null_usage_and_junk_lines_ignored(self) -> None:
        body = (
            b": comment with usage\n"
            b"event: usage\n"
            b"data: not json usage\n"
            b'data: {"usage": null}\n'
            b"data:\n"
            b'data:{"usage":{"prompt_tokens":3,"completion_tokens":4}}\r\n'
            b"data: [DONE]"
        )
        self.assertEqual(parse(body, SSE).tokens.to_json(), tokens(input_tokens=3, output_tokens=4))

    def test_final_line_without_newline_is_parsed(self) -> None:
        self.assertEqual(parse(b'data: {"usage":{"prompt_tokens":3}}', SSE).tokens.input_tokens, 3)

    def test_stream_without_usable_data_is_not_parsed(self) -> None:
        for body in (b"data: [DONE]\n\n", sse({"choices": []}), b"data: {bad usage json\n\n", b""):
            result = parse(body, SSE)
            self.assertEqual((result.parsed, result.error_msg, result.tokens.to_json()), (False, None, ZERO))

    def test_content_type_with_parameters(self) -> None:
        self.assertTrue(parse(sse({"usage": {"prompt_tokens": 1}}), "text/event-stream; charset=utf-8").parsed)

    def test_sse_body_with_json_content_type_is_not_parsed(self) -> None:
        self.assertFalse(parse(sse({"usage": {"prompt_tokens": 1}}), JSON).parsed)


class NonStreamingTests(SynchronousTestCase):
    """Buffered JSON bodies: parsed / not parsed decisions and the buffer bound."""

    def test_parsed_but_empty_usage_gives_minus_one_defaults(self) -> None:
        result = parse(b'{"usage":{}}')
        self.assertEqual((result.parsed, result.tokens.to_json()), (True, tokens()))

    def test_never_parsed_keeps_zero_tokens(self) -> None:
        for body in (b"", b"not json", b'{"choices":[]}', b'{"usage":', b"[]", b'"usage"'):
            result = parse(body)
            self.assertEqual((result.parsed, result.error_msg, result.tokens.to_json()), (False, None, ZERO), body)

    def test_body_over_max_buffer_not_parsed(self) -> None:
        body = json.dumps({"usage": {"prompt_tokens": 1}, "pad": "x" * 5000}).encode()
        parser = ResponseParser(JSON, "", "/v1/chat/completions", max_buffer=4096)
        for i in range(0, len(body), 100):
            parser.feed(body[i : i + 100])
            self.assertLessEqual(parser.buffered_bytes, 4096)
        self.assertEqual(parser.buffered_bytes, 0)
        self.assertFalse(parser.finish().parsed)

    def test_body_at_max_buffer_parsed(self) -> None:
        body = b'{"usage":{"prompt_tokens":1}}'
        self.assertTrue(parse(body, max_buffer=len(body), chunk=3).parsed)

    def test_numeric_coercions(self) -> None:
        body = b'{"usage":{"prompt_tokens":12.9,"completion_tokens":"7"},"timings":null}'
        result = parse(body)
        self.assertEqual((result.tokens.input_tokens, result.tokens.output_tokens), (0, 0))  # null timings exist
        result = parse(b'{"usage":{"prompt_tokens":12.9,"completion_tokens":"7"}}')
        self.assertEqual((result.tokens.input_tokens, result.tokens.output_tokens), (12, 7))

    def test_finish_twice_raises(self) -> None:
        parser = ResponseParser(JSON, "", "/v1/chat/completions")
        parser.finish()
        self.assertRaises(RuntimeError, parser.finish)

    def test_feed_after_finish_is_ignored(self) -> None:
        parser = ResponseParser(JSON, "", "/v1/chat/completions")
        parser.feed(COMPLETIONS_JSON)
        self.assertTrue(parser.finish().parsed)
        held = parser.buffered_bytes
        parser.feed(b"more")
        self.assertEqual(parser.buffered_bytes, held)


class ChunkBoundaryTests(SynchronousTestCase):
    """Results do not depend on where the transport splits the body."""

    def test_split_at_every_byte(self) -> None:
        body = ANTHROPIC_STREAM + CHAT_STREAM
        expected = parse(body, SSE).tokens
        for cut in range(len(body) + 1):
            parser = ResponseParser(SSE, "", "/v1/messages")
            parser.feed(body[:cut])
            parser.feed(body[cut:])
            self.assertEqual(parser.finish().tokens, expected, cut)

    def test_one_byte_chunks(self) -> None:
        for body in (ANTHROPIC_STREAM, RESPONSES_STREAM, CHAT_STREAM, VLLM_STREAM):
            self.assertEqual(parse(body, SSE, chunk=1), parse(body, SSE))

    def test_crlf_split_between_cr_and_lf(self) -> None:
        body = b'data: {"usage":{"prompt_tokens":3}}\r\n\r\ndata: [DONE]\r\n\r\n'
        for cut in range(len(body) + 1):
            parser = ResponseParser(SSE, "", "/v1/chat/completions")
            parser.feed(body[:cut])
            parser.feed(body[cut:])
            self.assertEqual(parser.finish().tokens.input_tokens, 3)


class CompressionTests(SynchronousTestCase):
    """gzip and deflate bodies, whole and split, and decompression failures."""

    def check_all_splits(self, body: bytes, encoding: str, content_type: str, expected: ParseResult) -> None:
        for cut in range(len(body) + 1):
            parser = ResponseParser(content_type, encoding, "/v1/messages")
            parser.feed(body[:cut])
            parser.feed(body[cut:])
            self.assertEqual(parser.finish(), expected, cut)

    def test_gzip_stream_whole_and_split(self) -> None:
        expected = parse(ANTHROPIC_STREAM, SSE)
        body = gzip.compress(ANTHROPIC_STREAM)
        self.assertEqual(parse(body, SSE, encoding="gzip"), expected)
        self.check_all_splits(body, "gzip", SSE, expected)

    def test_gzip_json(self) -> None:
        self.assertEqual(parse(gzip.compress(CHAT_JSON), encoding="GZIP", chunk=7), parse(CHAT_JSON))

    def test_deflate_zlib_wrapped_whole_and_split(self) -> None:
        expected = parse(ANTHROPIC_STREAM, SSE)
        body = zlib.compress(ANTHROPIC_STREAM)
        self.assertEqual(parse(body, SSE, encoding="deflate"), expected)
        self.check_all_splits(body, "deflate", SSE, expected)

    def test_deflate_raw_whole_and_split(self) -> None:
        expected = parse(ANTHROPIC_JSON)
        body = raw_deflate(ANTHROPIC_JSON)
        self.assertEqual(parse(body, encoding=" Deflate "), expected)
        self.check_all_splits(body, "deflate", JSON, expected)

    def test_deflate_trailing_bytes_ignored(self) -> None:
        parser = ResponseParser(JSON, "deflate", "/v1/messages")
        parser.feed(raw_deflate(ANTHROPIC_JSON) + b"trailer")
        for _ in range(100):
            parser.feed(b"x" * 1000)
        self.assertEqual(parser.buffered_bytes, len(ANTHROPIC_JSON))
        self.assertEqual(parser.finish(), parse(ANTHROPIC_JSON))

    def test_gzip_multi_member(self) -> None:
        half = len(CHAT_STREAM) // 2
        body = gzip.compress(CHAT_STREAM[:half]) + gzip.compress(CHAT_STREAM[half:])
        self.assertEqual(parse(body, SSE, encoding="gzip", chunk=5), parse(CHAT_STREAM, SSE))

    def test_highly_compressible_body_is_inflated_in_pieces(self) -> None:
        padding = b": " + b"x" * (4 * 1024 * 1024) + b"\n"
        body = gzip.compress(padding + sse({"usage": {"prompt_tokens": 9}}))
        parser = ResponseParser(SSE, "gzip", "/v1/chat/completions")
        parser.feed(body)
        self.assertLess(parser.buffered_bytes, 256 * 1024)
        self.assertEqual(parser.finish().tokens.input_tokens, 9)

    def test_unknown_encoding_passes_through(self) -> None:
        self.assertEqual(parse(CHAT_JSON, encoding="identity"), parse(CHAT_JSON))
        self.assertFalse(parse(gzip.compress(CHAT_JSON), encoding="br").parsed)

    def test_empty_compressed_body_is_not_an_error(self) -> None:
        self.assertEqual(parse(b"", encoding="gzip"), ParseResult())

    def test_decompress_failures(self) -> None:
        good = gzip.compress(CHAT_JSON)
        cases = {
            "gzip": [b"not gzip at all", good[:-6], good[:10], good + b"garbage!!!"],
            "deflate": [b"\xff\xff\xff\xff", zlib.compress(CHAT_JSON)[:-8], b"x"],
        }
        for encoding, bodies in cases.items():
            for body in bodies:
                for chunk in (0, 1):
                    result = parse(body, encoding=encoding, chunk=chunk)
                    self.assertFalse(result.parsed)
                    self.assertEqual(result.tokens.to_json(), ZERO)
                    self.assertIsNotNone(result.error_msg)
                    assert result.error_msg is not None
                    self.assertTrue(result.error_msg.startswith("response decompression failed: "), result.error_msg)

    def test_truncated_stream_reports_unexpected_eof(self) -> None:
        result = parse(gzip.compress(CHAT_STREAM)[:-4], SSE, encoding="gzip")
        self.assertEqual(result.error_msg, "response decompression failed: unexpected EOF")

    def test_data_after_failure_is_ignored(self) -> None:
        parser = ResponseParser(SSE, "gzip", "/v1/chat/completions")
        parser.feed(b"bogus-bytes")
        parser.feed(gzip.compress(CHAT_STREAM))
        self.assertEqual(parser.buffered_bytes, 0)
        self.assertIn("decompression failed", parser.finish().error_msg or "")


class ErrorMessageTests(SynchronousTestCase):
    """``error_msg`` for non-200 responses."""

    def test_extraction_rules(self) -> None:
        cases = [
            (b'{"error":{"message":"rate limited"}}', "rate limited"),
            (b'{"error":"bad request"}', "bad request"),
            (b'{"message":"nope"}', "nope"),
            (b'{"detail":"oops"}', "oops"),
            (b'{"error":{"message":"  padded \\n"}}', "padded"),
            (b'{"error":{"message":"   "},"message":"fallback"}', "fallback"),
            (b'{"error":{"message":"first"},"message":"second","detail":"third"}', "first"),
            (b'{"detail":[{"msg":"field required"}]}', "500 Internal Server Error"),
            (b'{"error":{"code":42}}', "500 Internal Server Error"),
            (b'{"usage":{}}', "500 Internal Server Error"),
            (b"upstream exploded", "500 Internal Server Error"),
            (b"", "500 Internal Server Error"),
        ]
        for body, expected in cases:
            self.assertEqual(error_message(500, body, JSON), expected, body)

    def test_status_text_fallback(self) -> None:
        self.assertEqual(error_message(404, b""), "404 Not Found")
        self.assertEqual(error_message(429, b"{}"), "429 Too Many Requests")
        self.assertEqual(error_message(599, b""), "HTTP 599")

    def test_truncation(self) -> None:
        exact = "e" * 500
        self.assertEqual(error_message(400, json.dumps({"error": exact}).encode()), exact)
        long = "x" * 501
        self.assertEqual(error_message(400, json.dumps({"error": long}).encode()), "x" * 500 + "...")

    def test_parser_in_error_mode(self) -> None:
        body = b'{"error":{"message":"model unavailable","type":"server_error"}}'
        result = parse(body, status=503, chunk=4)
        self.assertEqual(result, ParseResult(Tokens(), "model unavailable", False))

    def test_parser_error_mode_ignores_usage(self) -> None:
        result = parse(CHAT_JSON, status=400)
        self.assertEqual((result.parsed, result.tokens.to_json(), result.error_msg), (False, ZERO, "400 Bad Request"))

    def test_parser_error_mode_sse_and_compressed_bodies(self) -> None:
        self.assertEqual(parse(b'{"detail":"no"}', SSE, status=502).error_msg, "no")
        body = gzip.compress(b'{"error":"gz"}')
        self.assertEqual(parse(body, encoding="gzip", status=500, chunk=3).error_msg, "gz")

    def test_parser_error_mode_decode_failure(self) -> None:
        result = parse(b"not-gzip", encoding="gzip", status=500)
        self.assertTrue((result.error_msg or "").startswith("response decode failed: "))

    def test_parser_error_mode_oversized_body_falls_back_to_status(self) -> None:
        body = json.dumps({"error": "big", "pad": "x" * 100}).encode()
        self.assertEqual(parse(body, status=500, max_buffer=50).error_msg, "500 Internal Server Error")
        self.assertEqual(parse(b"", status=504).error_msg, "504 Gateway Timeout")


class HelperTests(SynchronousTestCase):
    """duration_ms and filter_accept_encoding."""

    def test_duration_rule(self) -> None:
        self.assertEqual(duration_ms(1000, Tokens()), 1000)
        self.assertEqual(duration_ms(1000, Tokens(prompt_ms=200.0, predicted_ms=1250.9)), 1450)
        self.assertEqual(duration_ms(2000, Tokens(prompt_ms=200.0, predicted_ms=1250.0)), 2000)
        self.assertEqual(duration_ms(100, parse(CHAT_JSON).tokens), 140)

    def test_filter_accept_encoding(self) -> None:
        cases = [
            (None, ""),
            ("", ""),
            ("br", ""),
            ("gzip, deflate, br, zstd", "gzip, deflate"),
            ("br;q=1.0, GZIP;q=0.5 , identity, deflate", "GZIP;q=0.5, deflate"),
            ("*", ""),
        ]
        for value, expected in cases:
            self.assertEqual(filter_accept_encoding(value), expected, value)


class MemoryBoundTests(SynchronousTestCase):
    """Buffers stay small however long the stream is."""

    def test_100mb_sse_stream_in_64k_chunks(self) -> None:
        event = sse(_chat_chunk("token "), done=False)
        chunk_size = 64 * 1024
        block = event * (chunk_size // len(event) + 2)
        tail = sse({"choices": [], "usage": {"prompt_tokens": 123, "completion_tokens": 456}})
        parser = ResponseParser(SSE, "", "/v1/chat/completions")
        fed, offset, peak = 0, 0, 0
        while fed < 100 * 1024 * 1024:
            # consecutive windows of the periodic block: boundaries fall everywhere in an event
            piece = block[offset : offset + chunk_size]
            offset = (offset + chunk_size) % len(event)
            parser.feed(piece)
            fed += len(piece)
            peak = max(peak, parser.buffered_bytes)
        parser.feed(event[offset:] + tail)  # complete the event cut by the last chunk
        self.assertLess(peak, 2 * len(event))
        result = parser.finish()
        self.assertEqual((result.tokens.input_tokens, result.tokens.output_tokens), (123, 456))

    def test_stream_with_timings_on_every_event(self) -> None:
        chunk_size = 64 * 1024
        parser = ResponseParser(SSE, "", "/v1/chat/completions")
        peak, fed, n = 0, 0, 0
        while fed < 16 * 1024 * 1024:
            events = []
            for _ in range(200):
                n += 1
                events.append(_chat_chunk("tok", timings={"prompt_n": 7, "predicted_n": n}))
            body = sse(*events, done=False)
            for i in range(0, len(body), chunk_size):
                parser.feed(body[i : i + chunk_size])
                peak = max(peak, parser.buffered_bytes)
            fed += len(body)
        self.assertLess(peak, 1024)
        self.assertEqual(parser.finish().tokens.output_tokens, n)

    def test_over_long_line_dropped_others_kept(self) -> None:
        long_line = b'data: {"usage":{"prompt_tokens":999},"pad":"' + b"x" * 5000 + b'"}\n\n'
        good = b'data: {"usage":{"completion_tokens":5}}\n\n'
        for chunk in (1, 100, 0):
            parser = ResponseParser(SSE, "", "/v1/chat/completions", max_buffer=1024)
            body = good + long_line + good
            step = chunk or len(body)
            for i in range(0, len(body), step):
                parser.feed(body[i : i + step])
                self.assertLessEqual(parser.buffered_bytes, 1024)
            tokens_ = parser.finish().tokens
            self.assertEqual((tokens_.input_tokens, tokens_.output_tokens), (0, 5), chunk)

    def test_only_usage_on_over_long_line_is_not_parsed(self) -> None:
        body = b'data: {"usage":{"prompt_tokens":999},"pad":"' + b"x" * 5000 + b'"}'
        self.assertFalse(parse(body, SSE, max_buffer=1024, chunk=64).parsed)


class LongInputTests(SynchronousTestCase):
    """Big inputs cost time linear in their size, and a big body is scanned, not parsed whole."""

    def test_long_sse_line_is_assembled_in_linear_time(self) -> None:
        import time

        usage = {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}
        pad = "p" * (8 * 1024 * 1024 - 200)
        body = sse(dict(usage, pad=pad))
        parser = ResponseParser(SSE, "", "/v1/chat/completions")
        piece = 1024  # 8,000 pieces: re-joining the line on each would copy ~32 GB
        started = time.perf_counter()
        for i in range(0, len(body), piece):
            parser.feed(body[i : i + piece])
            self.assertLessEqual(parser.buffered_bytes, 8 * 1024 * 1024)
        result = parser.finish()
        elapsed = time.perf_counter() - started
        print(f"\n8 MiB SSE line in 1 KiB pieces: {elapsed * 1000:.0f} ms")
        self.assertEqual(result.tokens.input_tokens, 7)
        self.assertEqual(result.tokens.output_tokens, 3)
        self.assertLess(elapsed, 1.5)  # linear: ~40 ms here; the old `pending += data`: ~2.4 s

    def test_big_json_body_scanned_in_steps(self) -> None:
        from llamaswap.activity import parse as parse_module

        doc = {"data": [{"embedding": [0.25] * 2000, "index": i} for i in range(300)],
               "usage": {"prompt_tokens": 11, "total_tokens": 11},
               "timings": {"prompt_n": 11, "predicted_n": 0, "prompt_ms": 5.0}}
        body = json.dumps(doc).encode()
        self.assertGreater(len(body), parse_module.SCAN_ABOVE)
        parser = ResponseParser(JSON, "", "/v1/embeddings")
        parser.feed(body)
        result, yields = drive_counting(parser.finish_steps())
        self.assertGreater(yields, 5)  # the reactor gets turns in between
        self.assertEqual(result, parse(body, path="/v1/embeddings"))
        self.patch(parse_module, "SCAN_ABOVE", 1 << 30)  # the whole-parse path agrees
        self.assertEqual(parse(body, path="/v1/embeddings"), result)
        self.assertEqual(result.tokens.input_tokens, 11)
