"""The consecutive-skip counter that stops an RL run whose updates keep failing (rlhf/guards.py)."""

from rlhf.guards import NonFiniteGuard


def test_stops_after_limit_consecutive_skipped_steps():
    guard = NonFiniteGuard(limit=3)
    assert guard.update(1, {"nonfinite_skips": 0.0}) == []
    assert guard.update(2, {"nonfinite_skips": 1.0}) == []
    assert guard.update(3, {"nonfinite_skips": 2.0}) == []  # several skipped updates in one step count once
    assert guard.update(4, {"nonfinite_skips": 1.0}) == ["policy"]
    msg = guard.message(["policy"], "/runs/x/checkpoints/step_00000004")
    assert msg == (
        "policy: non-finite loss/gradients in 3 consecutive steps (steps 2..4); those updates were skipped; "
        "last good checkpoint: /runs/x/checkpoints/step_00000004; lower trainer.lr or check the rewards"
    )


def test_a_clean_step_resets_the_count():
    guard = NonFiniteGuard(limit=2)
    assert guard.update(1, {"nonfinite_skips": 1.0}) == []
    assert guard.update(2, {"nonfinite_skips": 0.0}) == []
    assert guard.update(3, {"nonfinite_skips": 1.0}) == []
    assert guard.update(4, {"nonfinite_skips": 1.0}) == ["policy"]


def test_a_step_that_trained_nothing_leaves_the_count():
    guard = NonFiniteGuard(limit=2)
    assert guard.update(1, {"nonfinite_skips": 1.0}) == []
    assert guard.update(2, {"skipped": 1.0}) == []  # no informative prompt group: nothing trained
    assert guard.update(3, {"nonfinite_skips": 1.0}) == ["policy"]
    assert "(steps 1..3)" in guard.message(["policy"], "ckpt")


def test_roles_are_counted_separately():
    guard = NonFiniteGuard(limit=2)
    assert guard.update(1, {"nonfinite_skips": 1.0, "critic_nonfinite_skips": 0.0}) == []
    assert guard.update(2, {"nonfinite_skips": 0.0, "critic_nonfinite_skips": 1.0}) == []
    assert guard.update(3, {"nonfinite_skips": 1.0, "critic_nonfinite_skips": 1.0}) == ["critic"]
    assert "lower trainer.critic_lr" in guard.message(["critic"], "ckpt")


def test_zero_never_stops():
    guard = NonFiniteGuard(limit=0)
    assert all(guard.update(s, {"nonfinite_skips": 1.0}) == [] for s in range(1, 20))
