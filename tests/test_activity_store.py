"""Tests for llamaswap.activity.store and llamaswap.activity.query."""

from __future__ import annotations

import math
import time
import os
import sqlite3
import threading
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.activity.parse import Tokens
from llamaswap.activity.query import (
    SORT_COLUMNS,
    ActivityQuery,
    QueryError,
    parse_activity_query,
    parse_rfc3339,
)
from llamaswap.activity.store import ActivityEntry, ActivityStore, histogram, rfc3339

T0 = 1_750_000_000  # a whole second, so stored timestamps read back exactly


def entry(i: int, **kw: Any) -> ActivityEntry:
    """A distinct entry per ``i`` (fields vary in different orders for the sort tests)."""
    base: dict[str, Any] = dict(
        timestamp=float(T0 + (i * 7) % 10),
        model=["alpha", "beta", "gamma"][i % 3],
        req_path=["/v1/chat/completions", "/v1/messages", "/infill", "/v1/responses"][i % 4],
        resp_content_type=["application/json", "text/event-stream"][i % 2],
        resp_status_code=[200, 200, 500, 429][(i * 3) % 4],
        tokens=Tokens(
            cache_tokens=(i * 5) % 11 - 1,
            draft_tokens=(i * 3) % 7 - 1,
            draft_acc_tokens=i % 3,
            input_tokens=(i * 13) % 17,
            output_tokens=(i * 11) % 19,
            prompt_per_second=float((i * 37) % 23) - 1,
            tokens_per_second=float((i * 29) % 31) / 2,
        ),
        duration_ms=(i * 53) % 97,
        key_name=["", "team-b", "team-a"][(i * 2) % 3],
    )
    base.update(kw)
    return ActivityEntry(**base)


def args(**kw: Any) -> dict[str, list[str]]:
    return {k: v if isinstance(v, list) else [str(v)] for k, v in kw.items()}


class StoreTestMixin:
    """Start a store on the real reactor and close it on cleanup."""

    addCleanup: Callable[..., None]

    @inlineCallbacks
    def open_store(self, path: str | None = None, **kw: Any) -> Any:
        store = ActivityStore(reactor, path, **kw)
        yield store.start()
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def filled(self, n: int = 12, **kw: Any) -> Any:
        store = yield self.open_store(**kw)
        self.entries = {}
        for i in range(1, n + 1):
            e = entry(i)
            e.id = yield store.add(e)
            self.entries[e.id] = e
        return store

    @inlineCallbacks
    def ids(self, store: ActivityStore, **params: Any) -> Any:
        page = yield store.query(parse_activity_query(args(**params)))
        return [row["id"] for row in page["data"]]


