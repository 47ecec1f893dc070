"""The top-level members of a big JSON object, found without parsing it.

A request body of tens of MiB (a base64 image, a long conversation, an
embeddings batch) would hold the reactor for tens to hundreds of milliseconds
in ``json.loads``, and again in ``json.dumps`` to re-encode it after a filter,
just to read ``model`` and ``stream``.  :func:`scan_object` instead walks the
body's structure: strings are skipped with ``bytes.find`` (C speed, no
decoding), containers by counting brackets outside strings, and nothing is
built but a list of ``(key, key_start, value_start, value_end)`` offsets of
the top-level members.  Values are parsed only when asked for
(:meth:`ObjectScan.get`), one small slice at a time.

The scan is a generator (see :mod:`llamaswap.steps`): it yields every
``STEP_BYTES`` of input or ``STEP_TOKENS`` tokens, so a 30 MiB body is read
in slices that leave the reactor free in between.

It checks the structure (strings closed, brackets balanced and matched, ``key: value``
pairs separated by commas, nothing after the object) but not every token
inside nested values, and it does not check that the bytes are UTF-8: a
malformed body that passes reaches the upstream, which rejects it, where a
full parse would have refused it here.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Optional

from .steps import Steps

__all__ = ["ObjectScan", "STEP_BYTES", "STEP_TOKENS", "scan_object"]

#: Input read between yields (bytes) and tokens handled between yields.
STEP_BYTES = 256 * 1024
STEP_TOKENS = 2000

_STRUCTURE = re.compile(rb'["\[\]{}]')
# as json.loads: NaN and +-Infinity too
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null|NaN|-?Infinity")
_WS = re.compile(rb"[ \t\r\n]*")
_QUOTE, _BACKSLASH, _COLON, _COMMA = 0x22, 0x5C, 0x3A, 0x2C
_OPEN = b"[{"
_CLOSER = {0x5B: 0x5D, 0x7B: 0x7D}


class ObjectScan:
    """Offsets of one JSON object's top-level members (see the module doc)."""

    __slots__ = ("body", "members", "_last")

    def __init__(self, body: bytes, members: list[tuple[str, int, int, int]]) -> None:
        self.body = body
        #: ``(key, key_start, value_start, value_end)`` in body order, duplicates kept
        self.members = members
        self._last = {key: (vs, ve) for key, _, vs, ve in members}  # json.loads: the last one wins

    def __contains__(self, key: str) -> bool:
        return key in self._last

    def span(self, key: str) -> Optional[tuple[int, int]]:
        """``(start, end)`` of ``key``'s value (its last occurrence), or None."""
        return self._last.get(key)

    def raw(self, key: str) -> Optional[bytes]:
        span = self._last.get(key)
        return None if span is None else self.body[span[0]:span[1]]

    def get(self, key: str, default: Any = None) -> Any:
        """``key``'s value parsed (meant for small values: ``model``, ``stream``), else ``default``."""
        raw = self.raw(key)
        if raw is None:
            return default
        try:
            return json.loads(raw)
        except ValueError:
            return default

    def rebuild(self, replace: dict[str, bytes], drop: Iterable[str] = (), append: Iterable[tuple[str, bytes]] = ()) -> bytes:
        """The object re-serialised from its members, without parsing any value:
        ``replace`` maps a key to its new encoded value (at its first occurrence;
        later duplicates are dropped), keys in ``drop`` are left out, ``append``
        adds ``(key, encoded value)`` members at the end.  Untouched members are
        copied byte for byte (whitespace between members is not kept)."""
        view = memoryview(self.body)
        drop = set(drop)
        parts: list = [b"{"]
        seen: set = set()
        for key, ks, vs, ve in self.members:
            if key in drop:
                continue
            if key in replace:
                if key in seen:
                    continue
                seen.add(key)
                parts.append(view[ks:vs])
                parts.append(replace[key])
            else:
                parts.append(view[ks:ve])
            parts.append(b",")
        for key, value in append:
            parts.append(json.dumps(key, ensure_ascii=False).encode() + b":")
            parts.append(value)
            parts.append(b",")
        if len(parts) > 1:
            parts.pop()
        parts.append(b"}")
        return b"".join(parts)  # the one copy of the body


