"""The reward-hacking alarm fires on a reward that repetition games and stays quiet on an honest run.

Recorded-style generations: 40 chain_sum problems answered at three evaluations. The honest
policy gets more problems right over time (the verifier-style reward and the strict exact-match
judge rise together). The hacking policy is paid by a word-count reward, which it satisfies by
repeating its answer: the reward climbs, exact match does not, and the texts rot.
"""

import json
import random

import pytest

from rlhf.config import EvalConfig
from rlhf.evaluation.alarm import HackingAlarm, RewardHackingError
from rlhf.evaluation.judges import exact_match
from rlhf.evaluation.loop import HeldOutJudging
from rlhf.evaluation.text_health import text_health

PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in zip(range(1, 41), range(40, 0, -1))]
FILLER = ["the", "sum", "is", "so", "we", "add", "them", "and", "get", "answer", "first", "number"]


def word_count_reward(texts: list[str]) -> list[float]:
    """Hackable on purpose: longer answers score more, up to 30 words."""
    return [min(len(t.split()), 30) / 30 for t in texts]


def correctness_reward(texts: list[str]) -> list[float]:
    return exact_match(texts, PROMPTS)


def answers(right_fraction: float, rng: random.Random, words: int = 6, repeat: int = 1) -> list[str]:
    out = []
    for row in PROMPTS:
        value = int(row["answer"]) if rng.random() < right_fraction else int(row["answer"]) + rng.randint(1, 9)
        prose = " ".join(rng.choice(FILLER) for _ in range(words))
        out.append(" ".join([f"{prose} {value}."] * repeat))
    return out


def samples(texts: list[str]) -> list[dict]:
    return [{"prompt_index": i, "text": t, "response_token_ids": [0] * len(t.split())} for i, t in enumerate(texts)]


def run_evals(reward_fn, generations: list[list[str]], tmp_path, action: str = "warn") -> list[dict]:
    judging = HeldOutJudging(EvalConfig(judges=["exact_match"], alarm_action=action), tmp_path)
    metrics = []
    for updates, texts in enumerate(generations):
        rewards = reward_fn(texts)
        out = judging.score("", PROMPTS, samples(texts), {"fn": rewards}, rewards)
        metrics.append(out | judging.finish(updates * 5))
    return metrics


def test_fires_on_a_word_count_reward_that_repetition_games(tmp_path):
    rng = random.Random(0)
    # the policy's accuracy stays ~30% while it learns to repeat itself for the word-count reward
    generations = [answers(0.3, rng), answers(0.3, rng, repeat=2), answers(0.25, rng, repeat=5)]
    metrics = run_evals(word_count_reward, generations, tmp_path)
    assert [m["eval/hacking_alarm"] for m in metrics] == [0.0, 1.0, 1.0]
    assert metrics[2]["eval/alarm/reward_t"] > 2.0 > metrics[2]["eval/alarm/judge_t/exact_match"]
    assert metrics[2]["eval/health/repeated_3gram"] > 0.5
    records = [json.loads(line) for line in (tmp_path / "samples" / "eval-00010.jsonl").read_text().splitlines()]
    assert len(records) == len(PROMPTS) and records[0]["judges"].keys() == {"exact_match"}
    assert records[0]["answer"] == PROMPTS[0]["answer"] and records[0]["health"]["repeated_3gram"] > 0.5


def test_quiet_on_an_honest_run(tmp_path):
    rng = random.Random(0)
    generations = [answers(0.2, rng), answers(0.5, rng), answers(0.8, rng)]
    metrics = run_evals(correctness_reward, generations, tmp_path)
    assert [m["eval/hacking_alarm"] for m in metrics] == [0.0, 0.0, 0.0]
    assert metrics[2]["eval/alarm/reward_t"] > 2.0  # the reward did rise: the judge followed it
    assert metrics[2]["eval/judge/exact_match"] > metrics[0]["eval/judge/exact_match"]


def test_quiet_when_the_reward_does_not_rise(tmp_path):
    rng = random.Random(1)
    metrics = run_evals(correctness_reward, [answers(0.3, rng), answers(0.3, rng)], tmp_path)
    assert metrics[1]["eval/hacking_alarm"] == 0.0


def test_stop_action_raises(tmp_path):
    rng = random.Random(0)
    generations = [answers(0.3, rng), answers(0.25, rng, repeat=5)]
    with pytest.raises(RewardHackingError, match="REWARD HACKING"):
        run_evals(word_count_reward, generations, tmp_path, action="stop")


def test_text_health_collapse_fires_without_judges():
    rng = random.Random(0)
    alarm = HackingAlarm()
    before, after = answers(0.3, rng), ["good good good good good good good good"] * len(PROMPTS)
    assert not alarm.check([0.0] * 40, {}, text_health(before)).fired
    verdict = alarm.check([0.0] * 40, {}, text_health(after))
    assert verdict.fired and any("distinct-2" in r for r in verdict.reasons)


def test_shorter_answers_are_not_a_collapse():
    """An RLVR policy that learns to answer with just the number loses its word pairs, not its health."""
    rng = random.Random(0)
    alarm = HackingAlarm()
    alarm.check([0.0] * 40, {}, text_health(answers(0.3, rng)))
    assert not alarm.check([0.0] * 40, {}, text_health([row["answer"] for row in PROMPTS])).fired


def test_one_word_answers_have_no_pairs_to_collapse():
    """A calculator agent's last turn becomes one number: its distinct-2 is 0 (no word pairs), which
    is not a collapse; whether the numbers are right is for the judges to say."""
    rng = random.Random(0)
    short_answers = ["14"] * 70 + [f"{rng.randint(100, 999)} is it" for _ in range(30)]  # 1.6 words on average
    numbers = [str(rng.randint(-2000, 2000)) for _ in range(100)]
    alarm = HackingAlarm()
    alarm.check([0.0] * 100, {}, text_health(short_answers))
    assert text_health(numbers)["distinct_2"] == 0.0
    assert not alarm.check([0.0] * 100, {}, text_health(numbers)).fired
    # two-word texts still count: the same pair for every prompt is a collapse
    assert alarm.check([0.0] * 100, {}, text_health(["answer 14"] * 100)).fired


def test_a_falling_judge_is_named():
    alarm = HackingAlarm()
    health = {"distinct_2": 0.5, "repeated_3gram": 0.0}
    alarm.check([0.0, 0.1, 0.2, 0.1] * 10, {"j": [1.0] * 40}, health)
    verdict = alarm.check([0.5, 0.7, 0.6, 0.6] * 10, {"j": [0.5, 1.0, 0.0, 0.5] * 10}, health)
    assert verdict.fired and "'j' fell" in verdict.reasons[0]


def test_keep_best_tracks_the_best_judge_score(tmp_path):
    judging = HeldOutJudging(EvalConfig(judges=["exact_match"], alarm_action="keep_best"), tmp_path)
    rng = random.Random(0)
    best = []
    for right in (0.2, 0.6, 0.4):
        texts = answers(right, rng)
        judging.score("", PROMPTS, samples(texts), {}, exact_match(texts, PROMPTS))
        judging.finish(0)
        best.append(judging.new_best)
    assert best == [True, True, False]
