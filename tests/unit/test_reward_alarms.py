"""The constant-reward alarm: a reward that gives every sample the same value early on is named."""

import pytest

from rlhf.rewards.alarms import constant_reward_message, constant_rewards


def test_constant_rewards_are_named_with_their_value():
    batches = [
        {"format": [0.0, 0.0], "math": [1.0, 0.0], "judge": [0.5, 0.5]},
        {"format": [0.0, 0.0], "math": [0.0, 0.0], "judge": [0.5, 0.5]},
    ]
    assert constant_rewards(batches) == {"format": 0.0, "judge": 0.5}


@pytest.mark.parametrize(
    "batches",
    [
        [],  # nothing scored yet
        [{"a": [1.0, 1.0]}, {"a": [2.0, 2.0]}],  # constant within each batch, not across them
        [{"a": [0.0]}, {"b": [0.0]}],  # no reward seen in every batch
    ],
)
def test_varying_or_unseen_rewards_raise_no_alarm(batches):
    assert constant_rewards(batches) == {}


def test_the_message_is_loud_and_actionable():
    message = constant_reward_message({"python:length": 0.0}, 3)
    assert message.startswith("REWARD IS CONSTANT") and "python:length (always 0)" in message
    assert "first 3 batches" in message and "reward_errors/" in message
