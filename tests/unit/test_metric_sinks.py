"""RunLogger's extra sinks, and how actors/metrics.py maps a step's metrics onto Ray gauges (no Ray started)."""

import re

from actors.metrics import GAUGES, metric_sinks, records
from rlhf.config import LoggingConfig
from rlhf.run_log import RunLogger

STEP = {
    "reward/mean": 0.5,
    "reward/std": 0.25,
    "reward/accuracy": 0.5,
    "reward/format": 1.0,
    "reward_errors/accuracy": 2.0,
    "reward_timeouts/accuracy": 1.0,
    "rollout/worker_restarts": 1.0,
    "kl": 0.01,
    "kl_coef": 0.05,
    "entropy": 1.5,
    "clip_fraction": 0.1,
    "policy_loss": -0.2,
    "value_loss": 0.3,
    "critic_clip_fraction": 0.05,
    "grad_norm": 2.0,
    "critic_grad_norm": 4.0,
    "response_length/mean": 10.0,
    "samples": 8.0,
    "time/generate": 2.0,
    "time/score": 0.5,
    "time/reference": 1.0,
    "time/train": 4.0,
    "time/sync": 0.25,
    "time/step": 7.75,
    "throughput/generate_tokens_per_s": 41.0,
    "mismatch/mean_abs_logprob_diff": 0.003,
    "lr": 1e-5,
    "eval/reward_mean": 0.4,
    "nan_metric": float("nan"),
}


def by_key(recs):
    return {(name, tuple(sorted(tags.items()))): value for name, value, tags in recs}


def test_records_map_each_metric_to_a_tagged_gauge():
    got = by_key(records(3, STEP))
    expect = {
        ("raylhf_step", (("role", "coordinator"),)): 3.0,
        ("raylhf_reward_mean", (("role", "reward"),)): 0.5,
        ("raylhf_reward_function_mean", (("function", "accuracy"), ("role", "reward"))): 0.5,
        ("raylhf_reward_errors", (("function", "accuracy"), ("role", "reward"))): 2.0,
        ("raylhf_reward_timeouts", (("function", "accuracy"), ("role", "reward"))): 1.0,
        ("raylhf_worker_restarts", (("role", "rollout"),)): 1.0,
        ("raylhf_kl", (("role", "policy"),)): 0.01,
        ("raylhf_clip_fraction", (("role", "policy"),)): 0.1,
        ("raylhf_clip_fraction", (("role", "critic"),)): 0.05,
        ("raylhf_value_loss", (("role", "critic"),)): 0.3,
        ("raylhf_grad_norm", (("role", "critic"),)): 4.0,
        ("raylhf_phase_seconds", (("phase", "train"), ("role", "policy"))): 4.0,
        ("raylhf_weight_sync_seconds", (("role", "rollout"),)): 0.25,
        # samples/s per phase = samples / seconds; tokens/s = samples x mean length / seconds ...
        ("raylhf_samples_per_second", (("phase", "train"), ("role", "policy"))): 2.0,
        ("raylhf_tokens_per_second", (("phase", "train"), ("role", "policy"))): 20.0,
        ("raylhf_samples_per_second", (("phase", "sync"), ("role", "rollout"))): 32.0,
        # ... except where the coordinator measured tokens/s itself
        ("raylhf_tokens_per_second", (("phase", "generate"), ("role", "rollout"))): 41.0,
        ("raylhf_logprob_mismatch", (("role", "rollout"), ("stat", "mean_abs_logprob_diff"))): 0.003,
        ("raylhf_eval", (("name", "reward_mean"), ("role", "coordinator"))): 0.4,
        ("raylhf_metric", (("name", "lr"), ("role", "coordinator"))): 1e-5,
    }
    for key, value in expect.items():
        assert got.get(key) == value, key
    assert not any("nan_metric" in str(k) for k in got)  # non-finite values are dropped
    # one value per (gauge, tags): no series is set twice in a step
    assert len(got) == len(records(3, STEP))


def test_every_gauge_name_is_a_valid_prometheus_name_and_tags_match_its_keys():
    for name, _value, tags in records(3, STEP):
        assert name in GAUGES and re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name)
        assert set(tags) == {"role", *GAUGES[name][1]}, name
        assert all(isinstance(v, str) for v in tags.values())


class ListSink:
    def __init__(self, fail=False):
        self.logged, self.closed, self.fail = [], False, fail

    def log(self, step, metrics):
        if self.fail:
            raise RuntimeError("exporter down")
        self.logged.append((step, metrics))

    def close(self):
        self.closed = True


def test_run_logger_feeds_sinks_and_survives_a_broken_one(tmp_path):
    good, bad = ListSink(), ListSink(fail=True)
    logger = RunLogger(tmp_path, 2, tensorboard=False, sinks=[bad, good])
    logger.log(1, {"a": 1.0, "b": float("inf"), "c": "text"})
    logger.log(2, {"a": 2.0})
    logger.close()
    assert good.logged == [(1, {"a": 1.0}), (2, {"a": 2.0})] and good.closed
    assert logger.sinks == [good]  # the failing sink was switched off after its first error


def test_metric_sinks_follow_the_config(caplog):
    class Cfg:
        logging = LoggingConfig(ray_metrics=False, wandb=True)

        def model_dump(self, mode=None):
            return {}

    try:
        import wandb  # noqa: F401
    except ImportError:  # not installed here: a warning, and the run goes on without it
        assert metric_sinks(Cfg()) == []
        assert "wandb is not installed" in caplog.text
