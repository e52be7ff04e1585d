"""rollout.async_rollouts=auto: async only where the engines have compute of their own (rlhf/overlap.py)."""

import pytest

from rlhf.config import ResourcesConfig
from rlhf.overlap import choose_async

RL = ["policy", "rollout", "reference"]


def resources(**roles) -> ResourcesConfig:
    return ResourcesConfig(**roles)


def test_explicit_settings_are_obeyed_even_where_auto_would_not():
    assert choose_async(True, resources(), RL) == (True, "rollout.async_rollouts=true")
    gpus = resources(rollout={"gpus_per_actor": 1})
    assert choose_async(False, gpus, RL) == (False, "rollout.async_rollouts=false")


def test_auto_is_sync_where_engines_and_trainers_share_cpu_cores():
    # the default resources: every role on any node's CPUs (this machine: 2 cores) -> measured slower
    on, why = choose_async("auto", resources(), RL)
    assert not on and "share CPU cores" in why
    # a node kind for the engines alone does not separate them: the trainers may land on that node
    on, _ = choose_async("auto", resources(rollout={"node_kind": "gen"}), RL)
    assert not on
    # fractional GPUs may share a device with a trainer's fraction
    on, _ = choose_async("auto", resources(rollout={"gpus_per_actor": 0.5}, policy={"gpus_per_actor": 0.5}), RL)
    assert not on


def test_auto_is_async_where_engines_have_their_own_gpus_or_nodes():
    on, why = choose_async("auto", resources(rollout={"gpus_per_actor": 1}, policy={"gpus_per_actor": 1}), RL)
    assert on and "GPUs of their own" in why
    kinds = resources(rollout={"node_kind": "gen"}, policy={"node_kind": "train"}, reference={"node_kind": "train"})
    on, why = choose_async("auto", kinds, RL)
    assert on and "'gen'" in why
    # a role the run does not start (no reference without KL) does not count
    on, _ = choose_async("auto", resources(rollout={"node_kind": "gen"}, policy={"node_kind": "train"}), RL[:2])
    assert on
    # ... but one that does, with no kind, may share the engines' nodes
    on, _ = choose_async("auto", resources(rollout={"node_kind": "gen"}, policy={"node_kind": "train"}), RL)
    assert not on


@pytest.mark.parametrize("colocate", [[["policy", "rollout"]], [["reference", "rollout"]]])
def test_auto_is_sync_when_engines_are_colocated_with_a_trainer_or_sleep(colocate):
    gpus = {"gpus_per_actor": 1}
    res = resources(rollout=gpus, policy=gpus, reference=gpus, colocate=colocate)
    on, why = choose_async("auto", res, RL)
    assert not on and colocate[0][0] in why
    on, why = choose_async("auto", resources(rollout=gpus, policy=gpus), RL, sleep_during_training=True)
    assert not on and "sleep_during_training" in why


def test_forced_async_on_too_many_threads_gets_advice_to_split_the_cores():
    from rlhf.overlap import cpu_split_advice

    advice = cpu_split_advice(True, own_compute=False, threads=2, cores=2)
    assert advice and "RAYLHF_CPU_THREADS=1" in advice
    assert cpu_split_advice(True, own_compute=False, threads=1, cores=2) is None  # half each
    assert cpu_split_advice(True, own_compute=False, threads=None, cores=2) is None  # Ray's default: 1
    assert cpu_split_advice(False, own_compute=False, threads=2, cores=2) is None  # sync
    assert cpu_split_advice(True, own_compute=True, threads=8, cores=8) is None  # engines elsewhere


def test_reference_overlap_goes_with_async_and_a_reference_process():
    from rlhf.overlap import choose_reference_overlap

    gpus = {"gpus_per_actor": 1}
    own = resources(reference=gpus, policy=gpus, rollout=gpus)
    # auto: on with async rollouts, also on shared CPU cores (measured faster there)
    assert choose_reference_overlap("auto", True, own, True)[0]
    on, why = choose_reference_overlap("auto", True, resources(), True)
    assert on and why.startswith("auto")
    # nothing to overlap without async rollouts or without a reference process, whatever the setting
    assert choose_reference_overlap(True, False, own, True)[0] is False
    assert choose_reference_overlap("auto", False, own, True)[0] is False
    assert choose_reference_overlap(True, True, own, False)[0] is False
    assert choose_reference_overlap(True, True, resources(), True) == (True, "rollout.overlap_reference=true")
    assert choose_reference_overlap(False, True, own, True)[0] is False
