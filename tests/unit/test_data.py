"""reasoning-gym prompts: deterministic, scoreable, held-out split disjoint from train."""

from rlhf.data.chat import apply_chat_template
from rlhf.data.reasoning_gym import CHAIN_SUM_EASY, DEFAULT_SUFFIX, reasoning_gym_prompts, train_heldout_split
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
