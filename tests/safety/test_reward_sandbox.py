"""Attacks on the reward sandbox, each against the real sandbox process (no mocks).

Each attack must end in a counted failure (the fallback for the samples it cost, counted in
`errors`), the run intact (the same reward's next call scores normally), no process of the
sandbox left behind, and no sample lost (one value per sample). Every attack is bounded: rewards
that hang time out after TIMEOUT_S, the others after SLACK_S (a busy machine must not turn their
failure into a timeout), and the tests assert on wall time.
"""

import json
import os
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rlhf.config import RewardSpec
from rlhf.rewards.registry import _sandbox, build_reward_functions, run_reward_function

TIMEOUT_S = 2.0  # for the attacks that hang
SLACK_S = 30.0  # for the others
FALLBACK = -1.0
N = 3
NORMAL = ["a", "bb", "ccc"]  # the reward scores these by length: the run still works
ATTACK = ["attack"] * N

ATTACKS = """
import json, os, signal, socket, subprocess, sys, time

MARK = {mark!r}

def _normal(completions):
    return [float(len(c)) for c in completions]

def fork_bomb(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    while True:
        try:
            os.fork()
        except OSError:
            pass

def memory_hog(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    hog = []
    while True:
        hog.append(bytearray(64 * 1024 * 1024))

def endless_loop(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    while True:
        pass

def child_sleeps_past_timeout(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", MARK], start_new_session=True)  # escapes the process group
    child.wait()

def child_left_behind(completions, samples):
    if completions[0] == "attack":
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", MARK], start_new_session=True)
    return _normal(completions)

class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pwned-" + MARK,))

def pickle_payload(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    return [Payload() for _ in completions]

def pickle_payload_whole(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    return Payload()

def huge_list(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    return [0.0] * 10_000_000

def huge_items(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    return ["x" * 50_000_000] * len(completions)

def huge_reply_bytes(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    junk = b"1" * (64 * 1024 * 1024)
    for fd in range(3, 64):  # whichever descriptor carries replies
        try:
            os.write(fd, junk)
        except OSError:
            pass
    return _normal(completions)

def forged_reply(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    forged = json.dumps({{"values": [1e300, True, "1"], "errors": "x", "batch_error": None}}).encode() + b"\\n"
    for fd in range(3, 64):
        try:
            os.write(fd, forged)
        except OSError:
            pass
    time.sleep(1000)

def bad_values(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    return [float("nan"), float("inf"), "1.0"]

def returns_dict(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    return {{i: 1.0 for i in range(len(completions))}}

def returns_none(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    return None

def none_items(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    return [None] * len(completions)

def kills_itself(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    os.kill(os.getpid(), signal.SIGKILL)

def burns_cpu(completions, samples):
    if completions[0] != "attack":
        return _normal(completions)
    while True:
        pass

def one_bad_sample(completions, samples):
    if "boom" in completions:
        raise ValueError("cannot score " + repr(completions))
    return _normal(completions)

def connects(completions, samples):
    port = samples[0]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    return _normal(completions)
"""


@pytest.fixture(scope="module")
def mark():
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def attack_file(tmp_path_factory, mark):
    path = tmp_path_factory.mktemp("attacks") / "attacks.py"
    path.write_text(ATTACKS.format(mark=mark))
    return path


def reward(attack_file, function, **spec):
    spec = {"timeout_s": SLACK_S, "fallback": FALLBACK, "memory_mb": 1024, "max_processes": 16} | spec
    (named,) = build_reward_functions([RewardSpec(kind="python", function=f"{attack_file}:{function}", **spec)])
    return named


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def live_members(namespace: str) -> list[int]:
    """Processes (not zombies) in that PID namespace, as the host sees them."""
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and pid_namespace(int(entry)) == namespace:
            members.append(int(entry))
    return members


