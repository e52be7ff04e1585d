"""Name lookup for error messages: "did you mean ...?" against the names a registry knows."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`"; did you mean 'chain_sum'?"` for the closest known name, or "" when none is close."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> str:
    """`"unknown task; did you mean 'chain_sum'?"`, or the known names when none is close (few of them)."""
    known = sorted(known)
    hint = did_you_mean(name, known)
    if not hint:
        hint = (
            f"; known: {', '.join(known)}"
            if len(known) <= 12
            else f" ({len(known)} are known, e.g. {', '.join(known[:4])})"
        )
    return f"unknown {kind}{hint}"
