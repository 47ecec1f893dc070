"""The activity log: a sqlite table of finished inference requests.

Same schema and semantics as llama-swap's ``internal/store``: ``:memory:``
(pruned to the newest ``max_in_memory`` rows after every insert) unless a
file path is given, in which case the file is put in WAL mode and never
pruned, so ids continue across restarts.

Threading: sqlite is blocking, so every database call runs in ONE dedicated
worker thread -- a ``ThreadPool(1, 1)`` started by :meth:`ActivityStore.start`
and stopped by :meth:`ActivityStore.close` (or at reactor shutdown) -- via
``deferToThreadPool``.  The single worker serialises all access to the one
connection.  Public methods are called on the reactor thread and return
Deferreds; the ``has_capture`` hook is only ever called on the reactor thread.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..timefmt import format_rfc3339
from .parse import Tokens
from .query import ActivityQuery, where_clause

__all__ = ["ActivityEntry", "ActivityStore", "histogram", "rfc3339"]

_T = TypeVar("_T")
HasCapture = Callable[[int], bool]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS activity (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_created INTEGER NOT NULL,
        model_id TEXT NOT NULL,
        req_path TEXT NOT NULL DEFAULT '',
        resp_content_type TEXT NOT NULL DEFAULT '',
        resp_status_code INTEGER NOT NULL DEFAULT 0,
        cache_tokens INTEGER NOT NULL DEFAULT 0,
        draft_tokens INTEGER NOT NULL DEFAULT 0,
        draft_acc_tokens INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        prompt_per_second REAL NOT NULL DEFAULT 0,
        tokens_per_second REAL NOT NULL DEFAULT 0,
        duration_ms INTEGER NOT NULL DEFAULT 0,
        error_msg TEXT NOT NULL DEFAULT '',
        metadata_json TEXT NOT NULL DEFAULT '',
        remote_ip TEXT NOT NULL DEFAULT '',
        key_name TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS idx_activity_created_id ON activity (ts_created DESC, id DESC)",
    "CREATE INDEX IF NOT EXISTS idx_activity_model_created_id"
    " ON activity (model_id, ts_created DESC, id DESC)",
)
_COLUMNS = (
    "ts_created, model_id, req_path, resp_content_type, resp_status_code,"
    " cache_tokens, draft_tokens, draft_acc_tokens, input_tokens, output_tokens,"
    " prompt_per_second, tokens_per_second, duration_ms, error_msg, metadata_json, remote_ip, key_name"
)
_INSERT = f"INSERT INTO activity ({_COLUMNS}) VALUES ({', '.join(['?'] * 17)})"
# llamaswap addition: the client's address (stores written before it get the column)
_ADD_REMOTE_IP = "ALTER TABLE activity ADD COLUMN remote_ip TEXT NOT NULL DEFAULT ''"
# llamaswap addition: the API key's name (never the key); "" without apiKeys
_ADD_KEY_NAME = "ALTER TABLE activity ADD COLUMN key_name TEXT NOT NULL DEFAULT ''"
_KEY_INDEX = "CREATE INDEX IF NOT EXISTS idx_activity_key_created_id ON activity (key_name, ts_created DESC, id DESC)"
_SELECT = f"SELECT id, {_COLUMNS} FROM activity"
_PRUNE = "DELETE FROM activity WHERE id <= (SELECT MAX(id) FROM activity) - ?"
_TOTALS = (
    "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
    " COALESCE(SUM(CASE WHEN cache_tokens > 0 THEN cache_tokens ELSE 0 END), 0) FROM activity"
)
_SPEEDS = "SELECT prompt_per_second, tokens_per_second FROM activity"


def rfc3339(ts: float) -> str:
    """Go's ``time.Time`` JSON form in local time (see :mod:`llamaswap.timefmt`)."""
    return format_rfc3339(ts)


