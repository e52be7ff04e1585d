"""docs/config.md is generated from the config models and must stay in step with them; every
field carries a description; removed keys fail with a message that says what replaced them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config import REMOVED_KEYS, ConfigError, RunConfig, load_config
from rlhf.config_docs import DOC_PATH, REGENERATE, render_reference, sections, undescribed_fields

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {
    "models": {"policy": {"path": "p"}},
    "data": {"source": "reasoning_gym:chain_sum"},
    "algorithm": {"name": "grpo"},
    "rewards": [{"kind": "reasoning_gym"}],
}


def test_docs_config_md_is_what_the_generator_writes():
    # Rendered in a fresh interpreter: other tests register test-only entries (environments,
    # rewards) in this process, which the shipped reference must not list.
    expected = subprocess.run(
        [sys.executable, "-c", "from rlhf.config_docs import render_reference; print(render_reference(), end='')"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    path = ROOT / DOC_PATH
    assert path.is_file(), f"{DOC_PATH} is missing: run `{REGENERATE}`"
    actual = path.read_text()
    if actual != expected:
        old, new = actual.splitlines(), expected.splitlines()
        line = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        pytest.fail(
            f"{DOC_PATH} is out of date with rlhf/config.py (first difference at line {line + 1}): run `{REGENERATE}`"
        )


def test_every_field_has_a_description():
    missing = undescribed_fields()
    assert not missing, (
        f"{len(missing)} config field(s) have no description; add Field(description=...) in "
        "rlhf/config.py, then run `" + REGENERATE + "`:\n  " + "\n  ".join(missing)
    )


def test_the_reference_has_one_row_per_field_of_every_model():
    tables = sections()
    models = {t.model for t in tables}
    assert len(models) == len(tables)  # a model used in several places is one table
    schema_names = set(RunConfig.model_json_schema()["$defs"])  # every nested model, found by pydantic itself
    assert {m.__name__ for m in models} == schema_names | {"RunConfig"}
    rows = [row.key for t in tables for row in t.rows]
    assert len(rows) == sum(len(m.model_fields) for m in models)
    text = render_reference()
    for key in (
        "models.<role>.path",
        "resources.<role>.gpus_per_actor",
        "rewards.<i>.kind",
        "algorithm.dpo.beta",
        "checkpoint.keep_last",
        "logging.log_every",
        "algorithm.kl.coef",
        "data.source",
    ):
        assert f"| `{key}` |" in text


def _row(text: str, key: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_rows_show_type_default_and_constraints_read_from_the_fields():
    text = render_reference()
    assert _row(text, "trainer.lr")[1:4] == ["float", "`1e-06`", "> 0"]
    assert _row(text, "rollout.top_p")[3] == "> 0; <= 1"
    assert _row(text, "data.source")[2] == "required"
    assert _row(text, "algorithm.kl.estimator")[3] == "one of: `k1`, `k2`, `k3`"
    assert _row(text, "trainer.step_timeout_s")[1:3] == ["float", "`3600.0`"]
    assert _row(text, "models.<role>.tokenizer")[1:3] == ["str or null", "`null`"]
    assert _row(text, "resources.colocate")[1] == "list of list of str"
    assert _row(text, "resources.colocate")[3] == "items: `policy`, `reference`, `reward`, `critic`, `rollout`"
    assert "&lt;task>" in _row(text, "data.source")[4]  # a bare <task> would be read as an HTML tag


@pytest.mark.parametrize(
    "override, replacement",
    [
        ("rollout.num_engines=2", "set resources.rollout.num_actors"),
        ("algorithm.reward_lm_coef=0.1", "it had no effect"),
    ],
)
def test_a_removed_key_says_what_to_do_instead(override, replacement):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], base=MINIMAL)
    assert f"{key}: this key was removed; {replacement}" in str(err.value)


def test_removed_keys_are_not_fields_and_typos_still_list_the_allowed_keys():
    for key in REMOVED_KEYS:
        section, name = key.rsplit(".", 1)
        model = RunConfig
        for part in section.split("."):
            model = model.model_fields[part].annotation
        assert name not in model.model_fields, f"{key} is listed as removed but is still a field"
    with pytest.raises(ConfigError, match=r"rollout.temprature: unknown key .*did you mean 'temperature'"):
        load_config(None, ["rollout.temprature=0.5"], base=MINIMAL)
