"""Configuration errors that name the key path and the YAML line."""

from __future__ import annotations

from typing import Any

from .yamltree import Lines, Path, format_path


class ConfigError(Exception):
    """Every problem found in a configuration, reported together."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.errors)
        head = f"{self.source}: {n} configuration error{'s' if n != 1 else ''}"
        return head + "".join(f"\n  {e}" for e in self.errors)


class Problems:
    """Collects located errors and warnings while a config is checked."""

    def __init__(self, main_source: str, lines: Lines | None = None):
        self.main_source = main_source
        self.lines: Lines = lines if lines is not None else {}
        self.errors: list[str] = []
        self._order: dict[str, tuple] = {}
        self.warnings: list[str] = []

    def locate(self, path: Path) -> str:
        p = tuple(path)
        while p not in self.lines and p:
            p = p[:-1]
        loc = self.lines.get(p)
        if not loc:
            return ""
        source, line = loc
        if source == self.main_source:
            return f" (line {line})"
        return f" ({source} line {line})"

    def _format(self, path: Path, message: str) -> str:
        name = format_path(path)
        return f"{name}{self.locate(path)}: {message}" if name else message

    def error(self, path: Path, message: str) -> None:
        text = self._format(path, message)
        if text not in self.errors:
            self.errors.append(text)
            self._order[text] = self._position(path)

    def warn(self, path: Path, message: str) -> None:
        text = self._format(path, message)
        if text not in self.warnings:
            self.warnings.append(text)

    def _position(self, path: Path) -> tuple:
        p = tuple(path)
        while p not in self.lines and p:
            p = p[:-1]
        source, line = self.lines.get(p, (self.main_source, 0))
        return (source != self.main_source, source, line)

    def raise_if_any(self) -> None:
        """Raise every error found, in file and line order."""
        if self.errors:
            ordered = sorted(self.errors, key=lambda e: self._order.get(e, (False, "", 0)))
            raise ConfigError(self.main_source, ordered)


_TYPE_NAMES = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
               (list, "a list"), (dict, "a mapping"))


def type_name(value: Any) -> str:
    """How an error message names a YAML value's type."""
    if value is None:
        return "null"
    for kind, name in _TYPE_NAMES:  # bool before int: True is an int too
        if isinstance(value, kind):
            return name
    return type(value).__name__
