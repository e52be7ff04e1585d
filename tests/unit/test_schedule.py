import math

import pytest

from rlhf.schedule import lr_lambda, steps_to_prefetch


def test_warmup_then_constant():
    f = lr_lambda("constant", warmup_steps=3, total_steps=10)
    assert [f(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_linear_and_cosine_decay_to_zero():
    lin, cos = lr_lambda("linear", 0, 10), lr_lambda("cosine", 0, 10)
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.5) and lin(10) == 0.0
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    assert cos(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="cosine"):
        lr_lambda("exp", 0, 10)


def simulate_async(max_staleness: int, total_steps: int) -> list[int]:
    """The coordinator's bookkeeping without engines: a step takes its prefetched samples (or
    generates now), prefetches ahead on the current weights, then trains (one more version)."""
    in_flight, staleness = {}, []
    for version, step in enumerate(range(1, total_steps + 1)):  # one weight version per step
        generated_by = in_flight.pop(step, version)
        staleness.append(version - generated_by)
        for ahead in steps_to_prefetch(step, max_staleness, total_steps, in_flight):
            assert ahead not in in_flight
            in_flight[ahead] = version
    assert not in_flight  # nothing generated past the last step
    return staleness


@pytest.mark.parametrize(
    "k, expected",
    [
        (1, [0, 1, 1, 1, 1, 1]),
        (2, [0, 1, 2, 2, 2, 2]),
        (3, [0, 1, 2, 3, 3, 3]),
        (9, [0, 1, 2, 3, 4, 5]),  # never ahead of the run's last step
    ],
)
def test_prefetch_keeps_staleness_within_the_bound(k, expected):
    assert simulate_async(k, total_steps=6) == expected
    assert max(expected) <= k


def test_prefetch_skips_steps_in_flight_and_past_the_end():
    assert steps_to_prefetch(3, 2, 10, in_flight={4}) == [5]
    assert steps_to_prefetch(9, 2, 10, in_flight={}) == [10]
    assert steps_to_prefetch(10, 1, 10, in_flight={}) == []
