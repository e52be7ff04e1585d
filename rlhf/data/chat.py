"""Chat formatting: the model's own chat template, so prompts look like what it was tuned on."""

from __future__ import annotations

from typing import Any


def apply_chat_template(tokenizer: Any, prompt_text: str, system: str | None = None) -> str:
    """Wrap one user turn in the tokenizer's chat template, ending where the assistant speaks.

    Returns text, not ids: vLLM and HF tokenizers both take it, and it is readable in logs.
    Pass `system` to replace the template's default system prompt (SmolLM2 adds one).
    The RL loop, evaluations and benchmarks call it through rlhf.experience.format_prompt, which
    also honours data.chat_template = "none".
    """
    messages = [{"role": "user", "content": prompt_text}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def apply_chat_template_messages(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """A whole conversation (user, assistant, tool turns) in the chat template, ending where the
    assistant speaks next: the context an episode's policy turn is sampled in (SFT on transcripts)."""
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
