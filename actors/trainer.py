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

Micro-batches hold trainer.micro_batch_size rows, or with trainer.micro_batch_tokens as many
length-sorted rows as fit a token budget; `micro_batches` explains how DeepSpeed's accumulation
boundary and the ranks' collectives stay in step when their number varies.

Causal LM log-probs (`CausalLMRole.token_logprobs`, rlhf/shared_prompt.py) take the vocabulary
projection only where a response token is predicted (trainer.response_only_logits), and rows
with the same prompt token ids run that prompt once, packed with their responses in one row
under a 4D mask (trainer.shared_prompt): micro-batches are then planned over such packs.

LoRA (models.<role>.lora, the policy only): a trainable role wraps its model with peft before
deepspeed.initialize, so only the adapters have gradients and optimizer states; weights leave
merged under the plain model's names (rlhf/lora.py), checkpoints hold the adapters only.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator

import torch

from actors.group import peak_rss_mib, use_cpu_threads_from_env
from rlhf.algos import compute_token_logprobs
from rlhf.batch import Batch, split_micro_batches, token_budget_micro_batches
from rlhf.config import LoraConfig, ModelSpec, TrainerConfig
from rlhf.lora import lora_scale, merged_state_dict
from rlhf.models import preferred_dtype, resolve_model_path
from rlhf.schedule import lr_lambda
from rlhf.shared_prompt import (
    attention_implementation,
    decoder_and_head,
    pack_shared_prompts,
    packed_lengths,
    prompt_groups,
    response_logprobs,
    shard_by_prompt,
    shared_micro_batches,
    shared_prompt_logprobs,
    split_shared_micro_batches,
    tokens_saved,
)

log = logging.getLogger("raylhf")
AUTO_SHARE_MIN_SAVED = 0.1  # trainer.shared_prompt=auto packs a micro-batch when it skips >= 10% of its tokens

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def deepspeed_config(
    trainer: TrainerConfig, dtype: str, micro_batch: int, grad_accum: int, trainable: bool, world_size: int = 1
) -> dict:
    stage = trainer.stage_for(world_size, trainable)
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


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"


def keep_collectives_on_loopback() -> None:
    """Make gloo and NCCL bind their connection sockets to loopback in this process. Gloo would
    otherwise bind to the address the hostname resolves to, NCCL's bootstrap to the first
    non-loopback interface. Only for groups whose ranks all run on this host. The weight-broadcast
    group that policy rank 0 may also join names its own address (actors/weight_broadcast.py), so
    these variables do not bind it."""
    interface = loopback_interface()
    os.environ.update(GLOO_SOCKET_IFNAME=interface, NCCL_SOCKET_IFNAME=interface)


