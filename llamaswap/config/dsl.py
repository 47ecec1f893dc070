"""The swap-matrix set DSL.

Grammar (whitespace ignored, ``&`` binds tighter than ``|``)::

    or   := and ('|' and)*
    and  := atom ('&' atom)*
    atom := IDENT | '+' SETNAME | '(' or ')'
    IDENT chars: letters, digits, '_', '-', '.'

``expand_sets`` turns every set into its alternatives: the groups of models
that may run together (disjunctive normal form), in left-to-right order.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

_TOKEN = re.compile(r"\s*(?:([A-Za-z0-9_.\-/:]+)|(\+[A-Za-z0-9_.\-]*)|([&|()])|(\S))")
MAX_ALTERNATIVES = 10000


class DSLError(ValueError):
    pass


# AST: ("id", name) | ("ref", set) | ("and", [..]) | ("or", [..])
Node = tuple


def parse(expr: str) -> Node:
    tokens = _tokenize(expr)
    if not tokens:
        raise DSLError("empty expression")
    pos = 0

    def peek() -> Optional[tuple[str, str]]:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> tuple[str, str]:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        return tok

    def parse_or() -> Node:
        items = [parse_and()]
        while peek() == ("op", "|"):
            take()
            items.append(parse_and())
        return items[0] if len(items) == 1 else ("or", items)

    def parse_and() -> Node:
        items = [parse_atom()]
        while peek() == ("op", "&"):
            take()
            items.append(parse_atom())
        return items[0] if len(items) == 1 else ("and", items)

    def parse_atom() -> Node:
        tok = peek()
        if tok is None:
            raise DSLError("unexpected end of expression")
        kind, text = take()
        if kind == "id":
            return ("id", text)
        if kind == "ref":
            if len(text) < 2:
                raise DSLError("'+' must be followed by a set name")
            return ("ref", text[1:])
        if text == "(":
            inner = parse_or()
            if peek() != ("op", ")"):
                raise DSLError("missing ')'")
            take()
            return inner
        raise DSLError(f"unexpected {text!r}")

    node = parse_or()
    if pos != len(tokens):
        raise DSLError(f"unexpected {tokens[pos][1]!r}")
    return node


def _tokenize(expr: str) -> list[tuple[str, str]]:
    out = []
    for m in _TOKEN.finditer(expr):
        ident, ref, op, other = m.groups()
        if other is not None:
            raise DSLError(f"invalid character {other!r}")
        if ident is not None:
            out.append(("id", ident))
        elif ref is not None:
            out.append(("ref", ref))
        elif op is not None:
            out.append(("op", op))
    return out


Alternatives = list  # list[frozenset[str]]


def expand_sets(
    sets: Sequence[tuple[str, str]],
    resolve: Callable[[str], Optional[str]],
) -> tuple[dict[str, Alternatives], dict[str, str]]:
    """Expand ordered ``(name, dsl)`` sets.

    ``resolve`` maps an identifier (var or model id) to a model id or None.
    Returns ``(alternatives by set name, errors by set name)``.
    """
    asts: dict[str, Node] = {}
    errors: dict[str, str] = {}
    for name, expr in sets:
        try:
            asts[name] = parse(expr if isinstance(expr, str) else "")
        except DSLError as e:
            errors[name] = str(e)
    done: dict[str, Alternatives] = {}

    def expand(node: Node, stack: tuple[str, ...]) -> Alternatives:
        kind = node[0]
        if kind == "id":
            model = resolve(node[1])
            if model is None:
                raise DSLError(f"unknown var or model {node[1]!r}")
            return [frozenset([model])]
        if kind == "ref":
            ref = node[1]
            if ref in stack:
                raise DSLError("circular reference: " + " -> ".join(stack + (ref,)))
            if ref not in asts:
                if ref in errors:
                    raise DSLError(f"set '+{ref}' is invalid")
                raise DSLError(f"undefined set reference '+{ref}'")
            if ref not in done:
                done[ref] = expand(asts[ref], stack + (ref,))
            return done[ref]
        parts = [expand(child, stack) for child in node[1]]
        if kind == "or":
            out: Alternatives = []
            for p in parts:
                out.extend(p)
        else:
            out = [frozenset()]
            for p in parts:
                out = [a | b for a in out for b in p]
                if len(out) > MAX_ALTERNATIVES:
                    raise DSLError(f"expands to more than {MAX_ALTERNATIVES} alternatives")
        unique: Alternatives = []
        for alt in out:
            if alt not in unique:
                unique.append(alt)
        return unique

    for name, _ in sets:
        if name in errors or name in done:
            continue
        try:
            done[name] = expand(asts[name], (name,))
        except DSLError as e:
            errors[name] = str(e)
    return {n: done[n] for n, _ in sets if n in done and n not in errors}, errors


