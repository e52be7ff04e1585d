"""Check the pure-torch training path on this machine's accelerator: no Ray, vLLM or DeepSpeed.

    python scripts/gpu_check_torch.py [--quick] [--out FILE]      (from the repository root)

Needs torch and transformers (peft for the LoRA rows; they are skipped if it is missing), and
imports nothing of the project but rlhf.shared_prompt, rlhf.algos, rlhf.batch, rlhf.models and
bench.shared_prompt (all pure torch). Prints a PASS / FAIL / SKIP table, also written to --out;
exits 1 if any row FAILs. Random-weight models of real shapes, nothing downloaded.

Rows:
  device        rlhf.models.preferred_dtype picks the dtype the hardware computes fast, and it runs
  equal fp32    shared-prompt and response-only log-probs and gradients equal the full-logits path
  equal bf16    the same in bf16, each path measured against an fp32 run of the same weights
  speed ...     forward + backward at the issue's GPU shapes: seconds, speed-up, peak CUDA memory
  lora ...      (peft) adapters disabled give the base model's log-probs; gradients of the
                adapters equal between the shared and the full path

Tolerances (random-weight models, log-probs near -log(vocab)):
  fp32: max |Δ log-prob| <= 1e-4 and gradients' relative L2 error <= 1e-4 (measured ~5e-7 and
        ~2e-7 on CPU; the paths differ only in the order of additions).
  bf16: a path passes when its error against the fp32 run is at most 2x + 1e-3 (log-probs, mean
        |Δ|) and 2x + 1e-2 (gradients, relative L2) the full bf16 path's own error against it:
        the new paths must be no less accurate than the path they replace. bf16 rounding makes
        exact agreement between two bf16 paths meaningless.
On a machine without CUDA every row runs on the CPU at small sizes, and the speed rows say
"cuda: skipped, no GPU". --quick: tiny shapes everywhere (seconds; the unit test runs it).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

import torch

from bench.shared_prompt import build_model, compare_paths, differences, make_batch, run_path
from rlhf.models import preferred_dtype

FP32_LOGP, FP32_GRAD = 1e-4, 1e-4
BF16_FACTOR, BF16_LOGP_FLOOR, BF16_GRAD_FLOOR = 2.0, 1e-3, 1e-2


class Table:
    """Rows printed as they come (a slow or crashing check still leaves the ones before it)."""

    def __init__(self, out: str | None):
        self.lines, self.out, self.failed = [], out, False

    def row(self, status: str, name: str, detail: str = "") -> None:
        self.failed |= status == "FAIL"
        self.emit(f"{status:<5} {name:<22} {detail}")

    def emit(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)
        if self.out:
            Path(self.out).write_text("\n".join(self.lines) + "\n")

    def guard(self, name: str, check, *args) -> None:
        """Run one check; an exception is a FAIL row (with its traceback on stderr), not the end."""
        try:
            check(self, *args)
        except Exception as err:
            traceback.print_exc()
            self.row("FAIL", name, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")


# --------------------------------------------------------------------------- checks
def check_device(table: Table, device: str) -> None:
    chosen = preferred_dtype()
    if device == "cuda":
        expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        where = torch.cuda.get_device_name(0)
    else:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        expected = "bfloat16" if "amx_bf16" in flags else "float32"
        where = platform.processor() or platform.machine()
    dtype = getattr(torch, chosen)
    a = torch.randn(64, 64, device=device).to(dtype)
    ran = bool(torch.isfinite((a @ a).float()).all())
    status = "PASS" if chosen == expected and ran else "FAIL"
    table.row(status, "device", f"{device} ({where}): preferred_dtype={chosen}, expected {expected}, matmul ran: {ran}")
    if device != "cuda":
        table.row("SKIP", "device cuda", "cuda: skipped, no GPU")


def _equivalence_rows(model, batch, groups):
    rows = compare_paths(model, batch, groups, repeats=0, chunk_tokens=64)
    return {r["path"]: r for r in rows}


def check_equal_fp32(table: Table, device: str, shape: str, sizes: dict) -> None:
    model = build_model(shape, device, "fp32")
    batch, groups = make_batch(**sizes, vocab=model.config.vocab_size, ragged=True)
    rows = _equivalence_rows(model, batch, groups)
    for path in ("response", "shared"):
        r = rows[path]
        ok = r["logprob_max"] <= FP32_LOGP and r["grad_rel"] <= FP32_GRAD
        table.row(
            "PASS" if ok else "FAIL",
            f"equal fp32 {path}",
            f"{shape} on {device}: max|Δlogp| {r['logprob_max']:.1e} (<= {FP32_LOGP:g}), "
            f"rel Δgrad {r['grad_rel']:.1e} (<= {FP32_GRAD:g}), max|Δgrad| {r['grad_max']:.1e}",
        )


def check_equal_bf16(table: Table, device: str, shape: str, sizes: dict) -> None:
    model = build_model(shape, device, "bf16")
    reference_model = copy.deepcopy(model).float()  # the same (bf16-rounded) weights, fp32 compute
    batch, groups = make_batch(**sizes, vocab=model.config.vocab_size, ragged=True)
    reference = run_path("full", reference_model, batch, groups, repeats=0, chunk_tokens=64)
    del reference_model
    errors = {}
    for path in ("full", "response", "shared"):
        result = run_path(path, model, batch, groups, repeats=0, chunk_tokens=64)
        errors[path] = differences(result, reference, batch["response_mask"])
        del result
    base = errors["full"]
    table.emit(
        f"      {'':<22} bf16 full path vs fp32: mean|Δlogp| {base['logprob_mean']:.1e}, "
        f"rel Δgrad {base['grad_rel']:.1e} (the yardstick)"
    )
    for path in ("response", "shared"):
        e = errors[path]
        logp_limit = BF16_FACTOR * base["logprob_mean"] + BF16_LOGP_FLOOR
        grad_limit = BF16_FACTOR * base["grad_rel"] + BF16_GRAD_FLOOR
        ok = e["logprob_mean"] <= logp_limit and e["grad_rel"] <= grad_limit
        table.row(
            "PASS" if ok else "FAIL",
            f"equal bf16 {path}",
            f"{shape} on {device} vs fp32: mean|Δlogp| {e['logprob_mean']:.1e} (<= {logp_limit:.1e}), "
            f"max|Δlogp| {e['logprob_max']:.1e}, rel Δgrad {e['grad_rel']:.1e} (<= {grad_limit:.1e})",
        )


def check_speed(table: Table, device: str, shape: str, sizes: dict, dtype: str) -> None:
    name = f"speed {shape}"
    if device != "cuda":
        table.row("SKIP", name, "cuda: skipped, no GPU")
        return
    model = build_model(shape, device, dtype)
    batch, groups = make_batch(**sizes, vocab=model.config.vocab_size)
    rows = {}
    for path in ("full", "response", "shared"):  # one at a time: each peak is its own path's
        try:
            rows[path] = compare_paths(model, batch, groups, repeats=3, paths=(path,))[0]
        except torch.cuda.OutOfMemoryError:
            rows[path] = None
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    size = f"{sizes['prompts']}x{sizes['samples']}, {sizes['prompt_len']}+{sizes['response_len']} tokens, {dtype}"
    full = rows["full"]
    for path, r in rows.items():
        if r is None:
            table.row("FAIL" if path != "full" else "SKIP", f"{name} {path}", f"{size}: out of CUDA memory")
            continue
        speedup = full["seconds"] / r["seconds"] if full else float("nan")
        detail = f"{size}: {r['seconds']:.3f} s, {speedup:.2f}x full, peak {r['peak_gib']:.1f} GiB"
        if path == "full":
            table.row("PASS", f"{name} {path}", detail)
            continue
        # the point of both paths: no slower, and no more memory, than computing every logit
        ok = full is None or (
            speedup >= (1.0 if path == "shared" else 0.9) and r["peak_gib"] <= full["peak_gib"] * 1.05
        )
        table.row("PASS" if ok else "FAIL", f"{name} {path}", detail)
    del model
    torch.cuda.empty_cache()


def check_lora(table: Table, device: str, shape: str, sizes: dict) -> None:
    try:
        peft = importlib.import_module("peft")
    except ImportError:
        table.row("SKIP", "lora", "peft is not installed: pip install peft to check LoRA")
        return
    from rlhf.algos import compute_token_logprobs
    from rlhf.shared_prompt import pack_shared_prompts, response_logprobs, shared_prompt_logprobs

    model = build_model(shape, device, "fp32")
    batch, groups = make_batch(**sizes, vocab=model.config.vocab_size, ragged=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    with torch.no_grad():
        base = compute_token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids) * resp
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    lora = peft.get_peft_model(model, config)
    with torch.no_grad():  # B starts at 0 (adapters a no-op): make them matter
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    pack = pack_shared_prompts(ids, attn, resp, groups).to(device)
    with torch.no_grad(), lora.disable_adapter():
        off_shared = shared_prompt_logprobs(lora, pack)
        off_plain = response_logprobs(lora, ids, attn, resp)
    with torch.no_grad():
        on = shared_prompt_logprobs(lora, pack)
    err = max(float((off_shared - base).abs().max()), float((off_plain - base).abs().max()))
    moved = float((on - base).abs().max())
    ok = err <= FP32_LOGP and moved > 1e-3
    table.row(
        "PASS" if ok else "FAIL",
        "lora reference",
        f"{shape} fp32 on {device}: adapters disabled vs base model max|Δlogp| {err:.1e} (<= {FP32_LOGP:g}); "
        f"adapters enabled move it by {moved:.1e} (> 1e-3)",
    )

    def adapter_grads(logprobs):
        lora.zero_grad(set_to_none=True)
        logprobs.sum().backward()
        return {n: p.grad.clone() for n, p in lora.named_parameters() if p.grad is not None}

    full = adapter_grads(compute_token_logprobs(lora(input_ids=ids, attention_mask=attn).logits, ids) * resp)
    shared = adapter_grads(shared_prompt_logprobs(lora, pack))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    num = sum(float((shared[n] - full[n]).square().sum()) for n in full)
    den = sum(float(full[n].square().sum()) for n in full)
    rel = (num / den) ** 0.5 if den else float("inf")
    ok = set(full) == set(shared) == trainable and rel <= FP32_GRAD
    table.row(
        "PASS" if ok else "FAIL",
        "lora grads",
        f"{len(trainable)} adapter tensors, only they get gradients: {set(full) == trainable}; "
        f"shared vs full rel Δgrad {rel:.1e} (<= {FP32_GRAD:g})",
    )


# --------------------------------------------------------------------------- plan
def plan(device: str, quick: bool):
    """(shape, sizes) per check: small on the CPU, the issue's shapes on a GPU."""
    small = dict(prompts=3, samples=3, prompt_len=24, response_len=12)
    if quick:
        return {
            "equal": ("tiny", small),
            "lora": ("tiny", small),
            "speed": [("tiny", dict(prompts=4, samples=8, prompt_len=64, response_len=32))],
        }
    if device != "cuda":
        cpu = dict(prompts=2, samples=3, prompt_len=32, response_len=16)
        return {
            "equal": ("smollm2-135m", cpu),
            "lora": ("smollm2-135m", cpu),
            "speed": [("smollm2-135m", {}), ("qwen2-1.5b", {})],
        }
    return {
        "equal": ("smollm2-135m", dict(prompts=4, samples=4, prompt_len=128, response_len=64)),
        "lora": ("smollm2-135m", dict(prompts=4, samples=4, prompt_len=128, response_len=64)),
        "speed": [
            ("smollm2-135m", dict(prompts=4, samples=8, prompt_len=512, response_len=256)),
            # 2 prompts: 4 would put the full path's fp32 logits over a 152k vocabulary
            # (and its activations) near the memory of one 80 GB GPU
            ("qwen2-1.5b", dict(prompts=2, samples=8, prompt_len=512, response_len=256)),
        ],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="PASS/FAIL check of the pure-torch training path (see the file's docstring)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes only (seconds)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = Table(args.out)
    start = time.perf_counter()
    versions = [f"torch {torch.__version__}"] + [
        f"{m} {getattr(importlib.import_module(m), '__version__', '?')}"
        if importlib.util.find_spec(m)
        else f"{m} missing"
        for m in ("transformers", "peft")
    ]
    table.emit(
        f"gpu_check_torch: {', '.join(versions)}; device {device}"
        + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else "")
        + (", --quick" if args.quick else "")
    )
    steps = plan(device, args.quick)
    table.guard("device", check_device, device)
    shape, sizes = steps["equal"]
    table.guard("equal fp32", check_equal_fp32, device, shape, sizes)
    table.guard("equal bf16", check_equal_bf16, device, shape, sizes)
    for shape, sizes in steps["speed"]:
        table.guard(f"speed {shape}", check_speed, device, shape, sizes, "bf16")
    shape, sizes = steps["lora"]
    table.guard("lora", check_lora, device, shape, sizes)
    table.emit(f"{'FAILED' if table.failed else 'ALL PASSED'} in {time.perf_counter() - start:.0f} s")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
