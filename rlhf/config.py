"""One pydantic config tree for a run: the single source of truth.

Load a YAML file and apply dotted overrides from the command line:

    cfg = load_config("recipes/configs/rlvr.yaml", ["algorithm.kl.coef=0.02", "rollout.temperature=0.8"])

Every model forbids unknown keys, so a typo fails loudly. Validation lives next to the field it
checks; checks that span sections live on `RunConfig`. Errors are raised as `ConfigError`, whose
message names each bad field (dotted path), the value given and what is allowed.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, core_schema

from rlhf.algos.advantages import ADVANTAGE_ESTIMATORS, AdvantageEstimator
from rlhf.algos.kl import KL_ESTIMATORS
from rlhf.algos.losses import POLICY_LOSSES
from rlhf.environments import ENVIRONMENTS, import_environment_module
from rlhf.names import did_you_mean
from rlhf.registry import Registry
from rlhf.rewards.registry import REWARD_KINDS
from rlhf.strict_yaml import parse_yaml

# trainer.step_timeout_s: how long any one remote call may take before the run calls it hung
DEFAULT_STEP_TIMEOUT_S = 3600.0

Role = Literal["policy", "reference", "reward", "critic", "rollout"]
ROLES: tuple[str, ...] = ("policy", "reference", "reward", "critic", "rollout")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and no
    float may be inf or NaN (`lr: .inf` satisfies `gt=0`, and a NaN fails no comparison)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


@dataclass(frozen=True)
class RegisteredName:
    """Field metadata: the value is a name in `registry` (checked with a did-you-mean error);
    docs/config.md lists the registered names and what each does."""

    registry: Registry[Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.registry.check, handler(source))


# --------------------------------------------------------------------------------------- models
class LoraConfig(Section):
    """Low-rank adapters (peft): W x + (alpha / rank) * B A x on the targeted linear layers, only
    A and B trained (so only they have gradients and optimizer states)."""

    rank: int = Field(16, gt=0, description="rank r of each adapter (A: r x in, B: out x r)")
    alpha: float = Field(32.0, gt=0, description="scale numerator: the adapter's output is multiplied by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input while training")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="names (last part) of the nn.Linear layers that get adapters; default: attention and MLP "
        "projections of Llama/Qwen-style models",
    )


class ModelSpec(Section):
    path: str = Field(
        description="Hugging Face model folder, or a built-in name: 'smollm2-135m-instruct', 'all-minilm-l6-v2'"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the role's weights (the policy's also in the vLLM engines). 'auto': bf16 on GPUs "
        "(fp16 without bf16) and AMX CPUs, else float32 (other CPUs emulate bf16, ~8x slower)",
    )
    tokenizer: str | None = Field(None, description="tokenizer folder; default: the model's")
    lora: LoraConfig | None = Field(
        None,
        description="policy only: train low-rank adapters instead of all weights; the reference is then the "
        "same weights with the adapters off (no reference process), the engines get merged weights",
    )


class ModelsConfig(Section):
    policy: ModelSpec | None = Field(None, description="the model trained; every algorithm but reward_model needs it")
    reference: ModelSpec | None = Field(
        None, description="frozen model for DPO and the KL term (RL with algorithm.kl.coef > 0); default: the policy"
    )
    reward: ModelSpec | None = Field(
        None,
        description="sequence-classification reward model: scores RL samples, is what reward_model trains, "
        "and scores DPO's held-out samples",
    )
    critic: ModelSpec | None = Field(
        None, description="value model; used only by an algorithm.advantage that needs a critic (gae)"
    )


# ----------------------------------------------------------------------------------------- data
class DataConfig(Section):
    source: str = Field(description="'reasoning_gym:<task>', 'imdb', a .jsonl/.parquet file, or a `datasets` name")
    split: str = Field("train", description="split to read from a `datasets` name; local files ignore it")
    eval_source: str | None = Field(
        None,
        description="held-out data, read whole (a built-in draws eval_size); default: held out of data.source "
        "(another seed, imdb's fixed split, or eval_size prompts of the file)",
    )
    task_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="options of the reasoning-gym task or the imdb builder; files take none"
    )
    train_size: int = Field(1000, gt=0, description="built-ins generate this many train rows; a file's are cut to it")
    eval_size: int = Field(
        100,
        ge=0,
        description="held-out rows a built-in generates, or distinct prompts held out of a file "
        "(0 and no eval_source: no held-out evaluation)",
    )
    seed: int = Field(
        0,
        description="data randomness: problems generated, file shuffle and held-out split, "
        "order of prompts / pairs drawn",
    )
    prompt_field: str = Field("prompt", description="file column with the prompt text")
    answer_field: str = Field(
        "answer",
        description="file column with the gold answer, kept with RL prompts; math and reasoning_gym rewards need it",
    )
    response_field: str = Field("response", description="file column with the target response (sft)")
    chosen_field: str = Field("chosen", description="file column with the preferred response (dpo, reward_model)")
    rejected_field: str = Field("rejected", description="file column with the rejected response (dpo, reward_model)")
    chat_template: Literal["tokenizer", "none"] = Field(
        "tokenizer", description="'tokenizer': wrap prompts with the tokenizer's chat template"
    )
    prompt_suffix: str = Field("", description="text appended to every prompt, e.g. ' Give only the final number.'")
    max_prompt_len: int = Field(
        256,
        gt=0,
        description="prompt tokens, templated: sft / dpo keep the last this many; RL engines get "
        "max_prompt_len + rollout.max_new_tokens of context. File rows over 8 chars a token "
        "are bad rows",
    )
    max_response_len: int = Field(
        64,
        gt=0,
        description="sft / dpo: response tokens kept (EOS included); file rows over 8 chars a token are bad "
        "rows. RL responses are capped by rollout.max_new_tokens",
    )
    on_bad_row: Literal["strict", "skip"] = Field(
        "strict", description="'strict': stop before training; 'skip': drop and count bad rows"
    )
    sft_target: Literal["answer", "calculator_transcript"] = Field(
        "answer",
        description="sft on reasoning_gym:<task>: what to learn. 'answer': the gold answer; "
        "'calculator_transcript': a calculator episode's two turns, the call on the problem's expression "
        "(<calc>47 + 38</calc>) after the environment's first message and the result as the answer after "
        "the tool's reply, the warm start of an agent run (held-out exact match is then of those turns)",
    )

    @model_validator(mode="after")
    def _sft_target_needs_its_prompt(self) -> DataConfig:
        # the call transcripts are the environment's own first turn: nothing may change that prompt
        if self.sft_target == "calculator_transcript":
            if not self.source.startswith("reasoning_gym:") or (
                self.eval_source is not None and not self.eval_source.startswith("reasoning_gym:")
            ):
                raise ValueError(
                    "data.sft_target='calculator_transcript' builds its pairs from reasoning_gym:<task> rows"
                )
            if self.prompt_suffix or self.chat_template != "tokenizer":
                raise ValueError(
                    "data.sft_target='calculator_transcript' trains on the calculator episode's own prompt: "
                    "leave data.prompt_suffix empty and data.chat_template='tokenizer'"
                )
        return self

    @field_validator("task_kwargs")
    @classmethod
    def _finite_task_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        # free-form values escape allow_inf_nan, so walk them
        if bad := nonfinite_paths(kwargs):
            raise ValueError(f"not a finite number: {', '.join(bad)}")
        return kwargs


# -------------------------------------------------------------------------------------- rollout
class RolloutConfig(Section):
    # The number of engines is resources.rollout.num_actors: one vLLM engine per rollout actor.
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one vLLM engine spans; > 1 needs resources.rollout.gpus_per_actor equal to it"
    )
    prompts_per_step: int = Field(16, ge=1, description="prompts drawn per RL step (and per dynamic-sampling refill)")
    samples_per_prompt: int = Field(
        8, ge=1, description="completions per prompt: the group that group advantages compare (>= 2 for them)"
    )
    temperature: float = Field(
        1.0, ge=0.0, description="sampling temperature of training samples and eval_samples (0: greedy)"
    )
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="nucleus sampling: sample from the smallest token set holding this probability (1: off)",
    )
    max_new_tokens: int = Field(
        64, ge=1, description="longest response in tokens, in training and evaluation; longer ones are cut"
    )
    stop: list[str] = Field(default_factory=list, description="strings that end a response (vLLM stop strings)")
    seed: int = Field(
        0,
        description="sampling seed: each step and refill round derives its own from it, so a "
        "resumed run draws the same samples",
    )
    eval_samples: int = Field(
        4, ge=0, description="held-out: also score this many samples per prompt at `temperature` (0: greedy only)"
    )
    kv_cache_gib: Literal["auto"] | Annotated[float, Field(gt=0)] = Field(
        "auto",
        description="CPU only: each vLLM engine's KV cache, in GiB. auto: sized from the workload (the engine's share "
        "of prompts_per_step x samples_per_prompt sequences x (data.max_prompt_len + max_new_tokens) tokens in "
        "whole blocks x the model's KV bytes per token, x 1.25, at least 64 MiB; rlhf/memory.py), logged at "
        "start. Held-out prompts beyond that run in turn",
    )
    gpu_memory_utilization: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="GPU only: share of the GPU's memory an engine takes for weights and KV "
        "cache; leave room for trainers colocated with it",
    )
    async_rollouts: bool | Literal["auto"] = Field(
        "auto",
        description="generate the next step's samples while this step trains (one-step off-policy; "
        "algorithm.importance_sampling corrects for the older weights that sampled). auto: on when the engines "
        "have compute of their own (whole GPUs not colocated with a trainer, or nodes of a node_kind no trainer "
        "uses), off where they share CPU cores with the trainers (measured slower there: docs/benchmarks.md); "
        "the choice and its reason are logged at start (rlhf/overlap.py)",
    )
    overlap_reference: bool | Literal["auto"] = Field(
        "auto",
        description="with async rollouts: the reference computes the next step's log-probs as soon as its samples "
        "are generated, while the policy trains (used when the step trains exactly those samples, else computed "
        "again). auto: on whenever async rollouts are (measured faster even on 2 shared CPU cores: "
        "docs/benchmarks.md); no effect without a reference process (rlhf/overlap.py)",
    )
    max_staleness: int = Field(
        1,
        ge=1,
        description="async_rollouts: generate up to k steps ahead. Samples trained at step t were then "
        "generated by the weights of step t-1-k or later (at most k updates older than the weights they update)",
    )
    sleep_during_training: bool = Field(
        False,
        description="engines colocated with trainers (resources.colocate) free their device memory "
        "(vLLM sleep level 1) from the end of generation until the weight sync; a no-op on CPU",
    )
    weight_sync: Literal["auto", "object_store", "broadcast"] = Field(
        "auto",
        description="how a synchronous weight sync reaches the engines. object_store: policy rank 0 puts its packed "
        "weights in its node's object store and each engine reads them (zero-copy on that node; Ray copies them to "
        "other nodes). broadcast: rank 0 sends them over a gloo group of itself and the engines "
        "(actors/weight_broadcast.py), the object store as the fallback if the group fails. auto: broadcast when an "
        "engine is on another node than policy rank 0, else object_store. Async syncs use the object store",
    )
    max_worker_restarts: int = Field(
        2,
        ge=0,
        description="an engine actor that dies mid-generation is restarted in its bundle, given the policy's "
        "weights and its prompts again, at most this many times per generation call (0: fail)",
    )


# ---------------------------------------------------------------------------------- environment
class EnvironmentConfig(Section):
    """Multi-turn episodes: each rollout sample is an episode against an environment (rlhf/environments)."""

    name: Annotated[str, RegisteredName(ENVIRONMENTS)] = Field(
        description="which environment (listed under Registered names, or registered by `module`); a fresh "
        "one per episode"
    )
    module: str | None = Field(
        None,
        description="dotted name of a Python module to import first (driver and rollout workers), whose "
        "@environment classes register themselves, e.g. 'my_project.envs'. It runs in-process: trusted code only",
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the environment, e.g. {hints: false}"
    )
    max_turns: int = Field(4, ge=1, description="policy turns per episode at most (K)")
    max_tokens: int = Field(
        512,
        ge=2,
        description="token budget per episode: prompt + policy turns + observations; the engines' context "
        "length. A turn is also capped by rollout.max_new_tokens",
    )
    step_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="seconds one environment step (or reset) may take; a slower one ends its episode as an "
        "error (counted in episodes/timeouts) while the other episodes go on",
    )
    reward: Literal["environment", "rewards"] = Field(
        "environment",
        description="an episode's return: 'environment' = the sum of the rewards the environment gave over "
        "its turns (none given: 0); 'rewards' = the `rewards` functions on the last policy turn (for "
        "environments that give no reward)",
    )

    @model_validator(mode="before")
    @classmethod
    def _import_module(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("module"), str):
            import_environment_module(raw["module"])
        return raw

    @model_validator(mode="after")
    def _settings_accepted(self) -> EnvironmentConfig:
        if bad := nonfinite_paths(self.settings):
            raise ValueError(f"environment.settings: not a finite number: {', '.join(bad)}")
        try:  # the environment's own constructor says which settings it takes
            ENVIRONMENTS[self.name].make(**self.settings)
        except (TypeError, ValueError) as e:
            raise ValueError(f"environment.settings {self.settings} rejected by {self.name!r}: {e}") from None
        return self


# ------------------------------------------------------------------------------------ algorithm
class KLConfig(Section):
    coef: float = Field(
        0.0,
        ge=0.0,
        description="RL: weight of KL(policy || reference); 0: no KL term and no "
        "reference model (with adaptive: the starting value)",
    )
    estimator: Annotated[str, RegisteredName(KL_ESTIMATORS)] = Field(
        "k3", description="per-token KL estimator: k1 log-ratio, k2 half its square, k3 unbiased and >= 0 (GRPO)"
    )
    mode: Literal["reward", "loss"] = Field(
        "loss",
        description="'reward': subtracted from the reward before advantages (PPO); 'loss': added to the "
        "policy loss (GRPO)",
    )
    adaptive: bool = Field(False, description="steer coef toward kl.target (Ziegler et al. 2019) instead of fixing it")
    target: float = Field(6.0, gt=0.0, description="adaptive: the KL to steer toward, mean per response token (nats)")
    horizon: int = Field(10000, gt=0, description="adaptive controller's horizon (samples)")


class ImportanceSamplingConfig(Section):
    """Truncated importance sampling against rollout-engine vs trainer log-prob mismatch."""

    enabled: bool = Field(
        False,
        description="weight each token's policy loss by min(p_trainer / p_engine, cap); "
        "the mismatch/* metrics are logged either way",
    )
    cap: float = Field(2.0, gt=1.0, description="upper bound of an importance weight (bounds the variance)")
    level: Literal["token", "sequence"] = Field(
        "token",
        description="'token': a weight per token; 'sequence': the product over the response, shared by its "
        "tokens (higher variance)",
    )


class DPOConfig(Section):
    beta: float = Field(
        0.1,
        gt=0.0,
        description="pull toward the reference: higher keeps the policy closer "
        "(implicit reward = beta x log-ratio to the reference)",
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="'sigmoid': DPO; 'ipo': squared loss toward 1 / (2 beta), on summed log-probs here"
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="cDPO; 0 = plain DPO")
    ipo_logprobs: Literal["mean", "sum"] = Field(
        "mean",
        description="IPO only: response log-probs averaged over tokens (the IPO paper, TRL) or summed; "
        "the target margin 1/(2 beta) is per token with 'mean', per response with 'sum'. DPO always sums",
    )

    @property
    def logprob_reduction(self) -> str:
        """How token log-probs become one log-prob per response for this loss: 'sum' or 'mean'."""
        return self.ipo_logprobs if self.loss_type == "ipo" else "sum"


class AlgorithmConfig(Section):
    name: Literal["ppo", "grpo", "rlvr", "dpo", "sft", "reward_model"] = Field(
        description="the loop: ppo, grpo and rlvr run the same RL loop (a label: advantage, rewards and models decide "
        "what it does); dpo, sft and reward_model train without rollouts"
    )
    advantage: Annotated[str, RegisteredName(ADVANTAGE_ESTIMATORS)] = Field(
        "grpo",
        description="RL advantage estimator, e.g. gae (needs models.critic), grpo (group z-score), rloo; "
        "all are listed under Registered names",
    )
    policy_loss: Annotated[str, RegisteredName(POLICY_LOSSES)] = Field(
        "ppo", description="RL policy loss: ppo is the clipped surrogate (with clip_low, clip_high, dual_clip)"
    )
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="per-token discount of gae and reinforce++ (1: none)")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda: lower trusts the critic more (1: Monte Carlo)")
    clip_low: float = Field(
        0.2, gt=0.0, lt=1.0, description="PPO clip range below 1: ratios under 1 - clip_low are clipped"
    )
    clip_high: float = Field(
        0.2,
        gt=0.0,
        description="PPO clip range above 1: ratios over 1 + clip_high are clipped; > clip_low is DAPO's 'clip-higher'",
    )
    dual_clip: float | None = Field(
        None, gt=1.0, description="dual-clip bound c > 1 on negative-advantage tokens' loss (-A x c), or null"
    )
    value_clip: float | None = Field(
        0.2, gt=0.0, description="critic: clip each value's change from its rollout-time value (null: no clip)"
    )
    value_coef: float = Field(
        0.5,
        ge=0.0,
        description="scales the critic's value loss (the critic has its own optimizer and trainer.critic_lr)",
    )
    entropy_coef: float = Field(0.0, ge=0.0, description="entropy bonus subtracted from the policy loss (0: off)")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"] = Field(
        "token_mean",
        description="token losses to one number: token_mean (DAPO), seq_mean_token_mean (GRPO), "
        "seq_mean_token_sum, token_sum_norm (Dr. GRPO: sum / (max_new_tokens x "
        "global_batch_size))",
    )
    dynamic_sampling: bool = Field(False, description="drop prompt groups whose rewards are all equal, draw more")
    max_refills: int = Field(3, ge=0, description="dynamic sampling: extra generation rounds per step, at most")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL to the reference model (RL)")
    importance_sampling: ImportanceSamplingConfig = Field(
        default_factory=ImportanceSamplingConfig, description="correction for engine vs trainer log-prob mismatch (RL)"
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO loss settings (algorithm.name='dpo')")

    @property
    def advantage_estimator(self) -> AdvantageEstimator:
        """The registered estimator `advantage` names, with what it needs (needs_critic, needs_groups)."""
        return ADVANTAGE_ESTIMATORS[self.advantage]


class RewardSpec(Section):
    """One reward function; a run's reward is the weighted sum of its rewards."""

    kind: Annotated[str, RegisteredName(REWARD_KINDS)] = Field(
        description="which reward function (listed under Registered names): python needs `function`, "
        "http needs `url`, model needs models.reward"
    )
    weight: float = Field(1.0, description="multiplies this reward in the sum (negative: a penalty)")
    function: str | None = Field(None, description="'path/to/file.py:function' for kind=python")
    url: str | None = Field(None, description="endpoint for kind=http")
    timeout_s: float = Field(
        30.0,
        gt=0.0,
        description="seconds one call over a step's samples may take, else "
        "they get fallback (one deadline, http retries included)",
    )
    fallback: float = Field(0.0, description="reward given when the function fails or times out")
    # The sandbox each reward function runs in (rlhf/rewards/sandbox.py); defaults suit the built-ins.
    memory_mb: int = Field(4096, ge=64, description="address-space limit of each sandbox process (RLIMIT_AS)")
    cpu_time_s: int = Field(
        600, ge=1, description="CPU seconds of the sandbox (RLIMIT_CPU); it is replaced once it has used half"
    )
    max_processes: int = Field(
        32,
        ge=1,
        description="processes and threads the sandbox may have (RLIMIT_NPROC; "
        "as root the sandbox runs as 'nobody' so that it binds)",
    )
    max_open_files: int = Field(256, ge=16, description="RLIMIT_NOFILE of the sandbox")
    max_file_mb: int = Field(64, ge=1, description="largest file the sandbox may write (RLIMIT_FSIZE)")
    network: bool = Field(
        False,
        description="kind=python: allow network access (default: an empty network "
        "namespace where the OS allows one; kind=http always has network)",
    )

    @model_validator(mode="after")
    def _needs_target(self) -> RewardSpec:
        if self.kind == "python" and (not self.function or ":" not in self.function):
            raise ValueError(f"rewards: kind=python needs function='path/to/file.py:function', got {self.function!r}")
        if self.kind == "http":
            url = urlparse(self.url or "")
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ValueError(f"rewards: kind=http needs url='http://host:port/path', got {self.url!r}")
        return self


