"""PolicyActor: one rank of the policy under DeepSpeed: log-probs, PPO/GRPO and DPO updates, weights out."""
from __future__ import annotations

import torch

from actors.trainer import CausalLMRole, forward_logits
from rlhf.algos import (
    aggregate_loss,
    compute_entropy,
    compute_kl,
    compute_policy_loss,
    compute_token_logprobs,
    dpo_loss,
    masked_mean,
)
from rlhf.batch import Batch
from rlhf.config import AlgorithmConfig


class PolicyActor(CausalLMRole):
    trainable = True

    def __init__(self, *args, algorithm: dict, **kwargs):
        self.algo = AlgorithmConfig(**algorithm)
        super().__init__(*args, **kwargs)

    def train_step(self, batch: Batch, normalizer: float) -> dict[str, float]:
        """One optimizer step of the PPO-clip objective over this rank's share of a global batch.

        batch: input_ids, attention_mask, response_mask, old_logprobs, advantages (B, T), and
        ref_logprobs (KL in the loss) / is_weights (truncated IS) when those are on.
        normalizer: the global batch's loss denominator (compute_loss_normalizer).
        """
        self._check_share(batch)
        self.engine.train()
        a, stats = self.algo, []

        def losses():
            for micro in self.micro_batches(batch):
                mask = micro["response_mask"]
                logits = forward_logits(self.engine, micro)
                logprobs = compute_token_logprobs(logits, micro["input_ids"])
                loss, metrics = compute_policy_loss(
                    logprobs, micro["old_logprobs"], micro["advantages"], mask,
                    clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip,
                    is_weights=micro.get("is_weights"), agg_mode=a.loss_agg, global_normalizer=normalizer,
                )
                if a.kl.mode == "loss" and a.kl.coef > 0:
                    kl = compute_kl(logprobs, micro["ref_logprobs"], a.kl.estimator)
                    loss = loss + a.kl.coef * aggregate_loss(kl, mask, a.loss_agg, global_normalizer=normalizer)
                    metrics["kl"] = masked_mean(kl.detach(), mask)
                if a.entropy_coef > 0:
                    entropy = compute_entropy(logits[:, :-1].float())  # (B, T-1): position t predicts t+1
                    entropy = torch.nn.functional.pad(entropy, (1, 0))
                    loss = loss - a.entropy_coef * aggregate_loss(entropy, mask, a.loss_agg, global_normalizer=normalizer)
                    metrics["entropy"] = masked_mean(entropy.detach(), mask)
                stats.append({k: float(v) for k, v in metrics.items()})
                yield loss

        step = self.optimizer_step(losses())
        out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        return out | {"policy_loss": step["loss"], "grad_norm": step["grad_norm"], "lr": self.scheduler.get_last_lr()[0]}

    def dpo_step(self, batch: Batch, normalizer: float) -> dict[str, float]:
        """One optimizer step of DPO. Rows 2i / 2i+1 are the chosen / rejected response of pair i;
        batch carries ref_logprobs (B, T) from the reference. normalizer: pairs in the global batch."""
        self._check_share(batch)
        self.engine.train()
        a, stats = self.algo.dpo, []

        def losses():
            for micro in self.micro_batches(batch):
                mask = micro["response_mask"]
                logprobs = compute_token_logprobs(forward_logits(self.engine, micro), micro["input_ids"])
                seq = (logprobs * mask).sum(-1)  # (2P,)
                ref = (micro["ref_logprobs"] * mask).sum(-1)  # (2P,)
                losses, chosen, rejected = dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2],
                                                    beta=a.beta, loss_type=a.loss_type, label_smoothing=a.label_smoothing)
                stats.append({"accuracy": float((chosen > rejected).float().mean()), "margin": float((chosen - rejected).mean())})
                yield losses.sum() / normalizer

        step = self.optimizer_step(losses())
        return {"dpo_loss": step["loss"], "grad_norm": step["grad_norm"], **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}}

    def _check_share(self, batch: Batch) -> None:
        expected = self.cfg.global_batch_size // self.world_size
        if len(batch) != expected:
            raise ValueError(f"policy rank {self.rank}: got {len(batch)} samples, expected global_batch_size/ranks = {expected}")
