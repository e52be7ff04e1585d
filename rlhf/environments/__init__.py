"""Environments for multi-turn episodes: the interface (base), the registry and the built-ins.

Importing this package registers the built-in environments (calculator, guess_feedback).
"""

from rlhf.environments import calculator, guess_feedback
from rlhf.environments.base import (
    ENVIRONMENTS,
    Environment,
    EnvironmentKind,
    Message,
    Observation,
    environment,
    import_environment_module,
    make_environment,
    safe_reset,
    safe_step,
)

__all__ = [
    "ENVIRONMENTS",
    "Environment",
    "EnvironmentKind",
    "Message",
    "Observation",
    "calculator",
    "environment",
    "guess_feedback",
    "import_environment_module",
    "make_environment",
    "safe_reset",
    "safe_step",
]
