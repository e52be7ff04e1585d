"""Data sources: files are validated row by row before training; every source gives normalised rows."""

import json

import pytest

from rlhf.config import DataConfig
from rlhf.data.reasoning_gym import CHAIN_SUM_EASY
from rlhf.data.sources import (
    DataError,
    UnreadableRow,
    load_preference_pairs,
    load_prompts,
    load_rows,
    load_sft_pairs,
    validate_rows,
)

GOOD = {"prompt": "What is 2 + 3?", "answer": "5"}
# One bad row of each kind, at known lines; lines 1, 3 and 8 are good.
LINES = [
    json.dumps(GOOD),  # 1 good
    '{"prompt": "What is 1 + 1?", "answer": ',  # 2 malformed JSON
    json.dumps({"prompt": "What is 4 + 4?", "answer": 8, "level": 2}),  # 3 good (answer type is free)
    json.dumps({"question": "no prompt field"}),  # 4 missing field
    json.dumps({"prompt": 42}),  # 5 wrong type
    json.dumps({"prompt": "   "}),  # 6 empty prompt
    json.dumps({"prompt": "x" * 5000}),  # 7 too long (256 tokens x 8 chars = 2048)
    json.dumps({"prompt": "What is 9 - 2?", "answer": "7"}),  # 8 good
    json.dumps(["not", "an", "object"]),  # 9 not an object
]
BAD_LINES = {
    2: "invalid JSON",
    4: "field 'prompt': missing",
    5: "field 'prompt': expected str, got int",
    6: "field 'prompt': empty string",
    7: "field 'prompt': too long",
    9: "expected a JSON object",
}


@pytest.fixture
def messy_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(LINES) + "\n\n")  # trailing blank lines are not rows
    return path


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), eval_size=kw.pop("eval_size", 0), **kw)


def test_jsonl_rows_keep_their_line_numbers(messy_jsonl):
    rows = load_rows(str(messy_jsonl))
    assert len(rows) == len(LINES)
    assert rows[0] == GOOD and isinstance(rows[1], UnreadableRow) and isinstance(rows[8], UnreadableRow)


def test_strict_names_file_row_and_field_for_every_bad_row(messy_jsonl):
    with pytest.raises(DataError) as caught:
        load_prompts(cfg(messy_jsonl))
    message = str(caught.value)
    assert f"{messy_jsonl}: 6 of 9 rows are bad" in message
    for line, problem in BAD_LINES.items():
        assert f"{messy_jsonl}: row {line}: {problem}" in message
    assert "data.on_bad_row=skip" in message  # says how to go on


def test_skip_drops_exactly_the_bad_rows_and_counts_add_up(messy_jsonl):
    rows = load_rows(str(messy_jsonl))
    good, report = validate_rows(rows, {"prompt": str}, str(messy_jsonl), {"prompt": 2048}, on_bad_row="skip")
    assert [g["prompt"] for g in good] == ["What is 2 + 3?", "What is 4 + 4?", "What is 9 - 2?"]
    assert len(good) + report.bad_rows == report.total_rows == 9
    assert len(report.problems) == 6

    prompts = load_prompts(cfg(messy_jsonl, on_bad_row="skip"))
    assert sorted(p["prompt"] for p in prompts) == sorted(g["prompt"] for g in good)
    assert {"prompt": "What is 4 + 4?", "answer": 8, "level": 2} in prompts  # metadata kept


