"""YAML to plain Python data, remembering the line of every value.

``parse(text, source)`` returns ``(data, lines)`` where ``lines`` maps a key
path (a tuple of mapping keys and list indexes) to ``(source, line)``; lines
are 1-based.  Paths survive macro expansion unchanged, so validation can name
the line of any value it rejects.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

Path = tuple
Lines = dict  # Path -> (source, line)


class YAMLSyntaxError(Exception):
    def __init__(self, source: str, line: int | None, message: str):
        self.source, self.line, self.message = source, line, message
        where = f" (line {line})" if line else ""
        super().__init__(f"{source}{where}: {message}")


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.2 booleans only (as llama-swap's parser): "on", "yes", "no" stay strings.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    __import__("re").compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
# timestamps stay strings: the config has no date fields
for _first in list(_Loader.yaml_implicit_resolvers):
    _Loader.yaml_implicit_resolvers[_first] = [
        (t, r) for t, r in _Loader.yaml_implicit_resolvers[_first]
        if t != "tag:yaml.org,2002:timestamp"
    ]


def parse(text: str, source: str = "config") -> tuple[Any, Lines]:
    try:
        loader = _Loader(text)
    except yaml.YAMLError as e:  # a character YAML never accepts (a NUL, ...)
        raise YAMLSyntaxError(source, None, str(e)) from None
    try:
        node = loader.get_single_node()
        lines: Lines = {}
        data = _build(loader, node, (), source, lines) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise YAMLSyntaxError(
            source, mark.line + 1 if mark else None, str(e.problem or e.context or e)
        ) from None
    except yaml.YAMLError as e:
        raise YAMLSyntaxError(source, None, str(e)) from None
    finally:
        loader.dispose()
    return data, lines


def _build(loader: _Loader, node: Any, path: Path, source: str, lines: Lines) -> Any:
    lines[path] = (source, node.start_mark.line + 1)
    if isinstance(node, ScalarNode):
        return loader.construct_object(node, deep=True)
    if isinstance(node, SequenceNode):
        return [_build(loader, child, path + (i,), source, lines) for i, child in enumerate(node.value)]
    if isinstance(node, MappingNode):
        loader.flatten_mapping(node)  # "<<" merge keys
        out: dict = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be scalars", key_node.start_mark
                )
            key = "" if key is None else (str(key).lower() if isinstance(key, bool) else str(key))
            if key in out:
                raise yaml.constructor.ConstructorError(
                    None, None, f"mapping key {key!r} already defined", key_node.start_mark
                )
            out[key] = _build(loader, value_node, path + (key,), source, lines)
        return out
    raise yaml.constructor.ConstructorError(None, None, "unsupported YAML node", node.start_mark)


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
