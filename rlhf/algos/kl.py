"""KL divergence to the reference policy: per-token estimators, the penalty, and controllers.

We want KL(pi || pi_ref) = E_{y ~ pi}[log pi(y) - log pi_ref(y)] from the sampled tokens only.
With r = pi_ref(y) / pi(y) (so log r = ref_logprobs - logprobs), Schulman's estimators
(http://joschu.net/blog/kl-approx.html) are
    k1 = -log r                unbiased, high variance, can be negative per token
    k2 = 0.5 * (log r)^2       biased, low variance, >= 0
    k3 = (r - 1) - log r       unbiased, low variance, >= 0 (since x - 1 >= log x)
So k1 = logprobs - ref_logprobs: positive when the policy puts *more* mass on its sample than
the reference, which is the direction the penalty pushes against.

`KL_ESTIMATORS` maps the config's algorithm.kl.estimator to one `@kl_estimator` function of the
per-token log-ratio log r (B, T).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.algos.aggregation import aggregate_loss
from rlhf.registry import Entry, Registry, summary_of

KLFn = Callable[[torch.Tensor], torch.Tensor]  # log r = ref_logprobs - logprobs (B, T) -> KL (B, T)


@dataclass(frozen=True)
class KLEstimator(Entry):
    fn: KLFn


KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


def kl_estimator(name: str) -> Callable[[KLFn], KLFn]:
    """Register the decorated function of log r as the KL estimator `name` (algorithm.kl.estimator)."""

    def register(fn: KLFn) -> KLFn:
        KL_ESTIMATORS.add(KLEstimator(name, summary_of(fn), fn))
        return fn

    return register


# k3's exp(log r) overflows float32 past log r ~ 88. Above this cap exp is continued by its
# tangent line, so value and gradient stay finite and keep their sign (a clamp would zero both).
K3_EXP_CAP = 20.0


def compute_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k1",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs, (B, T).

    logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens under the policy and the
    reference. Differentiable in `logprobs` (for KL-as-loss). With a mask, masked positions are 0.
    """
    log_r = ref_logprobs - logprobs  # (B, T)
    if mask is not None:
        log_r = torch.where(mask.bool(), log_r, torch.zeros_like(log_r))
    return KL_ESTIMATORS[estimator].fn(log_r)


@kl_estimator("k1")
def k1(log_r: torch.Tensor) -> torch.Tensor:
    """-log r: the log-ratio; unbiased, high variance, can be negative per token."""
    return -log_r


@kl_estimator("k2")
def k2(log_r: torch.Tensor) -> torch.Tensor:
    """(log r)^2 / 2: biased, low variance, >= 0."""
    return 0.5 * log_r**2


@kl_estimator("k3")
def k3(log_r: torch.Tensor) -> torch.Tensor:
    """(r - 1) - log r: unbiased, low variance, >= 0 (GRPO)."""
    return _exp_capped(log_r) - 1.0 - log_r


def _exp_capped(x: torch.Tensor, cap: float = K3_EXP_CAP) -> torch.Tensor:
    """exp(x) for x <= cap; above it the tangent line exp(cap) * (1 + x - cap): finite for any
    finite log-ratio, never above exp(x) (so k3 stays >= 0), and with a gradient exp(cap) that
    still points the right way. Below there is no clamp:
    exp underflows to 0 harmlessly, and the gradient of k3 there (~1 per token, from -log r) is
    exactly where a policy that moved far from the reference is pulled back."""
    linear = math.exp(cap) * (1.0 + x - cap)
    return torch.where(x > cap, linear, torch.exp(x.clamp(max=cap)))


def apply_kl_penalty(token_rewards: torch.Tensor, kl: torch.Tensor, coef: float, mask: torch.Tensor) -> torch.Tensor:
    """KL-in-reward (InstructGPT/PPO): r_t - coef * kl_t on valid tokens, 0 elsewhere. (B, T).

    The KL is treated as part of the environment's reward, so it is detached.
    """
    penalised = token_rewards - coef * kl.detach()
    return torch.where(mask.bool(), penalised, torch.zeros_like(penalised))


def kl_loss(
    kl: torch.Tensor,
    mask: torch.Tensor,
    agg_mode: str = "token_mean",
    global_normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL-as-loss (GRPO): aggregate the per-token KL (B, T) like any other token loss -> scalar.

    Add `coef * kl_loss(...)` to the policy loss; use k3 (unbiased, >= 0) as GRPO does.
    """
    return aggregate_loss(kl, mask, agg_mode, global_normalizer=global_normalizer)


class FixedKLController:
    """A constant KL coefficient; `update` does nothing. Same interface as the adaptive one."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

    A proportional controller that steers the observed KL toward `target`:
        error = clip(current_kl / target - 1, -0.2, 0.2)
        coef *= 1 + error * n_steps / horizon
    The clip keeps one noisy KL estimate from moving the coefficient by more than 20% per horizon.
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController needs target > 0 and horizon > 0")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
