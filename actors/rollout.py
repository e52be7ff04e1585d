"""RolloutWorker: a Ray actor that owns one vLLM engine and turns prompts into samples.

One actor per engine; with `tensor_parallel_size > 1` vLLM spreads that engine over several
devices itself. The same code runs on vLLM-CPU and CUDA vLLM: only the defaults that matter on
CPU (KV-cache size from an env var, eager mode, whole-prompt prefill, an in-process engine)
switch on when no GPU is present.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray
import torch

from actors.group import use_cpu_threads_from_env
from rlhf.models import preferred_dtype

log = logging.getLogger(__name__)
WEIGHT_SYNC_EXTENSION = "actors.weight_sync.WeightSyncExtension"
SAMPLING_KEYS = ("n", "temperature", "top_p", "max_tokens", "stop", "seed", "logprobs")


@ray.remote
class RolloutWorker:
    """Owns a `vllm.LLM`; `generate` returns one flat dict per sample, `load_weights` syncs.

    `dtype=None` picks `rlhf.models.preferred_dtype()` (bf16 on GPUs and AMX CPUs, else fp32);
    extra keyword arguments go to `vllm.LLM` unchanged.
    `sleep_mode=True` lets `sleep()` free the engine's device memory until `wake_up()` (vLLM's
    sleep mode, CUDA only; on CPU the calls keep only the asleep/awake state).
    The actor runs one call at a time, in the order one caller submitted them (a plain Ray actor),
    so a weight load queued behind a generate never changes the weights that generate uses.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str | None = None,
        seed: int = 0,
        max_model_len: int = 1024,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gib: float = 1,
        enforce_eager: bool | None = None,
        sleep_mode: bool = False,
        **engine_kwargs: Any,
    ):
        on_gpu = torch.cuda.is_available()
        self.asleep = False
        # vLLM 0.32 supports sleep on CUDA/ROCm/XPU only: enable_sleep_mode raises "Sleep mode is not
        # supported on current platform" elsewhere, and its CPU worker's sleep() only logs a warning.
        self.frees_memory = sleep_mode and on_gpu
        if self.frees_memory:
            engine_kwargs.setdefault("enable_sleep_mode", True)
        elif sleep_mode:
            log.warning("rollout.sleep_during_training: vLLM has no sleep mode on CPU; sleep/wake_up are "
                        "no-ops here (the engine keeps its memory)")
        if not on_gpu:
            use_cpu_threads_from_env()
            # Read by vLLM-CPU when the engine starts, so it must be set in this process first.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
            # vLLM-CPU 0.32 kills the engine when a request with its own `seed` is prefilled in
            # chunks ("RuntimeError: CPU Generator does not use offset": it rewinds a CUDA-only
            # Philox offset). Whole-prompt prefill avoids that path; a step then needs room for
            # the longest prompt.
            engine_kwargs.setdefault("enable_chunked_prefill", False)
            engine_kwargs.setdefault("max_num_batched_tokens", max(4096, max_model_len))
            if tensor_parallel_size == 1:
                # Run the engine core and its one worker inside this actor instead of two more
                # processes that each import torch + vLLM again: on a 2-core machine engine
                # start fell from ~65 s to ~27 s at the same tokens/s. (vLLM then skips its
                # OpenMP core pinning; set the variable to 1 in the actor's env to opt out.)
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM  # imported here so the driver never needs vLLM installed

        self.llm = LLM(
            model=model_path,
            # None: decided here, on the node that runs the engine, which may differ from the driver's.
            dtype=dtype or preferred_dtype(),
            seed=seed,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            # CUDA graphs pay off on GPU; on CPU, compiling costs more start-up than it saves
            # for the short generations of RL steps.
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            worker_extension_cls=WEIGHT_SYNC_EXTENSION,
            **engine_kwargs,
        )

    def generate(self, prompts: list[str] | list[list[int]], sampling: dict) -> list[dict]:
        """Sample `sampling["n"]` completions per prompt (text, or token ids already templated).

        `sampling` takes the keys in SAMPLING_KEYS. Returns prompt-major flat samples, each with
        prompt_index, prompt_token_ids, response_token_ids, text, finish_reason and `logprobs`:
        the log-probability of each sampled token (vLLM's default: from the raw logits, before
        temperature / top-p, i.e. the policy's own distribution).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_awake("generate")
        unknown = set(sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"unknown sampling keys {sorted(unknown)}; allowed: {SAMPLING_KEYS}")
        # logprobs=0 asks for the sampled token's log-prob only; callers may ask for top-k more.
        params = {"logprobs": 0, **sampling}
        if params.get("seed") is not None:
            # One seed per prompt (vLLM adds the sample index for n > 1): with a single seed for
            # the whole call, every prompt would draw the same random numbers.
            params = [SamplingParams(**params | {"seed": (params["seed"] + i * 1009) % 2**31}) for i in range(len(prompts))]
        else:
            params = SamplingParams(**params)
        inputs = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [
            {
                "prompt_index": prompt_index,
                "prompt_token_ids": list(request.prompt_token_ids),
                "response_token_ids": list(sample.token_ids),
                "text": sample.text,
                "logprobs": [
                    step[token].logprob for step, token in zip(sample.logprobs or [], sample.token_ids)
                ],
                "finish_reason": sample.finish_reason,
            }
            for prompt_index, request in enumerate(outputs)
            for sample in request.outputs
        ]

    def timed_generate(self, prompts: list[str] | list[list[int]], sampling: dict) -> tuple[list[dict], float]:
        """`generate`, and the seconds it took on this engine (how much of it a caller hid)."""
        start = time.perf_counter()
        samples = self.generate(prompts, sampling)
        return samples, time.perf_counter() - start

    def load_weights(self, blob: bytes) -> None:
        """Replace the engine's weights with a `state_dict_to_bytes` blob (full state_dict)."""
        self._check_awake("load_weights")  # asleep, the weights' device memory is unmapped
        self.llm.collective_rpc("load_weights_from_bytes", args=(blob,))
        # Cached KV blocks were computed by the old weights; a prefix hit would reuse them.
        self.llm.reset_prefix_cache()

    def sleep(self) -> bool:
        """Free the engine's device memory: weights copied to host memory, KV cache dropped (vLLM
        sleep level 1; its prefix cache is cleared too). Returns whether memory was freed (False on
        CPU, where only the state changes)."""
        if not self.asleep and self.frees_memory:
            self.llm.sleep(level=1)
        self.asleep = True
        return self.frees_memory

    def wake_up(self) -> bool:
        """Take the device memory back (weights restored, KV cache reallocated). Returns whether
        memory was taken back (False on CPU)."""
        if self.asleep and self.frees_memory:
            self.llm.wake_up()  # every tag: weights and KV cache
        self.asleep = False
        return self.frees_memory

    def _check_awake(self, call: str) -> None:
        if self.asleep:
            raise RuntimeError(f"rollout engine: {call} while asleep; call wake_up() first")


