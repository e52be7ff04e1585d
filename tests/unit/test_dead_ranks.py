"""actors.group.dead_ranks' verdict on actors Ray cannot reach (no Ray: its calls are replaced).

An actor on a node that has just died answers ActorUnavailableError until Ray's health checks
declare the node dead, then ActorDiedError. Counting it dead at the first ActorUnavailableError
would restart it into a placement-group bundle Ray still places on the dead node, so dead_ranks
asks again until the verdict (or verdict_s passes). The real case: tests/integration/test_node_loss.py.
"""

import pytest
import ray

from actors import group


class Actor:
    """Answers each ping with the next item of `answers` (the last one repeats): None = alive."""

    def __init__(self, *answers):
        self.answers, self.pings = list(answers), 0

    @property
    def __ray_ready__(self):
        return self

    def remote(self):
        self.pings += 1
        return (self, self.answers[min(self.pings, len(self.answers)) - 1])


UNAVAILABLE = ray.exceptions.ActorUnavailableError("node unreachable", None)
DIED = ray.exceptions.ActorDiedError()


@pytest.fixture(autouse=True)
def fake_ray(monkeypatch):
    def get(ref, timeout):
        if ref[1] is not None:
            raise ref[1]

    monkeypatch.setattr(group.ray, "wait", lambda refs, num_returns, timeout: (list(refs), []))
    monkeypatch.setattr(group.ray, "get", get)
    monkeypatch.setattr(group.time, "sleep", lambda s: None)


def test_an_unreachable_actor_is_asked_again_until_ray_declares_it_dead():
    alive, died, lost_node, blip = (
        Actor(None),
        Actor(DIED),
        Actor(UNAVAILABLE, UNAVAILABLE, DIED),
        Actor(UNAVAILABLE, None),
    )
    assert group.dead_ranks([alive, died, lost_node, blip]) == [1, 2]
    assert (alive.pings, died.pings, lost_node.pings, blip.pings) == (1, 1, 3, 2)  # only the unreachable asked again


def test_an_actor_still_unreachable_after_verdict_s_counts_as_dead():
    forever = Actor(UNAVAILABLE)
    assert group.dead_ranks([Actor(None), forever], verdict_s=0) == [1]
    assert forever.pings == 1