# -------------------------------------------------------------------------------------- trainer
class TrainerConfig(Section):
    zero_stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto",
        description="DeepSpeed ZeRO stage of trained roles; frozen ones (reference, reward) shard only at 3. "
        "'auto': 0 for a role with one rank and no offload (ZeRO-1/2 would partition over one rank and keep a "
        "flat copy of the weights and gradient buckets: 1.6 GiB more for SmolLM2, docs/benchmarks.md), else 2",
    )
    offload: bool = Field(False, description="ZeRO CPU offload of optimizer (and params at stage 3)")
    lr: float = Field(
        1e-6, gt=0.0, description="peak AdamW learning rate of the policy (of the reward model in reward_model)"
    )
    critic_lr: float = Field(1e-5, gt=0.0, description="peak AdamW learning rate of the critic (gae)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="LR after warmup: constant, or linear / cosine decay to 0 at total_steps optimizer "
        "steps (an RL step takes epochs_per_rollout x samples / global_batch_size of them)",
    )
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear LR warmup")
    global_batch_size: int = Field(
        16, ge=1, description="samples per optimizer step, all ranks (pairs for dpo and reward_model)"
    )
    micro_batch_size: int = Field(
        4, ge=1, description="samples per forward/backward on one rank (pairs for dpo and reward_model)"
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="token budget per forward/backward on one rank, instead of micro_batch_size rows: "
        "rows sorted by length are packed while rows x longest row <= budget (a longer row goes alone), "
        "and ranks get token-balanced shares. null: micro_batch_size rows",
    )
    shared_prompt: Literal["auto", "on", "off"] = Field(
        "auto",
        description="policy, reference and critic forwards: rows with the same prompt token ids run the prompt once, "
        "packed with their responses in one row under a 4D attention mask (same log-probs, loss and "
        "gradients). auto: when it skips >= 10% of the tokens; on: whenever rows share a prompt; off: "
        "never. Models loaded with flash attention (no 4D mask) fall back to one row per sample, logged",
    )
    response_only_logits: bool = Field(
        True,
        description="policy and reference: project hidden states to the vocabulary only where a response "
        "token is predicted, in chunks (same log-probs). false: logits at every position (the old path; "
        "also used for an entropy bonus and for models that post-process their logits)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="every trained model (policy, critic, reward model): keep only each decoder layer's input in the forward and "
        "recompute the rest in the backward (transformers' gradient checkpointing, non-reentrant): less "
        "activation memory for about a third more training compute. Same loss and gradients",
    )
    grad_clip: float = Field(1.0, gt=0.0, description="clip the global gradient norm to this")
    epochs_per_rollout: int = Field(
        1, ge=1, description="RL: passes over each step's samples, in global_batch_size optimizer steps"
    )
    total_steps: int = Field(
        10, ge=1, description="RL steps (generate, score, train, sync); optimizer steps for sft, dpo and reward_model"
    )
    eval_every: int = Field(
        0, ge=0, description="every loop: held-out evaluation every N steps too (0: before and after only)"
    )
    max_nonfinite_steps: int = Field(
        3,
        ge=0,
        description="RL: stop, with a checkpoint, after this many consecutive steps whose update was skipped "
        "for a non-finite loss or gradient (0: never stop, only skip and count)",
    )
    step_timeout_s: float = Field(
        DEFAULT_STEP_TIMEOUT_S,
        gt=0.0,
        description="every loop: a remote call (a trainer step, a generation, an evaluation, a checkpoint "
        "save or load, an export) that takes longer fails, naming the role and ranks that did not answer, "
        "and the run restarts its actors from the newest checkpoint (checkpoint.max_restarts)",
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="torch.distributed timeout: a collective (all-reduce, ...) stuck this long raises "
        "instead of hanging",
    )
    seed: int = Field(
        0,
        description="torch and Python RNGs of the driver and every rank (new heads' initial weights), "
        "and the shuffle of each RL step's samples",
    )

    def stage_for(self, ranks: int, trainable: bool = True) -> int:
        """The ZeRO stage a role with `ranks` ranks runs: zero_stage with 'auto' resolved (partitioning over
        one rank saves nothing and costs DeepSpeed's flat copies); frozen roles shard only at stage 3."""
        stage = (0 if ranks == 1 and not self.offload else 2) if self.zero_stage == "auto" else self.zero_stage
        return stage if trainable else (3 if stage == 3 else 0)