class RoundTripTests(StoreTestMixin, TestCase):
    """Insert, read back, JSON shape, has_capture overlay."""

    @inlineCallbacks
    def test_insert_and_query_round_trip(self) -> None:
        store = yield self.open_store()
        e = ActivityEntry(
            timestamp=T0 + 0.75,
            model="qwen",
            req_path="/v1/chat/completions",
            resp_content_type="text/event-stream",
            resp_status_code=200,
            tokens=Tokens(5, 8, 6, 20, 10, 493.8, 99.75, prompt_ms=40.0, predicted_ms=100.0),
            duration_ms=1234,
            metadata={"selector": "warm", "fifo_priority": "3"},
        )
        ident = yield store.add(e)
        self.assertEqual(ident, 1)
        page = yield store.query(ActivityQuery())
        self.assertEqual(
            page,
            {
                "data": [
                    {
                        "id": 1,
                        "timestamp": rfc3339(T0),
                        "model": "qwen",
                        "req_path": "/v1/chat/completions",
                        "resp_content_type": "text/event-stream",
                        "resp_status_code": 200,
                        "tokens": {
                            "cache_tokens": 5,
                            "draft_tokens": 8,
                            "draft_acc_tokens": 6,
                            "input_tokens": 20,
                            "output_tokens": 10,
                            "prompt_per_second": 493.8,
                            "tokens_per_second": 99.75,
                        },
                        "duration_ms": 1234,
                        "has_capture": False,
                        "metadata": {"fifo_priority": "3", "selector": "warm"},
                    }
                ],
                "page": 1,
                "limit": 25,
                "total": 1,
                "total_pages": 1,
            },
        )

    @inlineCallbacks
    def test_error_msg_round_trip_and_omission(self) -> None:
        store = yield self.open_store()
        yield store.add(entry(1, error_msg="model unavailable", resp_status_code=503))
        yield store.add(entry(2, error_msg=None, metadata={}))
        page = yield store.query(ActivityQuery(order="asc"))
        first, second = page["data"]
        self.assertEqual(first["error_msg"], "model unavailable")
        self.assertNotIn("error_msg", second)
        self.assertNotIn("metadata", second)

    @inlineCallbacks
    def test_zero_timestamp_means_now(self) -> None:
        store = yield self.open_store()
        yield store.add(ActivityEntry(model="m"))
        page = yield store.query(ActivityQuery())
        stamp = parse_rfc3339(page["data"][0]["timestamp"]).timestamp()
        self.assertLess(abs(stamp - time.time()), 5)

    @inlineCallbacks
    def test_has_capture_hook(self) -> None:
        store = yield self.filled(4)
        page = yield store.query(ActivityQuery(order="asc"))
        self.assertEqual([r["has_capture"] for r in page["data"]], [False] * 4)
        store.has_capture = lambda ident: ident % 2 == 0
        page = yield store.query(ActivityQuery(order="asc"))
        self.assertEqual([r["has_capture"] for r in page["data"]], [False, True, False, True])
        page = yield store.query(ActivityQuery(order="asc"), has_capture=lambda ident: ident == 1)
        self.assertEqual([r["has_capture"] for r in page["data"]], [True, False, False, False])

    @inlineCallbacks
    def test_has_capture_hook_runs_on_reactor_thread(self) -> None:
        store = yield self.filled(2)
        threads = []
        yield store.query(ActivityQuery(), has_capture=lambda ident: threads.append(threading.current_thread()) or False)
        self.assertEqual(threads, [threading.main_thread()] * 2)

    @inlineCallbacks
    def test_values_bound_not_formatted(self) -> None:
        store = yield self.filled(3)
        ids = yield self.ids(store, model="alpha' OR '1'='1")
        self.assertEqual(ids, [])
        ids = yield self.ids(store, model="alpha); DROP TABLE activity; --")
        self.assertEqual(ids, [])
        page = yield store.query(ActivityQuery())
        self.assertEqual(page["total"], 3)


