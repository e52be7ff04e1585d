"""Tiny random causal LMs for tests and benchmarks (test-only code, kept out of the library).

`build_tiny_causal_lm()` writes a random Qwen2 (2 layers, hidden 64 by default) with a BPE
tokenizer trained on the given texts and the ChatML template the real SmolLM2 uses, small enough
that tests start vLLM and DeepSpeed engines on it in seconds. Imported as `tests.tiny_models`
(run from the repository root: `python -m pytest`, `python -m bench`).
"""

from __future__ import annotations

import os

import torch

from rlhf.models import CHAT_END, CHATML_TEMPLATE


def _train_tokenizer(texts: list[str], vocab_size: int, split_digits: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:  # one token per digit, as Llama and Qwen do: every number shares the same ten tokens
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bpe.pre_tokenizer])
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", CHAT_END]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=CHAT_END,
        pad_token=CHAT_END,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=specials[:2],
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_causal_lm(
    out_dir: str | os.PathLike,
    texts: list[str],
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.2,
    split_digits: bool = False,
) -> str:
    """Write a random tiny Qwen2 causal LM and a BPE tokenizer trained on `texts` to `out_dir`.

    Both transformers and vLLM load the result. Different `seed`s give the same architecture
    and tokenizer with different weights (useful for weight-sync tests). The default
    `initializer_range` (0.2) makes a random model's greedy choices clear-cut; a model meant to be
    trained learns much faster from the usual 0.02. `split_digits` gives every digit its own token
    (a number seen only at evaluation is then made of the same tokens as the trained ones, not of
    fragments the trained numbers never used). Returns `out_dir`.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(texts, vocab_size, split_digits)
    head_dim = 32  # a head size vLLM's CPU attention kernels support
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // head_dim),
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        # Larger than the default 0.02 so the random model's next-token distribution is peaked
        # enough that greedy decoding is not decided by float rounding noise.
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
