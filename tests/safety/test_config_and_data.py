"""Attacks on the config and the data: each is a clear error before any actor starts (exit 2,
naming the field, file, row or line), or a bad row that is counted; nothing is silently lost."""

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf.config import ConfigError, DataConfig, load_config, validate_config
from rlhf.data.sources import DataError, UnreadableRow, load_prompts, load_rows
from rlhf.preflight import check_before_start, python_function_problem

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
RL = {
    "models": {"policy": {"path": "smollm2-135m-instruct"}},
    "data": {"source": "reasoning_gym:chain_sum"},
    "algorithm": {"name": "grpo"},
    "rewards": [{"kind": "reasoning_gym"}],
}


def config_error(path=None, overrides=(), base=RL) -> str:
    with pytest.raises(ConfigError) as err:
        cfg = load_config(path, list(overrides), base=base)
        check_before_start(cfg)
    return str(err.value)


# ------------------------------------------------------------------------- duplicate keys
def test_duplicate_key_in_the_config_file_names_key_and_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "models:\n  policy: {path: p}\ndata: {source: imdb}\n"
        "trainer:\n  lr: 1.0e-6\n  total_steps: 5\n  lr: 1.0e-3\nalgorithm: {name: sft}\n"
    )
    text = config_error(path)
    assert "duplicate key 'lr' (first given on line 5" in text and "line 7" in text and str(path) in text


def test_duplicate_key_in_a_flow_mapping_and_in_an_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(RL) + "rollout: {temperature: 1.0, temperature: 0.0}\n")
    assert "duplicate key 'temperature'" in config_error(path)
    assert "duplicate key 'min_terms'" in config_error(None, ["data.task_kwargs={min_terms: 1, min_terms: 3}"])
    assert "not valid YAML" in config_error(None, ["rollout.stop=[a"])  # was an uncaught yaml traceback


def test_yaml_merge_keys_may_still_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(RL) + "x: &t {lr: 1.0e-6, total_steps: 5}\ntrainer: {<<: *t, lr: 2.0e-6}\n")
    text = config_error(path)  # the only problem left is the unknown top-level key x
    assert "x: unknown key" in text and "duplicate" not in text


# ------------------------------------------------------------------------ non-finite numbers
@pytest.mark.parametrize(
    "override, where",
    [
        ("trainer.lr=inf", "trainer.lr"),
        ("trainer.lr=.inf", "trainer.lr"),
        ("trainer.lr=.nan", "trainer.lr"),
        ("trainer.lr=nan", "trainer.lr"),
        ("rewards.0.weight=-.inf", "rewards.0.weight"),
        ("algorithm.kl.coef=.nan", "algorithm.kl.coef"),
        ("trainer.step_timeout_s=.inf", "trainer.step_timeout_s"),
        ("rollout.top_p=.nan", "rollout.top_p"),
        ("resources.policy.cpus_per_actor=.inf", "resources.policy.cpus_per_actor"),
    ],
)
def test_non_finite_overrides_are_refused_with_the_field_path(override, where):
    text = config_error(None, [override])
    assert f"{where} = " in text and "finite number" in text, text


def test_non_finite_in_the_file_and_in_free_form_task_kwargs(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(RL) + "trainer: {lr: .inf, grad_clip: .nan}\n")
    text = config_error(path)
    assert "trainer.lr = inf" in text and "trainer.grad_clip = nan" in text
    text = config_error(None, ["data.task_kwargs={max_value: .inf, levels: [1, .nan]}"])
    assert "data.task_kwargs: not a finite number: max_value = inf, levels.1 = nan" in text


def test_assignment_refuses_non_finite_too():
    cfg = validate_config(RL)
    with pytest.raises(ValueError, match="finite number"):
        cfg.trainer.lr = float("inf")


def test_overrides_leave_the_base_dict_alone():
    base = json.loads(json.dumps(RL))
    load_config(None, ["rewards.0.weight=3", "data.seed=5"], base=base)
    assert base == RL


# ----------------------------------------------------------------------------------- names
def test_misspelt_reward_kind_and_config_key_get_did_you_mean():
    assert "did you mean 'reasoning_gym'?" in config_error(None, ["rewards.0.kind=reasoning-gym"])
    text = config_error(None, ["trainer.learning_rat=1"])
    assert "trainer.learning_rat: unknown key" in text


