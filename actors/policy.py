"""PolicyActor: one rank of the policy under DeepSpeed: log-probs, PPO/GRPO, DPO and SFT updates, weights out."""

from __future__ import annotations

import torch

from actors.trainer import CausalLMRole, forward_logits
from rlhf.algos import (
    POLICY_LOSSES,
    aggregate_loss,
    compute_entropy,
    compute_kl,
    compute_sequence_logprobs,
    compute_token_logprobs,
    compute_truncated_is_weights,
    dpo_loss,
    masked_mean,
    sft_loss,
)
from rlhf.batch import Batch
from rlhf.config import AlgorithmConfig


class PolicyActor(CausalLMRole):
    trainable = True

    def __init__(self, *args, algorithm: dict, **kwargs):
        self.algo = AlgorithmConfig(**algorithm)
        super().__init__(*args, **kwargs)

    def train_step(self, batch: Batch, normalizer: float, kl_coef: float = 0.0) -> dict[str, float]:
        """One optimizer step of the PPO-clip objective over this rank's share of a global batch.

        batch: input_ids, attention_mask, response_mask, advantages (B, T); ref_logprobs when KL is
        in the loss; rollout_logprobs (the engine's) for the mismatch metrics and truncated IS.
        old_logprobs may be left out when the batch is trained on exactly once, in this one
        optimizer step: this forward's detached log-probs are then those of the weights before the
        update (PPO's old policy) and a separate log-prob pass is saved. Samples from older weights
        (async rollouts) are corrected towards them by the IS weights from rollout_logprobs.
        normalizer: the global batch's loss denominator (compute_loss_normalizer).
        kl_coef: the KL-loss weight now (the coordinator's controller may adapt it).
        """
        self._check_share(batch)
        self.engine.train()
        a, stats = self.algo, []
        self.tokens_not_run, tokens = 0, int(batch["attention_mask"].sum())

        def losses():
            for micro in self.micro_batches(batch, train=True):
                mask = micro["response_mask"]
                if a.entropy_coef > 0:  # the entropy needs the whole distribution: full logits
                    logits = forward_logits(self.engine, micro)
                    logprobs = compute_token_logprobs(logits, micro["input_ids"])
                else:  # response logits only, prompts shared where rows share them
                    logprobs = self.token_logprobs(micro)
                old = micro["old_logprobs"] if "old_logprobs" in micro else logprobs.detach()
                is_weights, mismatch = None, {}
                if "rollout_logprobs" in micro:  # the engine's log-probs: measure (and correct) the gap
                    is_weights, mismatch = compute_truncated_is_weights(
                        old,
                        micro["rollout_logprobs"],
                        mask,
                        cap=a.importance_sampling.cap,
                        level=a.importance_sampling.level,
                    )
                loss, metrics = POLICY_LOSSES[a.policy_loss].fn(
                    logprobs,
                    old,
                    micro["advantages"],
                    mask,
                    clip_low=a.clip_low,
                    clip_high=a.clip_high,
                    dual_clip=a.dual_clip,
                    is_weights=is_weights if a.importance_sampling.enabled else None,
                    agg_mode=a.loss_agg,
                    global_normalizer=normalizer,
                )
                metrics.update({f"mismatch/{k}": v for k, v in mismatch.items()})
                if a.kl.mode == "loss" and kl_coef > 0:
                    kl = compute_kl(logprobs, micro["ref_logprobs"], a.kl.estimator)
                    loss = loss + kl_coef * aggregate_loss(kl, mask, a.loss_agg, global_normalizer=normalizer)
                    metrics["policy_kl"] = masked_mean(kl.detach(), mask)
                if a.entropy_coef > 0:
                    entropy = compute_entropy(logits[:, :-1].float())  # (B, T-1): position t predicts t+1
                    entropy = torch.nn.functional.pad(entropy, (1, 0))
                    loss = loss - a.entropy_coef * aggregate_loss(
                        entropy, mask, a.loss_agg, global_normalizer=normalizer
                    )
                    metrics["entropy"] = masked_mean(entropy.detach(), mask)
                stats.append({k: float(v) for k, v in metrics.items()})
                yield loss

        step = self.optimizer_step(losses())
        out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        return out | {
            "policy_loss": step["loss"],
            "grad_norm": step["grad_norm"],
            "lr": self.scheduler.get_last_lr()[0],
            "skipped_nonfinite": step["skipped_nonfinite"],
            # share of the rows' tokens that shared-prompt packing did not run (trainer.shared_prompt)
            "shared_prompt/tokens_skipped": self.tokens_not_run / max(tokens, 1),
        }

    def dpo_step(self, batch: Batch, normalizer: float) -> dict[str, float]:
        """One optimizer step of DPO. Rows 2i / 2i+1 are the chosen / rejected response of pair i;
        batch carries ref_logprobs (B, T) from the reference. normalizer: pairs in the global batch.
        trainer.global_batch_size and micro_batch_size count pairs (as for reward-model training),
        so micro-batches of 2 x micro rows keep pairs whole and end on DeepSpeed's boundary."""
        self._check_share(batch, rows_per_sample=2)
        self.engine.train()
        a, stats = self.algo.dpo, []

        def losses():
            for micro in self.micro_batches(batch, rows_per_sample=2, train=True):
                mask = micro["response_mask"]
                logprobs = self.token_logprobs(micro)  # a pair's rows share their prompt: packed
                # summed for DPO; IPO's margin is per token, on length-averaged log-probs by default
                seq = compute_sequence_logprobs(logprobs, mask, a.logprob_reduction)  # (2P,)
                ref = compute_sequence_logprobs(micro["ref_logprobs"], mask, a.logprob_reduction)  # (2P,)
                losses, chosen, rejected = dpo_loss(
                    seq[0::2],
                    seq[1::2],
                    ref[0::2],
                    ref[1::2],
                    beta=a.beta,
                    loss_type=a.loss_type,
                    label_smoothing=a.label_smoothing,
                )
                stats.append(
                    {"accuracy": float((chosen > rejected).float().mean()), "margin": float((chosen - rejected).mean())}
                )
                yield losses.sum() / normalizer

        step = self.optimizer_step(losses())
        return {
            "dpo_loss": step["loss"],
            "grad_norm": step["grad_norm"],
            "skipped_nonfinite": step["skipped_nonfinite"],
            **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
        }

    def sft_step(self, batch: Batch, normalizer: float) -> dict[str, float]:
        """One optimizer step of supervised fine-tuning: cross-entropy on response tokens only.
        normalizer: response tokens in the global batch, so the step is the global token mean
        however the batch is split over ranks and micro-batches."""
        self._check_share(batch)
        self.engine.train()

        def losses():
            for micro in self.micro_batches(batch, train=True):
                logprobs = self.token_logprobs(micro)
                yield sft_loss(logprobs, micro["response_mask"], "token_mean", global_normalizer=normalizer)

        step = self.optimizer_step(losses())
        return {
            "sft_loss": step["loss"],
            "grad_norm": step["grad_norm"],
            "lr": self.scheduler.get_last_lr()[0],
            "skipped_nonfinite": step["skipped_nonfinite"],
        }

    def _check_share(self, batch: Batch, rows_per_sample: int = 1) -> None:
        expected = rows_per_sample * self.cfg.global_batch_size // self.world_size
        if len(batch) != expected:  # another count would put the optimizer step mid-batch
            raise ValueError(
                f"policy rank {self.rank}: got {len(batch)} rows, expected "
                f"{rows_per_sample} x global_batch_size / ranks = {expected}"
            )
