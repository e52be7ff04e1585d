"""Reward registry: every kind builds, and a failing reward costs its fallback, never the run."""

import json
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf.config import RewardSpec
from rlhf.rewards.registry import NamedReward, build_reward_functions, combine_rewards, run_reward_function

SAMPLES = [{"prompt": "2+3?", "answer": "5"}, {"prompt": "1+1?", "answer": "2"}, {"prompt": "4+4?", "answer": "8"}]
COMPLETIONS = ["5", "the answer is 3", "8"]

USER_REWARDS = textwrap.dedent(
    """
    import time
    NOT_A_FUNCTION = 3

    def length(completions, samples):
        return [float(len(c)) for c in completions]

    def raises(completions, samples):
        raise ZeroDivisionError("boom")

    def some_nan(completions, samples):
        return [1.0, float("nan"), "high"]

    def too_short(completions, samples):
        return [1.0]

    def hangs(completions, samples):
        time.sleep(1000)
    """
)


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def python_reward(user_file, function, timeout_s=30.0, fallback=-1.0) -> NamedReward:
    spec = RewardSpec(kind="python", function=f"{user_file}:{function}", timeout_s=timeout_s, fallback=fallback)
    return build_reward_functions([spec])[0]


def test_builtin_kinds_score_and_model_is_remote():
    specs = [RewardSpec(kind=k) for k in ("math", "format", "reasoning_gym", "model")] + [
        RewardSpec(kind="format", weight=0.5)
    ]
    rewards = build_reward_functions(specs, task="reasoning_gym:chain_sum")
    assert [r.name for r in rewards] == ["math", "format", "reasoning_gym", "model", "format#2"]
    assert rewards[3].remote and rewards[3].fn is None
    assert run_reward_function(rewards[0], COMPLETIONS, SAMPLES) == ([1.0, 0.0, 1.0], 0, None, 0)
    assert run_reward_function(rewards[1], COMPLETIONS, SAMPLES) == ([1.0, 0.0, 1.0], 0, None, 0)


def test_python_reward_from_a_file(user_file):
    reward = python_reward(user_file, "length")
    assert reward.name == "python:length"
    assert run_reward_function(reward, COMPLETIONS, SAMPLES) == ([1.0, 15.0, 1.0], 0, None, 0)


