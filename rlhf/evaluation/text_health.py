"""Text health: cheap signs that generations degenerate (repetition, gibberish, length blow-up).

A policy that games its reward often shows it in the text first: the same phrase over and over,
fewer distinct words, runs of punctuation or symbols. These are measured on whitespace words, so
they do not depend on any tokenizer.
"""

from __future__ import annotations

HEALTH_KEYS = ("length", "distinct_1", "distinct_2", "repeated_3gram", "non_text")


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that repeat an earlier one in the same text (0: none; ->1: a loop)."""
    grams = ngrams(text.split(), n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def non_text_fraction(text: str) -> float:
    """Share of non-space characters that are neither letters, digits nor common punctuation."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    ok = sum(c.isalnum() or c in ".,;:!?'\"()-+*/=%$&" for c in chars)
    return 1.0 - ok / len(chars)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of `texts` together (Li et al. 2016); 0 for no n-grams."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sample_health(text: str) -> dict[str, float]:
    """Per-sample health: length in words, repeated 3-gram share, non-text character share."""
    return {
        "length": float(len(text.split())),
        "repeated_3gram": repeated_ngram_fraction(text, 3),
        "non_text": non_text_fraction(text),
    }


def text_health(texts: list[str]) -> dict[str, float]:
    """Health of a set of generations: mean length (words), distinct-1/2 over the set, mean
    repeated-3-gram share and non-text share per sample. Keys: HEALTH_KEYS."""
    if not texts:
        return dict.fromkeys(HEALTH_KEYS, 0.0)
    per = [sample_health(t) for t in texts]
    mean = {k: sum(p[k] for p in per) / len(per) for k in ("length", "repeated_3gram", "non_text")}
    return {
        "length": mean["length"],
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_3gram": mean["repeated_3gram"],
        "non_text": mean["non_text"],
    }
