"""Multi-turn rollout on one vLLM engine: many episodes in flight, continuously batched.

Every episode is its own request stream. The loop feeds vLLM's engine (`add_request` / `step`)
directly, not `LLM.generate`: when an episode's turn finishes, its tokens are appended exactly
as sampled (rlhf/episodes.py), its environment step is handed to a thread pool, and the engine
keeps decoding the other episodes meanwhile; when the environment answers, the observation's
template delta is appended and the episode's next turn is queued. No turn waits for the
slowest episode of a batch.

Environment calls (creating the environment, reset, every step) run in the pool under
environment.step_timeout_s. One that raises or returns garbage becomes an episode error
(rlhf.environments.safe_step); one that hangs past its deadline ends its episode as a timeout
and is abandoned (Python cannot kill a thread: the hung call keeps its pool thread, which is
left behind when the pool shuts down without waiting). Either way the other episodes go on.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from rlhf.environments import Observation, import_environment_module, make_environment, safe_reset, safe_step
from rlhf.episodes import Episode, episode_record
from rlhf.experience import prompt_seed

MAX_ENV_THREADS = 32
TURN_SEED_STRIDE = 104_729  # turn t of an episode samples with seed + t * this (a prime, far from SEED_STRIDE)


def _start(env_cfg: dict[str, Any], row: dict[str, Any]) -> tuple[Any, tuple[list, str | None]]:
    """In the pool: a fresh environment and its reset (both user code)."""
    try:
        if env_cfg.get("module"):  # the user's environments register on import
            import_environment_module(env_cfg["module"])
        env = make_environment(env_cfg["name"], **env_cfg.get("settings", {}))
    except Exception as e:  # a broken environment constructor costs its episode, not the batch
        return None, ([], f"creating the environment raised {type(e).__name__}: {e}"[:1000])
    return env, safe_reset(env, row)


def run_episodes(
    engine: Any, tokenizer: Any, rows: list[dict[str, Any]], env_cfg: dict[str, Any], sampling: dict[str, Any]
) -> list[dict[str, Any]]:
    """sampling["n"] episodes per row against env_cfg (EnvironmentConfig as a dict), prompt-major;
    returns one `episode_record` per episode. `engine` is a vLLM LLMEngine with nothing else in flight.

    Turn t of the episode (row r, sample k) samples with seed prompt_seed(seed, r) + k + t *
    TURN_SEED_STRIDE (seeded sampling: a rerun draws the same episodes); max_tokens of a turn
    is the smaller of sampling["max_tokens"] and what the episode's token budget leaves."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    n, seed = sampling.get("n", 1), sampling.get("seed")
    per_turn = {k: v for k, v in sampling.items() if k in ("temperature", "top_p", "stop")}
    timeout = float(env_cfg["step_timeout_s"])
    slots = [(r, k) for r in range(len(rows)) for k in range(n)]  # episode i -> (row, sample)
    episodes: dict[int, Episode] = {}
    records: dict[int, dict[str, Any]] = {}
    waiting: dict[Future, tuple[int, str, float]] = {}  # env call -> (episode, "reset" | "step", deadline)
    in_engine: dict[str, int] = {}  # request id -> episode
    started = time.monotonic()
    turn_ends: dict[int, list[float]] = {i: [] for i in range(len(slots))}  # seconds into the call, per turn

    def queue_turn(i: int) -> None:
        ep = episodes[i]
        r, k = slots[i]
        params = SamplingParams(
            **per_turn,
            n=1,
            max_tokens=min(sampling["max_tokens"], ep.remaining_tokens),
            logprobs=0,  # the sampled token's log-prob: what the importance ratio needs
            seed=None if seed is None else (prompt_seed(seed, r) + k + ep.turns * TURN_SEED_STRIDE) % 2**31,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        request_id = f"{i}-{ep.turns}"
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=ep.token_ids), params)
        in_engine[request_id] = i

    def finish(i: int, timed_out: bool = False) -> None:
        records[i] = episode_record(episodes[i], *slots[i], timed_out=timed_out)
        records[i]["turn_end_s"] = turn_ends[i]  # when each policy turn came out of the engine

    def settle(i: int, kind: str, result: Any, timed_out: bool = False) -> None:
        """An environment call came back (or ran out of time): move episode i on."""
        r, _ = slots[i]
        if kind == "reset":
            env, reset = result
            episodes[i] = Episode(
                tokenizer,
                env,
                rows[r],
                group_id=r,
                max_turns=env_cfg["max_turns"],
                max_tokens=env_cfg["max_tokens"],
                reset=reset,
            )
        else:
            episodes[i].answer(result)
        if episodes[i].done:
            finish(i, timed_out)
        else:
            queue_turn(i)

    pool = ThreadPoolExecutor(max_workers=min(MAX_ENV_THREADS, max(len(slots), 1)), thread_name_prefix="env")
    try:
        for i in range(len(slots)):
            waiting[pool.submit(_start, env_cfg, rows[slots[i][0]])] = (i, "reset", time.monotonic() + timeout)
        while waiting or in_engine:
            now = time.monotonic()
            for future, (i, kind, deadline) in list(waiting.items()):
                if future.done():
                    del waiting[future]
                    settle(i, kind, future.result())
                elif now > deadline:
                    del waiting[future]
                    future.cancel()  # not started yet: never runs; running: abandoned
                    error = f"environment {kind} timed out after {timeout:g}s (environment.step_timeout_s)"
                    settle(i, kind, (None, ([], error)) if kind == "reset" else _timed_out(error), timed_out=True)
            if in_engine:
                for output in engine.step():
                    if not output.finished:
                        continue
                    i = in_engine.pop(output.request_id)
                    sampled = output.outputs[0]
                    ids = list(sampled.token_ids)
                    logprobs = [step[t].logprob for step, t in zip(sampled.logprobs or [], ids)]
                    turn_ends[i].append(round(time.monotonic() - started, 4))
                    text = episodes[i].take_policy_turn(ids, logprobs)
                    if text is None:  # cut by the token budget
                        finish(i)
                    else:
                        waiting[pool.submit(safe_step, episodes[i].env, text)] = (i, "step", time.monotonic() + timeout)
            elif waiting:  # nothing to decode: sleep until an environment answers or a deadline passes
                first_deadline = min(d for _, _, d in waiting.values())
                wait(
                    list(waiting), timeout=max(first_deadline - time.monotonic(), 0) + 0.01, return_when=FIRST_COMPLETED
                )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a hung environment call is left behind
    return [records[i] for i in range(len(slots))]


def _timed_out(error: str) -> Observation:
    return Observation("", None, done=True, error=error)
