"""Request/response captures for the activity page (llama-swap's ``captures.go``).

A capture is the (masked, redacted) request and response of one inference call,
served back by ``GET /api/captures/{id}``.  Captures live in memory only, in a
byte-bounded FIFO of ``captureBuffer`` MiB (0 disables them).

Storage design: chained zstd segments
-------------------------------------
llama-swap serialises each capture with CBOR and compresses it with zstd on its
own (about 6.77:1).  Agentic traffic is far more redundant than that: every
request repeats the whole conversation so far, so most of capture *n* already
sits in capture *n-1*.  Per-capture compression cannot see that; this store
compresses each capture *against what is already stored*:

* Captures are appended to a *segment*: one zstd frame written by a single
  streaming compressor (level 3, window = segment size).  Each capture is fed
  into the stream and flushed at a block boundary (``FLUSH_BLOCK``), so its
  compressed *chunk* can back-reference the raw bytes of every earlier capture
  in the segment.  The compressor keeps its match tables incrementally, so a
  capture costs time proportional to its own size; no dictionary is rebuilt or
  re-hashed per capture.
* A segment is *closed* (its compressor dropped; a new stream starts with the
  next capture) when its raw bytes would exceed ``segment_bytes`` (default
  4 MiB) or its compressed bytes reach 1/8 of the store.  This bounds ``get``:
  decoding capture *k* replays only its own segment's chunks up to *k* (at
  most ``segment_bytes`` of output, ~1 ms; never the whole history), and it
  keeps eviction fine-grained.
* Eviction is FIFO by whole segments, oldest first: decoding needs every
  earlier chunk of its segment, so a segment's bytes are freed together.
  Nothing but the compressed chunks is needed to decode, so ``stored_bytes``
  (the sum of all chunks kept) is exactly what ``max_bytes`` bounds; the stored
  set is always the newest contiguous run of captures and every one of them
  round-trips after any eviction.  The single live streaming encoder is
  fixed-size working memory (window plus match tables, a few MiB, like
  llama-swap's pooled encoders), dropped when its segment closes and never
  needed to decode.
* A capture whose chunk alone exceeds ``max_bytes`` is skipped (``add``
  returns ``False``, nothing is evicted for it) and the stream is closed, since
  the encoder has already consumed it.  When only the open segment is left and
  the new chunk does not fit beside it, that segment is evicted and the capture
  is recompressed into a fresh one.
* Limits come first: a capture whose bodies alone are larger than the whole
  store is skipped before it is encoded or compressed at all (the recorder
  already leaves such a body out, see ``activity/recorder.py``).
* A big capture never holds the reactor: it is CBOR-encoded as pieces that
  reference the bodies (no copy) and :meth:`CaptureStore.submit` compresses
  it ``PIECE`` bytes per step, a few milliseconds each, in slices (see
  :mod:`llamaswap.steps`); captures are submitted one at a time, in order.

Measured (``bench/bench_captures.py``, synthetic agent sessions; plain = CBOR
plus zstd-3 per capture, llama-swap's scheme):

=========================  =========  =======  ===========================
traffic                    plain      chained  add per capture (plain/ours)
=========================  =========  =======  ===========================
one 20-turn session        6.2:1      32:1     ~390 / ~135 us
one 100-turn session       4.1:1      35:1     ~850 / ~215 us
8 interleaved sessions     5.8:1      19:1     ~320 / ~160 us
=========================  =========  =======  ===========================

Long matches make the chained stream *cheaper* to encode than plain zstd.
Alternatives measured: a raw-content (prefix) dictionary rebuilt per capture
from a rolling 1 MiB window reaches the same ratio on one session (higher on
100 turns, as it never restarts cold) but costs ~1.3-2.9 ms per capture and
needs an unbounded decode chain; a 110 KB dictionary trained on a session's
first 10 captures compressed its next 10 only 7.0:1.  Larger
segments trade ``get`` time for ratio (8 MiB: 51:1 on 100 turns, ~1.6 ms
worst-case ``get``; 1 MiB: 13:1).
"""

from __future__ import annotations

import base64
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import cbor2
import zstandard
from twisted.internet import defer
from twisted.logger import Logger

from ..steps import Steps, drive, run_in_slices

