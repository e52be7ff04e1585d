"""reasoning-gym prompts: deterministic, scoreable, held-out split disjoint from train."""

import pytest

from rlhf.data.chat import apply_chat_template
from rlhf.data.reasoning_gym import (
    CHAIN_SUM_EASY,
    DEFAULT_SUFFIX,
    answer_matches_value,
    arithmetic_value,
    gold_answer_problems,
    reasoning_gym_prompts,
    train_heldout_split,
)
from rlhf.rewards.verifiers import reasoning_gym_reward


def test_prompts_are_deterministic_and_carry_what_scoring_needs():
    a = reasoning_gym_prompts("chain_sum", size=5, seed=7, task_kwargs=CHAIN_SUM_EASY)
    assert a == reasoning_gym_prompts("chain_sum", size=5, seed=7, task_kwargs=CHAIN_SUM_EASY)
    assert a != reasoning_gym_prompts("chain_sum", size=5, seed=8, task_kwargs=CHAIN_SUM_EASY)
    for sample in a:
        assert sample["prompt"] == sample["question"] + DEFAULT_SUFFIX
        assert sample["metadata"]["source_dataset"] == "chain_sum"
    assert reasoning_gym_reward()([s["answer"] for s in a], a) == [1.0] * 5


def test_heldout_questions_never_appear_in_train():
    # The easy space is small (a few thousand problems), so seeds collide: the split must filter.
    train, heldout = train_heldout_split("chain_sum", 500, 100, seed=0, task_kwargs=CHAIN_SUM_EASY)
    assert len(train) == 500 and len(heldout) == 100
    assert not {s["question"] for s in train} & {s["question"] for s in heldout}


def test_chat_template_wraps_the_prompt_for_generation():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from rlhf.models import CHATML_TEMPLATE

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=CHATML_TEMPLATE)
    text = apply_chat_template(tokenizer, "What is 2 + 3?")
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert apply_chat_template(tokenizer, "q", system="Be brief.").startswith("<|im_start|>system\nBe brief.")


def test_prompt_stream_visits_every_row_once_per_epoch_and_resumes():
    from rlhf.data.stream import PromptStream

    rows = [{"prompt": str(i)} for i in range(5)]
    stream = PromptStream(rows, seed=1)
    first_epoch = stream.next(5)
    assert sorted(r["prompt"] for r in first_epoch) == [str(i) for i in range(5)]
    second = stream.next(3)
    resumed = PromptStream(rows, seed=1, position=5).next(3)
    assert second == resumed and stream.position == 8
    assert PromptStream(rows, seed=2).next(5) != first_epoch  # the seed decides the order


def test_gold_answers_are_checked_at_load():
    """basic_arithmetic with one-digit terms and no parentheses states wrong answers ("4 / 1" -> 2):
    those rows are bad rows (strict: an error naming them; skip: dropped)."""
    from rlhf.config import DataConfig
    from rlhf.data.sources import DataError, load_prompts

    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "allow_parentheses": False}
    cfg = DataConfig(source="reasoning_gym:basic_arithmetic", task_kwargs=kwargs, train_size=300, eval_size=20)
    with pytest.raises(DataError) as e:
        load_prompts(cfg, "train")
    assert "62 of 300 rows are bad" in str(e.value)
    assert "row 2: field 'answer' = '2': wrong; the question's expression '4 / 1' = 4" in str(e.value)
    assert "divides by zero" in str(e.value)
    cfg.on_bad_row = "skip"
    rows = load_prompts(cfg, "train")
    assert len(rows) == 238 and all(not gold_answer_problems(r, "basic_arithmetic") for r in rows)
    # the main job's data is right: every row of it passes
    cfg = DataConfig(source="reasoning_gym:chain_sum", task_kwargs=CHAIN_SUM_EASY, train_size=300, eval_size=200)
    assert len(load_prompts(cfg, "train")) == 300 and len(load_prompts(cfg, "eval")) == 200


def test_gold_answer_checks():
    assert arithmetic_value("-( 3 - 5 ) * 2 / 4") == 1.0
    assert arithmetic_value("__import__('os')") is None and arithmetic_value("2 ** 3") is None
    assert answer_matches_value("0.56", 5 / 9) and not answer_matches_value("1", 5 / 9)
    row = {"question": "3 + 4 =", "answer": "7", "metadata": {"source_dataset": "chain_sum", "expression": "3 + 4"}}
    assert gold_answer_problems(row, "chain_sum") == []
    # an answer the run's answer extraction (last number) cannot read never earns the reward
    wrong = row | {"answer": "seven", "metadata": {"source_dataset": "chain_sum"}}
    assert "scores 0" in gold_answer_problems(wrong, "chain_sum")[0]
    assert gold_answer_problems(wrong, "chain_sum", verified=False) == []
