"""Run metrics beyond the run folder: Ray's metrics API (the dashboard, Prometheus) and wandb.

Both are RunLogger sinks (`.log(step, metrics)`, `.close()`); `metric_sinks(cfg, role)` builds the
ones the config asks for. RunLogger (rlhf/run_log.py) stays free of Ray.

Ray metrics. Every gauge below is tagged `run` (logging.run_name) and `role` (the role whose work
the number measures: policy, critic, reference, rollout, reward or coordinator); Ray exports each
one with the prefix `ray_`, e.g. `ray_raylhf_reward_mean{run="rlvr",role="reward"}`. The mapping
from our metric keys (`records` below, a pure function the unit tests check):

    step                                   raylhf_step                       coordinator
    reward/mean, reward/std                raylhf_reward_mean, _std          reward
    reward/<fn>                            raylhf_reward_function_mean{function=<fn>}
    reward_errors/<fn>, reward_timeouts/<fn>  raylhf_reward_errors{function}, raylhf_reward_timeouts{function}
    reward/constant_warning                raylhf_reward_constant_warning    reward (1: a reward was constant early on)
    kl, entropy, clip_fraction, policy_loss, grad_norm   raylhf_<same>            policy
    kl_coef                                raylhf_kl_coef                    coordinator
    value_loss, critic_clip_fraction, critic_grad_norm   raylhf_value_loss, raylhf_clip_fraction,
                                           raylhf_grad_norm                  critic
    response_length/mean                   raylhf_response_length_mean       rollout
    rollout/worker_restarts                raylhf_worker_restarts            rollout
    time/<phase>                           raylhf_phase_seconds{phase}       the phase's role (PHASE_ROLES)
    time/sync                              also raylhf_weight_sync_seconds   rollout
    samples / time/<phase>                 raylhf_samples_per_second{phase}
    throughput/<phase>_tokens_per_s, else
      samples x response_length/mean / time/<phase>   raylhf_tokens_per_second{phase}
    mismatch/<stat>                        raylhf_logprob_mismatch{stat}     rollout (engine vs trainer)
    eval/hacking_alarm                     raylhf_hacking_alarm              coordinator (1: reward up, judges not)
    eval/<name>                            raylhf_eval{name}                 coordinator
    anything else (lr, sft_loss, rm_accuracy, ...)   raylhf_metric{name}     the sink's default role

A scrape between steps reads the latest value of each series: Ray (2.60) drops a gauge series
that no process re-reports within two export intervals (2 x RAY_metrics_report_interval_ms,
default 20 s; ray-project/ray#56405, #64633), and its own emitters re-report every interval, so
RayMetrics does the same from a background thread. After `close()` the run's series age out.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# name -> (description, tag keys beyond ("run", "role"))
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "raylhf_step": ("Last training step logged", ()),
    "raylhf_reward_mean": ("Mean combined reward of the step's samples", ()),
    "raylhf_reward_std": ("Standard deviation of the combined reward of the step's samples", ()),
    "raylhf_reward_function_mean": ("Mean reward of one reward function over the step's samples", ("function",)),
    "raylhf_reward_errors": (
        "Samples whose reward function raised, timed out or gave a non-finite value, this step",
        ("function",),
    ),
    "raylhf_reward_timeouts": (
        "Samples whose reward-function call timed out this step (also in raylhf_reward_errors)",
        ("function",),
    ),
    "raylhf_reward_constant_warning": (
        "1 when a reward function gave every sample the same value over the run's "
        "first batches (it teaches nothing; see the log), else 0",
        (),
    ),
    "raylhf_worker_restarts": ("Rollout engine actors that died and were restarted this step", ()),
    "raylhf_kl": ("KL(policy || reference) of the sampled tokens", ()),
    "raylhf_kl_coef": ("KL coefficient (the adaptive controller's current value)", ()),
    "raylhf_entropy": ("Mean token entropy of the policy on the sampled responses", ()),
    "raylhf_clip_fraction": ("Fraction of tokens where the PPO (or value) clip was active", ()),
    "raylhf_policy_loss": ("Policy loss", ()),
    "raylhf_value_loss": ("Critic (value) loss", ()),
    "raylhf_grad_norm": ("Gradient norm before clipping", ()),
    "raylhf_response_length_mean": ("Mean response length in tokens", ()),
    "raylhf_phase_seconds": ("Wall seconds of one phase of the step", ("phase",)),
    "raylhf_samples_per_second": ("Samples of the step / seconds of the phase", ("phase",)),
    "raylhf_tokens_per_second": ("Response tokens of the step / seconds of the phase", ("phase",)),
    "raylhf_weight_sync_seconds": ("Seconds to send the policy's weights to the rollout engines", ()),
    "raylhf_logprob_mismatch": ("Rollout-engine vs trainer log-prob mismatch of the sampled tokens", ("stat",)),
    "raylhf_hacking_alarm": (
        "1 when the latest held-out evaluation found the training reward up while a judge stayed flat or "
        "fell, or text health collapsed (reward hacking? see the log and samples/), else 0",
        (),
    ),
    "raylhf_eval": ("Held-out evaluation metric", ("name",)),
    "raylhf_metric": ("Any other per-step metric, by its raylhf key", ("name",)),
}

# key -> (gauge, role) for keys that map one to one
EXACT = {
    "reward/mean": ("raylhf_reward_mean", "reward"),
    "reward/std": ("raylhf_reward_std", "reward"),
    "reward/constant_warning": ("raylhf_reward_constant_warning", "reward"),
    "kl": ("raylhf_kl", "policy"),
    "kl_coef": ("raylhf_kl_coef", "coordinator"),
    "entropy": ("raylhf_entropy", "policy"),
    "clip_fraction": ("raylhf_clip_fraction", "policy"),
    "critic_clip_fraction": ("raylhf_clip_fraction", "critic"),
    "policy_loss": ("raylhf_policy_loss", "policy"),
    "value_loss": ("raylhf_value_loss", "critic"),
    "grad_norm": ("raylhf_grad_norm", "policy"),
    "critic_grad_norm": ("raylhf_grad_norm", "critic"),
    "rm_grad_norm": ("raylhf_grad_norm", "reward"),
    "response_length/mean": ("raylhf_response_length_mean", "rollout"),
    "rollout/worker_restarts": ("raylhf_worker_restarts", "rollout"),
    "eval/hacking_alarm": ("raylhf_hacking_alarm", "coordinator"),
}
# key prefix -> (gauge, role, the tag that takes the rest of the key)
PREFIXES = {
    "reward/": ("raylhf_reward_function_mean", "reward", "function"),
    "reward_errors/": ("raylhf_reward_errors", "reward", "function"),
    "reward_timeouts/": ("raylhf_reward_timeouts", "reward", "function"),
    "mismatch/": ("raylhf_logprob_mismatch", "rollout", "stat"),
    "eval/": ("raylhf_eval", "coordinator", "name"),
}
# the role whose work each phase of RLCoordinator.step times
PHASE_ROLES = {
    "generate": "rollout",
    "score": "reward",
    "reference": "reference",
    "train": "policy",
    "sync": "rollout",
    "sleep": "rollout",
    "wake": "rollout",
    "step": "coordinator",
}


def records(
    step: int, metrics: dict[str, float], default_role: str = "coordinator"
) -> list[tuple[str, float, dict[str, str]]]:
    """(gauge name, value, tags except `run`) for one logged step. Pure: no Ray needed."""
    out = [("raylhf_step", float(step), {"role": "coordinator"})]
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
    for key, value in metrics.items():
        if key in EXACT:
            gauge, role = EXACT[key]
            out.append((gauge, value, {"role": role}))
        elif key.startswith("time/"):
            phase = key.removeprefix("time/")
            out.append(("raylhf_phase_seconds", value, {"role": PHASE_ROLES.get(phase, default_role), "phase": phase}))
            if phase == "sync":
                out.append(("raylhf_weight_sync_seconds", value, {"role": "rollout"}))
        elif key.startswith("throughput/") and key.endswith("_tokens_per_s"):
            phase = key.removeprefix("throughput/").removesuffix("_tokens_per_s")
            out.append(
                ("raylhf_tokens_per_second", value, {"role": PHASE_ROLES.get(phase, default_role), "phase": phase})
            )
        elif prefix := next((p for p in PREFIXES if key.startswith(p)), None):
            gauge, role, tag = PREFIXES[prefix]
            out.append((gauge, value, {"role": role, tag: key.removeprefix(prefix)}))
        else:
            out.append(("raylhf_metric", value, {"role": default_role, "name": key}))
    # Per-phase throughput, derived: the step's (kept) samples and their response tokens over each
    # phase's seconds. A phase whose tokens/s the coordinator measured itself keeps that number.
    samples, length = metrics.get("samples"), metrics.get("response_length/mean")
    for key, seconds in metrics.items():
        if not key.startswith("time/") or seconds <= 0 or samples is None:
            continue
        phase = key.removeprefix("time/")
        tags = {"role": PHASE_ROLES.get(phase, default_role), "phase": phase}
        out.append(("raylhf_samples_per_second", samples / seconds, tags))
        if length is not None and f"throughput/{phase}_tokens_per_s" not in metrics:
            out.append(("raylhf_tokens_per_second", samples * length / seconds, tags))
    return out


_gauges: dict = {}  # one Gauge object per name per process, however many runs it logs


class RayMetrics:
    """A RunLogger sink that sets Ray gauges (ray.util.metrics), exported by each node's metrics
    agent at http://<node>:<metrics_export_port>/metrics and shown on the dashboard's Metrics page.

    Records from the process that logs (the driver): a Ray driver is a core worker like any other
    and its metrics reach its node's agent, with or without the dashboard
    (tests/integration/test_ray_metrics.py checks it).
    """

    def __init__(self, run_name: str, default_role: str = "coordinator"):
        import ray
        from ray.util.metrics import Gauge

        self.run, self.default_role = run_name, default_role
        for name, (description, extra) in GAUGES.items():
            if name not in _gauges:
                _gauges[name] = Gauge(name, description=description, tag_keys=("run", "role", *extra))
        self.latest: dict[tuple[str, tuple], float] = {}  # (gauge, tags) -> last value, every series so far
        self.lock, self.stopped = threading.Lock(), threading.Event()
        try:  # re-report at twice the export rate, so no export interval misses a series
            interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 2000
        except Exception:
            interval_s = 5.0  # Ray's default interval is 10 s
        self.thread = threading.Thread(
            target=self._keep_alive, args=(interval_s,), name="raylhf-ray-metrics", daemon=True
        )
        self.thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.lock:
            for name, value, tags in records(step, metrics, self.default_role):
                self.latest[name, tuple(sorted({"run": self.run, **tags}.items()))] = value
            self._set_all()

    def _set_all(self) -> None:
        for (name, tags), value in self.latest.items():
            _gauges[name].set(value, tags=dict(tags))

    def _keep_alive(self, interval_s: float) -> None:
        while not self.stopped.wait(interval_s):
            try:
                with self.lock:
                    self._set_all()
            except Exception as e:  # e.g. Ray shut down under us: stop quietly, training goes on
                log.debug("Ray metrics keep-alive stopped: %s", e)
                return

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


class WandbSink:
    """A RunLogger sink for Weights & Biases (optional: `pip install wandb`; WANDB_MODE etc. apply)."""

    def __init__(self, run_name: str, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="raylhf", name=run_name, dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def metric_sinks(cfg, role: str = "coordinator", run_dir: Path | None = None) -> list:
    """The RunLogger sinks `cfg.logging` asks for: Ray metrics (ray_metrics) and wandb (wandb).

    `role` tags the metrics that belong to no particular role (see the module docstring). A
    missing wandb package is a warning, not an error: the run's own logs still have everything.
    """
    sinks: list = []
    if cfg.logging.ray_metrics:
        sinks.append(RayMetrics(cfg.logging.run_name, role))
    if cfg.logging.wandb:
        try:
            sinks.append(
                WandbSink(
                    cfg.logging.run_name,
                    run_dir or Path(cfg.logging.dir) / cfg.logging.run_name,
                    cfg.model_dump(mode="json"),
                )
            )
        except ImportError:
            log.warning("logging.wandb=true but wandb is not installed (pip install wandb); continuing without it")
        except Exception as e:  # e.g. no API key: the run's own logs still have every metric
            log.warning("logging.wandb=true but wandb.init failed (%s: %s); continuing without it", type(e).__name__, e)
    return sinks
