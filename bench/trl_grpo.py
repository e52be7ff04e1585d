"""The peer: TRL's GRPOTrainer on bench.rl_step's workload, for the samples/s comparison.

    bash bench/setup_trl.sh      # once: TRL in its own venv, bench/.trl-venv
    bench/.trl-venv/bin/python -m bench.trl_grpo --model-path PATH [--prompts 8] [--samples 4] [--tokens 32] [--steps 4] [--json out.json]

Runs in TRL's venv (no Ray, vLLM, DeepSpeed or pydantic there), so it imports only the light
parts of this repository: the reasoning-gym prompts and the same verifier reward. Same model,
prompts, samples per prompt, max new tokens, temperature 1, KL coef (TRL's `beta`) with a frozen
reference, token-mean loss (TRL's "dapo"), lr, grad clip, micro-batches of 8 with gradient
accumulation up to one optimizer step per generation batch, fp32 on the CPU. Without vLLM, TRL
samples with HF `generate`, all samples of a step in one batch. Step time is the wall time
between optimizer steps (TRL's callback), generation included; median over steps after the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.monitor import own_peak_mib
    from bench.rl_step import KL_COEF, LR, MICRO_BATCH, PROMPT_SUFFIX, TASK_KWARGS, TRAIN_SIZE, add_workload_args
    from rlhf.data.reasoning_gym import reasoning_gym_prompts
    from rlhf.experience import format_prompt
    from rlhf.rewards.verifiers import reasoning_gym_reward

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    add_workload_args(parser)
    parser.add_argument("--json")
    args = parser.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model_path)
    rows = reasoning_gym_prompts("chain_sum", TRAIN_SIZE, seed=0, task_kwargs=TASK_KWARGS, suffix=PROMPT_SUFFIX)
    data = Dataset.from_list(
        [
            {
                "prompt": format_prompt(tok, r["prompt"]),  # as our runs format it (data.chat_template default)
                "question": r["question"],
                "answer": r["answer"],
                "metadata": json.dumps(r["metadata"]),
            }
            for r in rows
        ]
    )
    verifier = reasoning_gym_reward("chain_sum")

    def chain_sum_reward(prompts, completions, question, answer, metadata, **_):
        samples = [
            {"question": q, "answer": a, "metadata": json.loads(m)} for q, a, m in zip(question, answer, metadata)
        ]
        return verifier(completions, samples)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, *_, **__):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    batch = args.prompts * args.samples
    micro = min(MICRO_BATCH, batch)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,  # one update per generation batch
        num_generations=args.samples,
        max_completion_length=args.tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=KL_COEF,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    clock = StepClock()
    trainer = GRPOTrainer(
        model=args.model_path,
        reward_funcs=chain_sum_reward,
        args=config,
        train_dataset=data,
        processing_class=tok,
        callbacks=[clock],
    )
    trainer.train()
    walls = [b - a for a, b in zip(clock.ends, clock.ends[1:])][1:]  # steps after the first
    lengths = [x["completions/mean_length"] for x in trainer.state.log_history if "completions/mean_length" in x][1:]
    out = {
        "step_s": statistics.median(walls),
        "samples_per_s": batch / statistics.median(walls),
        "generated_tokens_per_step": batch * sum(lengths) / max(len(lengths), 1),
        "peak_rss_mib": own_peak_mib(),
        "steps_measured": float(len(walls)),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
