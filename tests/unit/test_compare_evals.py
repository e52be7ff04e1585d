"""Before/after from sample files (rlhf/evaluation/compare.py, scripts/compare_evals.py) and DPO pairs
from sampled answers (rlhf/data/sampled_pairs.py, scripts/sampled_pairs.py)."""

import json
import math

import pytest

from rlhf.data.sampled_pairs import pairs_from_records
from rlhf.evaluation.compare import compare_records, means, read_records
from scripts import compare_evals, sampled_pairs


def record(index, mode, reward, sentiment=None, completion="text"):
    judges = {} if sentiment is None else {"lexicon_sentiment": sentiment}
    return {"prompt_index": index, "prompt": f"p{index}", "mode": mode, "completion": completion,
            "reward": reward, "judges": judges}  # fmt: skip


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sampled_scores_are_averaged_per_prompt_before_pairing():
    before = [record(0, "sampled", 0.0, 0.0), record(0, "sampled", 1.0, 0.0), record(1, "sampled", 0.0, 0.5)]
    after = [record(0, "sampled", 1.0, 0.5), record(0, "sampled", 1.0, 0.5), record(1, "sampled", 1.0, 0.5)]
    diff = compare_records(before, after)["sampled"]
    # prompt 0: 0.5 -> 1.0, prompt 1: 0.0 -> 1.0 (reward); n counts prompts, not samples
    assert diff["reward"].n == 2 and diff["reward"].mean == pytest.approx(0.75)
    assert diff["judge/lexicon_sentiment"].mean == pytest.approx(0.25)  # +0.5 and 0
    assert diff["reward"].se == pytest.approx(math.sqrt(((0.5 - 0.75) ** 2 + (1 - 0.75) ** 2) / 1 / 2))
    assert means(before)["sampled"]["reward"] == pytest.approx(0.25)


def test_per_sample_pairs_the_jth_sample_of_each_prompt():
    before = [record(0, "sampled", r) for r in (0.0, 1.0, 0.0)] + [record(1, "sampled", 0.5)]
    after = [record(0, "sampled", r) for r in (1.0, 1.0, 1.0)] + [record(1, "sampled", 0.5)]
    diff = compare_records(before, after, per_sample=True)["sampled"]["reward"]
    # pairs (0,0): +1, (0,1): 0, (0,2): +1, (1,0): 0 -> n counts samples
    assert diff.n == 4 and diff.mean == pytest.approx(0.5) and (diff.better, diff.worse) == (2, 0)
    assert compare_records(before, after)["sampled"]["reward"].n == 2


def test_modes_are_compared_separately_and_missing_judge_scores_are_skipped():
    before = [record(0, "greedy", 0.0, None), record(1, "greedy", 0.0, 0.2), record(0, "sampled", 5.0)]
    after = [record(0, "greedy", 1.0, 0.9), record(1, "greedy", 0.0, 0.4)]
    diff = compare_records(before, after)
    assert set(diff) == {"greedy"}  # only the after file lacks a sampled pass
    assert diff["greedy"]["judge/lexicon_sentiment"].n == 1  # prompt 0 had no judge score before
    assert diff["greedy"]["judge/lexicon_sentiment"].mean == pytest.approx(0.2)


def test_evaluations_of_different_prompts_are_refused():
    with pytest.raises(ValueError, match="share no prompt"):
        compare_records([record(0, "greedy", 1.0)], [record(1, "greedy", 1.0)])


def test_bad_sample_files_name_file_and_line(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps(record(0, "greedy", 1.0)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"eval.jsonl:2: not JSON"):
        read_records(bad)
    bad.write_text('{"completion": "x"}\n')
    with pytest.raises(ValueError, match=r"eval.jsonl:1: not a sample record"):
        read_records(bad)


def test_compare_script_reads_a_runs_first_and_last_evaluation(tmp_path, capsys):
    samples = tmp_path / "run" / "samples"
    samples.mkdir(parents=True)
    write(samples / "eval-00000.jsonl", [record(i, "greedy", 0.0, 0.0) for i in range(3)])
    write(samples / "eval-00004.jsonl", [record(i, "greedy", 5.0, 0.0) for i in range(3)])  # not the last
    write(samples / "eval-00008.jsonl", [record(i, "greedy", float(i), 0.1) for i in range(3)])
    assert compare_evals.main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "eval-00008.jsonl" in out and "0.000 -> 1.000  +1 ± 0.58" in out
    assert compare_evals.main([str(samples / "eval-00000.jsonl")]) == 2  # one file is not a run folder


def test_pairs_take_each_prompts_best_and_worst_sampled_answer_by_reward():
    records = [
        record(0, "greedy", 9.0, completion="greedy answers are not pairs"),
        record(0, "sampled", 0.1, sentiment=-1.0, completion="mid"),
        record(0, "sampled", 0.9, sentiment=-1.0, completion="best"),  # judges play no part
        record(0, "sampled", -0.5, sentiment=1.0, completion="worst"),
        record(0, "sampled", 2.0, completion="   "),  # blank: never a pair side
        record(1, "sampled", 0.3, completion="a"),
        record(1, "sampled", 0.31, completion="b"),  # gap 0.01 < min_gap
        record(2, "sampled", 0.5, completion="alone"),  # one answer: no pair
    ]
    pairs = pairs_from_records(records, min_gap=0.05)
    assert pairs == [
        {"prompt": "p0", "chosen": "best", "rejected": "worst", "reward_chosen": 0.9, "reward_rejected": -0.5}
    ]
    assert len(pairs_from_records(records)) == 2  # no min_gap: prompt 1's pair is kept


def test_pairs_script_writes_jsonl_and_refuses_samples_without_preferences(tmp_path, capsys):
    samples = write(tmp_path / "s.jsonl", [record(0, "sampled", 0.0, completion="x"), record(0, "sampled", 1.0)])
    assert sampled_pairs.main([str(samples), str(tmp_path / "pairs.jsonl")]) == 0
    (pair,) = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pair["chosen"] == "text" and pair["rejected"] == "x"
    flat = write(tmp_path / "flat.jsonl", [record(0, "sampled", 1.0), record(0, "sampled", 1.0)])
    assert sampled_pairs.main([str(flat), str(tmp_path / "none.jsonl")]) == 2
    assert "no prompt has two sampled answers" in capsys.readouterr().err


def test_gzipped_sample_files_read_like_plain_ones(tmp_path):
    import gzip

    records = [record(0, "greedy", 1.0, 0.5)]
    with gzip.open(tmp_path / "eval-00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(records[0]) + "\n")
    assert read_records(tmp_path / "eval-00000.jsonl.gz") == records
