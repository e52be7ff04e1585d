"""The peer: TRL's GRPOTrainer on bench.rl_step's workload, for the samples/s comparison.

    bash bench/setup_trl.sh      # once: TRL in its own venv, bench/.trl-venv
    bench/.trl-venv/bin/python -m bench.trl_grpo --model-path PATH [--prompts 8] [--samples 4] [--max-new-tokens 32]
        [--steps 4] [--grad-checkpointing off|on] [--dtype fp32|bf16 [--bf16-weights]] [--lora] [--threads N]
        [--json out.json]

Runs in TRL's venv (no Ray, vLLM, DeepSpeed or pydantic there), so it imports only the light
parts of this repository: the reasoning-gym prompts and the same verifier reward. Same model,
prompts, samples per prompt, max new tokens, temperature 1, KL coef (TRL's `beta`) with a frozen
reference, token-mean loss (TRL's "dapo"), lr, grad clip, fp32 on the CPU (`--dtype bf16`: fp32 weights under
bf16 autocast, TRL's `bf16=True`, the mixed precision it offers on CPU; with `--bf16-weights` the weights
themselves are bf16, as TRL loads a bf16 checkpoint like SmolLM2's by default: faster, but AdamW then updates
bf16 weights, whose rounding can swallow small updates; `--lora`: peft adapters of the same
rank, alpha and target modules as ours, the reference = adapters off, as TRL does with a peft model); micro-batches of
bench.workload.micro_batch_rows(batch) rows with gradient accumulation up to one optimizer step
per generation batch (TRL's generation batch = rows x accumulation steps = the workload's batch,
checked). Gradient checkpointing is set explicitly (TRL's default is on; ours has none unless the
trainer config offers it), and read back from the model. Without vLLM, TRL samples with HF
`generate`, all samples of a step in one batch. Step time is the wall time between optimizer
steps (TRL's callback), generation included; median over steps after the first.

Samples/s counts what TRL trained, from its own record: the rows that reached the loss
(`compute_loss`) and the completion tokens generated (`_generate_and_score_completions`), per
optimizer step; a step that trained other than prompts x samples rows makes the run fail
(bench.workload.trained_samples_per_s) instead of being counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# our config's default LoRA targets (rlhf.config.LoraConfig, not importable here: no pydantic in TRL's venv)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    from bench.rl_step import KL_COEF, LR, PROMPT_SUFFIX, TASK_KWARGS, add_workload_args, workload_of
    from bench.threads import use_threads
    from bench.workload import TRAIN_PROMPTS, WorkloadError, micro_batch_rows, trained_samples_per_s, validate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    add_workload_args(parser)
    parser.add_argument(
        "--bf16-weights", action="store_true", help="with --dtype bf16: load the weights in bf16 (no fp32 master copy)"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    threads = use_threads(args.threads)  # before torch loads: OpenMP reads it once

    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.monitor import own_peak_mib
    from rlhf.data.reasoning_gym import reasoning_gym_prompts
    from rlhf.experience import format_prompt
    from rlhf.rewards.verifiers import reasoning_gym_reward

    torch.set_num_threads(threads)
    if args.bf16_weights and args.dtype != "bf16":
        refuse(args, "--bf16-weights needs --dtype bf16")
    w = workload_of(args)
    try:
        validate(w, AutoConfig.from_pretrained(args.model_path).max_position_embeddings, args.steps)
    except WorkloadError as e:
        refuse(args, str(e))

    tok = AutoTokenizer.from_pretrained(args.model_path)
    rows = reasoning_gym_prompts("chain_sum", TRAIN_PROMPTS, seed=0, task_kwargs=TASK_KWARGS, suffix=PROMPT_SUFFIX)
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

    class CountingGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that records what it generated and what reached the loss."""

        rows_trained, tokens_generated, rows_generated = 0, 0, 0

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.rows_generated += int(out["completion_ids"].shape[0])
            self.tokens_generated += int(out["completion_mask"].sum())  # up to and with EOS, as ours counts
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.rows_trained += int(inputs["completion_ids"].shape[0])
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        """Wall time and the trainer's counts at each optimizer step's end."""

        def __init__(self):
            self.ends, self.records, self.trainer = [], [], None

        def on_train_begin(self, *_, **__):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())
            t = self.trainer
            self.records.append((t.rows_trained, t.rows_generated, t.tokens_generated))
            t.rows_trained = t.rows_generated = t.tokens_generated = 0

    micro = micro_batch_rows(w.batch)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        use_cpu=True,
        bf16=args.dtype == "bf16",  # autocast: fp32 master weights, as DeepSpeed's bf16 keeps on our side
        fp16=False,
        model_init_kwargs={"dtype": torch.bfloat16 if args.bf16_weights else torch.float32},
        gradient_checkpointing=args.grad_checkpointing == "on",  # TRL's default is on: always explicit
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=w.batch // micro,  # one update per generation batch
        num_generations=w.samples,
        max_completion_length=w.max_new_tokens,
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
    if config.generation_batch_size != w.batch:  # TRL would generate (and train) a different number
        refuse(args, f"TRL's generation_batch_size is {config.generation_batch_size}, the workload's batch {w.batch}")
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        from bench.rl_step import LORA

        peft_config = LoraConfig(
            r=LORA["rank"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
    clock = StepClock()
    trainer = CountingGRPOTrainer(
        model=args.model_path,
        reward_funcs=chain_sum_reward,
        args=config,
        train_dataset=data,
        processing_class=tok,
        callbacks=[clock],
        peft_config=peft_config,
    )
    clock.trainer = trainer
    trainer.train()
    walls = [b - a for a, b in zip(clock.ends, clock.ends[1:])][1:]  # steps after the first
    measured = clock.records[1:]
    trained = [float(r[0]) for r in measured]
    try:
        samples_per_s = trained_samples_per_s("TRL", w, walls, trained)
    except WorkloadError as e:
        refuse(args, str(e))
    out = {
        "step_s": statistics.median(walls),
        "samples_per_s": samples_per_s,
        "trained_samples_per_step": trained,
        "generated_samples_per_step": [float(r[1]) for r in measured],
        "generated_tokens_per_step": statistics.mean(float(r[2]) for r in measured),
        "peak_rss_mib": own_peak_mib(),
        "steps_measured": float(len(walls)),
        "micro_batch_rows": float(micro),
        "gradient_accumulation_steps": float(config.gradient_accumulation_steps),
        "grad_checkpointing": "on" if trainer.model.is_gradient_checkpointing else "off",  # the model's own flag
        "threads": float(torch.get_num_threads()),
        "dtype": "bf16 weights" if args.bf16_weights else args.dtype,
        "lora": "on" if args.lora else "off",
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out))


def refuse(args, reason: str) -> None:
    """Exit with status 3 and {"refused": reason} in --json: a size or setting this side cannot honour."""
    print(f"[bench.trl_grpo] refused: {reason}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"refused": reason}))
    sys.exit(3)


if __name__ == "__main__":
    main()
