"""Whether a run overlaps generation with training (asynchronous rollouts): rollout.async_rollouts=auto.

Async rollouts hide generation behind training, but only help when the two run on different
compute. Where they share it, each gets part of what a synchronous step gives every phase:

* measured on 2 CPU cores (docs/benchmarks.md, "Overlap"): two busy processes with 2 threads
  each oversubscribe the cores (SmolLM2 step 0.88x as fast as sync, tiny model 0.30x); with one
  core each, training, the largest phase, runs on half the cores and the SmolLM2 step was again
  slower than a sync step on both cores;
* on GPUs, engines on devices of their own (whole GPUs, not colocated) generate while the trainers train on theirs: the
  setup async RL systems are built for (not measured here: this project's CI has no GPU).

So `auto` chooses async only when the engines have compute of their own: GPUs not shared with a
trainer, or CPU nodes of another kind than every trainer's. Everything else runs synchronously,
including one CPU machine whatever its core count (a split of its cores was slower wherever we
measured it). `true` and `false` are obeyed as given.
"""

from __future__ import annotations

from typing import Literal

from rlhf.config import ResourcesConfig

MODEL_ROLES = ("policy", "reference", "critic", "reward")  # every role that runs a model besides the engines


def choose_async(
    setting: bool | Literal["auto"],
    resources: ResourcesConfig,
    roles: list[str],
    sleep_during_training: bool = False,
) -> tuple[bool, str]:
    """(async rollouts on?, why) for the run's `roles` (those it starts, e.g. no reference
    without KL). `setting` is rollout.async_rollouts."""
    if setting is True or setting is False:
        return setting, f"rollout.async_rollouts={str(setting).lower()}"
    if sleep_during_training:
        return False, "auto: rollout.sleep_during_training frees the engines' devices during training"
    others = [r for r in roles if r in MODEL_ROLES]
    engines = resources.rollout
    shared = sorted({r for g in resources.colocate if "rollout" in g for r in g if r in others})
    if shared:
        return False, f"auto: the engines share devices with {', '.join(shared)} (resources.colocate)"
    if engines.gpus_per_actor >= 1:  # Ray gives a whole-GPU request devices no other actor gets a share of
        return True, "auto: the engines have GPUs of their own"
    kinds = {r: getattr(resources, r).node_kind for r in others}
    if engines.node_kind is not None and all(k is not None and k != engines.node_kind for k in kinds.values()):
        return True, f"auto: the engines run on nodes of kind {engines.node_kind!r}, the trainers on others"
    return False, (
        "auto: the engines share CPU cores with the trainers, where asynchronous rollouts measured "
        "slower than synchronous ones (docs/benchmarks.md)"
    )


def cpu_split_advice(async_on: bool, own_compute: bool, threads: int | None, cores: int) -> str | None:
    """A warning when async rollouts run on engines without compute of their own (`own_compute`:
    what `auto` would have found) and the thread count (RAYLHF_CPU_THREADS; None: unset, Ray's
    default of one per CPU reserved) makes an engine and a trainer together use more threads than
    the machine has cores; else None. Measured on 2 cores: 2 threads each made the SmolLM2 step
    0.88x as fast as sync, the tiny model's 0.30x."""
    if not async_on or own_compute or threads is None or 2 * threads <= cores:
        return None
    return (
        f"asynchronous rollouts with {threads} threads per process (RAYLHF_CPU_THREADS) on {cores} cores "
        f"shared by the engines and the trainers oversubscribe them (measured up to 3x slower than sync, "
        f"docs/benchmarks.md); give each half: RAYLHF_CPU_THREADS={max(cores // 2, 1)}"
    )


def choose_reference_overlap(
    setting: bool | Literal["auto"], async_on: bool, resources: ResourcesConfig, reference_process: bool
) -> tuple[bool, str]:
    """(compute the next step's reference log-probs while the policy trains?, why).

    With async rollouts the next step's samples are generated during this step, so the
    reference can take them as soon as they are done, while the policy trains, instead of
    after the next step starts. `auto` does that whenever async rollouts are on: measured on 2
    CPU cores shared by all roles (1 thread each, SmolLM2), the async step fell from 19.9 s to
    16.6 s (the reference's 3.5 s left the step; training took 16.4 s -> 16.5 s), so it wins
    even without cores of its own (docs/benchmarks.md, "Overlap"). `reference_process`: the run
    has a reference actor (KL on, and not LoRA's adapters-off policy, which trains in the same
    process). `resources` is kept for rules that need the placement (none yet)."""
    del resources
    if setting is False:
        return False, "rollout.overlap_reference=false"
    if not reference_process:
        return False, "no reference process (no KL term, or LoRA's adapters-off policy)"
    if not async_on:
        return False, "synchronous rollouts: the next step's samples do not exist while the policy trains"
    if setting is True:
        return True, "rollout.overlap_reference=true"
    return True, "auto: with async rollouts (measured faster, docs/benchmarks.md)"
