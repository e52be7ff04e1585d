import math

import pytest

from rlhf.schedule import lr_lambda


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