@dataclass
class ActivityEntry:
    """One recorded request; ``timestamp`` is the completion time (unix seconds)."""

    id: int = 0
    timestamp: float = 0.0
    model: str = ""
    req_path: str = ""
    resp_content_type: str = ""
    resp_status_code: int = 0
    tokens: Tokens = field(default_factory=Tokens)
    duration_ms: int = 0
    error_msg: str | None = None
    metadata: dict[str, str] | None = None
    remote_ip: str = ""
    key_name: str = ""

    def to_json(self, has_capture: bool = False) -> dict[str, Any]:
        """llama-swap's ActivityLogEntry JSON (``error_msg``/``metadata`` only when set)."""
        doc: dict[str, Any] = {
            "id": self.id,
            "timestamp": rfc3339(self.timestamp),
            "model": self.model,
            "req_path": self.req_path,
            "resp_content_type": self.resp_content_type,
            "resp_status_code": self.resp_status_code,
            "tokens": self.tokens.to_json(),
            "duration_ms": self.duration_ms,
            "has_capture": has_capture,
        }
        if self.error_msg:
            doc["error_msg"] = self.error_msg
        if self.metadata:
            doc["metadata"] = dict(self.metadata)
        if self.remote_ip:
            doc["remote_ip"] = self.remote_ip
        if self.key_name:
            doc["key_name"] = self.key_name
        return doc

    def to_row(self) -> tuple[Any, ...]:
        """Values for the insert, in ``_COLUMNS`` order (timestamp floored to seconds)."""
        t = self.tokens
        metadata = json.dumps(self.metadata, sort_keys=True, separators=(",", ":")) if self.metadata else ""
        return (
            math.floor(self.timestamp or time.time()), self.model, self.req_path,
            self.resp_content_type, self.resp_status_code, t.cache_tokens, t.draft_tokens,
            t.draft_acc_tokens, t.input_tokens, t.output_tokens, float(t.prompt_per_second),
            float(t.tokens_per_second), int(self.duration_ms), self.error_msg or "", metadata,
            self.remote_ip or "", self.key_name or "",
        )  # fmt: skip

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> ActivityEntry:
        """Rebuild an entry from a ``_SELECT`` row."""
        (ident, ts, model, path, ctype, status, cached, draft, draft_acc,
         inp, out, pps, tps, duration, error, metadata, remote_ip, key_name) = row  # fmt: skip
        return cls(
            id=ident,
            timestamp=float(ts),
            model=model,
            req_path=path,
            resp_content_type=ctype,
            resp_status_code=status,
            tokens=Tokens(
                cache_tokens=cached,
                draft_tokens=draft,
                draft_acc_tokens=draft_acc,
                input_tokens=inp,
                output_tokens=out,
                prompt_per_second=pps,
                tokens_per_second=tps,
            ),
            duration_ms=duration,
            error_msg=error or None,
            metadata=json.loads(metadata) if metadata else None,
            remote_ip=remote_ip or "",
            key_name=key_name or "",
        )


def _percentile(ordered: Sequence[float], p: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    rank = p / 100 * (len(ordered) - 1)
    lower, upper = math.floor(rank), math.ceil(rank)
    return ordered[lower] + (rank - lower) * (ordered[upper] - ordered[lower])


def histogram(values: Sequence[float]) -> dict[str, Any] | None:
    """llama-swap's speed histogram: Sturges bins clamped to 5..20, interpolated percentiles."""
    if not values:
        return None
    ordered = sorted(values)
    low, high = ordered[0], ordered[-1]
    doc: dict[str, Any] = {"bins": [len(ordered)], "min": low, "max": high, "binSize": 0.0}
    doc.update({f"p{p}": _percentile(ordered, p) for p in (50, 95, 99)})
    if low == high:
        return doc
    count = min(20, max(5, math.ceil(math.log2(len(ordered))) + 1))
    size = (high - low) / count
    bins = [0] * count
    for value in ordered:
        bins[min(math.floor((value - low) / size), count - 1)] += 1
    doc.update(bins=bins, binSize=size)
    return doc


# --------------------------------------------------------------------------- worker-thread jobs


def _open(path: str | None) -> sqlite3.Connection:
    conn = sqlite3.connect(path or ":memory:", timeout=5.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if path:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"enable sqlite store WAL mode: got {mode!r}")
        for statement in _SCHEMA:
            conn.execute(statement)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(activity)")}
        if "remote_ip" not in columns:
            conn.execute(_ADD_REMOTE_IP)
        if "key_name" not in columns:
            conn.execute(_ADD_KEY_NAME)
        conn.execute(_KEY_INDEX)
    except BaseException:
        conn.close()
        raise
    return conn


def _insert(conn: sqlite3.Connection, row: tuple[Any, ...], keep: int | None) -> int:
    return _insert_many(conn, [row], keep)[0]


def _insert_many(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], keep: int | None) -> list[int]:
    """Insert rows in order, in one transaction; prune once afterwards."""
    idents = []
    conn.execute("BEGIN")
    try:
        for row in rows:
            ident = conn.execute(_INSERT, row).lastrowid
            assert ident is not None
            idents.append(ident)
        if keep is not None:
            conn.execute(_PRUNE, (keep,))
        conn.execute("COMMIT")
    except BaseException:
        # sqlite may have rolled back already (a full disk does): a second
        # ROLLBACK would fail and hide the real error
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return idents