def marked_processes(mark: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if mark.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def sandbox_namespace(named) -> str:
    """The PID namespace of the reward's (started) sandbox: its outer process's one child is its init."""
    sandbox = _sandbox(named)
    children = Path(f"/proc/{sandbox.proc.pid}/task/{sandbox.proc.pid}/children").read_text().split()
    assert len(children) == 1
    namespace = pid_namespace(int(children[0]))
    assert namespace != pid_namespace(os.getpid()), "the sandbox has no PID namespace of its own"
    return namespace


def wait_until(condition, seconds=5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def attack(named, mark, completions=ATTACK):
    """Run the attack; check the common promises; return (RewardRun, seconds)."""
    namespace = sandbox_namespace(named)
    before = len(live_members(namespace))
    assert before == 2  # init and the server
    start = time.monotonic()
    run = run_reward_function(named, completions, [{}] * len(completions))
    seconds = time.monotonic() - start
    assert seconds < named.timeout_s + 5  # bounded
    assert len(run.values) == len(completions)  # samples lost: 0
    assert run.errors == sum(v == FALLBACK for v in run.values)  # each fallback counted
    assert run.first_error and run.first_error.startswith(named.name)  # and reported
    # no process left behind: the attacked sandbox is gone (killed) or back to init + server
    assert wait_until(lambda: len(live_members(namespace)) in (0, 2)), live_members(namespace)
    assert wait_until(lambda: not marked_processes(mark)), "a process the reward started is still running"
    # the run is intact: the same reward's next call scores normally
    assert run_reward_function(named, NORMAL, [{}] * N) == ([1.0, 2.0, 3.0], 0, None, 0)
    return run, seconds


@pytest.mark.parametrize("function", ["fork_bomb", "endless_loop", "child_sleeps_past_timeout"])
def test_attacks_that_hang_time_out_and_are_killed_as_a_whole(attack_file, mark, function):
    named = reward(attack_file, function, timeout_s=TIMEOUT_S)
    run, seconds = attack(named, mark)
    assert run == ([FALLBACK] * N, N, f"python:{function}: timed out after {TIMEOUT_S:g}s", N)
    assert seconds >= TIMEOUT_S


def test_memory_hog_hits_the_address_space_limit(attack_file, mark):
    named = reward(attack_file, "memory_hog", memory_mb=512)
    run, _ = attack(named, mark)
    assert (run.values, run.errors, run.timeouts) == ([FALLBACK] * N, N, 0)
    assert "MemoryError" in run.first_error


def test_a_reward_that_crashes_its_sandbox_costs_the_batch_and_the_next_call_restarts_it(attack_file, mark):
    named = reward(attack_file, "kills_itself")
    run, _ = attack(named, mark)
    assert (run.values, run.errors, run.timeouts) == ([FALLBACK] * N, N, 0)
    assert "the reward sandbox died while answering" in run.first_error


def test_the_cpu_limit_kills_a_spinning_sandbox(attack_file, mark):
    named = reward(attack_file, "burns_cpu", cpu_time_s=1)
    start = time.monotonic()
    run = run_reward_function(named, ATTACK, [{}] * N)
    assert time.monotonic() - start < SLACK_S  # the CPU limit, not the timeout, ended it
    assert (run.values, run.errors, run.timeouts) == ([FALLBACK] * N, N, 0)
    assert "died" in run.first_error
    assert run_reward_function(named, NORMAL, [{}] * N) == ([1.0, 2.0, 3.0], 0, None, 0)


def test_children_left_running_are_killed_after_the_call(attack_file, mark):
    # max_processes is RLIMIT_NPROC, counted over every `nobody` process on the machine (other
    # tests' sandboxes included); this test is about cleanup, not that limit.
    named = reward(attack_file, "child_left_behind", max_processes=1024)
    namespace = sandbox_namespace(named)
    run = run_reward_function(named, ATTACK, [{}] * N)
    assert run == ([6.0] * N, 0, None, 0), run.first_error  # not a failure
    assert wait_until(lambda: not marked_processes(mark))
    assert len(live_members(namespace)) == 2


@pytest.mark.parametrize("function", ["pickle_payload", "pickle_payload_whole"])
def test_a_pickle_payload_is_never_unpickled(attack_file, mark, function):
    run, _ = attack(reward(attack_file, function), mark)
    assert (run.values, run.errors) == ([FALLBACK] * N, N)
    assert not os.path.exists(f"/tmp/pwned-{mark}")


@pytest.mark.parametrize(
    "function, message",
    [
        ("huge_list", "returned 10000000 values for 3 completions"),
        ("huge_items", "sample 0: 'xxxxxx"),
        ("huge_reply_bytes", "reply exceeded"),
        ("forged_reply", "not the reply to this request"),
    ],
)
def test_huge_returns_are_capped(attack_file, mark, function, message):
    run, _ = attack(reward(attack_file, function), mark)
    assert (run.values, run.errors) == ([FALLBACK] * N, N)
    assert message in run.first_error
    assert len(run.first_error) < 1200


@pytest.mark.parametrize(
    "function, message",
    [
        ("bad_values", "sample 0: nan is not a finite number"),
        ("returns_dict", "returned a dict; expected a list of 3 numbers"),
        ("returns_none", "returned a NoneType; expected a list of 3 numbers"),
        ("none_items", "sample 0: None is not a finite number"),
    ],
)
def test_values_that_are_not_finite_numbers_get_the_fallback(attack_file, mark, function, message):
    run, _ = attack(reward(attack_file, function), mark)
    assert (run.values, run.errors, run.timeouts) == ([FALLBACK] * N, N, 0)
    assert message in run.first_error


def test_one_bad_sample_fails_alone(attack_file, mark):
    named = reward(attack_file, "one_bad_sample")
    run, _ = attack(named, mark, completions=["a", "boom", "ccc"])
    assert (run.values, run.errors, run.timeouts) == ([1.0, FALLBACK, 3.0], 1, 0)
    assert "ValueError: cannot score ['a', 'boom', 'ccc'] (retried alone: 1 of 3 failed)" in run.first_error


@pytest.fixture
def tcp_server():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    yield server
    server.close()


def test_python_rewards_have_no_network_unless_asked(attack_file, tcp_server):
    port = tcp_server.getsockname()[1]
    samples = [{"port": port}] * N
    run = run_reward_function(reward(attack_file, "connects"), NORMAL, samples)
    assert (run.values, run.errors) == ([FALLBACK] * N, N)
    assert "unreachable" in run.first_error.lower()
    allowed = reward(attack_file, "connects", network=True)
    assert run_reward_function(allowed, NORMAL, samples) == ([1.0, 2.0, 3.0], 0, None, 0)


# ------------------------------------------------------------------------------ HTTP
class _Drip(BaseHTTPRequestHandler):
    """Answers 200 and then one byte every 0.2 s, for at most 20 s; headers too when `drip_headers`."""

    drip_headers = False
    stop = threading.Event()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"rewards": [1.0] * N}).encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        data = head + body if self.drip_headers else body
        if not self.drip_headers:
            self.wfile.write(head)
        deadline = time.monotonic() + 20
        for byte in data:
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.2)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("drip_headers", [False, True])
def test_a_slow_drip_http_server_is_cut_off_at_the_deadline(drip_headers):
    _Drip.drip_headers = drip_headers
    _Drip.stop.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        (named,) = build_reward_functions([RewardSpec(kind="http", url=url, timeout_s=TIMEOUT_S, fallback=FALLBACK)])
        start = time.monotonic()
        run = run_reward_function(named, NORMAL, [{}] * N)
        assert time.monotonic() - start < TIMEOUT_S + 5
        assert (run.values, run.errors) == ([FALLBACK] * N, N)
        assert "timed out" in run.first_error or "deadline" in run.first_error or "timeout" in run.first_error
    finally:
        _Drip.stop.set()
        server.shutdown()
        server.server_close()