def test_misspelt_reasoning_gym_task_and_task_option():
    text = config_error(None, ["data.source=reasoning_gym:chain_summ"])
    assert "data.source = 'reasoning_gym:chain_summ': unknown reasoning-gym task; did you mean 'chain_sum'?" in text
    text = config_error(None, ["data.eval_source=reasoning_gym:basic_arithmetc"])
    assert "data.eval_source" in text and "did you mean 'basic_arithmetic'?" in text
    text = config_error(None, ["data.task_kwargs={min_term: 2}"])
    assert "chain_sum has no option 'min_term'; did you mean 'min_terms'?" in text
    assert "min_terms must be positive" in config_error(None, ["data.task_kwargs={min_terms: 0}"])
    # the data loader says the same to code that loads data without the pre-flight
    with pytest.raises(DataError, match="did you mean 'chain_sum'"):
        load_prompts(DataConfig(source="reasoning_gym:chain_summ"))


def test_python_reward_checked_without_running_it(tmp_path):
    reward = tmp_path / "reward.py"
    marker = tmp_path / "ran"
    reward.write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef length_reward(completions, samples):\n"
        "    return [len(c) for c in completions]\n"
    )
    ok = {**RL, "rewards": [{"kind": "python", "function": f"{reward}:length_reward"}]}
    check_before_start(load_config(None, base=ok))
    text = config_error(None, [f"rewards.0.function={reward}:length_rewrd"], base=ok)
    assert f"rewards.0.function = '{reward}:length_rewrd'" in text and "did you mean 'length_reward'?" in text
    assert "does not exist" in config_error(None, [f"rewards.0.function={tmp_path}/rewards.py:length_reward"], base=ok)
    assert not marker.exists()  # the file was parsed, never executed
    reward.write_text("def broken(:\n")
    assert "does not parse: line 1" in python_function_problem(f"{reward}:broken")


