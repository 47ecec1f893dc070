"""Typed reads from a parsed YAML mapping, reporting located errors."""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

from . import defaults as D
from .errors import Problems, type_name
from .yamltree import Path

_MISSING = object()
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> Optional[float]:
    """Go-style duration (``15s``, ``1m30s``, ``500ms``) or a number of seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        return None
    return sign * total


_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS = {name.lower(): (name, factor) for name, factor in D.SIZE_UNITS.items()}


def parse_amount(value: Any) -> Optional[tuple[float, bool]]:
    """A resource amount: ``(amount, sized)`` or None when unreadable.

    A number is taken as it is (``sized`` False); a string may carry a size
    suffix (``24GiB``, ``500 MB``; ``KB/MB/GB/TB`` are powers of 1000,
    ``KiB/MiB/GiB/TiB`` of 1024, case-insensitive), which makes it a whole
    number of bytes (``sized`` True).  Negative amounts come back negative
    (the caller reports them); unknown suffixes are None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return (value, False) if value == value else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    sign = 1
    if text.startswith("-"):
        sign, text = -1, text[1:]
    m = _AMOUNT.match(text)
    if m is None:
        return None
    number, unit = float(m.group(1)), m.group(2)
    if not unit:
        plain = int(number) if number.is_integer() else number
        return sign * plain, False
    known = _SIZE_UNITS.get(unit.lower())
    if known is None:
        return None
    return sign * int(round(number * known[1])), True


def format_amount(value: float, sized: bool) -> str:
    """``25769803776`` sized -> ``24 GiB``; unsized amounts as plain numbers."""
    if not sized:
        return f"{value:g}"
    for name in ("TiB", "GiB", "MiB", "KiB"):
        factor = D.SIZE_UNITS[name]
        if abs(value) >= factor:
            return f"{value / factor:.4g} {name}"
    return f"{value:g} B"


def glob_problem(pattern: Any) -> Optional[str]:
    """Why ``pattern`` is not a usable model glob (``*``, ``?``, ``[abc]``,
    ``[!abc]``, as ``fnmatch``), else None."""
    if isinstance(pattern, bool) or not isinstance(pattern, (str, int, float)):
        return f"must be a glob string, not {type_name(pattern)}"
    text = str(pattern)
    if not text.strip():
        return "an empty glob matches nothing"
    if any(c.isspace() for c in text):
        return f"glob {text!r} contains whitespace"
    i = 0
    while i < len(text):
        if text[i] == "[":
            end = i + 1
            if end < len(text) and text[end] == "!":
                end += 1
            if end < len(text) and text[end] == "]":  # a leading ] is a member of the set
                end += 1
            end = text.find("]", end)
            if end < 0:
                return f"glob {text!r} has a '[' without its ']'"
            i = end
        i += 1
    return None


class Fields:
    """One mapping of the config, read key by key with type checks.

    Keys that were never read are reported as warnings by ``finish`` (like
    llama-swap, unknown keys are ignored, but we say so).
    """

    def __init__(self, problems: Problems, data: Any, path: Path, what: str = "a mapping"):
        self.problems = problems
        self.path = tuple(path)
        self.read: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.error(self.path, f"must be {what}, not {type_name(data)}")
            data = {}
        self.data: dict = data

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        value = self.data.get(key, _MISSING)
        return default if value is _MISSING or value is None else value

    def at(self, key: str) -> Path:
        return self.path + (key,)

    def error(self, key: str, message: str) -> None:
        self.problems.error(self.at(key), message)

    def _typed(self, key: str, default: Any, ok, what: str) -> Any:
        value = self.raw(key, _MISSING)
        if value is _MISSING:
            return default
        if not ok(value):
            self.error(key, f"must be {what}, not {type_name(value)}")
            return default
        return value

    def int(self, key: str, default: int, minimum: Optional[int] = None) -> int:
        value = self._typed(key, default, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
        if minimum is not None and value < minimum:
            self.error(key, f"must be >= {minimum}")
            return default
        return value

    def number(self, key: str, default: float) -> float:
        return float(self._typed(
            key, default, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"))

    def bool(self, key: str, default: bool) -> bool:
        return self._typed(key, default, lambda v: isinstance(v, bool), "true or false")

    def optional_bool(self, key: str) -> Optional[bool]:
        return self._typed(key, None, lambda v: isinstance(v, bool), "true or false")

    def str(self, key: str, default: str = "", strip: bool = False) -> str:
        value = self._typed(key, default, lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
                            "a string")
        value = value if isinstance(value, str) else str(value)
        return value.strip() if strip else value

    def str_list(self, key: str) -> list[str]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            self.error(key, f"must be a list of strings, not {type_name(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                self.problems.error(self.at(key) + (i,), f"must be a string, not {type_name(item)}")
                continue
            out.append(item if isinstance(item, str) else str(item))
        return out

    def mapping(self, key: str) -> dict:
        value = self.raw(key, {})
        if not isinstance(value, dict):
            self.error(key, f"must be a mapping, not {type_name(value)}")
            return {}
        return value

    def sub(self, key: str) -> "Fields":
        self.read.add(key)
        return Fields(self.problems, self.data.get(key), self.at(key))

    def choice(self, key: str, default: str, choices: Iterable[str], lower: bool = True) -> str:
        value = self.str(key, default, strip=True)
        if lower:
            value = value.lower()
        if value not in choices:
            self.error(key, f"must be one of: {', '.join(choices)} (got {value!r})")
            return default
        return value

    def finish(self, extra_known: Iterable[str] = ()) -> None:
        known = self.read | set(extra_known)
        for key in self.data:
            if key not in known:
                self.problems.warn(self.at(key), "unknown key ignored")