class DeepSpeedRole:
    """One rank of a model role. Subclasses set `trainable` and implement `load_model`."""

    trainable = False
    tokens_not_run = 0  # prompt tokens that shared-prompt packing did not run (a count for metrics)
    lora: LoraConfig | None = None  # the adapters this role trains (models.<role>.lora), if any

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        model: dict,
        trainer: dict,
        lr: float | None = None,
        seed: int = 0,
        rendezvous_dir: str | None = None,
    ):
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        import deepspeed  # after the env is set: DeepSpeed reads it at import on some accelerators

        self.rank, self.world_size = rank, world_size
        self.spec, self.cfg = ModelSpec(**model), TrainerConfig(**trainer)
        self.dtype = preferred_dtype() if self.spec.dtype == "auto" else self.spec.dtype
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        init_method = None  # env:// (MASTER_ADDR/MASTER_PORT): a TCPStore on every interface, for multi-host groups
        if rendezvous_dir is not None:  # every rank on this host (actors/group.py): nothing beyond loopback
            init_method = f"file://{os.path.join(rendezvous_dir, 'store')}"
            keep_collectives_on_loopback()
        # a collective whose peer died or hangs raises after this instead of blocking the rank forever
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=self.cfg.collective_timeout_s),
            init_method=init_method,
            rank=rank,
            world_size=world_size,
        )
        use_cpu_threads_from_env()
        torch.manual_seed(seed)
        module = self.load_model(resolve_model_path(self.spec.path))
        if self.trainable and self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(module)
        self.lora = self.spec.lora if self.trainable else None  # a frozen role has nothing to adapt
        if self.lora is not None:
            module = with_lora_adapters(module, self.lora)
        micro = self.cfg.micro_batch_size
        grad_accum = max(1, self.cfg.global_batch_size // (micro * world_size))
        ds_cfg = deepspeed_config(self.cfg, self.dtype, micro, grad_accum, self.trainable, world_size)
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
                model=module,
                model_parameters=params,
                optimizer=optimizer,
                config=ds_cfg,
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
    def micro_batches(self, batch: Batch, rows_per_sample: int = 1, train: bool = False) -> Iterator[Batch]:
        """The batch's micro-batches, trimmed to their longest row and on this rank's device.

        rows_per_sample: rows that stay together (2: a preference pair's chosen/rejected rows).
        train: the micro-batches of one optimizer step. DeepSpeed would put its accumulation
        boundary (gradient reduction at ZeRO-0/1, clipping, the update) after every
        `gradient_accumulation_steps` micro-steps, a count fixed in the config; with a token
        budget the number of micro-batches changes from step to step. So the boundary is set
        explicitly, on this call's last micro-batch (before its forward, as DeepSpeed asks):
        every `train_step` is then exactly one update, whatever the count (for fixed rows the
        count is gradient_accumulation_steps and nothing changes).
        """
        for _, micro in self._micro_batches(batch, rows_per_sample, train):
            yield micro

    def micro_batch_rows(self, batch: Batch, rows_per_sample: int = 1) -> list[list[int]]:
        """Row indices of each micro-batch. Every rank must call it (it may all-reduce a count).

        trainer.micro_batch_tokens unset: runs of micro_batch_size consecutive samples. Set:
        samples packed under the token budget (rlhf/batch.py). Then, with several ranks, the
        micro-batches are split until every rank has as many as the rank with the most: ZeRO-3
        gathers parameters in every forward and ZeRO-2/3 reduce gradients in every backward,
        collectives that must pair up one for one across ranks. (Equal row counts per rank
        always allow it: a rank never has more micro-batches than rows.)
        """
        r, budget = rows_per_sample, self.cfg.micro_batch_tokens
        if r == 1 and self.may_share_prompts():
            return self._shared_prompt_rows(batch)
        if budget is None:
            n, size = len(batch) // r, self.cfg.micro_batch_size
            samples = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        else:
            lengths = batch.sample_lengths(r)
            samples = token_budget_micro_batches(lengths, max(budget // r, 1))  # r rows of the pair's length
            if self.world_size > 1:
                count = torch.tensor([len(samples)], device=self.device)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
                samples = split_micro_batches(samples, lengths, int(count))
        return [[r * s + k for s in group for k in range(r)] for group in samples]

    def _shared_prompt_rows(self, batch: Batch) -> list[list[int]]:
        """micro_batch_rows when prompts may be shared: the rows of a prompt go into one micro-batch
        where the plan allows (fixed rows: the same number of micro-batches as without sharing;
        token budget: a pack counts its real tokens), then, as there, split to the ranks' count."""
        attn, resp = batch["attention_mask"], batch["response_mask"]
        groups = prompt_groups(batch["input_ids"], attn, resp)
        plan = shared_micro_batches(groups, attn, resp, self.cfg.micro_batch_size, self.cfg.micro_batch_tokens)
        if self.cfg.micro_batch_tokens is not None and self.world_size > 1:
            count = torch.tensor([len(plan)], device=self.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            plan = split_shared_micro_batches(plan, attn, resp, int(count))
        return [[row for pack in micro for row in pack] for micro in plan]

    def may_share_prompts(self) -> bool:
        """trainer.shared_prompt not off, a role whose forward can pack (`can_pack`), and an attention
        that takes a 4D mask (flash attention does not: then one row per sample, said once)."""
        if not hasattr(self, "_may_share"):
            impl = attention_implementation(self.plain_module())
            self._may_share = self.cfg.shared_prompt != "off" and self.can_pack()
            if self._may_share and impl.startswith("flash"):
                log.warning(
                    "%s: trainer.shared_prompt=%s ignored: attn_implementation=%r takes no 4D attention "
                    "mask; one row per sample (load the model with sdpa or eager attention to share prompts)",
                    type(self).__name__,
                    self.cfg.shared_prompt,
                    impl,
                )
                self._may_share = False
        return self._may_share

    def can_pack(self) -> bool:
        """Whether this role's forward has a shared-prompt layout (the policy, reference, critic)."""
        return False

    def packs(self, micro: Batch) -> list[list[int]] | None:
        """The micro-batch's rows grouped by prompt when they should run packed, else None: sharing
        off, no two rows with one prompt, or (auto) too few tokens saved to pay for the 4D mask."""
        if not self.may_share_prompts():
            return None
        attn, resp = micro["attention_mask"], micro["response_mask"]
        groups = prompt_groups(micro["input_ids"], attn, resp)
        if len(groups) == len(micro):
            return None
        if self.cfg.shared_prompt == "auto" and tokens_saved(attn, resp, groups) < AUTO_SHARE_MIN_SAVED:
            return None
        self.tokens_not_run += int(attn.sum()) - sum(packed_lengths(attn, resp, groups))  # the prompts' repeats
        return groups

    def forward_rows(self, batch: Batch, fn: Callable[[Batch], torch.Tensor], per_token: bool) -> torch.Tensor:
        """fn(micro-batch) for every micro-batch, as float on the CPU and in the batch's row order:
        (B, T) if per_token (each micro-batch's (b, t<=T) right-padded with 0), else (B,)."""
        width = batch["input_ids"].shape[1]
        rows, outs = [], []
        for index, micro in self._micro_batches(batch):
            out = fn(micro).float().cpu()
            outs.append(torch.nn.functional.pad(out, (0, width - out.shape[1])) if per_token else out)
            rows += index
        if not outs:
            return torch.zeros((0, width) if per_token else (0,))
        return torch.cat(outs)[torch.argsort(torch.tensor(rows))]  # rows: a permutation of 0..B-1

    def _micro_batches(
        self, batch: Batch, rows_per_sample: int = 1, train: bool = False
    ) -> Iterator[tuple[list[int], Batch]]:
        plan = self.micro_batch_rows(batch, rows_per_sample)
        for i, rows in enumerate(plan):
            if train:
                self.engine.set_gradient_accumulation_boundary(i == len(plan) - 1)
            yield rows, Batch({k: v.to(self.device) for k, v in batch.select(rows).trim().items()})

    def optimizer_step(self, losses: Iterator[torch.Tensor]) -> dict[str, float]:
        """Backward each micro-batch loss (already globally normalised), then one optimizer step.

        An update whose loss or gradients are non-finite (NaN/inf) on any rank is skipped on every
        rank: weights, optimizer state and LR schedule stay as they were; the gradients are dropped.
        Returns this rank's share of the full-batch loss, the global gradient norm (before
        clipping; inf for a skipped update) and skipped_nonfinite (1.0: skipped, 0.0: applied).
        """
        import math

        total, bad_loss, skipped, norm = 0.0, False, False, None
        for loss in losses:
            value = float(loss.detach())
            total += value
            if not math.isfinite(value):
                bad_loss = True
                # NaN in every gradient this loss reaches, even where a NaN term had no gradient:
                # DeepSpeed's optimizers then see a non-finite (all-reduced) gradient norm.
                loss = loss * float("nan")
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if self.engine.is_gradient_accumulation_boundary():
                skipped, norm = self._boundary_step(bad_loss)
            else:
                self.engine.step()  # between boundaries: bookkeeping only
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return {
            "loss": total,
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "skipped_nonfinite": float(skipped),
        }

    def _boundary_step(self, bad_loss: bool) -> tuple[bool, float | None]:
        """engine.step() at the accumulation boundary (gradients reduced), as an update or, if any
        rank saw a non-finite loss or the gradients are non-finite, as a skip on every rank.

        The ranks agree through one all-reduce of a flag. DeepSpeed's own optimizers (ZeRO-1/2/3,
        and the fp16/bf16 wrappers) skip a step whose global gradient norm is non-finite (engine
        `skipped_steps`, no LR-scheduler step); a plain torch optimizer (ZeRO-0 in fp32) has no such
        check, so its gradients are checked here and its `step` is replaced by a no-op for this
        one call. Under fp16 the loss scaler's overflow skips (how it finds its scale) are not
        counted unless a loss was non-finite. Returns (skipped for a non-finite value, the
        gradient norm when measured here, else None).
        """
        import math

        opt = self.engine.optimizer
        own_check = not hasattr(opt, "overflow")  # no DeepSpeed wrapper: nothing skips for us
        norm = None
        if own_check:
            grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
            # after the boundary's all-reduce every rank holds the same (global) gradients
            norm = (
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
                if grads
                else 0.0
            )
        flag = torch.tensor([float(bad_loss or (norm is not None and not math.isfinite(norm)))], device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        nonfinite = bool(flag.item())
        if own_check and nonfinite:
            saved = opt.__dict__.get("step")  # an LR scheduler may have wrapped the bound method
            opt.step, opt.overflow = (lambda *args, **kwargs: None), True  # the engine reads `overflow`
            try:
                self.engine.step()  # clears the gradients, counts a skipped step, leaves the LR schedule
            finally:
                del opt.overflow
                if saved is None:
                    del opt.step
                else:
                    opt.step = saved
        else:
            self.engine.step()
        applied = self.engine.was_step_applied()
        if nonfinite and applied:  # cannot happen with NaN gradients; never let it pass silently
            raise RuntimeError(
                f"{type(self).__name__} rank {self.rank}: DeepSpeed applied an update whose loss "
                "was non-finite; the weights may be corrupt"
            )
        skipped = not applied and (nonfinite or self.dtype != "float16")
        return skipped, (float("inf") if skipped else norm)

    def placement(self) -> tuple[int, str | None]:
        """(rank, placement group id): lets tests and logs check where each rank landed."""
        import ray

        return self.rank, ray.get_runtime_context().get_placement_group_id()

    def peak_rss_mib(self) -> float:
        """Peak resident memory of this rank's process, MiB."""
        return peak_rss_mib()

    def release_cached_memory(self) -> None:
        """Return the CUDA caching allocator's free blocks to the device, so that a vLLM engine on
        the same device can wake up into them (rollout.sleep_during_training). No-op on CPU."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def plain_module(self) -> torch.nn.Module:
        """The Hugging Face model inside the engine (under a peft wrapper with LoRA; its targeted
        layers still carry the adapters)."""
        module = self.engine.module
        return module.get_base_model() if self.lora is not None else module

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
        if self.lora is not None:  # the plain model's names, adapters folded in
            state = merged_state_dict(state, lora_scale(self.lora.rank, self.lora.alpha))
        # a causal LM only: a sequence classifier built on a tied LM (a SmolLM2 reward model) has no lm_head
        tied = getattr(module.config, "tie_word_embeddings", False) and hasattr(module, "lm_head")
        if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # vLLM wants both names
        return state

    def weights_blob(self, dtype: str | None = None, fmt: str = "flat"):
        """Rank 0's full weights as a weight-sync payload, `actors.weight_sync.FlatWeights` (None on
        other ranks; all must call it under ZeRO-3). `dtype` (e.g. the engine's "bfloat16") casts
        floating-point weights while packing, halving what the object store carries.
        `fmt="torch_save"`: the previous payload, `torch.save` bytes (for comparisons).

        The same tensors as `full_state_dict`, but each gathered parameter is copied once, straight
        into a buffer reused from sync to sync, instead of into a fresh tensor first."""
        import deepspeed

        from actors.weight_sync import FlatWeightsPacker, state_dict_to_bytes

        if fmt == "torch_save" or getattr(self, "lora", None) is not None:  # LoRA: merged weights, plain names
            state = self.full_state_dict()
            if fmt == "flat":
                return _pack_state(state, getattr(torch, dtype) if dtype else None) if state is not None else None
            return state_dict_to_bytes(state, getattr(torch, dtype) if dtype else None) if state is not None else None
        if fmt != "flat":
            raise ValueError(f"weights_blob: fmt must be 'flat' or 'torch_save', not {fmt!r}")

        module = self.engine.module
        cast = getattr(torch, dtype) if dtype else None
        packer = self.__dict__.setdefault("_weights_packer", FlatWeightsPacker())
        packer.reset()
        params = list(module.named_parameters())
        state_names = module.state_dict().keys()
        buffers = [(n, b) for n, b in module.named_buffers() if n in state_names]  # non-persistent: skip
        for name, t in params + buffers:
            shape = getattr(t, "ds_shape", t.shape)  # ZeRO-3 partitions hold a placeholder shape
            packer.add(name, shape, cast if cast is not None and t.is_floating_point() else t.dtype)
        tied = getattr(module.config, "tie_word_embeddings", False)
        names = {n for n, _ in params}
        if tied and "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
            packer.add("lm_head.weight", (), torch.float32, alias_of="model.embed_tokens.weight")  # vLLM wants both
        for name, param in params:
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                if self.rank == 0:
                    packer.write(name, param)
        if self.rank != 0:
            return None
        for name, buf in buffers:
            packer.write(name, buf)
        return packer.finish()

    def open_weight_broadcast(self, timeout_s: float) -> tuple[str, int] | None:
        """Rank 0: serve the rendezvous store of a new weight-broadcast group (actors/weight_broadcast.py)
        on this node's address; returns (address, port). Other ranks: None."""
        if self.rank != 0:
            return None
        from actors.weight_broadcast import WeightStore, node_address

        self._weight_broadcast, self._weight_store = None, WeightStore(node_address(), timeout_s)
        return self._weight_store.host, self._weight_store.port

    def join_weight_broadcast(self, world: int, timeout_s: float) -> None:
        """Rank 0 joins the group it serves as its rank 0 (returns once all `world` members have)."""
        if self.rank == 0:
            from actors.weight_broadcast import WeightBroadcast

            store = self._weight_store
            self._weight_broadcast = WeightBroadcast(store.host, store.port, 0, world, timeout_s, store=store.store)

    def broadcast_weights(self, dtype: str | None = None) -> int | None:
        """`weights_blob(dtype)` (every rank: ZeRO-3 gathers), which rank 0 then broadcasts to the
        engines of its weight-broadcast group; returns the bytes sent (None on other ranks)."""
        weights = self.weights_blob(dtype)
        return None if weights is None else self._weight_broadcast.send(weights)

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
        module = self.plain_module()
        plain = type(module)(module.config).to(next(iter(state.values())).dtype)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        tied = getattr(plain, "_tied_weights_keys", None) or {}  # filled again by tying on load
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise RuntimeError(
                f"save_pretrained: weights do not fit {type(module).__name__}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        plain.save_pretrained(directory)
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(self.spec.tokenizer or resolve_model_path(self.spec.path))
        tokenizer.save_pretrained(directory)
        return directory

    def save_checkpoint(self, directory: str, tag: str = "state") -> None:
        """Everything this rank needs to continue: weights, optimizer and LR-scheduler states
        (DeepSpeed's own format, sharded as trained) and this process's RNG state. Every rank
        calls it with the same folder. With LoRA only the adapters (and their optimizer state) are
        written: the frozen base weights are the model path's, loaded again on resume."""
        if self.lora is None:
            self.engine.save_checkpoint(directory, tag=tag, client_state={"torch_rng": torch.get_rng_state()})
            return
        # DeepSpeed's exclude_frozen_parameters keeps a tied frozen weight (lm_head = embed_tokens:
        # named_parameters lists it once), so the module state is cut to the adapters here
        engine, adapters = self.engine, {n for n, p in self.engine.module.named_parameters() if p.requires_grad}
        engine.module_state_dict = lambda *args, **kwargs: {
            name: value
            for name, value in type(engine).module_state_dict(engine, *args, **kwargs).items()
            if name in adapters
        }
        try:
            engine.save_checkpoint(
                directory, tag=tag, client_state={"torch_rng": torch.get_rng_state()}, exclude_frozen_parameters=True
            )
        finally:
            del engine.module_state_dict

    def load_checkpoint(self, directory: str, tag: str = "state") -> None:
        # LoRA: the checkpoint lacks the frozen base weights, which the model path gave already
        path, client_state = self.engine.load_checkpoint(directory, tag=tag, load_module_strict=self.lora is None)
        if path is None:
            raise FileNotFoundError(f"rank {self.rank}: no DeepSpeed checkpoint {tag!r} in {directory}")
        torch.set_rng_state(client_state["torch_rng"])


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward instead of keeping them.
    Non-reentrant: it needs no input that requires grad, so it also works under LoRA (frozen
    embeddings) and with the shared-prompt forward's explicit masks and position ids."""
    if not getattr(module, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"trainer.gradient_checkpointing: {type(module).__name__} does not support gradient checkpointing; "
            "set it to false"
        )
    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def with_lora_adapters(module: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """`module` wrapped by peft with LoRA adapters on lora.target_modules: every other parameter
    frozen (requires_grad False), B initialised to 0 so the wrapped model starts equal to the base."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(module, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("LoRA r=%d: %d of %d parameters trained (%.2f%%)", lora.rank, trainable, total, 100 * trainable / total)
    return wrapped


def forward_logits(engine, micro: Batch) -> torch.Tensor:
    return engine(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits


def through_engine(engine, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() (which calls parts of engine.module) run as the engine's forward: DeepSpeed hooks its
    forward (ZeRO-3's parameter gathering around the whole module, the backward prologue that the
    ZeRO optimizers need on the output), so a forward that bypassed it would train wrongly. The
    module's forward is shadowed by fn for this one call."""
    module = engine.module
    own = module.__dict__.get("forward")  # a forward someone set on the instance: put it back after
    module.forward = lambda *args, **kwargs: fn()  # an instance attribute: nn.Module.__call__ uses it
    try:
        return engine()
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def shard_keeping_prompts(batch: Batch, world_size: int, balance: bool, shared_prompt: str) -> list[Batch]:
    """The per-rank parts of a training batch (equal row counts, as Batch.shard), with the rows of
    one prompt on one rank where the counts allow, so that each rank can pack them
    (trainer.shared_prompt); Batch.shard when sharing is off or there is one rank."""
    if shared_prompt == "off" or world_size == 1:
        return batch.shard(world_size, balance)[0]
    groups = prompt_groups(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    lengths = batch["attention_mask"].sum(-1).tolist()
    return [batch.select(sorted(rows)) for rows in shard_by_prompt(groups, lengths, world_size, balance)]


class CausalLMRole(DeepSpeedRole):
    """A causal LM role (policy, reference): log-probs of given tokens."""

    def load_model(self, path: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[self.dtype])

    @torch.no_grad()
    def compute_logprobs(self, batch: Batch) -> torch.Tensor:
        """Log-probs (B, T) of the batch's tokens, aligned with input_ids (rlhf/batch.py); 0 outside
        the response when only response logits are computed (losses mask them out)."""
        self.engine.eval()
        return self.forward_rows(batch, self.token_logprobs, per_token=True)

    @torch.no_grad()
    def compute_reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """compute_logprobs of the reference that a LoRA policy carries inside: the same base weights
        with the adapters off, through the same forward (micro-batches, packing, response logits)."""
        if self.lora is None:
            raise RuntimeError(f"{type(self).__name__}: reference log-probs from the policy need models.policy.lora")
        with self.engine.module.disable_adapter():
            return self.compute_logprobs(batch)

    def token_logprobs(self, micro: Batch) -> torch.Tensor:
        """Log-probs (b, t) of a micro-batch's response tokens (0 elsewhere), differentiable when
        grad is enabled. Rows sharing a prompt run it once (packed, when trainer.shared_prompt and
        the attention implementation allow); the vocabulary projection runs only at response
        positions (trainer.response_only_logits); else the full logits, as before."""
        if not self.response_only():
            return compute_token_logprobs(forward_logits(self.engine, micro), micro["input_ids"])
        module, ids, attn, resp = (
            self.plain_module(),  # LoRA: the base model, whose targeted layers carry the adapters
            micro["input_ids"],
            micro["attention_mask"],
            micro["response_mask"],
        )
        packs = self.packs(micro)
        if packs is None:
            return through_engine(self.engine, lambda: response_logprobs(module, ids, attn, resp))
        pack = pack_shared_prompts(ids, attn, resp, packs).to(self.device)
        return through_engine(self.engine, lambda: shared_prompt_logprobs(module, pack))

    def response_only(self) -> bool:
        """trainer.response_only_logits, unless the model post-processes its logits (said once)."""
        if not hasattr(self, "_response_only"):
            self._response_only = self.cfg.response_only_logits
            if self._response_only:
                try:
                    decoder_and_head(self.plain_module())
                except ValueError as e:
                    log.warning("%s: logits at every position: %s", type(self).__name__, e)
                    self._response_only = False
        return self._response_only

    def can_pack(self) -> bool:
        return self.response_only()  # packing computes response logits only


def _pack_state(state: dict[str, torch.Tensor], cast: torch.dtype | None):
    """A full state_dict (e.g. LoRA's merged weights) as a FlatWeights payload."""
    from actors.weight_sync import FlatWeightsPacker

    packer = FlatWeightsPacker()
    packer.reset()
    for name, t in state.items():
        packer.add(name, t.shape, cast if cast is not None and t.is_floating_point() else t.dtype)
    for name, t in state.items():
        packer.write(name, t)
    return packer.finish()