# ------------------------------------------------------------------------------------ resources
class RoleResources(Section):
    num_actors: int = Field(
        1,
        ge=1,
        description="ranks of the role (a trained role splits each batch over them); "
        "for rollout: vLLM engines, one per actor",
    )
    cpus_per_actor: float = Field(
        1.0, ge=0.0, description="Ray CPUs each actor reserves (fractions allowed; also its default thread count)"
    )
    gpus_per_actor: float = Field(
        0.0,
        ge=0.0,
        description="Ray GPUs each actor reserves (0 on CPU machines; rollout "
        "with tensor_parallel_size > 1: that many)",
    )
    node_kind: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="place the role's actors only on nodes of this kind: nodes that have the custom Ray "
        "resource node_kind:<kind> (scripts/cluster.sh gives each node one; on a cluster.yaml cluster, "
        "add it to the node type's resources). None: any node",
    )


class ResourcesConfig(Section):
    policy: RoleResources = Field(default_factory=RoleResources, description="policy trainer ranks")
    reference: RoleResources = Field(default_factory=RoleResources, description="reference model ranks")
    reward: RoleResources = Field(default_factory=RoleResources, description="reward model ranks (scoring or trained)")
    critic: RoleResources = Field(default_factory=RoleResources, description="critic trainer ranks")
    rollout: RoleResources = Field(default_factory=RoleResources, description="vLLM rollout engines")
    colocate: list[list[Role]] = Field(
        default_factory=list,
        description="groups of roles that share one placement group: rank i of each shares "
        "bundle i (e.g. [[policy, rollout]])",
    )

    @field_validator("colocate")
    @classmethod
    def _each_role_once(cls, groups: list[list[str]]) -> list[list[str]]:
        seen: set[str] = set()
        for group in groups:
            for role in group:
                if role in seen:
                    raise ValueError(f"role {role!r} appears in more than one colocate group: {groups}")
                seen.add(role)
        return groups

    @model_validator(mode="after")
    def _colocated_roles_share_a_node_kind(self) -> ResourcesConfig:
        for group in self.colocate:  # one bundle holds rank i of each member: it sits on one node
            kinds = {getattr(self, role).node_kind for role in group} - {None}
            if len(kinds) > 1:
                raise ValueError(
                    f"colocated roles {group} ask for different node kinds {sorted(kinds)}; they share "
                    "bundles, so give them one resources.<role>.node_kind (or set it on one of them)"
                )
        return self


