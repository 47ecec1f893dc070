"""Macro expansion: ``${env.X}``, ``${name}``, ``${MODEL_ID}``, ``${PORT}``.

Rules (as llama-swap):

* ``${env.VAR}`` is replaced in the YAML *text* before parsing, but only for
  references outside comments; an unset variable is an error, values with a
  newline, CR or NUL are rejected, ``\\`` and ``"`` are escaped.
* Macros are an ordered list.  A value is expanded by walking the list from
  the last macro to the first, so a macro can only use macros declared before
  it.  A string that is exactly ``${name}`` takes the macro's typed value
  (int, float, bool); embedded uses are interpolated as text.
* Map keys are not expanded, except the keys of ``filters.setParamsByID``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

MACRO_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
MACRO_REF = re.compile(r"\$\{([a-zA-Z0-9_-]+)\}")
ENV_REF = re.compile(r"\$\{env\.([a-zA-Z_][a-zA-Z0-9_]*)\}")
RESERVED = ("PID", "PORT", "MODEL_ID")

MacroList = Sequence[tuple[str, Any]]


class MacroError(ValueError):
    pass


def env_references(data: Any) -> list[str]:
    """Names of every ``${env.X}`` used in the (comment-free) parsed data."""
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            found.extend(ENV_REF.findall(v))
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(data)
    return list(dict.fromkeys(found))


def substitute_env(text: str, names: Iterable[str], environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace ``${env.NAME}`` for ``names`` in ``text``; return (text, errors)."""
    errors = []
    for name in names:
        if name not in environ:
            errors.append(f"environment variable '{name}' is not set")
            continue
        value = environ[name]
        if any(c in value for c in "\n\r\x00"):
            errors.append(
                f"environment variable '{name}' contains newlines or null bytes "
                "which are not allowed in YAML substitution"
            )
            continue
        value = value.replace("\\", "\\\\").replace('"', '\\"')
        text = text.replace("${env.%s}" % name, value)
    return text, errors


def validate_macro(name: str, value: Any) -> str | None:
    """An error message for a bad macro declaration, else None."""
    if len(name) >= 64:
        return f"macro name '{name}' exceeds maximum length of 63 characters"
    if not MACRO_NAME.match(name):
        return f"macro name '{name}' contains invalid characters, must match ^[a-zA-Z0-9_-]+$"
    if name in RESERVED:
        return f"macro name '{name}' is reserved"
    if isinstance(value, str):
        if "${%s}" % name in value:
            return f"macro '{name}' contains self-reference"
    elif not isinstance(value, (bool, int, float)):
        return f"macro '{name}' has invalid type {type(value).__name__}, must be a scalar (string, int, float or bool)"
    return None


def macro_text(value: Any) -> str:
    """A macro value as interpolated text (Go ``%v`` formatting)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def expand_string(s: str, macros: MacroList) -> Any:
    for name, value in reversed(macros):
        token = "${%s}" % name
        if s == token:
            if not isinstance(value, str):
                return value
            s = value
        elif token in s:
            s = s.replace(token, macro_text(value))
    return s


def expand(value: Any, macros: MacroList) -> Any:
    """Expand macros in every string of a nested value (not in map keys)."""
    if not macros:
        return value
    if isinstance(value, str):
        return expand_string(value, macros) if "${" in value else value
    if isinstance(value, dict):
        return {k: expand(v, macros) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, macros) for v in value]
    return value


def expand_key(key: str, macros: MacroList) -> str:
    for name, value in reversed(macros):
        key = key.replace("${%s}" % name, macro_text(value))
    return key


def merge_model_macros(model_id: str, globals_: MacroList, local: MacroList) -> list[tuple[str, Any]]:
    """``MODEL_ID``, then globals, then model macros (which replace a global in place)."""
    merged = [("MODEL_ID", model_id), *globals_]
    for name, value in local:
        for i, (existing, _) in enumerate(merged):
            if existing == name:
                merged[i] = (name, value)
                break
        else:
            merged.append((name, value))
    return merged


def strip_comment_lines(cmd: str) -> str:
    """Drop lines whose trimmed text starts with ``#``."""
    return "\n".join(line for line in cmd.split("\n") if not line.strip().startswith("#"))


def leftover_macros(
    value: Any, path: tuple, report: Callable[[tuple, str], None],
    allow_pid: bool = False, already_reported: frozenset = frozenset(),
) -> None:
    """Report every ``${name}`` or ``${env.X}`` still present after expansion."""
    if isinstance(value, str):
        for name in MACRO_REF.findall(value):
            if (name == "PID" and allow_pid) or name in already_reported:
                continue
            if name == "PID":
                report(path, "macro '${PID}' is only allowed in cmdStop")
            else:
                report(path, f"unknown macro '${{{name}}}'")
        for name in ENV_REF.findall(value):
            report(path, f"environment variable '{name}' not set")
    elif isinstance(value, dict):
        for k, v in value.items():
            leftover_macros(v, path + (k,), report, allow_pid, already_reported)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            leftover_macros(v, path + (i,), report, allow_pid, already_reported)


__all__ = [
    "MacroError", "env_references", "substitute_env", "validate_macro", "expand",
    "expand_key", "merge_model_macros", "strip_comment_lines", "leftover_macros",
    "macro_text",
]
