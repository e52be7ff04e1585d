"""The reference role: the frozen starting policy, for the KL term and DPO.

ReferenceActor is its own DeepSpeed process (ZeRO-3 keeps it sharded). With LoRA on the policy
the reference is the policy's base weights with the adapters off, so no process or copy is
needed: `AdaptersOffReference` stands where the reference's ActorGroup would and sends its
log-prob calls to the policy's ranks (`compute_reference_logprobs`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from actors.trainer import CausalLMRole
from rlhf.batch import Batch
from rlhf.experience import collate, samples_from_generation

if TYPE_CHECKING:
    import ray

    from actors.group import ActorGroup
    from rlhf.config import ModelsConfig


class ReferenceActor(CausalLMRole):
    trainable = False

    def logprobs_of_generation(self, pad_id: int, starts: list[int], *shards: tuple[list[dict], float]) -> Batch:
        """Reference log-probs of a generation's samples, for rollout.overlap_reference: called
        with the engines' ObjectRefs (one per shard, starting at prompt `starts[i]`), which Ray
        resolves first, so this runs as soon as the generation is done, while the policy trains.
        Returns the batch's input_ids (B, T) (the driver uses the answer only if its own batch has
        the same) and ref_logprobs (B, T), collated exactly as the driver collates the samples."""
        generated = [
            s | {"prompt_index": s["prompt_index"] + start}
            for start, (samples, _) in zip(starts, shards)
            for s in samples
        ]
        rows: list[dict] = [{}] * (max((g["prompt_index"] for g in generated), default=-1) + 1)
        batch = collate(samples_from_generation(generated, rows, first_group=0, policy_version=0), pad_id)
        return Batch({"input_ids": batch["input_ids"], "ref_logprobs": self.compute_logprobs(batch)})


def reference_is_policy_without_adapters(models: ModelsConfig) -> bool:
    """LoRA on the policy and no other reference model named: the adapters-off policy serves."""
    policy, reference = models.policy, models.reference
    return (
        policy is not None
        and policy.lora is not None
        and (reference is None or (reference.path, reference.dtype) == (policy.path, policy.dtype))
    )


class AdaptersOffReference:
    """The reference's ActorGroup interface over the policy's group. Every rank runs the whole
    batch (as a reference group does; rank 0's answer is used), queued on each policy actor
    before the step's update, so it sees the weights the samples were scored with."""

    METHODS: ClassVar[dict[str, str]] = {"compute_logprobs": "compute_reference_logprobs"}

    def __init__(self, policy: ActorGroup):
        self.policy, self.role = policy, "reference"
        self.world_size = policy.world_size

    def async_run(self, method: str, *args: object, **kwargs: object) -> list[ray.ObjectRef]:
        if method not in self.METHODS:  # e.g. release_cached_memory: the policy does its own
            return []
        return self.policy.async_run(self.METHODS[method], *args, **kwargs)

    def dead_ranks(self) -> list[int]:
        return []  # the policy's group reports its own ranks

    def kill(self) -> None:
        pass  # the policy's group is killed as the policy
