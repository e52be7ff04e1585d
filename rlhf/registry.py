"""Named registries: the config names an algorithm piece, the registry finds it.

Each kind of pluggable piece (advantage estimators, KL estimators, policy losses, reward kinds)
has one `Registry`, filled by decorators next to the code they register:

    @advantage_estimator("grpo", needs_groups=True)
    def grpo(x: AdvantageInputs) -> Advantages: ...

An entry is a frozen dataclass: the name, a one-line summary (the function's docstring's first
line, shown in docs/config.md and error messages) and the properties the rest of the system reads
instead of comparing names (`needs_critic`, `needs_groups`, ...). The config validates each name
against its registry, with the project's did-you-mean errors (rlhf/names.py).

Pure Python: no torch here, so the entry types of every registry can share this one mechanism.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from rlhf.names import unknown_name


@dataclass(frozen=True)
class Entry:
    """What every registered piece has: its config name and a one-line summary."""

    name: str
    summary: str


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    """Entries of one kind by name, in registration order. `kind` names it in errors
    ("unknown advantage estimator; did you mean 'grpo'?")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, E] = {}

    def add(self, entry: E) -> E:
        """Register `entry`; a second entry with the same name is an error (a silent override
        would make the config mean different things depending on import order)."""
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def __getitem__(self, name: str) -> E:
        """The entry called `name`; ValueError with the closest known name otherwise."""
        entry = self._entries.get(name)
        if entry is None:
            raise ValueError(unknown_name(self.kind, name, self._entries))
        return entry

    def check(self, name: str) -> str:
        """`name` if registered, else ValueError (for config validators)."""
        return self[name].name

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> tuple[E, ...]:
        return tuple(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def summary_of(fn: Callable[..., object]) -> str:
    """The first line of `fn`'s docstring (what docs and errors show for an entry)."""
    doc = (fn.__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else fn.__name__