def _decode_key(raw: bytes) -> str:
    if b"\\" in raw:
        return json.loads(b'"' + raw + b'"')
    return raw.decode("utf-8", "surrogateescape")


def _string_end(body: bytes, start: int, tokens: int):
    """Steps: ``(index of the quote closing the string opened at start, or -1;
    the token count)``, yielding every ``STEP_TOKENS`` escaped quotes."""
    find = body.find
    q = find(b'"', start + 1)
    while q >= 0:
        k = q - 1
        while body[k] == _BACKSLASH:
            k -= 1
        if not (q - 1 - k) & 1:
            break
        q = find(b'"', q + 1)
        tokens += 1
        if tokens >= STEP_TOKENS:
            tokens = 0
            yield
    return q, tokens


def scan_object(body: bytes) -> "Steps[Optional[ObjectScan]]":
    """Scan ``body``; the result is an :class:`ObjectScan`, or None when the
    body is not a (well-formed) JSON object."""
    n = len(body)
    search = _STRUCTURE.search
    ws = _WS.match
    members: list[tuple[str, int, int, int]] = []
    tokens = 0
    mark = 0

    pos = ws(body, 3 if body.startswith(b"\xef\xbb\xbf") else 0).end()  # json.loads accepts a UTF-8 BOM
    if pos >= n or body[pos] != 0x7B:
        return None
    pos = ws(body, pos + 1).end()
    if pos < n and body[pos] == 0x7D:
        pos += 1
    else:
        while True:
            # "key"
            if pos >= n or body[pos] != _QUOTE:
                return None
            key_start = pos
            q, tokens = yield from _string_end(body, pos, tokens)
            if q < 0:
                return None
            try:
                key = _decode_key(body[key_start + 1:q])
            except ValueError:
                return None
            pos = ws(body, q + 1).end()
            if pos >= n or body[pos] != _COLON:
                return None
            pos = ws(body, pos + 1).end()
            if pos >= n:
                return None
            # value
            value_start = pos
            c = body[pos]
            if c == _QUOTE or c in _OPEN:
                stack: list[int] = []  # the closing bracket each open one expects
                while True:
                    if c == _QUOTE:
                        q, tokens = yield from _string_end(body, pos, tokens)
                        if q < 0:
                            return None
                        pos = q + 1
                    elif c in _OPEN:
                        stack.append(_CLOSER[c])
                        pos += 1
                    else:
                        if not stack or stack.pop() != c:
                            return None  # mismatched: ] for { or } for [
                        pos += 1
                    if not stack:
                        break
                    tokens += 1
                    if tokens >= STEP_TOKENS or pos - mark >= STEP_BYTES:
                        tokens, mark = 0, pos
                        yield
                    # the next string or bracket, looked for a window at a time
                    while True:
                        end = min(n, pos + STEP_BYTES)
                        m = search(body, pos, end)
                        if m is not None:
                            pos = m.start()
                            c = body[pos]
                            break
                        if end >= n:
                            return None
                        pos = mark = end
                        yield
            else:
                m = _SCALAR.match(body, pos)
                if m is None:
                    return None
                pos = m.end()
            members.append((key, key_start, value_start, pos))
            tokens += 1
            if tokens >= STEP_TOKENS or pos - mark >= STEP_BYTES:
                tokens, mark = 0, pos
                yield
            pos = ws(body, pos).end()
            if pos >= n:
                return None
            c = body[pos]
            if c == _COMMA:
                pos = ws(body, pos + 1).end()
                continue
            if c == 0x7D:
                pos += 1
                break
            return None
    if ws(body, pos).end() != n:
        return None
    return ObjectScan(body, members)