class RolloutGroup:
    """The rollout workers of a run: one per engine, each in its bundle of the rollout placement group.

    Prompts are split into contiguous shards, one per worker; results come back in prompt order
    with global `prompt_index`es, so n samples of a prompt stay contiguous (what the group
    advantage estimators expect).
    """

    def __init__(self, plan, model_path: str, dtype: str, rollout, max_model_len: int):
        res = plan.resources["rollout"]
        self.workers = [
            RolloutWorker.options(
                num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor * rollout.tensor_parallel_size,
                scheduling_strategy=plan.strategy("rollout", i),
            ).remote(
                model_path, dtype=dtype, seed=rollout.seed + i, max_model_len=max_model_len,
                tensor_parallel_size=rollout.tensor_parallel_size,
                gpu_memory_utilization=rollout.gpu_memory_utilization, kv_cache_gib=rollout.kv_cache_gib,
                sleep_mode=rollout.sleep_during_training,
            )
            for i in range(res.num_actors)
        ]

    def shards(self, n: int) -> list[tuple[int, int]]:
        bounds = [round(i * n / len(self.workers)) for i in range(len(self.workers) + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def async_generate(self, prompts: list, sampling: dict) -> list[ray.ObjectRef]:
        """One ObjectRef per worker; `merge_samples(ray.get(refs), len(prompts))` restores order."""
        return [w.generate.remote(prompts[a:b], seed) for w, (a, b), seed in self._shards(prompts, sampling)]

    def _shards(self, prompts: list, sampling: dict):
        """(worker, (start, end), its sampling) for each worker with prompts: seeds offset by start."""
        seeded = lambda a: sampling | {"seed": sampling["seed"] + a * 1009} if sampling.get("seed") is not None else sampling
        return [(w, (a, b), seeded(a)) for w, (a, b) in zip(self.workers, self.shards(len(prompts))) if b > a]

    def async_timed_generate(self, prompts: list, sampling: dict) -> list[ray.ObjectRef]:
        """`async_generate` through `timed_generate`; `merge_timed` restores the order."""
        return [w.timed_generate.remote(prompts[a:b], seed) for w, (a, b), seed in self._shards(prompts, sampling)]

    def merge_samples(self, results: list[list[dict]], num_prompts: int) -> list[dict]:
        starts = [a for a, b in self.shards(num_prompts) if b > a]
        return [s | {"prompt_index": s["prompt_index"] + start} for start, shard in zip(starts, results) for s in shard]

    def merge_timed(self, results: list[tuple[list[dict], float]], num_prompts: int) -> tuple[list[dict], float]:
        """(samples in prompt order, the slowest engine's seconds) from `async_timed_generate`."""
        return self.merge_samples([r for r, _ in results], num_prompts), max(s for _, s in results)

    def async_load_weights(self, blob: ray.ObjectRef | bytes) -> list[ray.ObjectRef]:
        """Every worker loads the same weights. Pass an ObjectRef (e.g. straight from the policy
        actor) and Ray ships it node to node through the object store, never via the driver."""
        return [w.load_weights.remote(blob) for w in self.workers]

    def async_sync_from(self, policy) -> tuple[list[ray.ObjectRef], list[ray.ObjectRef]]:
        """Every engine starts loading the policy group's current weights (rank 0's full state;
        every rank joins the ZeRO-3 gather, so all are called). Returns (the engines' loads, the
        ranks' blobs): wait for the loads and blobs[1:]; getting blobs[0] would copy it here."""
        blobs = policy.async_run("weights_blob")
        return self.async_load_weights(blobs[0]), blobs

    def sync_from(self, policy) -> None:
        """`async_sync_from`, waited for."""
        loads, blobs = self.async_sync_from(policy)
        ray.get(loads + blobs[1:])

    def async_sleep(self) -> list[ray.ObjectRef]:
        """Every engine frees its device memory until `async_wake_up` (RolloutWorker.sleep)."""
        return [w.sleep.remote() for w in self.workers]

    def async_wake_up(self) -> list[ray.ObjectRef]:
        return [w.wake_up.remote() for w in self.workers]

    def kill(self) -> None:
        for w in self.workers:
            ray.kill(w)