__all__ = [
    "CAPTURE_ALL", "CAPTURE_MASKS", "CAPTURE_NONE", "CAPTURE_REQ_ALL", "CAPTURE_REQ_BODY",
    "CAPTURE_REQ_HEADERS", "CAPTURE_RESP_ALL", "CAPTURE_RESP_BODY", "CAPTURE_RESP_HEADERS", "REDACTED", "SENSITIVE_HEADERS", "Capture",
    "CaptureStore", "build_capture", "canonical_header_name", "capture_mask",
]

_log = Logger(namespace="llamaswap.activity.captures")

CAPTURE_NONE = 0
CAPTURE_REQ_HEADERS = 1
CAPTURE_REQ_BODY = 2
CAPTURE_RESP_HEADERS = 4
CAPTURE_RESP_BODY = 8
CAPTURE_REQ_ALL = CAPTURE_REQ_HEADERS | CAPTURE_REQ_BODY
CAPTURE_RESP_ALL = CAPTURE_RESP_HEADERS | CAPTURE_RESP_BODY
CAPTURE_ALL = CAPTURE_REQ_ALL | CAPTURE_RESP_ALL

#: What is stored per request path; paths not listed store everything.
CAPTURE_MASKS: Mapping[str, int] = {
    "/v1/audio/speech": CAPTURE_REQ_HEADERS | CAPTURE_RESP_HEADERS,
    "/v1/audio/voices": CAPTURE_REQ_HEADERS | CAPTURE_RESP_ALL,
    "/v1/audio/transcriptions": CAPTURE_REQ_HEADERS | CAPTURE_RESP_ALL,
    "/v1/images/generations": CAPTURE_REQ_ALL | CAPTURE_RESP_HEADERS,
    "/v1/images/edits": CAPTURE_REQ_HEADERS | CAPTURE_RESP_HEADERS,
    "/sdapi/v1/txt2img": CAPTURE_REQ_ALL | CAPTURE_RESP_HEADERS,
    "/sdapi/v1/img2img": CAPTURE_REQ_HEADERS | CAPTURE_RESP_HEADERS,
}

REDACTED = "[REDACTED]"
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})

HeaderValue = Union[str, bytes, Iterable[Union[str, bytes]]]


def capture_mask(req_path: str) -> int:
    """The ``CAPTURE_*`` bit mask stored for ``req_path``."""
    return CAPTURE_MASKS.get(req_path, CAPTURE_ALL)


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_canonical_cache: dict[str, str] = {}


def canonical_header_name(name: Union[str, bytes]) -> str:
    """Go's ``CanonicalMIMEHeaderKey``: ``content-type`` -> ``Content-Type``.

    Names holding a byte that is not a token character are returned unchanged.
    """
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    got = _canonical_cache.get(name)
    if got is not None:
        return got
    if not name or not _TOKEN_CHARS.issuperset(name):
        return name
    got = "-".join(w[:1].upper() + w[1:].lower() for w in name.split("-"))
    if len(_canonical_cache) < 4096:
        _canonical_cache[name] = got
    return got


def _first_value(value: HeaderValue) -> Optional[str]:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, str):
        return value
    for v in value:
        return v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return None


def _single_valued(headers: Optional[Mapping[Any, HeaderValue]], drop: str = "") -> dict[str, str]:
    """Canonical names, first value of each, sensitive values redacted, ``drop`` removed."""
    out: dict[str, str] = {}
    if not headers:
        return out
    for raw_name, value in headers.items():
        name = canonical_header_name(raw_name)
        if name in out or name == drop:
            continue
        first = _first_value(value)
        if first is None:
            continue
        out[name] = REDACTED if name.lower() in SENSITIVE_HEADERS else first
    return out


