"""The `calculator` environment: a tool the policy may call before it answers.

Call formats (both accepted; `tool_call_format` says which one the instructions teach):
  plain tags   <calc>2+3*4</calc>                       (any tokenizer; the documented default)
  tool call    <tool_call>{"name": "calculator", "arguments": {"expression": "2+3*4"}}</tool_call>
               (the Hermes/Qwen style, taught when the tokenizer's chat template renders tools)
A turn with a call is answered with a "tool" message holding the result (or the error, e.g.
"error: names are not allowed"); a turn without one is the final answer, scored by the
reasoning-gym verifier of the row's task, and ends the episode.

`call_demonstration(row)` is a tool-using transcript for supervised warm starts: the call on the
problem's expression after the environment's first message, then the result as the final answer
after the tool's reply (`data.sft_target: calculator_transcript`).

Arithmetic is evaluated from the ast, never with eval: numbers, + - * / // % ** and
parentheses only; no names, calls or attributes; powers and results are bounded so a call
like 9**9**9 is refused instead of eating the CPU.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections.abc import Callable
from typing import Any

from rlhf.environments.base import Message, Observation, environment
from rlhf.rewards.verifiers import reasoning_gym_reward

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_INT_BITS = 256  # bigger intermediate integers are refused (bounds the work of * and **)
MAX_FLOAT = 1e100

PLAIN_CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
CALCULATOR_TOOL: dict[str, Any] = {  # the JSON schema a chat template renders for the tool
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 2+3*4"}},
            "required": ["expression"],
        },
    },
}
PLAIN_INSTRUCTIONS = (
    "You may use a calculator: write <calc>expression</calc> (for example <calc>2+3*4</calc>) and end "
    "your turn; the result comes back. When you know the answer, reply with just the final number."
)
TOOL_INSTRUCTIONS = (
    "You may call the calculator tool for arithmetic. When you know the answer, reply with just the final number."
)

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


class CalculatorError(ValueError):
    """The expression is not allowed or cannot be evaluated (the message goes back to the policy)."""


def evaluate(expression: str) -> int | float:
    """The value of a safe arithmetic expression; CalculatorError for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**"), mode="eval")
    except SyntaxError:
        raise CalculatorError("not an arithmetic expression") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return _bounded(node.value)
        raise CalculatorError("only numbers are allowed")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except (ZeroDivisionError, OverflowError, ValueError) as e:
            raise CalculatorError(str(e)) from None
    if isinstance(node, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)):
        raise CalculatorError("names, attributes and calls are not allowed")
    raise CalculatorError(f"{type(node).__name__} is not allowed")


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse powers whose result would be huge before computing them."""
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent over {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and base.bit_length() * exponent > MAX_INT_BITS:
        raise CalculatorError("result too large")


def _bounded(value: Any) -> int | float:
    if isinstance(value, complex):
        raise CalculatorError("complex result")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError("result too large")
    if isinstance(value, float) and not abs(value) <= MAX_FLOAT:  # also refuses nan and inf
        raise CalculatorError("result too large")
    if not isinstance(value, (int, float)):
        raise CalculatorError("not a number")
    return value


def format_number(value: int | float) -> str:
    """12 -> "12", 2.5 -> "2.5", 1/3 -> "0.3333333333" (ten significant digits)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def find_call(text: str) -> str | None:
    """The expression of the turn's first calculator call, in either format, or None."""
    plain = PLAIN_CALL.search(text)
    tool = TOOL_CALL.search(text)
    if tool and (plain is None or tool.start() < plain.start()):
        try:
            call = json.loads(tool.group(1))
            expression = call["arguments"]["expression"] if call.get("name") == "calculator" else None
        except (ValueError, TypeError, KeyError, AttributeError):
            return ""  # a malformed call: answered with an error, not taken as the final answer
        return str(expression) if expression is not None else ""
    return plain.group(1) if plain else None


def template_has_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders tools (then the tool-call format is taught)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


