"""Judges: scores of generated texts that the policy is not trained on.

A judge is a callable `(completions, rows) -> list[float]` like a reward function (rows are the
prompt dicts the completions answer, one per completion), named in the config's `eval.judges`:

    exact_match        1.0 when the completion's final answer (last \\boxed{}, text after ####,
                       else last number) equals the row's gold `answer` (numbers compared as
                       numbers), else 0: stricter than reasoning-gym's verifier, which gives
                       partial credit when the gold number is a substring of a wrong one
    lexicon_sentiment  VADER's compound sentiment of the completion, -1 (negative) .. +1
                       (positive): a rule-based lexicon (PyPI vaderSentiment), independent of
                       any learned reward model
    on_topic           cosine similarity of the completion's all-MiniLM-L6-v2 embedding (the
                       encoder the project ships) to the mean embedding of the domain's texts
                       (each row's `eval.on_topic_field`, e.g. the whole IMDB review; the prompts
                       when rows lack it): drifting to generic text lowers it
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from rlhf.rewards.verifiers import final_answer

JudgeFn = Callable[[list[str], list[dict[str, Any]]], list[float]]
JUDGES = ("exact_match", "lexicon_sentiment", "on_topic")
VADER_PIN = "vaderSentiment==3.3.2"


def _as_number(text: str) -> float | None:
    try:
        value = float(text.replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(answer: str | None, gold: object) -> bool:
    """Strict equality of an extracted answer and a gold answer: as numbers when both are, else as stripped text."""
    if answer is None or gold is None:
        return False
    a, g = _as_number(answer), _as_number(str(gold))
    if a is not None and g is not None:
        return a == g
    return answer.strip() == str(gold).strip()


def exact_match(completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
    return [
        1.0 if answers_match(final_answer(c), r.get("answer")) else 0.0 for c, r in zip(completions, rows, strict=True)
    ]


@cache
def _vader() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise ImportError(f"judge 'lexicon_sentiment' needs the VADER lexicon: pip install {VADER_PIN}") from e
    return SentimentIntensityAnalyzer()


def lexicon_sentiment(completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
    analyzer = _vader()
    return [float(analyzer.polarity_scores(c)["compound"]) for c in completions]


class Encoder:
    """all-MiniLM-L6-v2 sentence embeddings: mean of the last hidden states over real tokens, unit length."""

    def __init__(self, path: str | None = None, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from rlhf.models import minilm_path

        path = path or minilm_path()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> Any:
        """(N, D) unit-length embeddings of `texts`."""
        torch = self.torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                )
                hidden = self.model(**enc).last_hidden_state  # (b, T, D)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (b, D)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


@cache
def _encoder() -> Encoder:
    return Encoder()


def on_topic_judge(field: str = "review") -> JudgeFn:
    """The on_topic judge with domain texts taken from each row's `field` (else its prompt)."""

    def on_topic(completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
        if not completions:
            return []
        encoder = _encoder()
        domain = list(dict.fromkeys(str(r.get(field) or r["prompt"]) for r in rows))  # each text once
        centroid = encoder(domain).mean(0)  # (D,)
        centroid = centroid / centroid.norm().clamp(min=1e-12)
        # an empty completion has no meaning to compare: it scores 0, not the [CLS]/[SEP] embedding's similarity
        sims = (encoder([c if c.strip() else "." for c in completions]) @ centroid).tolist()  # (N,)
        return [float(s) if c.strip() else 0.0 for s, c in zip(sims, completions, strict=True)]

    return on_topic


def build_judges(names: Sequence[str], on_topic_field: str = "review") -> dict[str, JudgeFn]:
    """{name: judge} for the config's eval.judges (names checked against JUDGES). ImportError when
    lexicon_sentiment is named and vaderSentiment is not installed."""
    builders: dict[str, Callable[[], JudgeFn]] = {
        "exact_match": lambda: exact_match,
        "lexicon_sentiment": lambda: (_vader(), lexicon_sentiment)[1],  # a missing package fails here, at start
        "on_topic": lambda: on_topic_judge(on_topic_field),
    }
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise ValueError(f"unknown judge(s) {unknown}; known: {', '.join(JUDGES)}")
    return {name: builders[name]() for name in names}


def run_judge(judge: JudgeFn, completions: list[str], rows: list[dict[str, Any]]) -> tuple[list[float], str | None]:
    """(scores, None), or (NaN per sample, the error) when the judge fails: a judge must never stop a run."""
    try:
        scores = [float(s) for s in judge(completions, rows)]
        if len(scores) != len(completions):
            raise ValueError(f"returned {len(scores)} scores for {len(completions)} completions")
        return scores, None
    except Exception as e:  # an eval aid: report it, keep training
        return [math.nan] * len(completions), f"{type(e).__name__}: {e}"