@dataclass(frozen=True, slots=True)
class Capture:
    """One stored request/response pair; ``None`` marks a part not captured."""

    id: int
    req_path: str
    req_headers: Optional[dict[str, str]]
    req_body: Optional[bytes]
    resp_headers: Optional[dict[str, str]]
    resp_body: Optional[bytes]
    key_name: str = ""  # the API key's name (never the key); "" without apiKeys

    def to_json(self) -> dict[str, Any]:
        """The ``/api/captures/{id}`` object: bodies base64 (Go ``[]byte``), ``None`` -> null;
        ``key_name`` only when the request had an API key."""
        doc = {
            "id": self.id,
            "req_path": self.req_path,
            "req_headers": self.req_headers,
            "req_body": None if self.req_body is None else base64.b64encode(self.req_body).decode("ascii"),
            "resp_headers": self.resp_headers,
            "resp_body": None if self.resp_body is None else base64.b64encode(self.resp_body).decode("ascii"),
        }
        if self.key_name:
            doc["key_name"] = self.key_name
        return doc

    def encode(self) -> bytes:
        """CBOR serialisation used by :class:`CaptureStore`."""
        return b"".join(self.encoded_parts())

    def encoded_parts(self) -> list:
        """:meth:`encode` as pieces that join to it: the bodies are referenced,
        not copied, so a big capture is compressed without first being copied."""
        head = b"\x87" if self.key_name else b"\x86"  # a 7th item only when there is a key name
        parts: list = [head, cbor2.dumps(self.id), cbor2.dumps(self.req_path), cbor2.dumps(self.req_headers)]
        _body_parts(parts, self.req_body)
        parts.append(cbor2.dumps(self.resp_headers))
        _body_parts(parts, self.resp_body)
        if self.key_name:
            parts.append(cbor2.dumps(self.key_name))
        return parts

    @property
    def body_bytes(self) -> int:
        """The request plus response body sizes."""
        return len(self.req_body or b"") + len(self.resp_body or b"")

    @classmethod
    def decode(cls, data: bytes) -> "Capture":
        """Inverse of :meth:`encode`."""
        cid, path, reqh, reqb, resph, respb, *rest = cbor2.loads(data)
        return cls(cid, path, reqh, reqb, resph, respb, rest[0] if rest else "")


def _body_parts(parts: list, body: Optional[bytes]) -> None:
    """A CBOR byte string (major type 2, shortest length form, as cbor2 writes it), or null."""
    if body is None:
        parts.append(b"\xf6")
        return
    n = len(body)
    if n < 24:
        parts.append(bytes((0x40 | n,)) + body)
        return
    for head, size in ((0x58, 1), (0x59, 2), (0x5A, 4), (0x5B, 8)):
        if n < 1 << (8 * size):
            parts.append(bytes((head,)) + n.to_bytes(size, "big"))
            parts.append(body)
            return


def build_capture(id: int, req_path: str, req_headers: Optional[Mapping[Any, HeaderValue]],
                  req_body: Optional[bytes], resp_headers: Optional[Mapping[Any, HeaderValue]],
                  resp_body: Optional[bytes], key_name: str = "") -> Capture:
    """Build the capture llama-swap would store for one request.

    Applies the path's mask, makes headers single-valued (first value) with
    canonical names, redacts credentials and drops the response
    ``Content-Encoding`` (``resp_body`` must already be decoded).
    """
    mask = CAPTURE_MASKS.get(req_path, CAPTURE_ALL)
    return Capture(
        id=id,
        req_path=req_path,
        req_headers=_single_valued(req_headers) if mask & CAPTURE_REQ_HEADERS else None,
        req_body=(None if req_body is None else bytes(req_body)) if mask & CAPTURE_REQ_BODY else None,
        resp_headers=_single_valued(resp_headers, "Content-Encoding") if mask & CAPTURE_RESP_HEADERS else None,
        resp_body=(None if resp_body is None else bytes(resp_body)) if mask & CAPTURE_RESP_BODY else None,
        key_name=key_name,
    )


class _Segment:
    """The chunks of one zstd stream; chunk ``i`` decodes to capture ``ids[i]``."""

    __slots__ = ("chunks", "ids", "raw_lens", "stored", "raw")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ids: list[int] = []
        self.raw_lens: list[int] = []
        self.stored = 0
        self.raw = 0


#: Raw bytes per segment: the compressor window and the most one ``get`` decodes.
SEGMENT_BYTES = 4 << 20
#: A segment closes once its compressed bytes reach ``max_bytes // SEGMENT_FRACTION``.
SEGMENT_FRACTION = 8
COMPRESSION_LEVEL = 3
#: Raw bytes compressed per step (a few ms at level 3): see ``CaptureStore.submit``.
PIECE = 512 * 1024
#: Log the ratio after this many adds, or after ``LOG_MIN_ADDS`` if it moved by ``LOG_CHANGE``.
LOG_EVERY = 200
LOG_MIN_ADDS = 10
LOG_CHANGE = 0.2