class FilterTests(StoreTestMixin, TestCase):
    """Every filter, alone and combined."""

    @inlineCallbacks
    def test_model_filters(self) -> None:
        store = yield self.filled()
        alpha = sorted((i for i, e in self.entries.items() if e.model == "alpha"), reverse=True)
        ids = yield self.ids(store, model="alpha")
        self.assertEqual(ids, alpha)
        both = sorted((i for i, e in self.entries.items() if e.model in ("alpha", "gamma")), reverse=True)
        ids = yield self.ids(store, model=["alpha", " gamma ", ""])
        self.assertEqual(ids, both)
        ids = yield self.ids(store, model="nobody")
        self.assertEqual(ids, [])

    @inlineCallbacks
    def test_time_range_inclusive(self) -> None:
        store = yield self.filled()
        start, end = rfc3339(T0 + 2), rfc3339(T0 + 5)
        expected = sorted((i for i, e in self.entries.items() if T0 + 2 <= e.timestamp <= T0 + 5), reverse=True)
        self.assertTrue(expected)
        ids = yield self.ids(store, start=start, end=end)
        self.assertEqual(ids, expected)
        ids = yield self.ids(store, start=rfc3339(T0 + 9))
        self.assertEqual(ids, sorted((i for i, e in self.entries.items() if e.timestamp >= T0 + 9), reverse=True))
        ids = yield self.ids(store, end=rfc3339(T0))
        self.assertEqual(ids, sorted((i for i, e in self.entries.items() if e.timestamp <= T0), reverse=True))
        ids = yield self.ids(store, start=rfc3339(T0 + 3), end=rfc3339(T0 + 3))
        self.assertEqual(ids, sorted((i for i, e in self.entries.items() if e.timestamp == T0 + 3), reverse=True))

    @inlineCallbacks
    def test_time_filter_with_zone_offset(self) -> None:
        store = yield self.filled()
        ids = yield self.ids(store, start="2025-06-15T17:06:42+02:00", end="2025-06-15T15:06:44Z")
        expected = [i for i, e in self.entries.items() if T0 + 2 <= e.timestamp <= T0 + 4]
        self.assertEqual(ids, sorted(expected, reverse=True))

    @inlineCallbacks
    def test_id_range_inclusive(self) -> None:
        store = yield self.filled()
        ids = yield self.ids(store, min_id=3, max_id=6)
        self.assertEqual(ids, [6, 5, 4, 3])
        ids = yield self.ids(store, min_id=11)
        self.assertEqual(ids, [12, 11])
        ids = yield self.ids(store, max_id=2)
        self.assertEqual(ids, [2, 1])
        ids = yield self.ids(store, min_id=5, max_id=5)
        self.assertEqual(ids, [5])

    @inlineCallbacks
    def test_filters_combine(self) -> None:
        store = yield self.filled()
        expected = sorted(
            (i for i, e in self.entries.items() if e.model in ("beta", "gamma") and 2 <= i <= 10 and e.timestamp >= T0 + 3),
            reverse=True,
        )
        ids = yield self.ids(store, model=["beta", "gamma"], min_id=2, max_id=10, start=rfc3339(T0 + 3))
        self.assertEqual(ids, expected)
        page = yield store.query(parse_activity_query(args(model=["beta", "gamma"], min_id=2, max_id=10, start=rfc3339(T0 + 3))))
        self.assertEqual(page["total"], len(expected))


class SortTests(StoreTestMixin, TestCase):
    """Every sort column, both directions, with the id tie-breaker."""

    KEYS: dict[str, Callable[[ActivityEntry], Any]] = {
        "id": lambda e: e.id,
        "time": lambda e: e.timestamp,
        "model": lambda e: e.model,
        "req_path": lambda e: e.req_path,
        "resp_status_code": lambda e: e.resp_status_code,
        "resp_content_type": lambda e: e.resp_content_type,
        "cached": lambda e: e.tokens.cache_tokens,
        "prompt": lambda e: e.tokens.input_tokens,
        "generated": lambda e: e.tokens.output_tokens,
        "drafted": lambda e: e.tokens.draft_tokens,
        "prompt_speed": lambda e: e.tokens.prompt_per_second,
        "gen_speed": lambda e: e.tokens.tokens_per_second,
        "duration": lambda e: e.duration_ms,
        "key": lambda e: e.key_name,
    }

    def test_every_sort_column_covered(self) -> None:
        self.assertEqual(sorted(self.KEYS), sorted(SORT_COLUMNS))

    @inlineCallbacks
    def test_every_sort_column_both_orders(self) -> None:
        store = yield self.filled(20)
        for sort, key in self.KEYS.items():
            for order in ("asc", "desc"):
                ordered = sorted(self.entries.values(), key=lambda e: (key(e), e.id), reverse=order == "desc")
                ids = yield self.ids(store, sort=sort, order=order, limit=999)
                self.assertEqual(ids, [e.id for e in ordered], (sort, order))
                if sort != "id":
                    distinct = {key(e) for e in ordered}
                    self.assertGreater(len(distinct), 1, sort)

    @inlineCallbacks
    def test_default_is_id_desc_and_order_case_insensitive(self) -> None:
        store = yield self.filled(5)
        ids = yield self.ids(store)
        self.assertEqual(ids, [5, 4, 3, 2, 1])
        ids = yield self.ids(store, order="ASC")
        self.assertEqual(ids, [1, 2, 3, 4, 5])