def test_strict_shows_at_most_twenty_problems_but_counts_all(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": ""}) for _ in range(50)) + "\n" + json.dumps(GOOD))
    with pytest.raises(DataError, match=r"50 of 51 rows are bad \(50 problems\)") as caught:
        load_prompts(cfg(path))
    assert "row 20:" in str(caught.value) and "row 21:" not in str(caught.value)
    assert "... and 30 more" in str(caught.value)


def test_skip_with_no_good_rows_left_still_fails(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(DataError, match="no good rows"):
        load_prompts(cfg(path, on_bad_row="skip"))


def test_configured_field_names_become_normalised_keys(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"question": f"q{i}", "good": f"g{i}", "bad": f"b{i}", "prompt": "old"} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = cfg(path, prompt_field="question", chosen_field="good", rejected_field="bad", prompt_suffix="!")
    pairs = load_preference_pairs(data)
    assert sorted(pairs, key=lambda p: p["prompt"])[0] == {
        "prompt": "q0!",
        "chosen": "g0",
        "rejected": "b0",
        "source_prompt": "old",
    }

    sft = load_sft_pairs(cfg(path, prompt_field="question", response_field="good"))
    assert {(s["prompt"], s["response"]) for s in sft} == {(f"q{i}", f"g{i}") for i in range(4)}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_prompts(cfg(tmp_path / "nope.jsonl"))


def test_parquet_round_trip_and_nulls_are_reported(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(5)] + [{"prompt": None, "answer": "x"}]
    path = tmp_path / "prompts.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert load_rows(str(path)) == rows
    with pytest.raises(DataError, match=r"prompts.parquet: row 6: field 'prompt': missing \(null\)"):
        load_prompts(cfg(path))
    kept = load_prompts(cfg(path, on_bad_row="skip"))  # in the seeded order (see hold_out_by_prompt)
    assert sorted(kept, key=lambda p: p["prompt"]) == rows[:5]


def test_eval_is_held_out_of_the_file_by_prompt(tmp_path):
    # 30 prompts, two pairs each: a prompt's pairs must all land on one side.
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}{k}", "rejected": f"r{i}{k}"} for i in range(30) for k in range(2)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = cfg(path, eval_size=5, seed=3)
    train, heldout = load_preference_pairs(data, "train"), load_preference_pairs(data, "eval")
    assert len({p["prompt"] for p in heldout}) == 5 and len(heldout) == 10
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    assert len(train) + len(heldout) == len(rows)
    assert heldout == load_preference_pairs(data, "eval")  # deterministic
    assert len(load_preference_pairs(cfg(path, eval_size=5, train_size=7), "train")) == 7


def test_eval_source_is_used_whole(tmp_path):
    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_path.write_text(json.dumps(GOOD))
    eval_path.write_text("\n".join(json.dumps({"prompt": f"e{i}"}) for i in range(3)))
    data = cfg(train_path, eval_source=str(eval_path))
    assert [p["prompt"] for p in load_prompts(data, "eval")] == ["e0", "e1", "e2"]
    assert load_prompts(data, "train") == [GOOD]


def test_reasoning_gym_prompts_via_config():
    data = DataConfig(
        source="reasoning_gym:chain_sum",
        task_kwargs=CHAIN_SUM_EASY,
        train_size=20,
        eval_size=5,
        seed=1,
        prompt_suffix=" Answer:",
    )
    train, heldout = load_prompts(data, "train"), load_prompts(data, "eval")
    assert len(train) == 20 and len(heldout) == 5
    assert all(p["prompt"] == p["question"] + " Answer:" for p in train + heldout)
    assert train[0]["metadata"]["source_dataset"] == "chain_sum" and "answer" in train[0]
    assert not {p["question"] for p in train} & {p["question"] for p in heldout}
    with pytest.raises(DataError, match="not preference pairs"):
        load_preference_pairs(data)
    # SFT on the task: the gold answer is the response; held-out pairs stay unseen in train.
    sft_train, sft_heldout = load_sft_pairs(data, "train"), load_sft_pairs(data, "eval")
    assert [(p["prompt"], p["response"]) for p in sft_train] == [(p["prompt"], p["answer"]) for p in train]
    assert [p["question"] for p in sft_heldout] == [p["question"] for p in heldout]


def test_imdb_via_config():
    data = DataConfig(source="imdb", train_size=4, eval_size=2, task_kwargs={"max_words": 20})
    pairs = load_preference_pairs(data, "eval")
    assert len(pairs) == 2 and all(len(p["chosen"].split()) <= 20 for p in pairs)
    assert len(load_prompts(DataConfig(source="imdb", train_size=3))) == 3
    with pytest.raises(DataError, match="task_kwargs"):
        load_sft_pairs(DataConfig(source="imdb", task_kwargs={"bogus": 1}))


def test_task_kwargs_on_a_file_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD))
    with pytest.raises(DataError, match="task_kwargs"):
        load_prompts(cfg(path, task_kwargs={"x": 1}))


def test_unsupported_file_type_is_named(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\nhi\n")
    with pytest.raises(DataError, match=r"prompts.csv: unsupported file type '.csv'"):
        load_rows(str(path))


def test_json_array_file_goes_through_datasets(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([GOOD, {"prompt": "What is 1 + 2?"}]))
    assert load_rows(str(path)) == [GOOD, {"prompt": "What is 1 + 2?", "answer": None}]
    path.write_text(json.dumps([GOOD, {"prompt": ""}]))
    with pytest.raises(DataError, match="prompts.json: row 2: field 'prompt': empty string"):
        load_prompts(cfg(path))


def test_calculator_transcript_pairs_are_the_agent_runs_train_problems_never_its_held_out_ones() -> None:
    """The shipped warm start (sft_calculator.yaml) trains on calls for the agent config's train
    problems: every call computes the gold answer, and no held-out question of the agent run is in it."""
    from rlhf.config import load_config
    from rlhf.environments.calculator import evaluate, find_call, format_number

    sft = load_config("recipes/configs/sft_calculator.yaml")
    agent = load_config("recipes/configs/agent_calculator.yaml")
    assert sft.data.task_kwargs == agent.data.task_kwargs and sft.data.seed == agent.data.seed
    assert sft.data.sft_target == "calculator_transcript"
    train = load_sft_pairs(sft.data, "train")
    assert len(train) == 2 * sft.data.train_size  # the call, then the answer after the tool's reply
    for call, answer in zip(train[::2], train[1::2], strict=True):
        expression = find_call(call["response"])
        assert expression is not None and format_number(evaluate(expression)) == call["gold_answer"]
        assert answer["response"] == call["gold_answer"] and answer["messages"][-1]["content"] == call["gold_answer"]
        assert call["answer"] == call["response"]  # the SFT loop's held-out exact match is of the turns
        assert call["messages"][0]["content"] == call["prompt"]
        assert call["prompt"].startswith(call["question"] + "\n\n")
    held_out = {row["question"] for row in load_prompts(agent.data, "eval")}
    assert len(held_out) == agent.data.eval_size
    assert held_out.isdisjoint(row["question"] for row in train)
    assert {row["question"] for row in load_sft_pairs(sft.data, "eval")} == held_out  # scored on the same problems


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": "imdb"}, "reasoning_gym:<task>"),
        ({"prompt_suffix": " Give only the final number."}, "leave data.prompt_suffix empty"),
        ({"chat_template": "none"}, "leave data.prompt_suffix empty"),
    ],
)
def test_calculator_transcript_pairs_refuse_what_would_change_the_episode_prompt(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**({"source": "reasoning_gym:chain_sum", "sft_target": "calculator_transcript"} | change))


def test_calculator_transcript_pairs_are_for_sft_only() -> None:
    from rlhf.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="makes sft pairs"):
        load_config("recipes/configs/agent_calculator.yaml", ["data.sft_target=calculator_transcript"])