def test_python_reward_names_bound_by_imports_or_under_if_count(tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text(
        "from os.path import getsize as size\ntry:\n    import numpy as np\nexcept ImportError:\n"
        "    np = None\nif True:\n    def late(c, s):\n        return [0] * len(c)\nscore = late\n"
    )
    for name in ("size", "np", "late", "score"):
        assert python_function_problem(f"{reward}:{name}") is None, name
    reward.write_text("from helpers import *\n")  # may define anything: the import at build time decides
    assert python_function_problem(f"{reward}:whatever") is None


def test_data_and_reward_mismatches_found_before_start(tmp_path):
    text = config_error(None, ["data.source=imdb", "data.task_kwargs={}", "rewards=[{kind: math}]"])
    assert "rewards.0.kind = 'math' reads each prompt's answer" in text
    text = config_error(None, ["data.source=imdb", "data.task_kwargs={max_word: 3}", "rewards=[{kind: format}]"])
    assert "data.task_kwargs.max_word" in text
    assert "no such file" in config_error(None, [f"data.source={tmp_path}/train.jsonl", "data.task_kwargs={}"])
    assert "only reasoning_gym:<task> and imdb" in config_error(
        None, [f"data.source={tmp_path}/x.parquet", "data.task_kwargs={a: 1}"]
    )
    assert "not the preference pairs" in config_error(None, ["algorithm.name=dpo"])


def test_rlvr_with_a_misspelt_task_exits_2_before_ray():
    # runs `python -m recipes.rlvr ...` and reports afterwards whether Ray was started
    probe = (
        "import runpy, sys\nsys.argv = ['rlvr', 'data.source=reasoning_gym:chain_summ']\ntry:\n"
        "    runpy.run_module('recipes.rlvr', run_name='__main__')\nfinally:\n"
        "    ray = sys.modules.get('ray')\n    print('RAY_STARTED', bool(ray and ray.is_initialized()))\n"
    )
    started = time.monotonic()
    done = subprocess.run([PYTHON, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert (
        "data.source = 'reasoning_gym:chain_summ': unknown reasoning-gym task; did you mean 'chain_sum'?" in done.stderr
    )
    assert "Traceback" not in done.stderr
    assert "RAY_STARTED False" in done.stdout
    assert took < 20, f"took {took:.1f} s: the check should come before anything slow starts"


# ------------------------------------------------------------------------------ data rows
GOOD = {"prompt": "What is 2 + 3?", "answer": "5"}


def jsonl(tmp_path, *lines: bytes, name="rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def row(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def data(path, **kw) -> DataConfig:
    return DataConfig(source=str(path), eval_size=0, **kw)


def test_a_non_utf8_row_is_a_bad_row_strict_and_skip(tmp_path, caplog):
    path = jsonl(tmp_path, row(GOOD), b'{"prompt": "caf\xe9?", "answer": "1"}', row({"prompt": "ok", "answer": "2"}))
    with pytest.raises(DataError) as err:
        load_prompts(data(path))
    assert f"{path}: row 2: not UTF-8 text: byte 0xe9" in str(err.value) and "1 of 3 rows are bad" in str(err.value)
    with caplog.at_level(logging.WARNING):
        kept = load_prompts(data(path, on_bad_row="skip"))
    assert sorted(r["prompt"] for r in kept) == ["What is 2 + 3?", "ok"]
    assert "1 of 3 rows are bad" in caplog.text and "row 2: not UTF-8" in caplog.text


def test_bom_and_line_separators_inside_strings_do_not_break_rows(tmp_path):
    odd = {"prompt": "one\u2028two\u2029three\x85four\rfive\x1cend", "answer": "5"}
    path = jsonl(tmp_path, b"\xef\xbb\xbf" + row(GOOD), row(odd), b'{"prompt": "crlf", "answer": "1"}\r')
    rows = load_rows(str(path))
    assert rows == [GOOD, odd, {"prompt": "crlf", "answer": "1"}]
    assert len(load_prompts(data(path))) == 3


def test_repeated_keys_and_nan_in_a_row_are_bad_rows(tmp_path):
    path = jsonl(tmp_path, b'{"prompt": "a", "prompt": "b", "answer": "1"}', b'{"prompt": "x", "answer": NaN}')
    first, second = load_rows(str(path))
    assert isinstance(first, UnreadableRow) and "'prompt' appears twice" in first.error
    assert isinstance(second, UnreadableRow) and "NaN is not a JSON number" in second.error


def test_a_row_without_the_answer_a_reward_needs_is_bad(tmp_path, caplog):
    math = validate_config({**RL, "rewards": [{"kind": "math"}]}).rewards
    path = jsonl(tmp_path, row(GOOD), row({"prompt": "What is 1 + 1?"}), row({"prompt": "3 - 1?", "answer": ""}))
    with pytest.raises(DataError) as err:
        load_prompts(data(path), "train", math)
    text = str(err.value)
    assert (
        f"{path}: row 2: field 'answer': missing; reward kind 'math' scores against it (data.answer_field='answer')"
    ) in text
    assert f"{path}: row 3: field 'answer': empty" in text
    with caplog.at_level(logging.WARNING):
        assert load_prompts(data(path, on_bad_row="skip"), "train", math) == [GOOD]
    assert "2 of 3 rows are bad" in caplog.text
    assert len(load_prompts(data(path))) == 3  # without a reward that reads it, the answer stays optional


def test_a_misspelt_answer_field_fails_every_row_instead_of_scoring_zero(tmp_path):
    math = validate_config({**RL, "rewards": [{"kind": "math"}]}).rewards
    path = jsonl(tmp_path, *(row({"question": f"q{i}", "solution": str(i)}) for i in range(3)))
    with pytest.raises(DataError, match=r"row 1: field 'soluton': missing; .*data.answer_field='soluton'"):
        load_prompts(data(path, prompt_field="question", answer_field="soluton", on_bad_row="skip"), "train", math)
    rows = load_prompts(data(path, prompt_field="question", answer_field="solution"), "train", math)
    assert sorted(r["answer"] for r in rows) == ["0", "1", "2"]


def test_reasoning_gym_reward_on_file_rows_needs_the_task_in_metadata(tmp_path):
    rg = validate_config(RL).rewards
    path = jsonl(
        tmp_path,
        row({**GOOD, "metadata": {"source_dataset": "chain_sum"}}),
        row(GOOD),
        row({**GOOD, "metadata": {"source_dataset": "chain_summ"}}),
    )
    with pytest.raises(DataError) as err:
        load_prompts(data(path), "train", rg)
    text = str(err.value)
    assert "row 2: field 'metadata': missing; reward kind 'reasoning_gym'" in text
    assert (
        "row 3: field 'metadata.source_dataset' = 'chain_summ': unknown reasoning-gym task; did you mean 'chain_sum'?"
        in text
    )
    # generated rows carry their task: nothing to check
    assert len(load_prompts(DataConfig(source="reasoning_gym:chain_sum", train_size=4), "train", rg)) == 4


def test_reasoning_gym_rows_may_have_a_null_answer_but_not_lack_the_field(tmp_path):
    # some tasks (rush_hour, graph_color, ...) generate answer=None and score from metadata alone
    rg = validate_config(RL).rewards
    meta = {"metadata": {"source_dataset": "rush_hour"}}
    path = jsonl(tmp_path, row({"prompt": "p1", "answer": None, **meta}), row({"prompt": "p2", **meta}))
    with pytest.raises(
        DataError, match=r"1 of 2 rows are bad.*\n.*row 2: field 'answer': missing; reward kind 'reasoning_gym'"
    ):
        load_prompts(data(path), "train", rg)
    both = validate_config({**RL, "rewards": [{"kind": "reasoning_gym"}, {"kind": "math"}]}).rewards
    with pytest.raises(DataError, match=r"row 1: field 'answer': missing \(null\); reward kind 'math'"):
        load_prompts(data(path), "train", both)
