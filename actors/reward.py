"""RewardActor: a sequence-classification reward model that scores (prompt, response) text pairs.

It tokenizes text with its own tokenizer, so the reward model need not share the policy's
vocabulary (e.g. an all-MiniLM encoder scoring a SmolLM2 policy).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from actors.trainer import DTYPES, DeepSpeedRole
from rlhf.algos import reward_model_loss
from rlhf.batch import Batch


class RewardActor(DeepSpeedRole):
    trainable = False  # scoring role; reward-model *training* uses RewardTrainerActor below

    def load_model(self, path: str) -> torch.nn.Module:
        self.tokenizer = AutoTokenizer.from_pretrained(self.spec.tokenizer or path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[self.dtype])
        model.config.pad_token_id = self.tokenizer.pad_token_id  # HF pools at the last non-pad token
        return model

    def encode(self, prompts: list[str], responses: list[str]) -> Batch:
        enc = self.tokenizer(prompts, responses, padding=True, truncation=True, max_length=512, return_tensors="pt")
        return Batch(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    def _scores(self, micro: Batch) -> torch.Tensor:
        return self.engine(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits[:, 0].float()

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """One scalar score per (prompt, response): (B,)."""
        self.engine.eval()
        batch = self.encode(prompts, responses)
        return self.forward_rows(batch, self._scores, per_token=False)


class RewardTrainerActor(RewardActor):
    """Bradley-Terry training of the reward model on preference pairs (`prompt`, `chosen`, `rejected`).

    trainer.global_batch_size and micro_batch_size count *pairs*: a micro-batch of m pairs is
    2m rows, so DeepSpeed's accumulation boundary (global / (micro x ranks) micro-batches) lines
    up with one `train_step`.
    """

    trainable = True

    def train_step(self, pairs: list[dict], normalizer: float) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch; normalizer = pairs in the global batch."""
        expected = self.cfg.global_batch_size // self.world_size
        if len(pairs) != expected:  # another count would put the optimizer step mid-batch
            raise ValueError(
                f"reward rank {self.rank}: got {len(pairs)} pairs, expected global_batch_size/ranks = {expected}"
            )
        self.engine.train()
        # Interleave so each micro-batch holds whole pairs: rows 2i / 2i+1 = chosen / rejected.
        texts = [p[key] for p in pairs for key in ("chosen", "rejected")]
        batch = self.encode([p["prompt"] for p in pairs for _ in (0, 1)], texts)
        stats = []

        def losses():
            for micro in self.micro_batches(batch, rows_per_sample=2, train=True):
                s = self._scores(micro)
                stats.append(float((s[0::2] > s[1::2]).float().mean()))
                yield reward_model_loss(s[0::2], s[1::2]) * (len(s) // 2) / normalizer

        step = self.optimizer_step(losses())
        lr = self.scheduler.get_last_lr()[0]
        return {
            "rm_loss": step["loss"],
            "rm_grad_norm": step["grad_norm"],
            "rm_accuracy": sum(stats) / len(stats),
            "lr": lr,
            "skipped_nonfinite": step["skipped_nonfinite"],
        }
