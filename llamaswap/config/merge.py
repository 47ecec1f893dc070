"""``--config-dir`` merging of parsed YAML trees (reference §1).

Maps merge recursively, sequences concatenate, null yields to the other side,
differing scalars are an error, and under the identity maps (``models``,
``groups``, ``profiles``, ``selectors``, ``peers``, ``matrix`` and
``routing.router.settings.groups|matrix``) a child key defined twice is an error.
"""

from __future__ import annotations

from typing import Any, Callable

from .yamltree import Lines, Path, format_path

IDENTITY_MAPS = {
    ("models",), ("groups",), ("profiles",), ("selectors",), ("peers",), ("matrix",),
    ("routing", "router", "settings", "groups"), ("routing", "router", "settings", "matrix"),
}


def merge(
    dst: Any, dst_lines: Lines, src: Any, src_lines: Lines, report: Callable[[Path, str], None]
) -> Any:
    """Merge ``src`` into ``dst`` (both plain data); ``dst_lines`` gains src's lines."""
    return _merge(dst, dst_lines, src, src_lines, (), report)


def _merge(dst: Any, dl: Lines, src: Any, sl: Lines, path: Path, report) -> Any:
    if src is None:
        return dst
    if dst is None:
        _copy_lines(sl, dl, path)
        return src
    if isinstance(dst, dict) and isinstance(src, dict):
        for key, value in src.items():
            child = path + (key,)
            if key not in dst:
                dst[key] = value
                _copy_lines(sl, dl, child)
            elif path in IDENTITY_MAPS:
                where = sl.get(child, ("?", 0))
                report(child, f"defined again in {where[0]} line {where[1]}")
            else:
                dst[key] = _merge(dst[key], dl, value, sl, child, report)
        return dst
    if isinstance(dst, list) and isinstance(src, list):
        base = len(dst)
        for i, _ in enumerate(src):
            for p, loc in sl.items():
                if p[: len(path) + 1] == path + (i,):
                    dl[path + (base + i,) + p[len(path) + 1:]] = loc
        return dst + src
    if type(dst) is type(src) and dst == src:
        return dst
    where = sl.get(path, ("?", 0))
    report(path, f"conflicting values {dst!r} and {src!r} ({where[0]} line {where[1]}) for {format_path(path)}")
    return dst


def _copy_lines(src: Lines, dst: Lines, prefix: Path) -> None:
    n = len(prefix)
    for p, loc in src.items():
        if p[:n] == prefix:
            dst[p] = loc