class PagingTests(StoreTestMixin, TestCase):
    """Pages, limits and totals."""

    @inlineCallbacks
    def test_paging_and_totals(self) -> None:
        store = yield self.filled(7)
        seen = []
        for page_no in (1, 2, 3):
            page = yield store.query(parse_activity_query(args(limit=3, page=page_no)))
            self.assertEqual(
                {k: page[k] for k in ("page", "limit", "total", "total_pages")},
                {"page": page_no, "limit": 3, "total": 7, "total_pages": 3},
            )
            seen.extend(r["id"] for r in page["data"])
        self.assertEqual(seen, [7, 6, 5, 4, 3, 2, 1])
        page = yield store.query(parse_activity_query(args(limit=3, page=4)))
        self.assertEqual((page["data"], page["total"], page["page"]), ([], 7, 4))

    @inlineCallbacks
    def test_totals_follow_filters_and_empty_store(self) -> None:
        store = yield self.open_store()
        page = yield store.query(ActivityQuery())
        self.assertEqual(page, {"data": [], "page": 1, "limit": 25, "total": 0, "total_pages": 0})
        for i in range(30):
            yield store.add(entry(i))
        page = yield store.query(ActivityQuery())
        self.assertEqual((len(page["data"]), page["total"], page["total_pages"]), (25, 30, 2))
        page = yield store.query(ActivityQuery(models=("alpha",), limit=4))
        self.assertEqual((len(page["data"]), page["total"], page["total_pages"]), (4, 10, 3))

    @inlineCallbacks
    def test_unnormalised_query_values(self) -> None:
        store = yield self.filled(3)
        page = yield store.query(ActivityQuery(limit=0, page=0))
        self.assertEqual((page["limit"], page["page"], len(page["data"])), (25, 1, 3))
        page = yield store.query(ActivityQuery(page=2**62, limit=999))
        self.assertEqual(page["data"], [])


class QueryParseTests(SynchronousTestCase):
    """parse_activity_query: defaults, values and every error message."""

    def test_defaults(self) -> None:
        self.assertEqual(parse_activity_query({}), ActivityQuery())
        self.assertEqual(
            ActivityQuery(),
            ActivityQuery(models=(), start=None, end=None, min_id=0, max_id=0, limit=25, page=1, sort="id", order="desc"),
        )

    def test_values(self) -> None:
        q = parse_activity_query(
            args(
                model=["a", "b"],
                start="2025-06-15T15:06:40Z",
                end="2025-06-15T15:06:41.5+00:00",
                min_id=" 2 ",
                max_id="9",
                limit=999,
                page=3,
                sort="gen_speed",
                order="Asc",
            )
        )
        self.assertEqual(
            q,
            ActivityQuery(("a", "b"), float(T0), T0 + 1.5, 2, 9, 999, 3, "gen_speed", "asc"),
        )

    def test_bytes_args_like_twisted_request(self) -> None:
        q = parse_activity_query({b"model": [b"x", b"y"], b"limit": [b"5"], b"sort": [b"duration"]})
        self.assertEqual((q.models, q.limit, q.sort), (("x", "y"), 5, "duration"))

    def test_first_value_wins_for_scalars_and_blank_means_default(self) -> None:
        q = parse_activity_query(args(limit=["7", "bad"], page=[""], sort=["  "], order=[""]))
        self.assertEqual((q.limit, q.page, q.sort, q.order), (7, 1, "id", "desc"))

    def test_errors(self) -> None:
        cases = [
            (args(limit=0), "limit must be between 1 and 999"),
            (args(limit=1000), "limit must be between 1 and 999"),
            (args(limit=-3), "limit must be between 1 and 999"),
            (args(limit="ten"), "invalid limit"),
            (args(limit="1.5"), "invalid limit"),
            (args(limit="99999999999999999999"), "invalid limit"),
            (args(page=0), "page must be >= 1"),
            (args(page="x"), "page must be >= 1"),
            (args(sort="ts_created"), "invalid sort column"),
            (args(sort="id; DROP TABLE activity"), "invalid sort column"),
            (args(order="up"), "order must be asc or desc"),
            (args(start="yesterday"), "invalid 'start' timestamp, use RFC3339 format"),
            (args(start="2025-06-15"), "invalid 'start' timestamp, use RFC3339 format"),
            (args(end="2025-06-15T15:06:40"), "invalid 'end' timestamp, use RFC3339 format"),
            (args(end="2025-13-15T15:06:40Z"), "invalid 'end' timestamp, use RFC3339 format"),
            (args(start="2025-06-15T15:06:41Z", end="2025-06-15T15:06:40Z"), "start must be before end"),
            (args(min_id=0), "min_id must be >= 1"),
            (args(max_id="-1"), "max_id must be >= 1"),
            (args(max_id="abc"), "max_id must be >= 1"),
            (args(min_id=5, max_id=4), "min_id must be <= max_id"),
        ]
        for params, message in cases:
            with self.assertRaises(QueryError) as raised:
                parse_activity_query(params)
            self.assertEqual(raised.exception.message, message, params)
            self.assertEqual(str(raised.exception), message)

    def test_start_equal_end_allowed(self) -> None:
        q = parse_activity_query(args(start="2025-06-15T15:06:40Z", end="2025-06-15T15:06:40Z"))
        self.assertEqual(q.start, q.end)

    def test_sql_fragments_are_parameterised(self) -> None:
        q = ActivityQuery(models=("a'--", "b"), start=T0 + 0.9, end=T0 + 5.2, min_id=2, max_id=7, sort="prompt_speed", order="asc")
        where, params = q.where()
        self.assertEqual(
            where, " WHERE model_id IN (?, ?) AND ts_created >= ? AND ts_created <= ? AND id >= ? AND id <= ?"
        )
        self.assertEqual(params, ["a'--", "b", T0, T0 + 5, 2, 7])
        self.assertEqual(q.order_by(), " ORDER BY prompt_per_second ASC, id ASC")
        self.assertEqual(ActivityQuery().order_by(), " ORDER BY id DESC")
        self.assertEqual(ActivityQuery().where(), ("", []))

    def test_rfc3339_round_trip(self) -> None:
        for ts in (T0, T0 + 0.5, T0 + 0.123456):
            self.assertAlmostEqual(parse_rfc3339(rfc3339(ts)).timestamp(), ts, places=6)
        self.assertNotIn(".", rfc3339(T0))


