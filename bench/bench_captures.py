"""Capture-store benchmark: plain per-capture zstd (llama-swap) vs chained segments.

Run from the repository root: ``python bench/bench_captures.py [--quick]``.
Every scheme sees the same captures in the same run; add/get times are the
best of ``--repeat`` passes (mean per capture, and the slowest single add/get).
``add`` includes CBOR encoding; ``get`` includes decoding back to a ``Capture``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zstandard  # noqa: E402

from llamaswap.activity.captures import Capture, CaptureStore  # noqa: E402
from tests.test_captures import agentic_conversation, build_all, interleaved_conversations  # noqa: E402


class PlainStore:
    """llama-swap's scheme: CBOR, then zstd on each capture alone (no eviction needed here)."""

    def __init__(self, level: int) -> None:
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._dctx = zstandard.ZstdDecompressor()
        self._items: dict[int, bytes] = {}
        self.raw = 0

    def add(self, cap: Capture) -> bool:
        raw = cap.encode()
        self.raw += len(raw)
        self._items[cap.id] = self._cctx.compress(raw)
        return True

    def get(self, cid: int) -> Optional[Capture]:
        return Capture.decode(self._dctx.decompress(self._items[cid]))

    def stats(self) -> dict:
        stored = sum(map(len, self._items.values()))
        return {"count": len(self._items), "stored_bytes": stored, "raw_bytes": self.raw,
                "ratio": self.raw / stored}


class RawDictStore:
    """Rejected alternative: per capture, a raw-content dictionary from the last ``window`` raw bytes."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._history = bytearray()
        self._params = zstandard.ZstdCompressionParameters.from_level(3, window_log=23)
        self._items: dict[int, bytes] = {}
        self.raw = 0

    def add(self, cap: Capture) -> bool:
        raw = cap.encode()
        self.raw += len(raw)
        if self._history:
            d = zstandard.ZstdCompressionDict(bytes(self._history[-self.window:]),
                                              dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            cctx = zstandard.ZstdCompressor(dict_data=d, compression_params=self._params)
        else:
            cctx = zstandard.ZstdCompressor(level=3)
        self._items[cap.id] = cctx.compress(raw)
        self._history += raw
        del self._history[:-self.window]
        return True

    get = None  # decoding needs the chain of earlier captures; not measured

    def stats(self) -> dict:
        stored = sum(map(len, self._items.values()))
        return {"count": len(self._items), "stored_bytes": stored, "raw_bytes": self.raw,
                "ratio": self.raw / stored}


def measure(make: Callable[[], object], caps: list[Capture], repeat: int) -> dict:
    add_us: list[float] = []
    add_max: list[float] = []
    get_mean: list[float] = []
    get_max: list[float] = []
    stats: dict = {}
    for _ in range(repeat):
        store = make()
        times = []
        for cap in caps:
            t0 = time.perf_counter()
            store.add(cap)  # type: ignore[attr-defined]
            times.append((time.perf_counter() - t0) * 1e6)
        add_us.append(statistics.fmean(times))
        add_max.append(max(times))
        stats = store.stats()  # type: ignore[attr-defined]
        getter = getattr(store, "get", None)
        if getter is None:
            continue
        stored_ids = [c.id for c in caps if getattr(store, "has", lambda i: True)(c.id)]
        times = []
        for cid in stored_ids:
            t0 = time.perf_counter()
            got = getter(cid)
            times.append((time.perf_counter() - t0) * 1e6)
            assert got is not None and got.id == cid
        get_mean.append(statistics.fmean(times))
        get_max.append(max(times))
    return {"stats": stats, "add_us": min(add_us), "add_max_us": min(add_max), "get_us": min(get_mean) if get_mean else None,
            "get_max_us": min(get_max) if get_max else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only the 20-turn conversation")
    args = ap.parse_args()

    scenarios = [("20-turn agent", build_all(agentic_conversation(1, 20)))]
    if not args.quick:
        scenarios += [
            ("100-turn agent", build_all(agentic_conversation(2, 100))),
            ("8 agents x 25 interleaved", build_all(interleaved_conversations(3, 8, 25))),
        ]
    big = 1 << 30
    schemes: list[tuple[str, Callable[[], object]]] = [
        ("plain zstd-3 per capture", lambda: PlainStore(3)),
        ("plain zstd-7 (~llama-swap)", lambda: PlainStore(7)),
        ("chained segments 1 MiB", lambda: CaptureStore(big, segment_bytes=1 << 20)),
        ("chained segments 2 MiB", lambda: CaptureStore(big, segment_bytes=2 << 20)),
        ("chained segments 4 MiB *", lambda: CaptureStore(big)),
        ("chained segments 8 MiB", lambda: CaptureStore(big, segment_bytes=8 << 20)),
        ("chained, 5 MiB store *", lambda: CaptureStore(5 << 20)),
        ("raw-content dict 1 MiB", lambda: RawDictStore(1 << 20)),
    ]
    print("zstandard %s (%s backend), python %s" % (zstandard.__version__, zstandard.backend,
                                                     sys.version.split()[0]))
    print("* = CaptureStore defaults (4 MiB segments); 5 MiB store = llama-swap's default captureBuffer\n")
    head = "%-26s %-28s %5s %8s %9s %7s %7s %8s %7s %8s" % (
        "scenario", "scheme", "kept", "raw MiB", "kept KiB", "ratio", "add us", "add max", "get us", "get max")
    print(head)
    print("-" * len(head))
    for name, caps in scenarios:
        for label, make in schemes:
            r = measure(make, caps, args.repeat)
            s = r["stats"]
            print("%-26s %-28s %5d %8.2f %9.1f %7.2f %7.0f %8.0f %7s %8s" % (
                name, label, s["count"], s["raw_bytes"] / 2 ** 20, s["stored_bytes"] / 1024, s["ratio"],
                r["add_us"], r["add_max_us"], "-" if r["get_us"] is None else "%.0f" % r["get_us"],
                "-" if r["get_max_us"] is None else "%.0f" % r["get_max_us"]))
        print()


if __name__ == "__main__":
    main()
