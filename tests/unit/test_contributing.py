"""CONTRIBUTING.md's worked example is real code: every Python block in it is in the tree, verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("rlhf/algos/advantages.py", "tests/unit/test_advantages.py")


def test_every_python_block_of_contributing_is_in_the_tree():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2  # the estimator and its test
    sources = {path: (ROOT / path).read_text() for path in SOURCES}
    for block in blocks:
        found = [path for path, source in sources.items() if block in source]
        assert found, f"this CONTRIBUTING.md block is not in {SOURCES} (copy the code again):\n{block}"