def _list(conn: sqlite3.Connection, q: ActivityQuery) -> tuple[list[ActivityEntry], int]:
    where, params = q.where()
    (total,) = conn.execute("SELECT COUNT(*) FROM activity" + where, params).fetchone()
    limit, offset = q.page_limit()
    rows = conn.execute(_SELECT + where + q.order_by() + " LIMIT ? OFFSET ?", [*params, limit, offset])
    return [ActivityEntry.from_row(row) for row in rows], total


def _stats(conn: sqlite3.Connection, model: str | None, key_names: Sequence[str] = (),
           by_key: bool = False) -> dict[str, Any]:
    where, params = where_clause([model] if model else [], key_names=key_names)
    doc = _stats_where(conn, where, params)
    if by_key:  # the same figures per API key name ("-": requests without a key)
        names = [name for (name,) in conn.execute("SELECT DISTINCT key_name FROM activity" + where, params)]
        doc["by_key"] = {}
        for name in sorted(names):
            sub, sub_params = where_clause([model] if model else [], key_names=[name], empty_key=True)
            doc["by_key"][name or "-"] = _stats_where(conn, sub, sub_params)
    return doc


def _stats_where(conn: sqlite3.Connection, where: str, params: list[Any]) -> dict[str, Any]:
    count, inp, out, cached = conn.execute(_TOTALS + where, params).fetchone()
    speeds = (" AND " if where else " WHERE ") + "(prompt_per_second > 0 OR tokens_per_second > 0)"
    prompt: list[float] = []
    gen: list[float] = []
    for pps, tps in conn.execute(_SPEEDS + where + speeds, params):
        if pps > 0:
            prompt.append(pps)
        if tps > 0:
            gen.append(tps)
    return {
        "total_requests": count,
        "total_input_tokens": inp,
        "total_output_tokens": out,
        "total_cache_tokens": cached,
        "prompt_histogram": histogram(prompt),
        "gen_histogram": histogram(gen),
    }


# --------------------------------------------------------------------------- the store