@pytest.mark.parametrize(
    "function, message",
    [
        ("missing", "defines no 'missing'; callables in it: ['hangs', 'length'"),
        ("NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
    ],
)
def test_python_reward_load_errors_name_what_is_wrong(user_file, function, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        python_reward(user_file, function)


def test_python_reward_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        python_reward(tmp_path / "nope.py", "f")


@pytest.mark.parametrize(
    "function, expected, errors, first_error",
    [
        ("raises", [-1.0] * 3, 3, "ZeroDivisionError: boom"),
        ("some_nan", [1.0, -1.0, -1.0], 2, "sample 1: nan is not a finite number"),
        ("too_short", [-1.0] * 3, 3, "returned 1 values for 3 completions"),
    ],
)
def test_failures_give_the_fallback_and_are_counted(user_file, function, expected, errors, first_error):
    values, n_errors, error, timeouts = run_reward_function(python_reward(user_file, function), COMPLETIONS, SAMPLES)
    assert (values, n_errors, timeouts) == (expected, errors, 0)  # failures, but no timeouts
    assert first_error in error and error.startswith(f"python:{function}")


def test_a_hung_reward_times_out_and_the_next_call_works(user_file):
    hung = python_reward(user_file, "hangs", timeout_s=1.5, fallback=0.25)
    start = time.monotonic()
    assert run_reward_function(hung, COMPLETIONS, SAMPLES) == ([0.25] * 3, 3, "python:hangs: timed out after 1.5s", 3)
    assert time.monotonic() - start < 1.5 + 3
    assert run_reward_function(python_reward(user_file, "length"), ["ab"], [{}]) == ([2.0], 0, None, 0)


def test_combine_rewards_is_a_weighted_sum():
    combined = combine_rewards({"a": [1.0, 0.0], "b": [2.0, 4.0]}, {"a": 1.0, "b": 0.5})
    assert combined == [2.0, 2.0]
    with pytest.raises(KeyError, match="no weight"):
        combine_rewards({"a": [1.0]}, {})
    with pytest.raises(ValueError, match="differ in length"):
        combine_rewards({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1, "b": 1})


class _RewardServer(BaseHTTPRequestHandler):
    """Rewards = completion lengths; answers 503 to the first `fail_first` requests."""

    fail_first = 0
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).calls <= type(self).fail_first:
            self.send_response(503)
            self.end_headers()
            return
        reply = json.dumps({"rewards": [len(c) for c in body["completions"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def reward_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RewardServer)
    _RewardServer.calls, _RewardServer.fail_first = 0, 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score", _RewardServer
    server.shutdown()
    server.server_close()


def test_http_reward(reward_server):
    url, handler = reward_server
    (reward,) = build_reward_functions([RewardSpec(kind="http", url=url, timeout_s=5)])
    assert run_reward_function(reward, COMPLETIONS, SAMPLES) == ([1.0, 15.0, 1.0], 0, None, 0)
    assert handler.calls == 1


def test_http_reward_retries_a_failing_server(reward_server):
    url, handler = reward_server
    handler.fail_first = 1
    (reward,) = build_reward_functions([RewardSpec(kind="http", url=url, timeout_s=5)])
    assert run_reward_function(reward, COMPLETIONS, SAMPLES) == ([1.0, 15.0, 1.0], 0, None, 0)
    assert handler.calls == 2


def test_http_reward_gives_up_after_retries(reward_server, monkeypatch):
    import rlhf.rewards.registry as registry

    monkeypatch.setattr(registry, "HTTP_FIRST_BACKOFF_S", 0.01)
    url, handler = reward_server
    handler.fail_first = 100
    (reward,) = build_reward_functions([RewardSpec(kind="http", url=url, timeout_s=5, fallback=0.5)])
    values, errors, first_error, _ = run_reward_function(reward, COMPLETIONS, SAMPLES)
    assert (values, errors, handler.calls) == ([0.5] * 3, 3, 1 + registry.HTTP_RETRIES)
    assert "503" in first_error


# ------------------------------------------------------------------------------ reply validation
@pytest.mark.parametrize(
    "raw, values, errors, batch_error",
    [
        ([1, 0.5, True], [1.0, 0.5, 1.0], [], None),  # ints and bools are numbers
        (
            [float("nan"), float("inf"), "1.0"],
            [None] * 3,
            [
                [0, "sample 0: nan is not a finite number"],
                [1, "sample 1: inf is not a finite number"],
                [2, "sample 2: '1.0' is not a finite number"],
            ],
            None,
        ),
        ({0: 1.0, 1: 1.0, 2: 1.0}, [None] * 3, [], "returned a dict; expected a list of 3 numbers"),
        (None, [None] * 3, [], "returned a NoneType; expected a list of 3 numbers"),
        ("abc", [None] * 3, [], "returned a str; expected a list of 3 numbers"),
        ([1.0] * 4, [None] * 3, [], "returned 4 values for 3 completions"),
        (iter(lambda: 1.0, None), [None] * 3, [], "returned more values for 3 completions"),  # endless, bounded
        ((x for x in [1.0, 2.0, 3.0]), [1.0, 2.0, 3.0], [], None),
    ],
)
def test_what_a_reward_returns_becomes_numbers_or_named_failures(raw, values, errors, batch_error):
    from rlhf.rewards.sandbox_server import _as_values

    assert _as_values(raw, 3) == (values, errors, batch_error)


@pytest.mark.parametrize(
    "reply, values, first",
    [
        (
            {"values": [1.0, 2, None], "errors": [[2, "sample 2: boom"]], "batch_error": None},
            [1.0, 2.0, None],
            "sample 2: boom",
        ),
        (
            {"values": [1.0, True, "1"]},
            [1.0, None, None],
            "sample 1: the reward sandbox sent no number",
        ),  # forged: checked again
        ({"values": [1e309, float("nan"), 0.0]}, [None, None, 0.0], "sample 0: the reward sandbox sent no number"),
        ({"values": [1.0, 2.0]}, [None] * 3, "the reward sandbox sent a malformed reply (no list of values)"),
        ({"values": {"0": 1.0}}, [None] * 3, "the reward sandbox sent a malformed reply (no list of values)"),
        ({"values": [0.0] * 3, "batch_error": "x" * 5000}, [0.0] * 3, "x" * 1000),  # messages are cut
    ],
)
def test_the_trainer_trusts_no_part_of_a_sandbox_reply(reply, values, first):
    from rlhf.rewards.registry import checked_reply

    checked, messages = checked_reply(reply, 3)
    assert checked == values and messages[0] == first


def test_reward_specs_carry_sandbox_limits(user_file):
    reward = python_reward(user_file, "length")
    assert (reward.limits.memory_mb, reward.limits.max_processes, reward.limits.network) == (4096, 32, False)
    assert not reward.trusted and reward.retry_alone
    (http,) = build_reward_functions([RewardSpec(kind="http", url="http://127.0.0.1:1/x", memory_mb=256)])
    assert http.limits.network and http.limits.memory_mb == 256 and http.trusted and not http.retry_alone
