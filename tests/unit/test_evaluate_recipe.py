"""recipes/evaluate.py's choices that need no Ray: judges by task, model paths, paired comparisons."""

import pytest

from recipes.evaluate import comparisons, default_judges, resolve_model
from rlhf.config import ConfigError, load_config
from rlhf.evaluation.scoring import ScoredPass


def test_default_judges_follow_the_task():
    rlvr = load_config("recipes/configs/rlvr.yaml")
    assert default_judges(rlvr, [{"prompt": "1+1", "answer": "2"}]) == ["exact_match"]
    ppo = load_config("recipes/configs/ppo.yaml")
    assert default_judges(ppo, [{"prompt": "This movie"}])[-1] == "on_topic"
    named = load_config("recipes/configs/ppo.yaml", ["eval.judges=[on_topic]"])
    assert default_judges(named, [{"prompt": "x"}]) == ["on_topic"]


def test_model_paths(tmp_path):
    cfg = load_config("recipes/configs/rlvr.yaml")
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    assert resolve_model(cfg, str(tmp_path / "run"))[1] == str(tmp_path / "run" / "final")
    assert resolve_model(cfg, str(tmp_path / "run" / "final"))[1] == str(tmp_path / "run" / "final")
    with pytest.raises(ConfigError, match="not 'start'"):
        resolve_model(cfg, str(tmp_path))


def test_comparisons_are_paired_per_prompt():
    def scored(total, judge):
        samples = [{"prompt_index": i, "text": ""} for i in range(len(total))]
        return ScoredPass("greedy", samples, [{}] * len(total), {"fn": total}, total, {"exact_match": judge})

    diff = comparisons(scored([0.0, 0.0, 1.0], [0.0, 1.0, 1.0]), scored([1.0, 1.0, 1.0], [0.0, 1.0, 1.0]), 3)
    assert diff["reward"].startswith("+0.6667") and "2 up / 0 down" in diff["reward"]
    assert diff["judge/exact_match"].startswith("+0 ± 0")


def test_sampled_comparisons_pair_each_prompts_mean_over_its_answers():
    def sampled(total):  # 2 prompts x 2 answers
        samples = [{"prompt_index": i // 2, "text": ""} for i in range(4)]
        return ScoredPass("sampled", samples, [{}] * 4, {"fn": total}, total, {"exact_match": total})

    diff = comparisons(sampled([0.0, 1.0, 0.0, 0.0]), sampled([1.0, 1.0, 0.0, 1.0]), 2, "sampled/")
    # prompt 0: 0.5 -> 1.0, prompt 1: 0.0 -> 0.5; n is 2 prompts, not 4 answers
    assert diff["sampled/reward"].startswith("+0.5 ± 0 ") and "n=2" in diff["sampled/reward"]
    assert set(diff) == {"sampled/reward", "sampled/judge/exact_match"}


def test_judges_none_and_the_train_split_parse():
    from recipes.evaluate import parse_args

    args = parse_args(["--judges", "none", "--split", "train"])
    assert args.judges == "none" and args.split == "train"
    assert parse_args([]).split == "eval"
    with pytest.raises(SystemExit):
        parse_args(["--split", "test"])
