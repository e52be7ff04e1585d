"""Environments: the calculator's safe arithmetic and call formats, guess_feedback's turns, the
registry's did-you-mean, and safe_step turning every failure into a counted error observation."""

from __future__ import annotations

import math
from typing import Any

import pytest

from rlhf.data.reasoning_gym import reasoning_gym_prompts
from rlhf.environments import ENVIRONMENTS, Observation, make_environment, safe_reset, safe_step
from rlhf.environments.calculator import (
    Calculator,
    CalculatorError,
    call_demonstration,
    evaluate,
    find_call,
    format_number,
    problem_expression,
)

ROW = {"question": "What is 2+3*4?", "answer": "14", "metadata": {"source_dataset": "basic_arithmetic"}}


@pytest.mark.parametrize(
    ("expression", "value"),
    [("2+3*4", 14), ("(2+3)*4", 20), ("7/2", 3.5), ("-3**2", -9), ("7//2", 3), ("7%3", 1), ("2^10", 1024), ("6×7", 42)],
)
def test_calculator_evaluates_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",  # a call
        "x + 1",  # a name
        "(1).real",  # attribute access
        "().__class__",
        "[1, 2][0]",  # subscript / list
        "lambda: 1",
        "9**9**9",  # a huge power: refused before computing
        "2**10000",
        "10**50 * 10**50 * 10**50",  # huge intermediate integers
        "1e300 * 1e300",  # inf
        "1/0",
        "'a' * 3",  # strings
        "True + 1",  # bools are not numbers here
        "1" * 300,  # too long
        "2 +",  # not an expression
    ],
)
def test_calculator_refuses_everything_but_bounded_arithmetic(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expression)


def test_numbers_are_formatted_plainly() -> None:
    assert [format_number(v) for v in (12, 12.0, 2.5, 1 / 3)] == ["12", "12", "2.5", "0.3333333333"]


def test_calculator_finds_calls_in_both_formats() -> None:
    assert find_call("so <calc>2+3</calc> then") == "2+3"
    assert find_call('<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>') == "6*7"
    assert find_call("<tool_call>not json</tool_call>") == ""  # malformed: an error answer, not a final one
    assert find_call("The answer is 14") is None


def test_calculator_answers_calls_then_scores_the_final_answer() -> None:
    env = make_environment("calculator")
    assert isinstance(env, Calculator)
    first = env.reset(ROW)
    assert "<calc>" in first[0]["content"] and ROW["question"] in first[0]["content"]
    assert env.step("<calc>2+3*4</calc>") == Observation([{"role": "tool", "content": "14"}])
    assert env.step("<calc>__import__('os')</calc>").messages()[0]["content"].startswith("error:")
    assert env.calls == 2
    assert env.step("The answer is 14") == Observation("", reward=1.0, done=True)
    env.reset(ROW)
    assert env.step("The answer is 15") == Observation("", reward=0.0, done=True)


def test_calculator_teaches_the_tool_call_format_when_asked() -> None:
    env = Calculator(tool_call_format=True)
    assert env.tools and env.tools[0]["function"]["name"] == "calculator"
    assert "<calc>" not in env.reset(ROW)[0]["content"]


@pytest.mark.parametrize("tool_call_format", [False, True])
@pytest.mark.parametrize(
    "task_kwargs",
    [{"min_terms": 3, "max_terms": 3, "min_digits": 3, "max_digits": 3}, {"min_terms": 2, "max_terms": 5}],
)
def test_call_demonstrations_are_episodes_the_environment_scores_right(
    tool_call_format: bool, task_kwargs: dict[str, Any]
) -> None:
    """The warm start's transcripts, replayed against a fresh environment: the first context is its
    first message, the call is answered with the gold answer (the environment's own evaluator), the
    second context is exactly the conversation so far, and the answer ends the episode at reward 1."""
    for row in reasoning_gym_prompts("chain_sum", 200, seed=5, task_kwargs=task_kwargs, suffix=""):
        call, answer = call_demonstration(row, tool_call_format=tool_call_format)
        env = Calculator(tool_call_format=tool_call_format)
        assert call["messages"] == env.reset(row) and call["prompt"] == call["messages"][0]["content"]
        assert call["response"].startswith("<tool_call>" if tool_call_format else "<calc>")
        assert find_call(call["response"]) == row["metadata"]["expression"]
        reply = env.step(call["response"])
        assert reply == Observation([{"role": "tool", "content": row["answer"]}]) and env.calls == 1
        assert answer["messages"] == [
            *call["messages"],
            {"role": "assistant", "content": call["response"]},
            *reply.messages(),
        ]
        assert answer["response"] == row["answer"]
        assert env.step(answer["response"]) == Observation("", reward=1.0, done=True)


