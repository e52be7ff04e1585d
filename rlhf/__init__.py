"""rlhf: the pure core of the system (config, algorithms, data, rewards).

Nothing in this package imports ray, deepspeed or vllm (tests/unit/test_pure_core.py enforces it),
so everything here runs and is tested in a plain Python process.
"""