class PruneAndPersistenceTests(StoreTestMixin, TestCase):
    """In-memory pruning and the file store."""

    @inlineCallbacks
    def test_in_memory_pruned_to_max(self) -> None:
        store = yield self.open_store(max_in_memory=5)
        self.assertTrue(store.in_memory)
        for i in range(1, 9):
            ident = yield store.add(entry(i))
            self.assertEqual(ident, i)
        page = yield store.query(ActivityQuery())
        self.assertEqual((page["total"], [r["id"] for r in page["data"]]), (5, [8, 7, 6, 5, 4]))
        stats = yield store.stats()
        self.assertEqual(stats["total_requests"], 5)

    @inlineCallbacks
    def test_file_store_persists_and_ids_continue(self) -> None:
        path = self.mktemp()
        store = ActivityStore(reactor, path, max_in_memory=2)
        self.assertFalse(store.in_memory)
        yield store.start()
        for i in range(1, 4):
            yield store.add(entry(i))
        yield store.close()
        yield store.close()  # idempotent

        with sqlite3.connect(path) as raw:
            self.assertEqual(raw.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            indexes = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        self.assertTrue({"idx_activity_created_id", "idx_activity_model_created_id"} <= indexes)

        again = yield self.open_store(path, max_in_memory=2)
        ident = yield again.add(entry(4))
        self.assertEqual(ident, 4)
        page = yield again.query(ActivityQuery(order="asc"))
        self.assertEqual([r["id"] for r in page["data"]], [1, 2, 3, 4])  # never pruned
        self.assertEqual(page["data"][0]["model"], entry(1).model)

    @inlineCallbacks
    def test_ids_not_reused_after_prune(self) -> None:
        store = yield self.open_store(max_in_memory=1)
        for _ in range(3):
            yield store.add(entry(1))
        ident = yield store.add(entry(1))
        self.assertEqual(ident, 4)

    @inlineCallbacks
    def test_lifecycle_errors(self) -> None:
        store = ActivityStore(reactor)
        yield self.assertFailure(store.add(entry(1)), RuntimeError)
        yield store.start()
        yield self.assertFailure(store.start(), RuntimeError)
        closing = store.close()
        yield self.assertFailure(store.add(entry(1)), RuntimeError)
        yield closing
        yield self.assertFailure(store.query(ActivityQuery()), RuntimeError)
        yield self.assertFailure(store.stats(), RuntimeError)

    @inlineCallbacks
    def test_start_failure_stops_the_worker(self) -> None:
        before = threading.active_count()
        store = ActivityStore(reactor, os.path.join(self.mktemp(), "missing-dir", "db.sqlite"))
        yield self.assertFailure(store.start(), sqlite3.OperationalError)
        self.assertEqual(threading.active_count(), before)
        yield store.close()

    @inlineCallbacks
    def test_close_stops_the_worker_thread(self) -> None:
        before = threading.active_count()
        store = ActivityStore(reactor)
        yield store.start()
        self.assertEqual(threading.active_count(), before + 1)
        yield store.close()
        self.assertEqual(threading.active_count(), before)

    @inlineCallbacks
    def test_pending_operations_finish_before_close(self) -> None:
        store = ActivityStore(reactor)
        yield store.start()
        adds = [store.add(entry(i)) for i in range(10)]
        closed = store.close()
        ids = []
        for d in adds:
            ident = yield d
            ids.append(ident)
        yield closed
        self.assertEqual(ids, list(range(1, 11)))


class DelayedBatchTests(StoreTestMixin, TestCase):
    """Rows go to the worker in batches (one thread hop for many requests),
    and a read never misses a row added before it."""

    @inlineCallbacks
    def test_rows_of_a_burst_go_together(self) -> None:
        store = yield self.open_store()
        hops = []
        call = store._call
        store._call = lambda job: (hops.append(job), call(job))[1]
        ids = yield gatherResults([store.add(entry(i)) for i in range(1, 21)])
        self.assertEqual(ids, list(range(1, 21)))
        self.assertEqual(len(hops), 1)  # twenty rows, one hop

    @inlineCallbacks
    def test_a_read_sees_rows_added_before_it(self) -> None:
        store = yield self.open_store()
        store.add(entry(1))
        first = yield self.ids(store)  # at once: the pending row is queued ahead of the read
        self.assertEqual(first, [1])
        store.add(entry(2))  # pending, waiting for its batch
        store._write_pending()  # a batch under way ...
        store.add(entry(3))  # ... and a row behind it
        ids = yield self.ids(store)
        self.assertEqual(ids, [3, 2, 1])
        stats = yield store.stats()
        self.assertEqual(stats["total_requests"], 3)


class StatsTests(StoreTestMixin, TestCase):
    """Totals and histograms."""

    @inlineCallbacks
    def test_totals_and_histograms_on_known_data(self) -> None:
        store = yield self.open_store()
        caches = [-1, 0, 5, 7, -1, 0, 0, 0, 0, 0]
        for i in range(10):
            yield store.add(
                ActivityEntry(
                    timestamp=T0,
                    model="a" if i < 7 else "b",
                    tokens=Tokens(
                        cache_tokens=caches[i],
                        input_tokens=i + 1,
                        output_tokens=10 * (i + 1),
                        prompt_per_second=float(i + 1),
                        tokens_per_second=42.0 if i < 3 else (-1.0 if i < 6 else 0.0),
                    ),
                )
            )
        stats = yield store.stats()
        self.assertEqual(
            {k: stats[k] for k in ("total_requests", "total_input_tokens", "total_output_tokens", "total_cache_tokens")},
            {"total_requests": 10, "total_input_tokens": 55, "total_output_tokens": 550, "total_cache_tokens": 12},
        )
        prompt = stats["prompt_histogram"]
        self.assertEqual((prompt["bins"], prompt["min"], prompt["max"]), ([2, 2, 2, 2, 2], 1.0, 10.0))
        self.assertAlmostEqual(prompt["binSize"], 1.8)
        self.assertAlmostEqual(prompt["p50"], 5.5)
        self.assertAlmostEqual(prompt["p95"], 9.55)
        self.assertAlmostEqual(prompt["p99"], 9.91)
        self.assertEqual(
            stats["gen_histogram"],
            {"bins": [3], "min": 42.0, "max": 42.0, "binSize": 0.0, "p50": 42.0, "p95": 42.0, "p99": 42.0},
        )
        by_model = yield store.stats(" b ")
        self.assertEqual((by_model["total_requests"], by_model["total_input_tokens"]), (3, 27))
        self.assertIsNone(by_model["gen_histogram"])
        self.assertEqual(by_model["prompt_histogram"]["min"], 8.0)

    @inlineCallbacks
    def test_null_histograms_without_speeds(self) -> None:
        store = yield self.open_store()
        stats = yield store.stats()
        self.assertEqual(
            stats,
            {
                "total_requests": 0,
                "total_input_tokens": 0,
                "total_output_tokens": 0,
                "total_cache_tokens": 0,
                "prompt_histogram": None,
                "gen_histogram": None,
            },
        )
        yield store.add(ActivityEntry(model="m", tokens=Tokens(input_tokens=3, prompt_per_second=-1.0)))
        yield store.add(ActivityEntry(model="m", tokens=Tokens(input_tokens=4)))
        stats = yield store.stats("m")
        self.assertEqual((stats["total_requests"], stats["total_input_tokens"]), (2, 7))
        self.assertIsNone(stats["prompt_histogram"])
        self.assertIsNone(stats["gen_histogram"])
        stats = yield store.stats("other")
        self.assertEqual(stats["total_requests"], 0)


class HistogramTests(SynchronousTestCase):
    """The pure histogram function."""

    def test_bin_count_clamped(self) -> None:
        self.assertIsNone(histogram([]))
        self.assertEqual(len(histogram([1.0, 2.0])["bins"]), 5)  # type: ignore[index]
        self.assertEqual(len(histogram([float(i) for i in range(1, 101)])["bins"]), 8)  # type: ignore[index]
        big = [float(i) for i in range(600_000)]
        data = histogram(big)
        assert data is not None
        self.assertEqual(len(data["bins"]), 20)
        self.assertEqual(sum(data["bins"]), len(big))

    def test_single_value(self) -> None:
        self.assertEqual(
            histogram([7.5]), {"bins": [1], "min": 7.5, "max": 7.5, "binSize": 0.0, "p50": 7.5, "p95": 7.5, "p99": 7.5}
        )

    def test_max_lands_in_last_bin_and_percentiles_interpolate(self) -> None:
        data = histogram([10.0, 0.0 + 1, 4.0, 2.5])
        assert data is not None
        self.assertEqual(sum(data["bins"]), 4)
        self.assertEqual(data["bins"][-1], 1)
        self.assertAlmostEqual(data["p50"], (2.5 + 4.0) / 2)
        self.assertAlmostEqual(data["p95"], 4.0 + 0.85 * 6.0)
        self.assertTrue(math.isclose(data["binSize"], 9.0 / 5))


class BatchTests(StoreTestMixin, TestCase):
    @inlineCallbacks
    def test_burst_is_written_in_batches_in_order(self):
        store = yield self.open_store(max_in_memory=30)
        jobs = []
        real_call = store._call
        store._call = lambda job: (jobs.append(job), real_call(job))[1]
        ids = yield gatherResults([store.add(entry(i)) for i in range(1, 51)])
        self.assertEqual(ids, list(range(1, 51)))
        self.assertLess(len(jobs), 10)  # one thread hop per batch, not per row
        page = yield store.query(parse_activity_query(args(limit="100")))
        self.assertEqual(page["total"], 30)  # pruned once per batch, still to the bound

    @inlineCallbacks
    def test_close_writes_what_was_added(self):
        path = self.mktemp()
        store = ActivityStore(reactor, path)
        yield store.start()
        adds = [store.add(entry(i)) for i in range(1, 6)]
        yield store.close()
        self.assertEqual((yield gatherResults(adds)), [1, 2, 3, 4, 5])
        reopened = yield self.open_store(path)
        page = yield reopened.query(parse_activity_query(args()))
        self.assertEqual(page["total"], 5)
