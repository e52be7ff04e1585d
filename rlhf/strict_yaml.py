"""YAML for configs: yaml.safe_load, except that a key given twice in one mapping is an error."""

from __future__ import annotations

from typing import Any

import yaml


# yaml ships no types (the types-PyYAML stubs are not installed), so its SafeLoader is Any to mypy.
class UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last,
    silently). Keys brought in by a `<<:` merge may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}  # key -> the line it was first given on
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if seen is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {seen}; YAML would keep only the last)",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        mapping: dict[Any, Any] = super().construct_mapping(node, deep)
        return mapping


def parse_yaml(text: str, name: str) -> Any:
    """YAML text -> Python values, duplicate keys refused; errors name `name` and the line."""
    loader = UniqueKeyLoader(text)
    loader.name = name  # what error marks print instead of "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
