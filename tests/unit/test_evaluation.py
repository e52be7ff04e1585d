"""Pure evaluation pieces: text health, paired statistics, pass@k, judges, pass scoring, config."""

import math

import pytest

from rlhf.config import ConfigError, load_config
from rlhf.evaluation.judges import answers_match, build_judges, exact_match, on_topic_judge, run_judge
from rlhf.evaluation.scoring import judge_pass, pass_metrics, sample_records
from rlhf.evaluation.stats import paired_difference, pass_at_k, per_prompt_means
from rlhf.evaluation.text_health import distinct_n, non_text_fraction, repeated_ngram_fraction, text_health


def test_text_health():
    assert repeated_ngram_fraction("a b c d e") == 0.0
    assert repeated_ngram_fraction("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert distinct_n(["a b", "a b"], 2) == 0.5 and distinct_n([""], 1) == 0.0
    assert non_text_fraction("hello, world!") == 0.0 and non_text_fraction("@@##") == 1.0
    health = text_health(["one two three", "one two four"])
    assert health["length"] == 3.0 and health["distinct_1"] == pytest.approx(4 / 6)


def test_paired_difference():
    d = paired_difference([0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert d.mean == 0.5 and d.better == 2 and d.worse == 0
    assert d.se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4)) and d.t == pytest.approx(d.mean / d.se)
    assert paired_difference([0.0, 0.0], [1.0, 1.0]).t == math.inf
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_pass_at_k():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert per_prompt_means([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], 2) == [0.5, 1.0]


def test_exact_match_is_strict():
    rows = [{"answer": "5"}, {"answer": "-12"}, {"answer": "1000"}, {"answer": "5"}, {"answer": None}]
    texts = ["2 + 3 = 5", "The answer is -12.", "1,000", "15", "7"]
    assert exact_match(texts, rows) == [1.0, 1.0, 1.0, 0.0, 0.0]  # "15" for 5: no partial credit
    assert answers_match("5.0", "5") and not answers_match("abc", "abd")


def test_judges_by_name_and_failures_counted():
    with pytest.raises(ValueError, match="unknown judge"):
        build_judges(["nope"])

    def broken(texts, rows):
        raise RuntimeError("boom")

    scores, error = run_judge(broken, ["a", "b"], [{}, {}])
    assert all(math.isnan(s) for s in scores) and "boom" in error


def test_on_topic_prefers_text_of_the_domain():
    reviews = [
        "This movie was a masterpiece, the acting and the direction were superb.",
        "A dull film with a weak plot; the actors seemed bored in every scene.",
        "The director's new movie has beautiful cinematography and a moving score.",
    ]
    rows = [{"prompt": "I watched this film", "review": r} for r in reviews]
    scores = on_topic_judge("review")(
        ["the film's cast and story were wonderful", "buy cheap insurance online today now", ""], rows
    )
    assert scores[0] > scores[1] + 0.1 and scores[2] == 0.0


def test_lexicon_sentiment():
    pytest.importorskip("vaderSentiment")
    (judge,) = build_judges(["lexicon_sentiment"]).values()
    good, bad = judge(["a wonderful, moving film", "a terrible, boring mess"], [{}, {}])
    assert good > 0.3 and bad < -0.3


def test_pass_metrics_and_records():
    prompts = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4"}]
    texts = ["2", "3", "5", "4.0"]  # 2 samples per prompt
    samples = [{"prompt_index": i // 2, "text": t, "response_token_ids": [1]} for i, t in enumerate(texts)]
    rows = [prompts[s["prompt_index"]] for s in samples]
    scored = judge_pass(
        build_judges(["exact_match"]), "sampled", prompts, samples, {"v": [1.0, 0.0, 0.0, 1.0]}, [1.0] * 4
    )
    m = pass_metrics(scored, 2, "eval/sampled/")
    assert m["eval/sampled/judge/exact_match"] == 0.5 and m["eval/sampled/pass@2/exact_match"] == 1.0
    assert m["eval/sampled/pass@2/v"] == 1.0 and "eval/sampled/health/distinct_1" in m
    rec = sample_records(scored, "start")
    assert rec[3]["completion"] == "4.0" and rec[3]["judges"] == {"exact_match": 1.0} and rec[3]["answer"] == "4"
    assert rows[3] is prompts[1]


def test_eval_config_fields(tmp_path):
    cfg = load_config("recipes/configs/rlvr.yaml", ["eval.judges=[exact_match]", "eval.alarm_action=keep_best"])
    assert cfg.eval.judges == ["exact_match"]
    with pytest.raises(ConfigError, match="best_judge"):
        load_config("recipes/configs/rlvr.yaml", ["eval.judges=[exact_match]", "eval.best_judge=on_topic"])
    with pytest.raises(ConfigError, match="keep_best"):
        load_config("recipes/configs/rlvr.yaml", ["eval.judges=[]", "eval.alarm_action=keep_best"])