def test_call_demonstrations_refuse_rows_they_cannot_answer() -> None:
    assert problem_expression({"question": "Work out: 12 + 30 =", "metadata": {}}) == "12 + 30"
    wrong = {"question": "Compute: 2 + 2 =", "answer": "5", "metadata": {"expression": "2 + 2"}}
    with pytest.raises(ValueError, match="answer is '5'"):
        call_demonstration(wrong)
    with pytest.raises(ValueError, match="no arithmetic expression"):
        call_demonstration({"question": "Name a colour.", "answer": "red", "metadata": {}})


def test_guess_feedback_hints_until_right_or_out_of_guesses() -> None:
    env = make_environment("guess_feedback", max_guesses=3)
    env.reset({"secret": 37})
    assert env.step("50").content == "Lower."
    assert env.step("I say 20") == Observation("Higher.")
    assert env.step("37") == Observation("", reward=1.0, done=True)
    env.reset({"secret": 37})
    env.step("1"), env.step("2")
    assert env.step("3") == Observation("", reward=0.0, done=True)
    plain = make_environment("guess_feedback", hints=False)
    assert "Reply with just the final number" in plain.reset(ROW)[0]["content"]
    assert plain.step("15").content == "Wrong, try again."
    assert plain.step("no idea").content.startswith("Please reply with a number")
    assert plain.step("14").reward == 1.0


def test_registry_lists_built_ins_and_suggests_names() -> None:
    assert {"calculator", "guess_feedback"} <= set(ENVIRONMENTS.names())
    with pytest.raises(ValueError, match="unknown environment; did you mean 'calculator'"):
        make_environment("calculater")


class Broken:
    """An environment whose step does whatever it is told to."""

    def __init__(self, result: Any = None, exc: Exception | None = None) -> None:
        self.result, self.exc = result, exc

    def reset(self, row: dict[str, Any]) -> Any:
        if self.exc:
            raise self.exc
        return self.result

    def step(self, policy_text: str) -> Any:
        if self.exc:
            raise self.exc
        return self.result


@pytest.mark.parametrize(
    ("env", "error"),
    [
        (Broken(exc=RuntimeError("boom")), "step raised RuntimeError: boom"),
        (Broken(result="just a string"), "step returned str, not an Observation"),
        (Broken(result=None), "step returned NoneType"),
        (Broken(result=Observation("ok", reward=math.nan)), "not a finite number"),
        (Broken(result=Observation("ok", reward="1")), "not a finite number"),  # type: ignore[arg-type]
        (Broken(result=Observation("ok", done="yes")), "not a bool"),  # type: ignore[arg-type]
        (Broken(result=Observation([{"role": "tool"}])), "no text 'content'"),
        (Broken(result=Observation(["hi"])), "message 0 is not a dict"),  # type: ignore[list-item]
    ],
)
def test_safe_step_turns_failures_into_error_observations(env: Broken, error: str) -> None:
    observation = safe_step(env, "anything")
    assert observation.done and observation.error is not None and error in observation.error
    assert observation.reward is None


def test_safe_step_cuts_flooding_text_and_passes_good_observations() -> None:
    assert len(str(safe_step(Broken(Observation("x" * 10**6)), "").content)) == 20_000
    assert safe_step(Broken(Observation("ok", reward=1)), "") == Observation("ok", reward=1.0)


def test_safe_reset_reports_failures() -> None:
    assert safe_reset(Broken(exc=KeyError("question")), ROW) == ([], "reset raised KeyError: 'question'")
    assert safe_reset(Broken(result=[]), ROW)[1] == "reset: reset returned no messages"
    assert safe_reset(Broken(result="hi"), ROW)[1] == "reset: messages are a str, not a list"


def test_calculator_few_shot_opens_with_a_worked_exchange() -> None:
    env = make_environment("calculator", few_shot=True)
    messages = env.reset({"question": "What is 3 + 4?"})
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user"]
    assert find_call(messages[1]["content"]) == "48 + 37" and messages[2]["content"] == "85" == messages[3]["content"]
    assert messages[-1]["content"].startswith("What is 3 + 4?")
    tool = make_environment("calculator", few_shot=True, tool_call_format=True).reset({"question": "q"})
    assert find_call(tool[1]["content"]) == "48 + 37" and "<tool_call>" in tool[1]["content"]