@environment("calculator")
class Calculator:
    """A calculator tool (<calc>2+3*4</calc>); the final answer is scored by reasoning-gym."""

    def __init__(self, tool_call_format: bool = False, task: str | None = None, few_shot: bool = False) -> None:
        self.tool_call_format = tool_call_format  # teach <tool_call> JSON instead of <calc> tags
        self.few_shot = few_shot  # open with one worked exchange (a call, its result, the answer)
        self.task = task  # reasoning-gym task; None: the row's metadata["source_dataset"]
        self.tools = [CALCULATOR_TOOL] if tool_call_format else None  # rendered by the chat template
        self.row: dict[str, Any] = {}
        self.calls = 0  # tool calls this episode (the demo's tool-call rate)

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self.row, self.calls = row, 0
        instructions = TOOL_INSTRUCTIONS if self.tool_call_format else PLAIN_INSTRUCTIONS
        question = [{"role": "user", "content": f"{row['question']}\n\n{instructions}"}]
        return self.example(instructions) + question if self.few_shot else question

    def example(self, instructions: str) -> list[Message]:
        """A worked exchange shown before the question: small models rarely call a tool unprompted."""
        call = (
            '<tool_call>{"name": "calculator", "arguments": {"expression": "48 + 37"}}</tool_call>'
            if self.tool_call_format
            else "<calc>48 + 37</calc>"
        )
        return [
            {"role": "user", "content": f"What is 48 + 37?\n\n{instructions}"},
            {"role": "assistant", "content": call},
            {"role": "tool", "content": format_number(evaluate("48 + 37"))},
            {"role": "assistant", "content": "85"},
        ]

    def episode_metrics(self) -> dict[str, float]:
        """Per-episode figures the rollout reports (episodes/env/<name>): the tool-call rate's parts."""
        return {"tool_calls": float(self.calls), "used_tool": float(self.calls > 0)}

    def step(self, policy_text: str) -> Observation:
        expression = find_call(policy_text)
        if expression is None:  # no call: the final answer
            score = reasoning_gym_reward(self.task)([policy_text], [self.row])[0]
            return Observation("", reward=score, done=True)
        self.calls += 1
        try:
            result = format_number(evaluate(expression))
        except CalculatorError as e:
            result = f"error: {e}"
        return Observation([{"role": "tool", "content": result}])


def problem_expression(row: dict[str, Any]) -> str:
    """The arithmetic expression of a reasoning-gym row: metadata["expression"] (chain_sum,
    basic_arithmetic), else the question's text between its last ":" and the final "=".
    ValueError when neither is there."""
    expression = (row.get("metadata") or {}).get("expression")
    if isinstance(expression, str) and expression.strip():
        return expression.strip()
    match = re.search(r":\s*([^:=]+?)\s*=\s*\??\s*$", str(row.get("question", "")))
    if match is None:
        raise ValueError(f"no arithmetic expression in the row: {str(row.get('question'))[:80]!r}")
    return match.group(1)


def call_demonstration(row: dict[str, Any], tool_call_format: bool = False) -> list[dict[str, Any]]:
    """A tool-using transcript of the row's problem as supervised pairs, one per policy turn:
    1. `messages` = the user message Calculator.reset(row) opens with (no worked example),
       `response` = the call on the row's expression, in the format that environment teaches;
    2. `messages` = that, the call and the tool's result (what step() answers), `response` = the
       result as the final answer.
    Each pair also has `prompt`, the user message's text. Rendered with the chat template and a
    generation prompt, `messages` is the episode's own context at that turn. ValueError when the
    call's value is not the row's gold answer (a transcript that would teach a wrong answer)."""
    env = Calculator(tool_call_format=tool_call_format)
    first = env.reset(row)  # few_shot=False: the question alone, one user message
    expression = problem_expression(row)
    if tool_call_format:
        call = f"<tool_call>{json.dumps({'name': 'calculator', 'arguments': {'expression': expression}})}</tool_call>"
    else:
        call = f"<calc>{expression}</calc>"
    result = env.step(call).messages()
    value = str(result[0]["content"])
    if str(row.get("answer", "")).strip() != value:
        raise ValueError(f"{expression!r} = {value}, but the row's answer is {row.get('answer')!r}")
    prompt = str(first[0]["content"])
    return [
        {"prompt": prompt, "messages": first, "response": call},
        {"prompt": prompt, "messages": [*first, {"role": "assistant", "content": call}, *result], "response": value},
    ]
