"""RolloutWorker: a Ray actor that owns one vLLM engine and turns prompts into samples.

One actor per engine; with `tensor_parallel_size > 1` vLLM spreads that engine over several
devices itself. The same code runs on vLLM-CPU and CUDA vLLM: only the defaults that matter on
CPU (KV-cache size from an env var, eager mode, whole-prompt prefill, an in-process engine)
switch on when no GPU is present.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
import torch

from actors.group import (
    START_TIMEOUT_S,
    StepTimeoutError,
    dead_ranks,
    peak_rss_mib,
    ray_get,
    use_cpu_threads_from_env,
)
from rlhf.config import DEFAULT_STEP_TIMEOUT_S
from rlhf.experience import SAMPLING_KEYS, prompt_seed
from rlhf.memory import (
    KV_FLOOR_BYTES,
    KV_MARGIN,
    MAX_NUM_SEQS,
    MIB,
    kv_bytes_per_token,
    kv_cache_bytes,
    sequences_per_engine,
)
from rlhf.models import preferred_dtype

log = logging.getLogger(__name__)
WEIGHT_SYNC_EXTENSION = "actors.weight_sync.WeightSyncExtension"
# A weight broadcast's members wait this long for each other (gloo's timeout): long enough for any
# member to reach the call in a synchronous sync, short enough that a member lost with its node
# (whose connection may never close) does not hold policy rank 0 for a whole step timeout.
BROADCAST_TIMEOUT_S = 120.0


def cpu_kv_cache(model_path: str, dtype: str, gib: float | str, sequences: int, max_len: int) -> dict:
    """The KV cache of a CPU engine: {"bytes", "how"}. `gib` "auto": sized from the workload
    (rlhf/memory.py), else that many GiB."""
    if gib != "auto":
        return {"bytes": int(float(gib) * 2**30), "how": f"rollout.kv_cache_gib={gib}"}
    config_file = Path(model_path) / "config.json"
    per_token = kv_bytes_per_token(json.loads(config_file.read_text()), dtype, source=str(config_file))
    size = kv_cache_bytes(sequences, max_len, per_token)
    how = (
        f"auto: {sequences} sequences x {max_len} tokens (whole blocks) x {per_token} B/token ({dtype}) "
        f"x {KV_MARGIN}, at least {KV_FLOOR_BYTES // MIB} MiB"
    )
    return {"bytes": size, "how": how}


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
        kv_cache_gib: float | str = "auto",
        kv_cache_sequences: int = MAX_NUM_SEQS,
        enforce_eager: bool | None = None,
        sleep_mode: bool = False,
        **engine_kwargs: Any,
    ):
        on_gpu = torch.cuda.is_available()
        self.asleep = False
        self.kv_cache: dict = {"bytes": None, "how": "GPU: a share of the device's memory (gpu_memory_utilization)"}
        # vLLM 0.32 supports sleep on CUDA/ROCm/XPU only: enable_sleep_mode raises "Sleep mode is not
        # supported on current platform" elsewhere, and its CPU worker's sleep() only logs a warning.
        self.frees_memory = sleep_mode and on_gpu
        if self.frees_memory:
            engine_kwargs.setdefault("enable_sleep_mode", True)
        elif sleep_mode:
            log.warning(
                "rollout.sleep_during_training: vLLM has no sleep mode on CPU; sleep/wake_up are "
                "no-ops here (the engine keeps its memory)"
            )
        if not on_gpu:
            use_cpu_threads_from_env()
            self.kv_cache = cpu_kv_cache(
                model_path, dtype or preferred_dtype(), kv_cache_gib, kv_cache_sequences, max_model_len
            )
            engine_kwargs.setdefault("kv_cache_memory_bytes", self.kv_cache["bytes"])
            # vLLM-CPU lets this (whole-GiB) variable override kv_cache_memory_bytes: the config decides here
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
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

        `sampling` takes the keys in SAMPLING_KEYS (rlhf.experience.sampling_settings derives it
        from the config). Returns prompt-major flat samples, each with prompt_index, prompt_token_ids, response_token_ids, text, finish_reason and `logprobs`:
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
        if params.get("seed") is not None:  # one seed per prompt (vLLM adds the sample index for n > 1)
            params = [SamplingParams(**params | {"seed": prompt_seed(params["seed"], i)}) for i in range(len(prompts))]
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
                "logprobs": [step[token].logprob for step, token in zip(sample.logprobs or [], sample.token_ids)],
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

    def generate_episodes(self, rows: list[dict], sampling: dict, environment: dict) -> list[dict]:
        """`sampling["n"]` multi-turn episodes per data row against `environment` (EnvironmentConfig
        as a dict), continuously batched on this engine (actors/episode_rollout.py). Returns one
        plain record per episode, prompt-major (rlhf.episodes.episode_record), with the policy's
        tokens exactly as sampled and their log-probs."""
        from actors.episode_rollout import run_episodes

        self._check_awake("generate_episodes")
        unknown = set(sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"unknown sampling keys {sorted(unknown)}; allowed: {SAMPLING_KEYS}")
        if getattr(self, "tokenizer", None) is None:  # the Hugging Face tokenizer the engine was started with
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.llm.llm_engine.model_config.tokenizer)
        return run_episodes(self.llm.llm_engine, self.tokenizer, rows, environment, sampling)

    def timed_generate_episodes(self, rows: list[dict], sampling: dict, environment: dict) -> tuple[list[dict], float]:
        """`generate_episodes`, and the seconds it took on this engine."""
        start = time.perf_counter()
        records = self.generate_episodes(rows, sampling, environment)
        return records, time.perf_counter() - start

    def load_weights(self, blob) -> None:
        """Replace the engine's weights with a full state_dict: `FlatWeights` (what the trainer's
        `weights_blob` returns), its `to_bytes()`, or an older `state_dict_to_bytes` blob.

        An engine in this process (the CPU default) reads the payload where it lies, which for
        an object-store argument is shared memory mapped by `ray.get`: no copy before vLLM's
        own load. Engine worker processes get bytes (the only form that arrived intact)."""
        from actors.weight_sync import FlatWeights

        self._check_awake("load_weights")  # asleep, the weights' device memory is unmapped
        if isinstance(blob, FlatWeights) and not self._engine_in_this_process():
            blob = blob.to_bytes()
        self.llm.collective_rpc("load_weights_from_bytes", args=(blob,))
        # Cached KV blocks were computed by the old weights; a prefix hit would reuse them.
        self.llm.reset_prefix_cache()

    def join_weight_broadcast(self, host: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        """Join the policy's weight-broadcast group as `rank` (actors/weight_broadcast.py)."""
        from actors.weight_broadcast import WeightBroadcast

        self._weight_broadcast = WeightBroadcast(host, port, rank, world, timeout_s)

    def receive_weights(self) -> int:
        """Receive the weights policy rank 0 broadcasts and load them (as `load_weights`); returns the bytes."""
        weights = self._weight_broadcast.receive()
        self.load_weights(weights)
        return weights.nbytes

    def _engine_in_this_process(self) -> bool:
        """Whether vLLM runs its one worker inside this actor (no engine-core or worker process),
        so `collective_rpc` arguments are passed by reference, not serialised."""
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        return isinstance(getattr(self.llm.llm_engine, "model_executor", None), UniProcExecutor)

    def kv_cache_plan(self) -> dict:
        """{"bytes": the engine's KV cache (None on GPU), "how": how it was chosen}."""
        return self.kv_cache

    def peak_rss_mib(self) -> float:
        """Peak resident memory of this actor's process and its children (engine processes), MiB."""
        return peak_rss_mib(children=True)

    def engine_dtype(self) -> str:
        """The dtype the engine computes in (e.g. "bfloat16"): what a sync may cast to up front."""
        return str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

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

    A worker that dies (its process killed, out of memory) is replaced in the same bundle and
    given the policy's weights; `generate` then asks it again for the shard it lost, with the
    same seed, so the step gets the samples it would have had (`rollout.max_worker_restarts`
    per call; `restarts` counts them over the run).
    """

    def __init__(
        self,
        plan,
        model_path: str,
        dtype: str,
        rollout,
        max_model_len: int,
        timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
    ):
        res = plan.resources["rollout"]
        self.plan = plan
        self.max_restarts, self.timeout_s, self.restarts = rollout.max_worker_restarts, timeout_s, 0

        def start(i: int):
            return RolloutWorker.options(
                num_cpus=res.cpus_per_actor,
                num_gpus=res.gpus_per_actor,  # = tensor_parallel_size GPUs (config check)
                scheduling_strategy=plan.strategy("rollout", i),
            ).remote(
                model_path,
                dtype=dtype,
                seed=rollout.seed + i,
                max_model_len=max_model_len,
                tensor_parallel_size=rollout.tensor_parallel_size,
                gpu_memory_utilization=rollout.gpu_memory_utilization,
                kv_cache_gib=rollout.kv_cache_gib,
                kv_cache_sequences=sequences_per_engine(
                    rollout.prompts_per_step, rollout.samples_per_prompt, res.num_actors
                ),
                sleep_mode=rollout.sleep_during_training,
            )

        self.start = start
        self.workers = [start(i) for i in range(res.num_actors)]
        self.weight_sync = rollout.weight_sync
        self._broadcast_group_at: int | None = None  # `restarts` when the broadcast group formed
        # Asked now, so the answer is queued before any generate and never waits behind one.
        self._engine_dtypes = [w.engine_dtype.remote() for w in self.workers]
        self._kv_cache_plans = [w.kv_cache_plan.remote() for w in self.workers]

    def kv_cache_plans(self) -> list[dict]:
        """Each engine's KV cache ({"bytes", "how"}: RolloutWorker.kv_cache_plan), once they started."""
        return ray_get(START_TIMEOUT_S, rollout=self._kv_cache_plans)

    def async_peak_rss_mib(self) -> list[ray.ObjectRef]:
        """Each engine actor's peak resident memory (with its engine processes), MiB."""
        return [w.peak_rss_mib.remote() for w in self.workers]

    def shards(self, n: int) -> list[tuple[int, int]]:
        bounds = [round(i * n / len(self.workers)) for i in range(len(self.workers) + 1)]
        return list(itertools.pairwise(bounds))

    @staticmethod
    def shard_sampling(sampling: dict, start: int) -> dict:
        """The shard starting at prompt `start` offsets the seed as if it were one call (per-prompt seeds)."""
        return (
            sampling | {"seed": prompt_seed(sampling["seed"], start)} if sampling.get("seed") is not None else sampling
        )

    def async_generate(self, prompts: list, sampling: dict) -> list[ray.ObjectRef]:
        """One ObjectRef per worker; `merge_samples(ray.get(refs), len(prompts))` restores order.
        No restarts: `generate` (or `start_generation` + `collect`) is what a run uses."""
        return [
            self.workers[i].generate.remote(prompts[a:b], self.shard_sampling(sampling, a))
            for i, (a, b) in enumerate(self.shards(len(prompts)))
            if b > a
        ]

    def merge_samples(self, results: list[list[dict]], num_prompts: int) -> list[dict]:
        starts = [a for a, b in self.shards(num_prompts) if b > a]
        return [s | {"prompt_index": s["prompt_index"] + start} for start, shard in zip(starts, results) for s in shard]

    def async_generate_shard(self, i: int, prompts: list, sampling: dict, environment: dict | None = None):
        """Worker i's share of `generate(prompts, sampling)`: its shard, with the shard's seed;
        the ref resolves to (samples, the engine's seconds). With `environment` the prompts are
        data rows and the samples episode records (RolloutWorker.generate_episodes)."""
        a, b = self.shards(len(prompts))[i]
        if environment is not None:
            return self.workers[i].timed_generate_episodes.remote(
                prompts[a:b], self.shard_sampling(sampling, a), environment
            )
        return self.workers[i].timed_generate.remote(prompts[a:b], self.shard_sampling(sampling, a))

    def start_generation(
        self, prompts: list, sampling: dict, environment: dict | None = None
    ) -> dict[int, ray.ObjectRef]:
        """Every worker starts on its shard; `collect` waits for them. {worker index: ref}."""
        return {
            i: self.async_generate_shard(i, prompts, sampling, environment)
            for i, (a, b) in enumerate(self.shards(len(prompts)))
            if b > a
        }

    def generate(self, prompts: list, sampling: dict, weights_from=None, environment: dict | None = None) -> list[dict]:
        """Samples (or episode records) for `prompts` in prompt order, waiting for every worker (see `collect`)."""
        refs = self.start_generation(prompts, sampling, environment)
        return self.collect(prompts, sampling, refs, weights_from, environment)[0]

    def collect(
        self,
        prompts: list,
        sampling: dict,
        refs: dict[int, ray.ObjectRef],
        weights_from=None,
        environment: dict | None = None,
    ) -> tuple[list[dict], float]:
        """(samples in prompt order, the slowest engine's seconds) of a `start_generation(prompts, sampling)`.

        A worker that dies is restarted, loaded with `weights_from`'s current weights (the
        policy group; None: the start model, e.g. before any update) and given its shard again;
        after rollout.max_worker_restarts restarts in this call the actor error is raised. A
        shard not back within the step timeout raises StepTimeoutError naming the workers.
        """
        shards = self.shards(len(prompts))
        pending = {ref: i for i, ref in refs.items()}
        results, restarts = {}, 0
        deadline = time.monotonic() + self.timeout_s
        while pending:
            left = max(deadline - time.monotonic(), 0)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not ready:
                raise StepTimeoutError(
                    f"rollout rank(s) {', '.join(str(i) for i in sorted(pending.values()))} did not "
                    f"answer within {self.timeout_s:g}s (trainer.step_timeout_s)"
                )
            i = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0], timeout=self.timeout_s)  # answered already: no wait
            except ray.exceptions.RayActorError as e:
                if restarts >= self.max_restarts:
                    raise
                restarts += 1
                log.warning(
                    "rollout worker %d died during generation (%s); restarting it (%d of at most %d this "
                    "call) and generating its %d prompts again",
                    i,
                    type(e).__name__,
                    restarts,
                    self.max_restarts,
                    shards[i][1] - shards[i][0],
                )
                self.restart([i], weights_from)
                pending[self.async_generate_shard(i, prompts, sampling, environment)] = (
                    i  # same seed: the samples it would have given
                )
                deadline = time.monotonic() + self.timeout_s  # engine start excluded
        ordered = [results[i] for i in sorted(results)]
        return self.merge_samples([s for s, _ in ordered], len(prompts)), max(sec for _, sec in ordered)

    def restart(self, ranks: list[int], weights_from=None) -> None:
        """New workers for `ranks` in their bundles (a dead actor's resources return to its bundle),
        loaded with `weights_from`'s current weights; waits until they are ready (engine start-up
        is not bounded by the step timeout). A worker Ray cannot reach is first waited for until Ray
        declares it dead (its node lost: the bundle then moves to a live node) or it answers."""
        dead_ranks([self.workers[i] for i in ranks])  # the verdict on unreachable ones (actors.group)
        for i in ranks:
            ray.kill(self.workers[i])  # a no-op if it is dead; frees the bundle if it is wedged
            self.workers[i] = self.start(i)
        self.restarts += len(ranks)
        self.say_if_waiting_for_a_node()
        try:
            if weights_from is None:
                ray_get(START_TIMEOUT_S, rollout={i: self.workers[i].__ray_ready__.remote() for i in ranks})
            else:
                blobs = weights_from.async_run(
                    "weights_blob", dtype=self.sync_dtype()
                )  # every policy rank joins (ZeRO-3 gathers)
                loads = dict(zip(ranks, self.async_load_weights(blobs[0], ranks)))
                ray_get(START_TIMEOUT_S, rollout=loads, policy={rank + 1: ref for rank, ref in enumerate(blobs[1:])})
        except StepTimeoutError as e:
            kind = self.plan.resources["rollout"].node_kind
            raise StepTimeoutError(
                f"restarted rollout worker(s) {ranks} not ready within {START_TIMEOUT_S:g}s: "
                f"no node {f'of kind {kind!r} ' if kind else ''}took their placement-group bundle, or the "
                f"engine did not start ({e})"
            ) from e
        log.warning(
            "rollout worker(s) %s restarted%s", ranks, " with the policy's current weights" if weights_from else ""
        )

    def say_if_waiting_for_a_node(self) -> None:
        """A node that died took bundles of the rollout placement group with it: Ray places them
        again (state RESCHEDULING) on a node that fits, which may have to join the cluster first.
        Say so, since the restarted workers wait for it (START_TIMEOUT_S)."""
        try:
            state = ray.util.placement_group_table(self.plan.groups["rollout"]).get("state")
        except Exception:  # only a log line depends on it
            return
        if state == "RESCHEDULING":
            kind = self.plan.resources["rollout"].node_kind
            log.warning(
                "the rollout placement group lost a node; Ray is placing its bundle(s) on another node%s "
                "(the restarted engines wait up to %gs for one)",
                f" of kind {kind!r}" if kind else "",
                START_TIMEOUT_S,
            )

    def sync_dtype(self, wait_s: float = 5.0) -> str | None:
        """The dtype every engine computes in, which the policy casts to while packing (half the
        bytes for a bf16 engine, and the same rounding vLLM's loader would do); None, i.e. no
        cast, if the engines differ or have not answered within `wait_s`."""
        ready, _ = ray.wait(self._engine_dtypes, num_returns=len(self._engine_dtypes), timeout=wait_s)
        if len(ready) < len(self._engine_dtypes):
            return None
        try:
            dtypes = set(ray.get(self._engine_dtypes, timeout=wait_s))
        except ray.exceptions.RayError:  # a worker that died before answering: send as trained
            return None
        return dtypes.pop() if len(dtypes) == 1 else None

    def async_load_weights(self, blob, ranks: list[int] | None = None) -> list[ray.ObjectRef]:
        """Every worker (or those in `ranks`) loads the same weights. Pass an ObjectRef (e.g. straight
        from the policy actor) and Ray ships it node to node through the object store, never via the driver."""
        return [
            self.workers[i].load_weights.remote(blob) for i in (range(len(self.workers)) if ranks is None else ranks)
        ]

    def async_sync_from(self, policy) -> tuple[list[ray.ObjectRef], list[ray.ObjectRef]]:
        """Every engine starts loading the policy group's current weights (rank 0's full state;
        every rank joins the ZeRO-3 gather, so all are called). Returns (the engines' loads, the
        ranks' blobs) for `wait_loads(loads, blobs[1:])`: getting blobs[0] would copy it here."""
        blobs = policy.async_run("weights_blob", dtype=self.sync_dtype())
        return self.async_load_weights(blobs[0]), blobs

    def wait_loads(self, loads: list[ray.ObjectRef], policy_parts: list[ray.ObjectRef] = ()) -> None:
        """Wait for an `async_sync_from`. An engine found dead is left for the next `collect`
        to restart, with the weights of then; any other failure raises."""
        ray_get(self.timeout_s, policy={rank + 1: ref for rank, ref in enumerate(policy_parts)})
        for rank, ref in enumerate(loads):
            try:
                ray_get(self.timeout_s, rollout={rank: ref})
            except ray.exceptions.RayActorError:
                if rank not in self.dead_ranks():  # e.g. the policy rank that held the blob died
                    raise
                log.warning("rollout worker %d is dead at the weight sync; its next generation restarts it", rank)

    def sync_from(self, policy) -> None:
        """Every engine takes the policy group's current weights, waited for: broadcast from policy
        rank 0 over a gloo group where `rollout.weight_sync` says so, else through the object
        store, which is also the fallback when a broadcast fails (an engine died, a member timed
        out): the group then forms again at the next sync."""
        if self.broadcasts_weights():
            try:
                self.broadcast_from(policy)
                return
            except (StepTimeoutError, ray.exceptions.RayError) as e:
                self._broadcast_group_at = None
                log.warning("weight broadcast failed, syncing through the object store instead: %s", e)
        loads, blobs = self.async_sync_from(policy)
        self.wait_loads(loads, blobs[1:])

    def broadcasts_weights(self) -> bool:
        """`rollout.weight_sync`; auto: broadcast when an engine runs on another node than policy rank 0."""
        if self.weight_sync != "auto":
            return self.weight_sync == "broadcast"
        try:
            trainer_node = self.plan.node_ids("policy")[0]
            return any(node != trainer_node for node in self.plan.node_ids("rollout"))
        except (KeyError, IndexError):  # no policy placement group here (e.g. a colocated plan)
            return False

    def broadcast_from(self, policy) -> None:
        """Policy rank 0 broadcasts its packed weights; every engine receives and loads them."""
        if self._broadcast_group_at != self.restarts:  # first use, or an engine was replaced since
            self.form_broadcast_group(policy)
        sends = policy.async_run("broadcast_weights", dtype=self.sync_dtype())
        receives = [w.receive_weights.remote() for w in self.workers]
        ray_get(self.timeout_s, policy=sends, rollout=receives)

    def form_broadcast_group(self, policy) -> None:
        """A gloo group of policy rank 0 (rank 0, serving its store) and every engine (ranks 1..n).
        Refused while an engine is dead: rank 0 would wait for it until the timeout."""
        if dead := self.dead_ranks():
            raise StepTimeoutError(f"rollout worker(s) {dead} dead: no broadcast group until they are restarted")
        world, timeout_s = 1 + len(self.workers), min(self.timeout_s, BROADCAST_TIMEOUT_S)
        host, port = ray_get(self.timeout_s, policy=policy.async_run("open_weight_broadcast", timeout_s))[0]
        joins = [
            w.join_weight_broadcast.remote(host, port, rank, world, timeout_s)
            for rank, w in enumerate(self.workers, start=1)
        ]
        ray_get(self.timeout_s, policy=policy.async_run("join_weight_broadcast", world, timeout_s), rollout=joins)
        self._broadcast_group_at = self.restarts
        log.info("weight broadcast group formed: policy rank 0 at %s:%d and %d engine(s)", host, port, world - 1)

    def dead_ranks(self) -> list[int]:
        return dead_ranks(self.workers)

    def async_sleep(self) -> list[ray.ObjectRef]:
        """Every engine frees its device memory until `async_wake_up` (RolloutWorker.sleep)."""
        return [w.sleep.remote() for w in self.workers]

    def async_wake_up(self) -> list[ray.ObjectRef]:
        return [w.wake_up.remote() for w in self.workers]

    def kill(self) -> None:
        for w in self.workers:
            ray.kill(w)