class ActivityStore:
    """Async facade over the sqlite activity table (see the module docstring on threading).

    ``path`` None or blank means ``:memory:``.  ``has_capture`` (reactor
    thread) tells :meth:`query` which ids have a capture; default: none do.
    """

    log = Logger()

    #: seconds a row may wait for others to go to the worker thread with it
    BATCH_DELAY = 0.05

    def __init__(
        self,
        reactor: Any,
        path: str | None = None,
        max_in_memory: int = 1000,
        *,
        has_capture: HasCapture | None = None,
    ) -> None:
        self._reactor = reactor
        self.path = path.strip() if path and path.strip() else None
        self.max_in_memory = max_in_memory if max_in_memory > 0 else 1000
        self.has_capture: HasCapture = has_capture or (lambda ident: False)
        self._pool: ThreadPool | None = None
        self._conn: sqlite3.Connection | None = None  # touched only by the worker thread
        self._shutdown_trigger: Any = None
        self._close_waiters: list[Deferred[None]] = []
        self._pending: list[tuple[tuple[Any, ...], Deferred[int]]] = []
        self._writing = False
        self._batch_call: Any = None  # the delayed write of the rows pending
        self._read_waiters: list[Callable[[], None]] = []  # reads waiting for pending rows to be queued

    @property
    def in_memory(self) -> bool:
        """True for the pruned ``:memory:`` store."""
        return self.path is None

    def start(self) -> Deferred[None]:
        """Start the worker thread and open/migrate the database."""
        if self._pool is not None:
            return fail(RuntimeError("activity store already started"))
        self._pool = ThreadPool(1, 1, "llamaswap-activity-store")
        self._pool.start()
        self._shutdown_trigger = self._reactor.addSystemEventTrigger("before", "shutdown", self._on_shutdown)

        def failed(reason: Failure) -> Failure:
            self._stop_pool()
            return reason

        return self._call(self._open_job).addErrback(failed)

    def add(self, entry: ActivityEntry) -> Deferred[int]:
        """Insert ``entry`` (prune the in-memory store); fires with the new id.

        Rows go to the worker thread together, at most ``BATCH_DELAY``
        seconds after the first of them (or at once when a read needs them,
        see :meth:`_read`): a busy proxy makes one thread hop per batch, not
        per request (the hop and the transaction were half the proxy's CPU
        per request).
        """
        if self._pool is None or self._close_waiters:
            return fail(RuntimeError("activity store is not running"))
        d: Deferred[int] = Deferred()
        self._pending.append((entry.to_row(), d))
        self._schedule_batch()
        return d

    def _schedule_batch(self) -> None:
        if self._pending and not self._writing and self._batch_call is None:
            self._batch_call = self._reactor.callLater(self.BATCH_DELAY, self._write_pending)

    def _read(self, job: Callable[[], _T]) -> Deferred[_T]:
        """Run a read on the worker after every row added before it (one
        worker runs jobs in order, so queuing the pending rows first is enough)."""
        if self._pool is None or self._close_waiters:
            return fail(RuntimeError("activity store is not running"))
        if self._writing and self._pending:  # queued when the batch under way is done
            d: Deferred[_T] = Deferred()
            self._read_waiters.append(lambda: self._call(job).chainDeferred(d))
            return d
        if self._pending:
            self._write_pending()
        return self._call(job)

    def _write_pending(self) -> None:
        if self._batch_call is not None:
            if self._batch_call.active():
                self._batch_call.cancel()
            self._batch_call = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        self._writing = True
        keep = self.max_in_memory if self.in_memory else None
        rows = [row for row, _ in batch]

        def written(idents: list[int]) -> None:
            for (_, d), ident in zip(batch, idents):
                d.callback(ident)

        def failed(reason: Failure) -> None:
            for _, d in batch:
                d.errback(reason)

        def next_batch(_: object) -> None:
            self._writing = False
            waiters, self._read_waiters = self._read_waiters, []
            if self._close_waiters:  # closing: rows added too late are refused
                late, self._pending = self._pending, []
                for _, d in late:
                    d.errback(RuntimeError("activity store is not running"))
            elif waiters:
                self._write_pending()  # a read waits for these rows: now, ahead of it
            else:
                self._schedule_batch()
            for waiter in waiters:
                waiter()

        self._call(lambda: _insert_many(self._connection(), rows, keep)).addCallbacks(
            written, failed).addBoth(next_batch)

    def query(self, q: ActivityQuery, has_capture: HasCapture | None = None) -> Deferred[dict[str, Any]]:
        """One page: ``{"data", "page", "limit", "total", "total_pages"}``."""
        hook = has_capture or self.has_capture
        limit, _ = q.page_limit()
        page = max(q.page, 1)

        def render(result: tuple[list[ActivityEntry], int]) -> dict[str, Any]:
            entries, total = result
            return {
                "data": [e.to_json(bool(hook(e.id))) for e in entries],
                "page": page,
                "limit": limit,
                "total": total,
                "total_pages": math.ceil(total / limit) if total else 0,
            }

        return self._read(lambda: _list(self._connection(), q)).addCallback(render)

    def stats(self, model: str | None = None, key_names: Sequence[str] = (),
              by_key: bool = False) -> Deferred[dict[str, Any]]:
        """Totals and speed histograms, optionally for one model and some API
        key names; ``by_key`` adds the same per key name (``by_key``)."""
        name = model.strip() if model else None
        keys = tuple(key_names)
        return self._read(lambda: _stats(self._connection(), name, keys, by_key))

    def close(self) -> Deferred[None]:
        """Close the connection, then stop the worker thread; idempotent, never fails."""
        if self._pool is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if not self._close_waiters and self._pending:
            self._write_pending()  # queued ahead of the close job: nothing added is lost
        self._close_waiters.append(waiter)
        if len(self._close_waiters) == 1:
            d = deferToThreadPool(self._reactor, self._pool, self._close_job)
            d.addErrback(lambda reason: self.log.failure("closing the activity store failed", reason))
            d.addBoth(self._closed)
        return waiter

    # -- internals

    def _call(self, job: Callable[[], _T]) -> Deferred[_T]:
        if self._pool is None or self._close_waiters:
            return fail(RuntimeError("activity store is not running"))
        return deferToThreadPool(self._reactor, self._pool, job)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("activity store is not open")
        return self._conn

    def _open_job(self) -> None:
        self._conn = _open(self.path)

    def _close_job(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _closed(self, _: object) -> None:
        self._stop_pool()
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _on_shutdown(self) -> Deferred[None]:
        self._shutdown_trigger = None  # firing: must not be removed any more
        return self.close()

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if pool is not None:
            pool.stop()  # the worker is idle by now, so the join is immediate
