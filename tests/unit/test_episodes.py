"""Episode token bookkeeping on the real SmolLM2 tokenizer: the episode's tokens are the prompt,
the sampled tokens as sampled and the chat-template deltas, byte for byte; the loss mask is 1
exactly on the sampled tokens; failures, K turns and the token budget end an episode cleanly."""

from __future__ import annotations

from typing import Any

import pytest

from rlhf.environments import Observation, make_environment
from rlhf.episodes import FALLBACK_FORMAT, Episode
from rlhf.experience import collate

GAME = {"secret": 37}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from rlhf.models import smollm2_instruct_path

    return AutoTokenizer.from_pretrained(smollm2_instruct_path())


def sampled(tokenizer: Any, text: str, eos: bool = True) -> tuple[list[int], list[float]]:
    """What an engine returns for one turn: ids (ending in <|im_end|> when it stopped there), log-probs."""
    ids = tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])
    return ids, [-0.1 * (i + 1) for i in range(len(ids))]


def render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))


def test_three_turns_are_prompt_plus_sampled_plus_deltas_byte_for_byte(tokenizer: Any) -> None:
    ep = Episode(tokenizer, make_environment("guess_feedback"), GAME, group_id=7, max_turns=5, max_tokens=2048)
    first = [
        {"role": "user", "content": "I am thinking of an integer between 1 and 100. Guess it: reply with one number."}
    ]
    prompt_ids = tokenizer.encode(render(tokenizer, first, True), add_special_tokens=False)
    assert ep.prompt_ids == prompt_ids and ep.token_ids == prompt_ids

    turns = [sampled(tokenizer, "50"), sampled(tokenizer, "I guess 25", eos=False), sampled(tokenizer, "37")]
    conversation, expected, deltas = list(first), list(prompt_ids), []
    for i, (ids, lps) in enumerate(turns):
        before = render(tokenizer, conversation, True)
        ep.add_policy_turn(ids, lps)
        expected += ids
        if i < 2:  # the environment answers; its delta, computed here independently
            conversation += [{"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}]
            conversation += [{"role": "user", "content": ["Lower.", "Higher."][i]}]
            suffix = render(tokenizer, conversation, True)[len(before + tokenizer.decode(ids)) :]
            deltas.append(suffix)
            expected += tokenizer.encode(suffix, add_special_tokens=False)
    assert ep.token_ids == expected
    assert (ep.done, ep.finish_reason, ep.turn_rewards, ep.reward) == (True, "env_done", [None, None, 1.0], 1.0)
    assert ep.delta_fallbacks == 0 and ep.errors == 0
    # the deltas close the policy's turn the way the template does: "\n" after a sampled <|im_end|>,
    # "<|im_end|>\n" when the turn stopped without it (max_tokens)
    assert deltas[0] == "\n<|im_start|>user\nLower.<|im_end|>\n<|im_start|>assistant\n"
    assert deltas[1] == "<|im_end|>\n<|im_start|>user\nHigher.<|im_end|>\n<|im_start|>assistant\n"
    # and the whole sequence reads as the template's rendering of the conversation
    conversation += [{"role": "assistant", "content": "37"}]
    assert tokenizer.decode(ep.token_ids) + "\n" == render(tokenizer, conversation, False)

    sample = ep.to_sample(policy_version=3)
    assert sample.token_ids == expected and sample.group_id == 7 and sample.policy_version == 3
    assert sample.text == "37" and sample.row == GAME and sample.finish_reason == "env_done"
    policy_positions = [i for i, m in enumerate(sample.loss_mask) if m == 1]
    assert [sample.token_ids[i] for i in policy_positions] == [t for ids, _ in turns for t in ids]
    assert [sample.logprobs[i] for i in policy_positions] == [x for _, lps in turns for x in lps]
    assert all(sample.logprobs[i] == 0.0 for i, m in enumerate(sample.loss_mask) if m == 0)
    batch = collate([sample], pad_id=tokenizer.pad_token_id)
    assert batch["response_mask"][0].tolist() == [float(m) for m in sample.loss_mask]


def test_sampled_tokens_are_kept_even_when_re_tokenizing_would_change_them(tokenizer: Any) -> None:
    ep = Episode(tokenizer, make_environment("guess_feedback"), GAME, 0, max_turns=3, max_tokens=2048)
    odd = [tokenizer.convert_tokens_to_ids(c) for c in "hello"] + [tokenizer.eos_token_id]  # one per letter
    assert odd[:5] != tokenizer.encode("hello", add_special_tokens=False)  # not how "hello" tokenizes
    ep.add_policy_turn(odd, [-1.0] * 6)
    start = len(ep.prompt_ids)
    assert ep.delta_fallbacks == 0 and ep.token_ids[start : start + 6] == odd
    assert ep.to_sample().loss_mask[start : start + 7] == [1] * 6 + [0]
    assert tokenizer.encode(tokenizer.decode(ep.token_ids), add_special_tokens=False) != ep.token_ids


def test_a_turn_the_template_cannot_reproduce_falls_back_to_the_tag_format(tokenizer: Any) -> None:
    ep = Episode(tokenizer, make_environment("guess_feedback"), GAME, 0, max_turns=3, max_tokens=2048)
    ids = tokenizer.encode("50<|im_start|>", add_special_tokens=False) + [tokenizer.eos_token_id]
    ep.add_policy_turn(ids, [0.0] * len(ids))  # a special token mid-turn: the decoded text differs
    tag = FALLBACK_FORMAT.format(role="user", content="Lower.")
    assert ep.delta_fallbacks == 1 and ep.token_ids[-len(tokenizer.encode(tag)) :] == tokenizer.encode(tag)
    ep.add_policy_turn(*sampled(tokenizer, "30"))  # and it stays in the tag format
    assert ep.delta_fallbacks == 2 and tokenizer.decode(ep.token_ids).endswith(
        '<observation role="user">Higher.</observation>\n'
    )


def test_calculator_tool_turns_are_masked_out(tokenizer: Any) -> None:
    row = {"question": "What is 2+3*4?", "answer": "14", "metadata": {"source_dataset": "basic_arithmetic"}}
    ep = Episode(tokenizer, make_environment("calculator"), row, 0, max_turns=4, max_tokens=1024)
    call, answer = sampled(tokenizer, "<calc>2+3*4</calc>"), sampled(tokenizer, "14")
    ep.add_policy_turn(*call)
    ep.add_policy_turn(*answer)
    assert (ep.finish_reason, ep.reward) == ("env_done", 1.0)
    sample = ep.to_sample()
    masked_text = tokenizer.decode([t for t, m in zip(sample.token_ids, sample.loss_mask, strict=True) if m == 0])
    policy_text = tokenizer.decode([t for t, m in zip(sample.token_ids, sample.loss_mask, strict=True) if m == 1])
    assert "<|im_start|>tool\n14<|im_end|>" in masked_text
    assert policy_text == "<calc>2+3*4</calc><|im_end|>14<|im_end|>"


class Scripted:
    """An environment that answers each turn with the next of `answers` (an exception is raised)."""

    def __init__(self, *answers: Any, first: Any = None) -> None:
        self.answers, self.first = list(answers), first

    def reset(self, row: dict[str, Any]) -> Any:
        if isinstance(self.first, Exception):
            raise self.first
        return self.first or [{"role": "user", "content": "Go."}]

    def step(self, policy_text: str) -> Any:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.mark.parametrize(
    "answer", [ValueError("bad state"), "garbage", Observation("x", reward=float("inf")), Observation([{"no": 1}])]
)
def test_a_failing_environment_ends_its_episode_with_a_counted_error(tokenizer: Any, answer: Any) -> None:
    ep = Episode(tokenizer, Scripted(Observation("again"), answer), {}, 0, max_turns=5, max_tokens=512)
    ep.add_policy_turn(*sampled(tokenizer, "one"))
    before = list(ep.token_ids)
    ep.add_policy_turn(*sampled(tokenizer, "two"))  # does not raise
    assert (ep.done, ep.finish_reason, ep.errors) == (True, "env_error", 1) and ep.error
    assert ep.token_ids == before + sampled(tokenizer, "two")[0]  # the policy's turn is kept, nothing after
    assert ep.to_sample().num_policy_tokens == 2 * len(sampled(tokenizer, "one")[0])
    with pytest.raises(RuntimeError, match="episode is over"):
        ep.add_policy_turn(*sampled(tokenizer, "three"))


def test_a_failing_reset_gives_an_empty_finished_episode(tokenizer: Any) -> None:
    ep = Episode(tokenizer, Scripted(first=KeyError("question")), {}, 0, max_turns=2, max_tokens=512)
    assert (ep.done, ep.finish_reason, ep.errors, ep.token_ids) == (True, "env_error", 1, [])
    assert ep.to_sample().num_policy_tokens == 0  # the worker drops it and counts the error


def test_truncation_at_k_turns(tokenizer: Any) -> None:
    ep = Episode(tokenizer, make_environment("guess_feedback", max_guesses=10), GAME, 0, max_turns=2, max_tokens=2048)
    ep.add_policy_turn(*sampled(tokenizer, "50"))
    ep.add_policy_turn(*sampled(tokenizer, "40"))
    assert (ep.done, ep.finish_reason, ep.turns) == (True, "max_turns", 2)
    assert tokenizer.decode(ep.token_ids).endswith("40<|im_end|>")  # the unanswerable observation is not appended


def test_truncation_at_the_token_budget_cuts_the_policy_turn(tokenizer: Any) -> None:
    ep = Episode(tokenizer, make_environment("guess_feedback"), GAME, 0, max_turns=5, max_tokens=2048)
    ep.max_tokens = len(ep.prompt_ids) + 3
    ids, lps = sampled(tokenizer, "I think it is 50")
    ep.add_policy_turn(ids, lps)
    assert (ep.finish_reason, len(ep.token_ids), ep.remaining_tokens, ep.turn_rewards) == (
        "token_budget",
        ep.max_tokens,
        0,
        [None],
    )
    assert ep.to_sample().logprobs[-3:] == lps[:3]


def test_an_observation_over_the_budget_ends_the_episode_without_it(tokenizer: Any) -> None:
    flood = Observation("word " * 500)
    ep = Episode(tokenizer, Scripted(flood), {}, 0, max_turns=5, max_tokens=200)
    ep.add_policy_turn(*sampled(tokenizer, "hi"))
    assert (ep.finish_reason, ep.token_ids[-1]) == ("token_budget", tokenizer.eos_token_id)
    assert ep.length <= 200


def test_a_prompt_over_the_budget_is_cut_and_ends_the_episode(tokenizer: Any) -> None:
    ep = Episode(tokenizer, make_environment("guess_feedback"), GAME, 0, max_turns=5, max_tokens=10)
    assert (ep.done, ep.finish_reason, len(ep.token_ids)) == (True, "token_budget", 10)


TOOLS_TEMPLATE = (  # a ChatML template that renders tools in the system turn (as Qwen's and Hermes' do)
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_the_calculator_tool_call_format_goes_through_a_template_with_tools(tokenizer: Any) -> None:
    import copy

    with_tools = copy.deepcopy(tokenizer)
    with_tools.chat_template = TOOLS_TEMPLATE
    row = {"question": "What is 6*7?", "answer": "42", "metadata": {"source_dataset": "basic_arithmetic"}}
    ep = Episode(
        with_tools, make_environment("calculator", tool_call_format=True), row, 0, max_turns=3, max_tokens=1024
    )
    assert tokenizer.decode(ep.prompt_ids).startswith("<|im_start|>system\nTools: calculator <|im_end|>")
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
    ep.add_policy_turn(*sampled(tokenizer, call))
    assert tokenizer.decode(ep.token_ids).endswith(
        call + "<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    )
    ep.add_policy_turn(*sampled(tokenizer, "42"))
    assert (ep.finish_reason, ep.reward, ep.delta_fallbacks) == ("env_done", 1.0, 0)


def test_the_warm_starts_transcripts_are_the_episodes_own_turns(tokenizer: Any) -> None:
    """data.sft_target=calculator_transcript: each pair's context, templated as the SFT loop does, is
    the episode's text at that turn (the first one token for token), and its response is the turn."""
    from rlhf.data.chat import apply_chat_template_messages
    from rlhf.data.reasoning_gym import reasoning_gym_prompts
    from rlhf.environments.calculator import call_demonstration

    for row in reasoning_gym_prompts("chain_sum", 5, seed=1, task_kwargs={"min_digits": 3, "max_digits": 3}):
        call, answer = call_demonstration(row)
        ep = Episode(tokenizer, make_environment("calculator"), row, 0, max_turns=3, max_tokens=1024)
        context = apply_chat_template_messages(tokenizer, call["messages"])
        assert tokenizer(context, add_special_tokens=False)["input_ids"] == ep.prompt_ids
        ep.add_policy_turn(*sampled(tokenizer, call["response"], eos=False))  # cut at the stop string </calc>
        assert not ep.done and ep.env.calls == 1
        assert tokenizer.decode(ep.token_ids) == apply_chat_template_messages(tokenizer, answer["messages"])
        ep.add_policy_turn(*sampled(tokenizer, answer["response"]))
        assert (ep.finish_reason, ep.reward) == ("env_done", 1.0)