TRAINER = """
import sys, threading
from rlhf.config import RewardSpec
from rlhf.rewards.registry import _sandbox, build_reward_functions, run_reward_function

def start():  # from a thread that ends at once: the sandbox must not die with it
    global named
    (named,) = build_reward_functions([RewardSpec(kind="python", function=sys.argv[1], timeout_s=600)])
thread = threading.Thread(target=start)
thread.start()
thread.join()
print(_sandbox(named).proc.pid, flush=True)
run_reward_function(named, ["attack"] * 3, [{}] * 3)  # hangs: the test kills this process meanwhile
"""


def test_a_killed_trainer_leaves_no_sandbox_behind(attack_file, mark, tmp_path):
    import signal
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    trainer = subprocess.Popen(
        [sys.executable, str(script), f"{attack_file}:child_sleeps_past_timeout"], stdout=subprocess.PIPE, text=True
    )
    try:
        outer = int(trainer.stdout.readline())
        assert wait_until(lambda: marked_processes(mark), 60)  # the attack runs (slow on a loaded machine)
        (init,) = Path(f"/proc/{outer}/task/{outer}/children").read_text().split()
        namespace = pid_namespace(int(init))
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(5)
        assert wait_until(lambda: not marked_processes(mark) and not live_members(namespace))
        assert wait_until(
            lambda: not os.path.exists(f"/proc/{outer}") or Path(f"/proc/{outer}/stat").read_text().split()[2] == "Z"
        )
    finally:
        trainer.kill()
        trainer.wait()
