"""CriticActor: one rank of the value model (PPO with GAE): values per token and the value-loss update."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForTokenClassification

from actors.trainer import DTYPES, DeepSpeedRole, through_engine
from rlhf.algos import compute_value_loss
from rlhf.batch import Batch
from rlhf.config import AlgorithmConfig
from rlhf.shared_prompt import pack_shared_prompts, shared_prompt_values


class CriticActor(DeepSpeedRole):
    trainable = True

    def __init__(self, *args, algorithm: dict, **kwargs):
        self.algo = AlgorithmConfig(**algorithm)
        super().__init__(*args, **kwargs)

    def load_model(self, path: str) -> torch.nn.Module:
        # A causal LM body with a fresh scalar head per token (the head is the only new weight).
        return AutoModelForTokenClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[self.dtype])

    def can_pack(self) -> bool:
        module = self.engine.module  # a token-classification model: body, dropout, one-label head
        return hasattr(module, "base_model") and hasattr(module, "score")

    def _values(self, micro: Batch) -> torch.Tensor:
        packs = self.packs(micro)  # rows sharing a prompt run it once (trainer.shared_prompt)
        if packs is not None:
            pack = pack_shared_prompts(micro["input_ids"], micro["attention_mask"], micro["response_mask"], packs)
            pack = pack.to(self.device)
            return through_engine(self.engine, lambda: shared_prompt_values(self.engine.module, pack))  # (b, t)
        out = self.engine(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits[..., 0]  # (b, t)
        # Align like log-probs: values[:, t] = V(state before token t), read from position t - 1.
        return F.pad(out[:, :-1].float(), (1, 0))

    @torch.no_grad()
    def compute_values(self, batch: Batch) -> torch.Tensor:
        self.engine.eval()
        return self.forward_rows(batch, self._values, per_token=True)  # (B, T)

    def train_step(self, batch: Batch, normalizer: float) -> dict[str, float]:
        """One optimizer step of the clipped value loss; batch carries old_values and returns (B, T)."""
        self.engine.train()

        stats = []

        def losses():
            for micro in self.micro_batches(batch, train=True):
                loss, metrics = compute_value_loss(
                    self._values(micro),
                    micro["old_values"],
                    micro["returns"],
                    micro["response_mask"],
                    clip_range=self.algo.value_clip,
                    agg_mode=self.algo.loss_agg,
                    global_normalizer=normalizer,
                )
                stats.append({k: float(v) for k, v in metrics.items()})
                yield self.algo.value_coef * loss

        step = self.optimizer_step(losses())
        out = {
            "value_loss": step["loss"],
            "critic_grad_norm": step["grad_norm"],
            "critic_skipped_nonfinite": step["skipped_nonfinite"],
        }
        return out | {f"critic_{k}": sum(s[k] for s in stats) / len(stats) for k in stats[0]}