# ---------------------------------------------------------------------------- checkpoint, logging
class CheckpointConfig(Section):
    dir: str | None = Field(
        None,
        description="default <logging.dir>/<run_name>/checkpoints; shared storage on a "
        "cluster (each run writes into its own <run_name>-<run id> folder there)",
    )
    every_n_steps: int = Field(0, ge=0, description="0 = only at the end")
    keep_last: int = Field(
        2, ge=1, description="this run's newest checkpoints kept; older ones of this run are deleted"
    )
    resume: bool = Field(
        False,
        description="continue the run in <logging.dir>/<run_name> from its newest intact "
        "checkpoint (else a new run, in a new folder if that one is taken)",
    )
    resume_from: str | None = Field(
        None,
        description="a new run that starts from this checkpoint (a step_<k> folder), whichever run wrote it; "
        "differences in model or data are logged, not refused",
    )
    max_restarts: int = Field(
        2,
        ge=0,
        description="every loop: when an actor dies or hangs, restart every group and resume from the newest "
        "checkpoint (step 1 if none) at most this many times per run (0: stop)",
    )

    @model_validator(mode="after")
    def _one_way_to_resume(self) -> CheckpointConfig:
        if self.resume and self.resume_from:
            raise ValueError(
                "checkpoint.resume continues the run named logging.run_name from its own newest "
                "checkpoint; checkpoint.resume_from starts a new run from the checkpoint given: set one"
            )
        return self


