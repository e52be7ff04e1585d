"""Shared fixtures for integration and e2e tests: one real local Ray per session, tiny real models."""
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private test cluster; no token dance
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

TEXTS = [f"{a} + {b} = {a + b}" for a in range(20) for b in range(20)] + ["hello world", "the answer is"]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tests.tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", TEXTS, seed=0)
