"""docs/config.md, the configuration reference, generated from the pydantic models of rlhf/config.py.

    python scripts/gen_config_docs.py            # rewrite docs/config.md
    python scripts/gen_config_docs.py --check    # exit 1 if it is out of date

One table per section (the models' nesting): dotted key, type, default, constraints (bounds and
choices, read from the fields themselves) and the field's description. A model used in several
places is one table whose key names the part that varies: `models.<role>.path`, `rewards.<i>.kind`.
tests/unit/test_config_docs.py keeps the file equal to `render_reference()` and every field described.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from rlhf.config import REMOVED_KEYS, ROLES, RegisteredName, RunConfig
from rlhf.registry import Registry

DOC_PATH = "docs/config.md"
REGENERATE = "python scripts/gen_config_docs.py"
BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


@dataclass
class Row:
    key: str  # dotted, with <role> / <i> where the model repeats
    owner: str  # the model class that declares the field
    field: FieldInfo


@dataclass
class Table:
    key: str  # the section's dotted key ("" at the top level)
    model: type[BaseModel]
    rows: list[Row]


# ------------------------------------------------------------------------------------- walking
def _child_models(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model a field holds, whether it holds a list of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    is_list = typing.get_origin(annotation) is list
    for arg in typing.get_args(annotation):
        model, _ = _child_models(arg)
        if model is not None:
            return model, is_list
    return None, False


def _paths(model: type[BaseModel], prefix: str, found: dict[type[BaseModel], list[str]]) -> None:
    found.setdefault(model, []).append(prefix)
    for name, field in model.model_fields.items():
        child, is_list = _child_models(field.annotation)
        if child is not None:
            _paths(child, _join(prefix, name) + (".<i>" if is_list else ""), found)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _template(paths: list[str]) -> str:
    """One key for a model found at several paths: the parts that differ become <role> (or <name>)."""
    split = [p.split(".") for p in paths]
    if len({len(s) for s in split}) != 1:
        return paths[0]
    parts = []
    for values in zip(*split):
        if len(set(values)) == 1:
            parts.append(values[0])
        else:
            parts.append("<role>" if set(values) <= set(ROLES) else "<name>")
    return ".".join(parts)


def sections(root: type[BaseModel] = RunConfig) -> list[Table]:
    """Every section of the config tree, depth first, each model once."""
    found: dict[type[BaseModel], list[str]] = {}
    _paths(root, "", found)
    tables: list[Table] = []

    def visit(model: type[BaseModel]) -> None:
        key = _template(found[model])
        rows = [Row(_join(key, name), model.__name__, field) for name, field in model.model_fields.items()]
        tables.append(Table(key, model, rows))
        for field in model.model_fields.values():
            child, _ = _child_models(field.annotation)
            if child is not None and all(t.model is not child for t in tables):
                visit(child)

    visit(root)
    return tables


def undescribed_fields(root: type[BaseModel] = RunConfig) -> list[str]:
    """`key (Class)` of every field without a description."""
    return [
        f"{row.key} ({row.owner})"
        for table in sections(root)
        for row in table.rows
        if not (row.field.description or "").strip()
    ]


# ------------------------------------------------------------------------------------ rendering
def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:  # a constrained member of a union (e.g. `Literal["auto"] | Annotated[float, ...]`)
        return _type_name(args[0])
    if origin is Literal:
        return " or ".join(sorted({type(a).__name__ for a in args}))
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        inner = _type_name(args[0])
        return f"list of {inner}s" if inner == "section" else f"list of {inner}"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _literal_choices(annotation: Any) -> tuple[list[Any], bool]:
    """(the choices of a Literal anywhere in the annotation, whether they are list items)."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation)), False
    for arg in typing.get_args(annotation):
        choices, in_list = _literal_choices(arg)
        if choices:
            return choices, in_list or typing.get_origin(annotation) is list
    return [], False


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value)}`"


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    # The factory, if any, is called (our factories take no arguments; pydantic also allows ones that
    # take the validated data, hence get_default rather than calling default_factory ourselves).
    return _value(field.get_default(call_default_factory=True, validated_data={}))


def _constraints(field: FieldInfo) -> str:
    out = []
    for item in field.metadata:
        for kind, attr, symbol in BOUNDS:
            if isinstance(item, kind):
                out.append(f"{symbol} {getattr(item, attr):g}")
    for member in typing.get_args(field.annotation):  # bounds of a union's constrained member
        if typing.get_origin(member) is Annotated:
            for item in typing.get_args(member)[1:]:
                for meta in getattr(item, "metadata", [item]):
                    for kind, attr, symbol in BOUNDS:
                        if isinstance(meta, kind):
                            out.append(f"a number {symbol} {getattr(meta, attr):g}")
    choices, in_list = _literal_choices(field.annotation)
    choices += [name for item in field.metadata if isinstance(item, RegisteredName) for name in item.registry]
    others = [
        _type_name(a)
        for a in typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) in (Union, types.UnionType)
        and typing.get_origin(a) not in (Literal, Annotated)
        and a is not type(None)
    ]
    if choices:
        out.append(("items: " if in_list else "one of: ") + ", ".join(f"`{c}`" for c in choices))
        out[-1] += "".join(f", or a {name}" for name in others)
    return "; ".join(out)


def _cell(text: str) -> str:
    """Markdown table cell: `|` escaped; `<` escaped outside code spans (else it reads as HTML)."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _table(table: Table) -> list[str]:
    title = f"`{table.key}`" if table.key else "Top level"
    doc = (table.model.__doc__ or "").strip() if table.model is not RunConfig else ""
    lines = [f"## {title}", ""]
    if doc and not doc.startswith("Base of"):
        lines += [_cell(" ".join(doc.split())), ""]
    lines += ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for row in table.rows:
        f = row.field
        lines.append(
            f"| `{row.key}` | {_cell(_type_name(f.annotation))} | {_default(f)} | {_constraints(f)} | "
            f"{_cell(f.description or '')} |"
        )
    return lines + [""]


def registered_fields(root: type[BaseModel] = RunConfig) -> list[tuple[str, Registry[Any]]]:
    """(dotted key, registry) of every field whose value names a registry entry."""
    return [
        (row.key, item.registry)
        for table in sections(root)
        for row in table.rows
        for item in row.field.metadata
        if isinstance(item, RegisteredName)
    ]


def _properties(entry: Any) -> str:
    """An entry's declared properties that are set (`needs_critic`, `remote`, ...)."""
    fields = [f.name for f in dataclasses.fields(entry) if f.name not in ("name", "summary")]
    return ", ".join(f"`{name}`" for name in fields if getattr(entry, name) is True)


def _registered(key: str, registry: Registry[Any]) -> list[str]:
    lines = [f"### `{key}` ({registry.kind})", "", "| name | what it does | declares |", "|---|---|---|"]
    lines += [f"| `{e.name}` | {_cell(e.summary)} | {_properties(e)} |" for e in registry.entries()]
    return lines + [""]


def render_reference(root: type[BaseModel] = RunConfig) -> str:
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from rlhf/config.py by `{REGENERATE}`; edit the field descriptions there. -->",
        "",
        "A run is one YAML file; any key can also be set on the command line as `dotted.key=value`",
        "(`rewards.0.weight=2` indexes the list). Unknown keys, values out of range and settings that",
        "contradict each other are errors that name the field, before any actor starts.",
        "`<role>` stands for one of " + ", ".join(f"`{r}`" for r in ROLES) + "; `<i>` for a list position.",
        "",
    ]
    for table in sections(root):
        lines += _table(table)
    if registered := registered_fields(root):
        lines += [
            "## Registered names",
            "",
            "These fields name an entry of a registry: a function registered with a decorator where it",
            "is defined (CONTRIBUTING.md shows how to add one). A name that is not registered is an error",
            "that suggests the closest one.",
            "",
        ]
        for key, registry in registered:
            lines += _registered(key, registry)
    if REMOVED_KEYS:
        lines += [
            "## Removed keys",
            "",
            "A config that still sets one of these is an error that says what to do.",
            "",
            "| key | instead |",
            "|---|---|",
        ]
        lines += [f"| `{key}` | {_cell(hint)} |" for key, hint in sorted(REMOVED_KEYS.items())]
        lines.append("")
    return "\n".join(lines)