class LoggingConfig(Section):
    run_name: str = Field(
        "run", description="the run's folder under logging.dir; also the wandb name and the Ray metrics' `run` tag"
    )
    dir: str = Field("runs", description="parent folder of run folders: config.yaml, metrics, checkpoints, final/")
    jsonl: bool = Field(True, description="write every step's metrics to <run folder>/metrics.jsonl")
    tensorboard: bool = Field(True, description="write TensorBoard events to <run folder>/tensorboard")
    wandb: bool = Field(False, description="also log to Weights & Biases (pip install wandb; missing: a warning)")
    ray_metrics: bool = Field(True, description="export metrics as Ray gauges (dashboard, Prometheus)")
    log_every: int = Field(1, ge=1, description="print a progress line every N steps (the files get every step)")


class EvalConfig(Section):
    judges: list[Literal["exact_match", "lexicon_sentiment", "on_topic"]] = Field(
        default_factory=list,
        description="independent judges of held-out generations, reported as eval/judge/<name> next to the "
        "training reward: exact_match (strict final answer == gold), lexicon_sentiment (VADER, -1..1), "
        "on_topic (MiniLM cosine similarity to the domain's texts); see rlhf/evaluation/judges.py",
    )
    on_topic_field: str = Field(
        "review",
        description="on_topic: the row field holding the domain's text (IMDB: the whole review); else the prompt",
    )
    alarm_action: Literal["off", "warn", "stop", "keep_best"] = Field(
        "warn",
        description="when the reward-hacking alarm fires (eval/hacking_alarm=1): warn (log + metric), stop the run, "
        "or keep_best (also export the policy with the best judge score so far to <run>/best-by-judge)",
    )
    alarm_reward_z: float = Field(
        2.0, gt=0.0, description="alarm: the training reward's paired t since the first eval that counts as a rise"
    )
    alarm_judge_z: float = Field(
        1.0, description="alarm: a judge whose paired t since the first eval stays under this did not follow the rise"
    )
    health_floor: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="alarm: text health collapsed when distinct-2 falls under this x the first eval's (texts of "
        "two words or more on average, at least half as long as at the first eval)",
    )
    max_repeat_rise: float = Field(
        0.25, gt=0.0, le=1.0, description="alarm: text health collapsed when the repeated-3-gram share rises by more"
    )
    best_judge: str | None = Field(None, description="keep_best: the judge that ranks evaluations; default the first")
    save_samples: bool = Field(
        True, description="write every eval's generations with their scores to <run>/samples/eval-<updates>.jsonl"
    )

    @model_validator(mode="after")
    def _best_judge_known(self) -> EvalConfig:
        if self.best_judge is not None and self.best_judge not in self.judges:
            raise ValueError(f"eval.best_judge={self.best_judge!r} is not in eval.judges {self.judges}")
        if self.alarm_action == "keep_best" and not self.judges:
            raise ValueError("eval.alarm_action='keep_best' ranks evaluations by a judge: name one in eval.judges")
        return self


