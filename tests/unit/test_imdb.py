"""Built-in IMDB data: clean text, fixed disjoint splits, pairs whose preference is the sentiment."""

import pytest

from rlhf.data.imdb import (
    NEGATIVE,
    POSITIVE,
    clean_review,
    imdb_preference_pairs,
    imdb_prompts,
    imdb_reviews,
    imdb_sft_pairs,
    truncate_words,
)


def test_html_is_stripped_but_reviewers_angle_brackets_stay():
    assert clean_review("Great.<br /><br />Really <i>great</i> &amp; fun") == "Great. Really great & fun"
    assert clean_review("rated <=8.<br />ok <grin>") == "rated <=8. ok <grin>"


def test_splits_are_fixed_disjoint_and_labelled():
    train, heldout = imdb_reviews("train"), imdb_reviews("eval")
    assert len(train) + len(heldout) == 25_000  # the IMDB part of the file
    assert 0.07 < len(heldout) / 25_000 < 0.13
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert {r["label"] for r in heldout} == {POSITIVE, NEGATIVE}
    assert not any("<br" in r["text"] for r in train)
    assert imdb_reviews("eval", seed=1) == imdb_reviews("eval", seed=1) != heldout  # seed only reorders
    assert len(imdb_reviews("train", sources=("imdb", "rotten_tomatoes"))) > len(train)


def test_prompts_are_review_prefixes():
    prompts = imdb_prompts(16, seed=0, prefix_words=8)
    assert len(prompts) == 16 and prompts == imdb_prompts(16, seed=0)
    for p in prompts:
        assert len(p["prompt"].split()) == 8 and p["review"].startswith(p["prompt"])
    eval_reviews = {r["text"] for r in imdb_reviews("eval")}
    assert not any(p["review"] in eval_reviews for p in prompts)


def test_preference_pairs_prefer_positive_reviews():
    by_text = {r["text"]: r["label"] for r in imdb_reviews("train")}
    pairs = imdb_preference_pairs(32, seed=5, max_words=30)
    assert len(pairs) == 32 and pairs == imdb_preference_pairs(32, seed=5, max_words=30)
    for pair in pairs:
        assert len(pair["chosen"].split()) <= 30 and len(pair["rejected"].split()) <= 30
        # each side is the start of a real review with the right label
        chosen = [label for text, label in by_text.items() if text.startswith(pair["chosen"])]
        rejected = [label for text, label in by_text.items() if text.startswith(pair["rejected"])]
        assert POSITIVE in chosen and NEGATIVE in rejected
    train_chosen = {p["chosen"] for p in pairs}
    assert not train_chosen & {p["chosen"] for p in imdb_preference_pairs(200, seed=5, max_words=30, split="eval")}


def test_sft_pairs_continue_the_prompt():
    for pair in imdb_sft_pairs(8, seed=2, prefix_words=6, max_words=20):
        assert len(pair["prompt"].split()) == 6 and 0 < len(pair["response"].split()) <= 20


def test_truncation_prefers_a_sentence_end():
    text = "One two three. Four five six seven eight nine ten"
    assert truncate_words(text, 6) == "One two three."
    assert truncate_words(text, 3) == "One two three."
    assert truncate_words("a b c d e f", 4) == "a b c d"
    assert truncate_words("short", 10) == "short"


def test_asking_for_more_than_the_split_has_fails_clearly():
    with pytest.raises(ValueError, match="only"):
        imdb_preference_pairs(10**6)
