"""What every training loop (RL, SFT, DPO, reward model) implements, and what every run returns.

One driver (actors/driver.py) runs the outer loop for all of them: held-out evaluation before
training, steps with progress and metrics, checkpoints and verified resume, evaluation every
`trainer.eval_every` steps and after training, export, restarts after an actor fails. A loop
only says how to do one of each:

    setup()                   start its actors, load and encode its data
    step(k) -> metrics        training step k (1-based); deterministic in k, so a resumed run
                              continues exactly where the uninterrupted one would have been
    evaluate() -> metrics     held-out metrics (`eval/...`; {} when there is no held-out data)
    save_state(folder) -> d   each trainable role writes its state under `folder/<role>`; `d` is
                              the loop's own driver-side state (picklable), saved in driver.pt
    load_state(folder, d)     the reverse, on fresh actors after setup()
    export(path) -> str       the trained model as a Hugging Face folder; its absolute path
    dead_actors() -> names    'policy rank 1', ...: which of its actors have died
    shutdown()                kill its actors, free its placement groups (safe after a failed setup)

Pure: no Ray here (tests/unit/test_pure_core.py), so the protocol and the result shape can be
read and tested without a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

# Every run's result (result.json and the value `actors.launch.run` returns), whatever the loop.
RESULT_KEYS = ("before", "after", "steps", "final_path", "run_dir", "restarts")


class TrainingLoop(Protocol):
    progress_keys: tuple[str, ...]  # metrics shown in the progress line, when a step reports them
    sink_role: str  # the `role` tag of its Ray dashboard gauges

    def setup(self) -> None: ...
    def step(self, step: int) -> dict[str, float]: ...
    def evaluate(self) -> dict[str, float]: ...
    def save_state(self, folder: Path) -> dict[str, Any]: ...
    def load_state(self, folder: Path, state: dict[str, Any]) -> None: ...
    def export(self, path: Path) -> str: ...
    def dead_actors(self) -> list[str]: ...
    def shutdown(self) -> None: ...


def run_result(
    before: dict[str, float], after: dict[str, float], steps: int, final_path: str, run_dir: str, restarts: int
) -> dict[str, Any]:
    """The one result shape (RESULT_KEYS): held-out metrics before/after training, steps trained
    in all, the exported model's folder, the run folder and how many times the actors were
    restarted after a failure."""
    result = {
        "before": before,
        "after": after,
        "steps": steps,
        "final_path": final_path,
        "run_dir": run_dir,
        "restarts": restarts,
    }
    assert tuple(result) == RESULT_KEYS
    return result


def due(step: int, every: int, total_steps: int) -> bool:
    """Whether a periodic action (checkpoint) falls on `step`: every `every` steps (0: never) and
    always at the last step."""
    return bool(every and step % every == 0) or step == total_steps


def eval_due(step: int, every: int, total_steps: int) -> bool:
    """A held-out evaluation during training: every `every` steps (0: never), but not at the last
    step, which the evaluation after training covers."""
    return bool(every) and step % every == 0 and step < total_steps
