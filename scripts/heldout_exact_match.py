"""Held-out exact-match accuracy of an RLVR run's starting and trained policy:

    .venv/bin/python scripts/heldout_exact_match.py runs/rlvr-smollm2-chain-sum

Greedy answers to the run's own held-out prompts with its generation settings (vLLM in this
process, fp32), scored twice: by reasoning-gym's verifier, as the run's eval/reward does (partial
credit len(gold)/len(answer) when the gold number is a substring of a wrong one), and strictly:
the verifier's full score, 1.0, which it gives only when the last number equals the gold answer.
"""

import sys
from pathlib import Path

from transformers import AutoTokenizer
from vllm import LLM, SamplingParams

from rlhf.config import load_config
from rlhf.data.chat import apply_chat_template
from rlhf.data.sources import load_prompts
from rlhf.models import resolve_model_path
from rlhf.rewards.verifiers import reasoning_gym_reward


def main() -> None:
    run = Path(sys.argv[1])  # a finished run folder: config.yaml and final/
    cfg = load_config(run / "config.yaml")
    heldout = load_prompts(cfg.data, "eval")
    for name, path in [("start", resolve_model_path(cfg.models.policy.path)), ("trained", str(run / "final"))]:
        tok = AutoTokenizer.from_pretrained(path)
        texts = [
            apply_chat_template(tok, p["prompt"]) if cfg.data.chat_template == "tokenizer" else p["prompt"]
            for p in heldout
        ]  # as the run formatted them (RLCoordinator.format_prompt)
        llm = LLM(path, dtype="float32", max_model_len=512, seed=0)
        outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=cfg.rollout.max_new_tokens))
        completions = [o.outputs[0].text for o in outs]
        scores = reasoning_gym_reward()(completions, heldout)
        exact = [score == 1.0 for score in scores]
        print(
            f"{name}: verifier score {sum(scores) / len(scores):.4f}, exact match {sum(exact)}/{len(exact)} = "
            f"{sum(exact) / len(exact):.1%}, partial-credit answers {sum(0 < s < 1 for s in scores)}",
            flush=True,
        )
        del llm


if __name__ == "__main__":  # vLLM's engine process re-imports this module
    main()