# ------------------------------------------------------------------------------------------ run
class RunConfig(Section):
    models: ModelsConfig = Field(description="the models of each role")
    data: DataConfig = Field(description="where prompts, pairs or SFT examples come from, and their limits")
    algorithm: AlgorithmConfig = Field(description="which loop runs, and its losses and estimators")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="sampling with the vLLM engines")
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="RL reward functions: a sample's reward is their weighted sum (+ models.reward)",
    )
    environment: EnvironmentConfig | None = Field(
        None,
        description="RL only: train on multi-turn episodes against this environment instead of single responses",
    )
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="optimization under DeepSpeed")
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Ray actors per role and what each reserves"
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="RL checkpoints and restarts")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="where metrics go")
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="held-out evaluation: judges, samples written, the reward-hacking alarm"
    )

    @property
    def is_rl(self) -> bool:
        return self.algorithm.name in ("ppo", "grpo", "rlvr")

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        t, algo, ro, res = self.trainer, self.algorithm, self.rollout, self.resources
        if self.models.policy is None and algo.name != "reward_model":
            raise ValueError(f"algorithm.name={algo.name!r} trains a policy: set models.policy.path")
        if algo.name == "reward_model" and self.models.reward is None:
            raise ValueError(
                "algorithm.name='reward_model' trains models.reward: set models.reward.path "
                "(a folder, or the built-in 'all-minilm-l6-v2')"
            )
        # every trained role splits each global batch over its ranks, then into micro-batches
        trained = ["reward"] if algo.name == "reward_model" else ["policy"]
        trained += ["critic"] if self.is_rl and algo.advantage_estimator.needs_critic else []
        for role in trained:
            ranks = getattr(res, role).num_actors
            if t.global_batch_size % (t.micro_batch_size * ranks):
                raise ValueError(
                    f"trainer.global_batch_size={t.global_batch_size} must be divisible by "
                    f"trainer.micro_batch_size ({t.micro_batch_size}) x resources.{role}.num_actors ({ranks})"
                )
        if self.is_rl:
            per_step = ro.prompts_per_step * ro.samples_per_prompt
            if per_step % t.global_batch_size:
                raise ValueError(
                    f"rollout.prompts_per_step x rollout.samples_per_prompt = {per_step} samples per step "
                    f"must be divisible by trainer.global_batch_size={t.global_batch_size}"
                )
            if algo.advantage_estimator.needs_groups and ro.samples_per_prompt < 2:
                raise ValueError(
                    f"algorithm.advantage={algo.advantage!r} compares samples of one prompt: "
                    f"rollout.samples_per_prompt must be >= 2, got {ro.samples_per_prompt}"
                )
            if algo.advantage_estimator.needs_critic and self.models.critic is None:
                raise ValueError(f"algorithm.advantage={algo.advantage!r} needs a value model: set models.critic.path")
            env = self.environment
            if env is not None and env.reward == "environment":
                if self.rewards or self.models.reward is not None:
                    raise ValueError(
                        "environment.reward='environment': the environment's rewards are the return, so `rewards` "
                        "and models.reward would be ignored; remove them or set environment.reward='rewards'"
                    )
            elif not self.rewards and self.models.reward is None:
                raise ValueError("an RL run needs a reward: add an entry to `rewards` or set models.reward")
            if res.rollout.num_actors > ro.prompts_per_step:
                # each engine gets whole prompts (all n samples of a prompt on one engine)
                raise ValueError(
                    f"resources.rollout.num_actors={res.rollout.num_actors} engines share rollout.prompts_per_step="
                    f"{ro.prompts_per_step} prompts a step, so some would never generate; lower "
                    f"resources.rollout.num_actors or raise rollout.prompts_per_step"
                )
        if self.data.sft_target != "answer" and algo.name != "sft":
            raise ValueError(
                f"data.sft_target={self.data.sft_target!r} makes sft pairs, but algorithm.name={algo.name!r}"
            )
        if self.environment is not None and not self.is_rl:
            raise ValueError(f"environment: episodes are RL samples, but algorithm.name={algo.name!r}")
        if self.environment is not None and self.environment.max_tokens < ro.max_new_tokens:
            raise ValueError(
                f"environment.max_tokens={self.environment.max_tokens} (the whole episode) is below "
                f"rollout.max_new_tokens={ro.max_new_tokens} (one turn)"
            )
        for role in ("reference", "reward", "critic"):
            spec = getattr(self.models, role)
            if spec is not None and spec.lora is not None:
                raise ValueError(f"models.{role}.lora: only the policy trains adapters (models.policy.lora)")
        if algo.clip_high < algo.clip_low:
            raise ValueError(
                f"algorithm.clip_high={algo.clip_high} is below clip_low={algo.clip_low}; "
                "clip-higher means clip_high >= clip_low"
            )
        if any(REWARD_KINDS[r.kind].remote for r in self.rewards) and self.models.reward is None:
            raise ValueError("rewards has kind=model but models.reward is not set")
        if ro.sleep_during_training and not any("rollout" in group and len(group) > 1 for group in res.colocate):
            raise ValueError(
                "rollout.sleep_during_training frees the engines' memory for the roles that share their devices, "
                "but rollout shares them with none: add a group such as [policy, rollout] to resources.colocate"
            )
        if ro.sleep_during_training and ro.async_rollouts is True:  # auto: sync with sleep (rlhf/overlap.py)
            raise ValueError(
                "rollout.async_rollouts generates while the trainers train, and rollout.sleep_during_training puts "
                "the engines to sleep then: choose one"
            )
        if ro.tensor_parallel_size > 1 and res.rollout.gpus_per_actor != ro.tensor_parallel_size:
            # an engine's actor holds all the GPUs its tensor-parallel workers use, in its one bundle
            raise ValueError(
                f"rollout.tensor_parallel_size={ro.tensor_parallel_size} spreads each engine over that many GPUs: "
                f"set resources.rollout.gpus_per_actor={ro.tensor_parallel_size} (got {res.rollout.gpus_per_actor:g})"
            )
        return self