class CaptureStore:
    """Byte-bounded FIFO of captures, each compressed against earlier ones (see module doc)."""

    def __init__(self, max_bytes: int, *, segment_bytes: int = SEGMENT_BYTES,
                 level: int = COMPRESSION_LEVEL) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.segment_bytes = max(1, int(segment_bytes))
        window_log = min(max(zstandard.WINDOWLOG_MIN, math.ceil(math.log2(self.segment_bytes))), 27)
        self._params = zstandard.ZstdCompressionParameters.from_level(level, window_log=window_log)
        self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << max(window_log, 27))
        self._segment_stored_max = max(1, self.max_bytes // SEGMENT_FRACTION)
        self._segments: deque[_Segment] = deque()
        self._index: dict[int, tuple[_Segment, int]] = {}
        self._open: Optional[_Segment] = None
        self._cobj: Any = None
        self._stored = 0
        self._raw = 0
        self._evicted = 0
        self._skipped = 0
        self._adds_since_log = 0
        self._logged_ratio = 0.0
        self._lock = defer.DeferredLock()  # submit(): one capture at a time, in order

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    # -- writing ---------------------------------------------------------------

    def _start(self) -> _Segment:
        seg = _Segment()
        self._segments.append(seg)
        self._open = seg
        self._cobj = zstandard.ZstdCompressor(compression_params=self._params).compressobj()
        return seg

    def _close(self) -> None:
        self._open = None
        self._cobj = None

    def _compress(self, parts: list) -> "Steps[Optional[bytes]]":
        """One capture's chunk, fed ``PIECE`` bytes at a time (a step each);
        None if the stream was dropped meanwhile (``clear``)."""
        cobj = self._cobj
        out = []
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), PIECE):
                piece = cobj.compress(view[start:start + PIECE])
                if piece:
                    out.append(piece)
                if len(view) > PIECE:
                    yield
                    if self._cobj is not cobj:
                        return None
        out.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        return b"".join(out)

    def _evict_oldest(self) -> None:
        seg = self._segments.popleft()
        if seg is self._open:
            self._close()
        index = self._index
        for i, cid in enumerate(seg.ids):
            loc = index.get(cid)
            if loc is not None and loc[0] is seg and loc[1] == i:
                del index[cid]
                self._evicted += 1
        self._stored -= seg.stored
        self._raw -= seg.raw

    def _drop_if_empty(self, seg: _Segment) -> None:
        if not seg.chunks and self._segments and self._segments[-1] is seg:
            self._segments.pop()

    def add(self, capture: Capture) -> bool:
        """Store ``capture``, evicting the oldest captures to fit; ``False`` if disabled or too large.

        Runs at once; :meth:`submit` does the same in slices."""
        if self._lock.locked:
            raise RuntimeError("a capture is being added in slices: use submit()")
        return drive(self._add_steps(capture))

    def submit(self, capture: Capture, clock) -> "defer.Deferred[bool]":
        """:meth:`add` in slices on ``clock`` (a reactor), one capture at a time
        in the order given: a big capture is compressed ``PIECE`` bytes per step,
        so the reactor is never held for long (a small one is added at once)."""
        return self._lock.run(run_in_slices, self._add_steps(capture), clock)

    def _add_steps(self, capture: Capture) -> "Steps[bool]":
        if self.max_bytes <= 0:
            return False
        if capture.body_bytes > self.max_bytes:
            # A body larger than the whole store: refused before any encoding or compression.
            self._skipped += 1
            _log.warn("capture {id} too large ({size} body bytes, store holds {max_bytes}), skipping",
                      id=capture.id, size=capture.body_bytes, max_bytes=self.max_bytes)
            return False
        parts = capture.encoded_parts()
        raw_len = sum(len(part) for part in parts)
        seg = self._open
        if seg is not None and (seg.raw + raw_len > self.segment_bytes or seg.stored >= self._segment_stored_max):
            self._close()
            seg = None
        if seg is None:
            seg = self._start()
        chunk = yield from self._compress(parts)
        if chunk is None:
            return False
        if len(chunk) > self.max_bytes:
            return self._skip(seg, capture, len(chunk))
        while self._stored + len(chunk) > self.max_bytes and self._segments[0] is not seg:
            self._evict_oldest()
        if self._stored + len(chunk) > self.max_bytes:
            # Only the open segment is left and the chunk refers into it: start over cold.
            self._evict_oldest()
            seg = self._start()
            chunk = yield from self._compress(parts)
            if chunk is None:
                return False
            if len(chunk) > self.max_bytes:
                return self._skip(seg, capture, len(chunk))
        old = self._index.get(capture.id)
        if old is not None:  # re-added id: the newer copy wins
            self._index.pop(capture.id)
        seg.chunks.append(chunk)
        seg.ids.append(capture.id)
        seg.raw_lens.append(raw_len)
        seg.stored += len(chunk)
        seg.raw += raw_len
        self._index[capture.id] = (seg, len(seg.chunks) - 1)
        self._stored += len(chunk)
        self._raw += raw_len
        self._maybe_log()
        return True

    def _skip(self, seg: _Segment, capture: Capture, size: int) -> bool:
        self._close()  # the encoder has consumed the capture; its stream cannot go on
        self._drop_if_empty(seg)
        self._skipped += 1
        _log.warn("capture {id} too large ({size} bytes compressed, store holds {max_bytes}), skipping",
                  id=capture.id, size=size, max_bytes=self.max_bytes)
        return False

    def _maybe_log(self) -> None:
        self._adds_since_log += 1
        n = self._adds_since_log
        if n < LOG_MIN_ADDS:
            return
        ratio = self._raw / self._stored if self._stored else 0.0
        last = self._logged_ratio
        if n >= LOG_EVERY or not last or abs(ratio - last) > LOG_CHANGE * last:
            self._adds_since_log = 0
            self._logged_ratio = ratio
            _log.info("captures: {count} stored, {raw_bytes} bytes in {stored_bytes} ({ratio:.1f}:1), "
                      "{evicted} evicted", count=len(self._index), raw_bytes=self._raw,
                      stored_bytes=self._stored, ratio=ratio, evicted=self._evicted)

    # -- reading ---------------------------------------------------------------

    def has(self, id: int) -> bool:
        """Whether capture ``id`` is stored."""
        return id in self._index

    def get(self, id: int) -> Optional[Capture]:
        """Decode capture ``id`` (replaying its segment up to it), or ``None`` if not stored."""
        loc = self._index.get(id)
        if loc is None:
            return None
        seg, i = loc
        dobj = self._dctx.decompressobj()
        chunks = seg.chunks
        for k in range(i):
            dobj.decompress(chunks[k])
        raw = dobj.decompress(chunks[i])
        if len(raw) != seg.raw_lens[i]:  # pragma: no cover - zstd always flushes whole blocks
            raise RuntimeError("capture %d: decoded %d bytes, expected %d" % (id, len(raw), seg.raw_lens[i]))
        return Capture.decode(raw)

    def ids(self) -> list[int]:
        """Stored capture ids, oldest first."""
        index = self._index
        return [cid for seg in self._segments for i, cid in enumerate(seg.ids)
                if (loc := index.get(cid)) is not None and loc[0] is seg and loc[1] == i]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, id: object) -> bool:
        return id in self._index

    def stats(self) -> dict[str, Any]:
        """``count``, ``stored_bytes``, ``raw_bytes``, ``ratio`` (raw/stored), ``max_bytes``, ``evicted``,
        plus ``segments`` and ``skipped``."""
        return {
            "count": len(self._index),
            "stored_bytes": self._stored,
            "raw_bytes": self._raw,
            "ratio": (self._raw / self._stored) if self._stored else 0.0,
            "max_bytes": self.max_bytes,
            "evicted": self._evicted,
            "segments": len(self._segments),
            "skipped": self._skipped,
        }

    def clear(self) -> None:
        """Drop every capture (counters other than ``evicted``/``skipped`` reset)."""
        self._close()
        self._segments.clear()
        self._index.clear()
        self._stored = 0
        self._raw = 0
        self._adds_since_log = 0
        self._logged_ratio = 0.0
