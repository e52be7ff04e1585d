"""Benchmark: rollout throughput through the system vs vLLM called directly vs HF generate,
and weight-sync time from the policy trainer into the rollout engines.

    .venv/bin/python -m bench.rollout_and_sync [--model tiny|smollm2|both] [--prompts 32] [--samples 4] [--tokens 32] [--repeats 3]

Each figure is the median of `--repeats` timed runs after one warm-up run, measured side by side
in this process. Ratios are what to compare across machines; absolute numbers depend on load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first vLLM / HF call compiles and allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_path(name: str) -> str:
    """SmolLM2-135M-Instruct, or the benchmarks' tiny model (a 4-layer, 128-wide Qwen2 with a BPE
    tokenizer trained on sums), built once into the model cache so every script and process of
    a suite run uses the same one."""
    from rlhf.models import cache_root, smollm2_instruct_path
    from tests.tiny_models import build_tiny_causal_lm

    if name == "smollm2":
        return smollm2_instruct_path()
    out = cache_root() / "bench-tiny-qwen2-4x128"
    if not (out / "config.json").exists():
        texts = [f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)]
        cache_root().mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=cache_root())
        os.replace(build_tiny_causal_lm(staging + "/tiny", texts, hidden=128, layers=4), out)  # never half a model
        os.rmdir(staging)
    return str(out)


def prompts_for(path: str, k: int) -> list[str]:
    from transformers import AutoTokenizer

    from rlhf.data.reasoning_gym import reasoning_gym_prompts
    from rlhf.experience import format_prompt

    tok = AutoTokenizer.from_pretrained(path)
    rows = reasoning_gym_prompts(
        "chain_sum", k, seed=0, task_kwargs={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}
    )
    return [format_prompt(tok, r["prompt"]) for r in rows]


def bench_generation(path: str, args) -> dict:
    """Tokens/s: RolloutGroup (Ray actor) vs in-process vllm.LLM vs HF generate, same prompts."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.group import PlacementPlan, ray_get
    from actors.local_cluster import init_ray
    from actors.rollout import RolloutGroup
    from rlhf.config import DEFAULT_STEP_TIMEOUT_S, ResourcesConfig, RolloutConfig
    from rlhf.experience import sampling_settings
    from rlhf.models import preferred_dtype

    prompts = prompts_for(path, args.prompts)
    # a run's training samples at temperature 1 (rollout.seed 0, step 0: seed 0)
    workload = RolloutConfig(samples_per_prompt=args.samples, temperature=1.0, max_new_tokens=args.tokens, seed=0)
    sampling = sampling_settings(workload, "train")
    n_tokens = len(prompts) * args.samples * args.tokens
    dtype = preferred_dtype()
    out = {}

    init_ray(num_cpus=os.cpu_count())
    plan = PlacementPlan.create(ResourcesConfig(rollout={"cpus_per_actor": 1}), ["rollout"])
    group = RolloutGroup(plan, path, dtype, RolloutConfig(), max_model_len=512)
    through_group = lambda: group.merge_samples(
        ray_get(DEFAULT_STEP_TIMEOUT_S, rollout=group.async_generate(prompts, sampling)), len(prompts)
    )
    t = median_time(through_group, args.repeats)
    produced = sum(len(s["response_token_ids"]) for s in through_group())
    out["group_tokens_per_s"] = produced / t
    group.kill()
    plan.shutdown()
    ray.shutdown()

    from vllm import LLM, SamplingParams

    # The same engine settings the rollout worker uses on CPU (actors/rollout.py), in this process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = LLM(
        model=path,
        dtype=dtype,
        seed=0,
        max_model_len=512,
        enforce_eager=True,
        enable_chunked_prefill=False,
        max_num_batched_tokens=4096,
    )
    params = SamplingParams(**sampling, logprobs=0)
    direct = lambda: llm.generate(prompts, params, use_tqdm=False)
    t = median_time(direct, args.repeats)
    produced_direct = sum(len(o.token_ids) for r in direct() for o in r.outputs)
    out["direct_tokens_per_s"] = produced_direct / t
    llm = direct = None  # free the engine before the next part

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def hf():
        with torch.no_grad():
            return model.generate(
                **enc,
                do_sample=True,
                max_new_tokens=args.tokens,
                num_return_sequences=args.samples,
                pad_token_id=tok.pad_token_id,
            )

    t = median_time(hf, 1)
    out["hf_tokens_per_s"] = n_tokens / t  # HF pads every sample to max_new_tokens: an upper bound
    out["group_vs_direct"] = out["group_tokens_per_s"] / out["direct_tokens_per_s"]
    out["group_vs_hf"] = out["group_tokens_per_s"] / out["hf_tokens_per_s"]
    return out


def bench_sync(path: str, args) -> dict:
    """Seconds and GB/s to move the policy's weights into a live engine (gather + object store + load)."""
    import ray

    from actors.group import START_TIMEOUT_S, ActorGroup, PlacementPlan, ray_get
    from actors.local_cluster import init_ray
    from actors.policy import PolicyActor
    from actors.rollout import RolloutGroup
    from rlhf.config import (
        DEFAULT_STEP_TIMEOUT_S,
        AlgorithmConfig,
        ModelSpec,
        ResourcesConfig,
        RolloutConfig,
        TrainerConfig,
    )

    init_ray(num_cpus=os.cpu_count())
    res = ResourcesConfig(policy={"cpus_per_actor": 0.5}, rollout={"cpus_per_actor": 0.5})
    plan = PlacementPlan.create(res, ["policy", "rollout"])
    policy = ActorGroup(
        PolicyActor,
        "policy",
        plan,
        model=ModelSpec(path=path).model_dump(),
        trainer=TrainerConfig(global_batch_size=4, micro_batch_size=4).model_dump(),
        algorithm=AlgorithmConfig(name="grpo").model_dump(),
    )
    group = RolloutGroup(plan, path, None, RolloutConfig(), max_model_len=512)
    ray_get(START_TIMEOUT_S, rollout=[group.workers[0].__ray_ready__.remote()])
    size = len(ray_get(DEFAULT_STEP_TIMEOUT_S, policy=policy.async_run("weights_blob"))[0])

    def sync():
        blobs = policy.async_run("weights_blob")
        ray_get(DEFAULT_STEP_TIMEOUT_S, rollout=group.async_load_weights(blobs[0]), policy=blobs[1:])

    t = median_time(sync, args.repeats)
    policy.kill()
    group.kill()
    plan.shutdown()
    ray.shutdown()
    return {"sync_seconds": t, "sync_GB": size / 1e9, "sync_GB_per_s": size / 1e9 / t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default="both")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", help="also write {model: results} to this file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    rows = []
    for name in names:
        path = model_path(name)
        rows.append((name, bench_generation(path, args) | bench_sync(path, args)))
    print(
        f"\nworkload: {args.prompts} prompts x {args.samples} samples x <= {args.tokens} new tokens; "
        f"median of {args.repeats}; {os.cpu_count()} CPUs"
    )
    keys = list(rows[0][1])
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows)))
    print("| metric | " + " | ".join(n for n, _ in rows) + " |\n|---|" + "---|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.3g}" for _, r in rows) + " |")


if __name__ == "__main__":
    main()
