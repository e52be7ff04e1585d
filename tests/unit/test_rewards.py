"""Verifiable rewards on real reasoning-gym entries and math answers: right -> 1, wrong -> 0."""

import pytest

from rlhf.data.reasoning_gym import CHAIN_SUM_EASY, reasoning_gym_prompts
from rlhf.rewards.verifiers import (
    BOXED_ANSWER,
    final_answer,
    format_reward,
    last_number,
    math_answer_reward,
    reasoning_gym_reward,
)


@pytest.fixture(scope="module")
def chain_sum():
    return reasoning_gym_prompts("chain_sum", size=8, seed=3, task_kwargs=CHAIN_SUM_EASY)


def test_reasoning_gym_reward_scores_the_last_number(chain_sum):
    reward = reasoning_gym_reward()
    right = [f"Let me add. The answer is {s['answer']}." for s in chain_sum]
    wrong = [f"{int(s['answer']) + 1}" for s in chain_sum]
    assert reward(right, chain_sum) == [1.0] * len(chain_sum)
    assert reward(wrong, chain_sum) == [0.0] * len(chain_sum)


def test_reasoning_gym_reward_takes_the_task_by_name(chain_sum):
    sample = {k: v for k, v in chain_sum[0].items() if k != "metadata"}
    assert reasoning_gym_reward("chain_sum")([chain_sum[0]["answer"]], [sample]) == [1.0]


@pytest.mark.parametrize("garbage", ["", "no digits here", "}{\\boxed{", "\x00\uffff", "1" * 5000])
def test_garbage_scores_zero_without_raising(chain_sum, garbage):
    assert reasoning_gym_reward()([garbage], chain_sum[:1]) == [0.0]
    assert math_answer_reward()([garbage], [{"answer": "3"}]) == [0.0]
    assert reasoning_gym_reward()([garbage], [{"broken": True}]) == [0.0]


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("so the result is \\boxed{1/2}", "0.5", 1.0),
        ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", 1.0),
        ("First 3, then 4, finally 1,000", "1000", 1.0),
        ("\\boxed{71}", "72", 0.0),
        ("the last number wins: 5 then 6", "5", 0.0),
    ],
)
def test_math_answer_reward(completion, gold, expected):
    assert math_answer_reward()([completion], [{"answer": gold}]) == [expected]


def test_final_answer_prefers_boxed_then_hashes_then_last_number():
    assert final_answer("1 \\boxed{\\frac{2}{3}} 4") == "\\frac{2}{3}"
    assert final_answer("12 #### 7 apples") == "7 apples"
    assert final_answer("from 3 to -4.5") == "-4.5"
    assert final_answer("nothing") is None
    assert last_number("1,234 and 5") == "5"


def test_format_reward():
    only_number, boxed = format_reward(), format_reward(BOXED_ANSWER, score=0.5)
    completions = [" 12 ", "It is 12", "so \\boxed{12}\nDone"]
    assert only_number(completions, [{}] * 3) == [1.0, 0.0, 0.0]
    assert boxed(completions, [{}] * 3) == [0.0, 0.0, 0.5]