# --------------------------------------------------------------------------------- load / errors
class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem found, one per line."""


# Keys that configs used to accept: what to do instead (an unknown key otherwise only lists the allowed ones).
REMOVED_KEYS = {
    "rollout.num_engines": "set resources.rollout.num_actors, the number of vLLM engines (one per rollout actor)",
    "algorithm.reward_lm_coef": "it had no effect (any value but 0 stopped the run): delete it",
}


def _describe(error: ErrorDetails, root: type[BaseModel]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "<root>"
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        key = ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
        if key in REMOVED_KEYS:
            return f"{where}: this key was removed; {REMOVED_KEYS[key]}"
        allowed = _allowed_keys(root, error["loc"][:-1])
        hint = did_you_mean(str(error["loc"][-1]), allowed)
        return f"{where}: unknown key (value {value!r}){hint}; allowed keys here: {', '.join(allowed)}"
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "literal_error":  # "Input should be 'math', 'format' or ...": add the closest one
        msg += did_you_mean(str(value), re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", "")))
    if isinstance(value, dict):  # a whole section failed a cross-field check: the message names fields
        return f"{where}: {msg}"
    return f"{where} = {value!r}: {msg}"


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Walk the model tree along `loc` to list the keys valid at that level."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        sub_model = _model_of(field.annotation)
        if sub_model is None:
            return []
        model = sub_model
    return sorted(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err, RunConfig) for err in e.errors()]
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines)) from None


def nonfinite_paths(value: Any, path: str = "") -> list[str]:
    """Dotted paths of every inf/NaN float inside nested dicts and lists (`a.b.0 = inf`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path or '<value>'} = {value}"]
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    return [p for k, v in items for p in nonfinite_paths(v, f"{path}.{k}" if path else str(k))]


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (1e-6, true, [a, b])."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    parts = key.strip().split(".")
    node: Any = raw
    for part in parts[:-1]:
        if isinstance(node, list):  # rewards.0.weight=2 indexes a list
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {override!r}: no item {part!r} in a list of {len(node)}")
            node = node[int(part)]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {override!r}: {part!r} is a value ({child!r}), not a section")
        node = child
    try:
        value = parse_yaml(text, f"override {override!r}") if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {e}") from None
    if isinstance(node, list):
        if not parts[-1].isdigit() or int(parts[-1]) >= len(node):
            raise ConfigError(f"override {override!r}: no item {parts[-1]!r} in a list of {len(node)}")
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None
) -> RunConfig:
    """Read YAML (if given) on top of `base`, apply overrides, validate. Raises ConfigError."""
    raw: dict[str, Any] = copy.deepcopy(base or {})  # overrides edit nested sections in place: never the caller's
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is allowed
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: line {line}: {e.reason}") from None
        try:
            loaded = parse_yaml(text, str(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        raw = _deep_merge(raw, loaded)
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, source=str(path) if path else "config")


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump_config(cfg: RunConfig) -> str:
    """YAML text that `load_config` reads back to an equal config."""
    text: str = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return text
