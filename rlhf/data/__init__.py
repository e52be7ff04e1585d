"""Prompt, preference and SFT data: built-in sources (reasoning-gym, IMDB) and validated files."""

from rlhf.data.imdb import imdb_preference_pairs, imdb_prompts, imdb_reviews, imdb_sft_pairs
from rlhf.data.sources import (
    DataError,
    RowReport,
    load_preference_pairs,
    load_prompts,
    load_rows,
    load_sft_pairs,
    validate_rows,
)

__all__ = [
    "DataError",
    "RowReport",
    "imdb_preference_pairs",
    "imdb_prompts",
    "imdb_reviews",
    "imdb_sft_pairs",
    "load_preference_pairs",
    "load_prompts",
    "load_rows",
    "load_sft_pairs",
    "validate_rows",
]
