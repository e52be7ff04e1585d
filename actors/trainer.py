"""The DeepSpeed base shared by the model roles (policy, reference, critic, reward).

Each Ray actor is one rank. The constructor joins the role's process group (NCCL on GPU, gloo
on CPU: DeepSpeed's accelerator picks), loads the model and wraps it in a DeepSpeed engine with
the configured ZeRO stage. Trainable roles get an optimizer and LR schedule; frozen roles get an
inference engine (ZeRO-3 keeps them sharded; lower stages hold a full copy per rank).

Gradient accumulation: losses arrive already divided by a *global* normaliser (the whole
batch's token or sequence count, see rlhf/algos/aggregation.py), so micro-batch losses add up to
the full-batch loss. DeepSpeed must therefore not divide by the accumulation steps
(`scale_wrt_gas=False`), and since it averages gradients over data-parallel ranks we multiply
by the world size: the update is then the same for any micro-batch size and rank count.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

from actors.group import use_cpu_threads_from_env
from rlhf.algos import compute_token_logprobs
from rlhf.batch import Batch
from rlhf.config import ModelSpec, TrainerConfig
from rlhf.models import preferred_dtype, resolve_model_path
from rlhf.schedule import lr_lambda

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def deepspeed_config(trainer: TrainerConfig, dtype: str, micro_batch: int, grad_accum: int, trainable: bool) -> dict:
    stage = trainer.zero_stage if trainable else (3 if trainer.zero_stage == 3 else 0)
    zero: dict = {"stage": stage}
    if trainer.offload and trainable:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if trainer.offload and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if trainable:
        cfg["gradient_clipping"] = trainer.grad_clip
    if trainable and trainer.offload:  # ZeRO-Offload wants DeepSpeed's CPU Adam: let DS build it
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": trainer.lr, "weight_decay": trainer.weight_decay}}
    return cfg


class DeepSpeedRole:
    """One rank of a model role. Subclasses set `trainable` and implement `load_model`."""

    trainable = False

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int,
                 model: dict, trainer: dict, lr: float | None = None, seed: int = 0):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        import deepspeed  # after the env is set: DeepSpeed reads it at import on some accelerators

        self.rank, self.world_size = rank, world_size
        self.spec, self.cfg = ModelSpec(**model), TrainerConfig(**trainer)
        self.dtype = preferred_dtype() if self.spec.dtype == "auto" else self.spec.dtype
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   timeout=__import__("datetime").timedelta(minutes=10))
        use_cpu_threads_from_env()
        torch.manual_seed(seed)
        module = self.load_model(resolve_model_path(self.spec.path))
        micro = self.cfg.micro_batch_size
        grad_accum = max(1, self.cfg.global_batch_size // (micro * world_size))
        ds_cfg = deepspeed_config(self.cfg, self.dtype, micro, grad_accum, self.trainable)
        if self.trainable:
            lr = lr if lr is not None else self.cfg.lr
            params = [p for p in module.parameters() if p.requires_grad]
            optimizer = None
            if "optimizer" not in ds_cfg:
                optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay)
            else:
                ds_cfg["optimizer"]["params"]["lr"] = lr
            schedule = lr_lambda(self.cfg.scheduler, self.cfg.warmup_steps, self.cfg.total_steps)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=module, model_parameters=params, optimizer=optimizer, config=ds_cfg,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            )
        else:
            module.requires_grad_(False)
            self.engine, *_ = deepspeed.initialize(model=module, config=ds_cfg)
            self.engine.eval()

    # ----------------------------------------------------------------- to override
    def load_model(self, path: str) -> torch.nn.Module:
        raise NotImplementedError

    # ----------------------------------------------------------------- shared helpers
    def micro_batches(self, batch: Batch, size: int | None = None) -> Iterator[Batch]:
        for micro in batch.split(size or self.cfg.micro_batch_size):
            yield Batch({k: v.to(self.device) for k, v in micro.trim().items()})

    def optimizer_step(self, losses: Iterator[torch.Tensor]) -> dict[str, float]:
        """Backward each micro-batch loss (already globally normalised), then one optimizer step.

        Returns this rank's share of the full-batch loss and the global gradient norm (before clipping).
        """
        total = 0.0
        for loss in losses:
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self.engine.step()  # applies the update only at the accumulation boundary
            total += float(loss.detach())
        norm = self.engine.get_global_grad_norm()
        return {"loss": total, "grad_norm": float(norm) if norm is not None else float("nan")}

    def placement(self) -> tuple[int, str | None]:
        """(rank, placement group id): lets tests and logs check where each rank landed."""
        import ray

        return self.rank, ray.get_runtime_context().get_placement_group_id()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The unsharded weights on rank 0 (None elsewhere). Every rank must call it under ZeRO-3."""
        import deepspeed

        module = self.engine.module
        state = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                if self.rank == 0:
                    state[name] = param.detach().to("cpu", copy=True)
        if self.rank != 0:
            return None
        for name, buf in module.named_buffers():  # e.g. rotary caches are not persistent, skip those
            if name in module.state_dict():
                state[name] = buf.detach().cpu()
        tied = getattr(module.config, "tie_word_embeddings", False)
        if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # vLLM wants both names
        return state

    def weights_blob(self) -> bytes | None:
        """Rank 0's full weights as a weight-sync blob (None on other ranks; all must call it)."""
        from actors.weight_sync import state_dict_to_bytes

        state = self.full_state_dict()
        return state_dict_to_bytes(state) if state is not None else None

    def save_pretrained(self, directory: str) -> str | None:
        """Write the full weights as a Hugging Face folder (model + tokenizer) that any role, vLLM
        or `from_pretrained` loads. Every rank must call it (ZeRO-3 gathers); rank 0 writes and
        returns the folder, other ranks return None."""
        state = self.full_state_dict()
        if state is None:
            return None
        from transformers import AutoTokenizer

        # A fresh module of the same class: under ZeRO-3 the engine's own parameters are
        # partitioned placeholders, so it cannot be saved directly.
        module = self.engine.module
        plain = type(module)(module.config).to(next(iter(state.values())).dtype)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        tied = getattr(plain, "_tied_weights_keys", None) or {}  # filled again by tying on load
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise RuntimeError(f"save_pretrained: weights do not fit {type(module).__name__}: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        plain.save_pretrained(directory)
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(self.spec.tokenizer or resolve_model_path(self.spec.path))
        tokenizer.save_pretrained(directory)
        return directory

    def save_checkpoint(self, directory: str, tag: str = "state") -> None:
        """Everything this rank needs to continue: weights, optimizer and LR-scheduler states
        (DeepSpeed's own format, sharded as trained) and this process's RNG state. Every rank
        calls it with the same folder."""
        self.engine.save_checkpoint(directory, tag=tag, client_state={"torch_rng": torch.get_rng_state()})

    def load_checkpoint(self, directory: str, tag: str = "state") -> None:
        path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"rank {self.rank}: no DeepSpeed checkpoint {tag!r} in {directory}")
        torch.set_rng_state(client_state["torch_rng"])


def forward_logits(engine, micro: Batch) -> torch.Tensor:
    return engine(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits


class CausalLMRole(DeepSpeedRole):
    """A causal LM role (policy, reference): log-probs of given tokens."""

    def load_model(self, path: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[self.dtype])

    @torch.no_grad()
    def compute_logprobs(self, batch: Batch) -> torch.Tensor:
        """Log-probs (B, T) of the batch's tokens, aligned with input_ids (rlhf/batch.py)."""
        self.engine.eval()
        width = batch["input_ids"].shape[1]
        out = []
        for micro in self.micro_batches(batch):
            lp = compute_token_logprobs(forward_logits(self.engine, micro), micro["input_ids"])  # (b, t<=T)
            out.append(torch.nn.functional.pad(lp.float().cpu(), (0, width - lp.shape[1])))
        return torch.cat(out) if out else torch.zeros(0, width)
