"""Every wait for a remote result has a deadline.

A `ray.get` without a timeout waits forever for an actor that hangs (a stuck collective, a wedged
engine), and the run hangs with it instead of failing and restarting. The project waits through
one helper, `actors.group.ray_get(timeout_s, role=refs)`, which names the role and ranks that do
not answer; any other `ray.get(...)` in actors/, recipes/ or bench/ must pass `timeout=`. This
scans the source (AST, so comments and docstrings do not count) and names every offender.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("actors", "recipes", "bench")
HELPER = ("actors/group.py", "ray_get")  # the one function allowed its own ray.get
# Files another branch owns at the time of writing; remove each entry once that branch routes its
# waits through ray_get (the lead merges both). Nothing else may be added here.
NOT_YET: set[str] = set()  # files still to convert (none)


def is_ray_get(call: ast.Call) -> bool:
    f = call.func
    return isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Name) and f.value.id == "ray"


def unbounded_calls(source: str, path: str) -> list[str]:
    """'path:line' of each `ray.get(...)` without a timeout keyword, outside the helper."""
    tree = ast.parse(source)
    allowed: set[int] = set()
    if path == HELPER[0]:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == HELPER[1]:
                allowed |= {id(n) for n in ast.walk(node)}
    return [
        f"{path}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and is_ray_get(node)
        and id(node) not in allowed
        and not any(k.arg == "timeout" for k in node.keywords)
    ]


def test_no_ray_get_without_a_timeout_outside_the_helper():
    found = []
    for folder in SCANNED:
        for file in sorted((ROOT / folder).rglob("*.py")):
            rel = file.relative_to(ROOT).as_posix()
            if any(part.startswith(".") for part in file.relative_to(ROOT).parts):
                continue  # a virtual environment (bench/.trl-venv, made by bench/setup_trl.sh): not our code
            if rel not in NOT_YET:
                found += unbounded_calls(file.read_text(), rel)
    assert not found, (
        "ray.get without a deadline (use actors.group.ray_get(timeout_s, role=refs), or pass timeout=): "
        + ", ".join(found)
    )


def test_the_scan_finds_what_it_must():
    source = (
        "import ray\n"
        "x = ray.get(ref)\n"  # line 2: unbounded
        "y = ray.get(ref, timeout=5)\n"
        "# ray.get(ref) in a comment\n"
        "def ray_get(t, **refs):\n"
        "    return ray.get(refs)\n"  # line 6: only allowed inside the helper's own file
        "z = [ray.get(r) for r in refs]\n"  # line 7
    )
    assert unbounded_calls(source, "actors/other.py") == ["actors/other.py:2", "actors/other.py:6", "actors/other.py:7"]
    assert unbounded_calls(source, HELPER[0]) == ["actors/group.py:2", "actors/group.py:7"]


def test_the_helper_exists_and_requires_a_deadline():
    tree = ast.parse((ROOT / HELPER[0]).read_text())
    (helper,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == HELPER[1]]
    first = helper.args.args[0]
    assert first.arg == "timeout_s" and not helper.args.defaults  # no default: every caller names a deadline
