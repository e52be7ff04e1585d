"""Benchmark: forward + backward of summed response log-probs, three ways (no Ray, no DeepSpeed).

    python -m bench.shared_prompt [--shape smollm2-135m|qwen2-1.5b|tiny] [--device cpu|cuda]
        [--dtype fp32|bf16] [--prompts 8] [--samples 4] [--prompt-len 96] [--response-len 32]
        [--repeats 3] [--attn sdpa|eager] [--ragged] [--paths full,response,shared] [--json FILE]

* full:     model(...).logits at every position, then compute_token_logprobs (today's path)
* response: the decoder body once, vocabulary projection only where a response token is
            predicted, in chunks (rlhf.shared_prompt.response_logprobs)
* shared:   each prompt once, followed by its samples' responses in one row under a 4D mask
            (rlhf.shared_prompt.pack_shared_prompts + shared_prompt_logprobs; packing included)

A randomly initialised model of the chosen shape (config only, nothing downloaded); random
prompts, `--samples` responses per prompt. Each time is the median of `--repeats` runs after a
warm-up; the differences are against the full path (log-probs at response positions, every
parameter's gradient). The issue's GPU shapes: `--device cuda --dtype bf16 --prompts 4
--samples 8 --prompt-len 512 --response-len 256`, with `--shape smollm2-135m` or `qwen2-1.5b`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    # SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json)
    "smollm2-135m": dict(
        family="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # Qwen2-1.5B's architecture (Qwen/Qwen2-1.5B config.json)
    "qwen2-1.5b": dict(
        family="qwen2",
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    # small enough for unit tests and --quick checks
    "tiny": dict(
        family="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1000,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ("full", "response", "shared")


def build_model(shape: str, device: str = "cpu", dtype: str = "fp32", attn: str = "sdpa", seed: int = 0):
    """A randomly initialised causal LM of `shape` (a SHAPES key) on `device`, in eval mode (no dropout)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        spec.pop("family")
    ]
    config = config_cls(**spec, attn_implementation=attn)
    torch.manual_seed(seed)
    # initialised on the device (a 1.5B model's init on the CPU takes minutes) and in the dtype as
    # from_pretrained does: the rotary frequencies stay float32, which `.to(bf16)` would round
    with torch.device(device):
        model = model_cls._from_config(config, dtype=DTYPES[dtype])
    return model.eval()


def make_batch(
    prompts: int, samples: int, prompt_len: int, response_len: int, vocab: int, ragged: bool = False, seed: int = 0
):
    """A right-padded Batch (rlhf/batch.py) of prompts x samples rows, and the row groups
    (consecutive rows share a prompt). ragged: prompt and response lengths vary (between half
    and all of the given length), so rows and groups need padding."""
    from rlhf.batch import collate_samples

    g = torch.Generator().manual_seed(seed)

    def length(n: int) -> int:
        return int(torch.randint(max(1, n // 2), n + 1, (1,), generator=g)) if ragged else n

    prompt_ids, response_ids = [], []
    for _ in range(prompts):
        prompt = torch.randint(3, vocab, (length(prompt_len),), generator=g).tolist()
        for _ in range(samples):
            prompt_ids.append(prompt)
            response_ids.append(torch.randint(3, vocab, (length(response_len),), generator=g).tolist())
    groups = [list(range(i * samples, (i + 1) * samples)) for i in range(prompts)]
    return collate_samples(prompt_ids, response_ids, pad_id=0), groups


def path_logprobs(path: str, model, batch, groups, chunk_tokens: int) -> torch.Tensor:
    """(B, T) log-probs of the response tokens (0 elsewhere) by one of PATHS; batch on the model's device."""
    from rlhf.algos import compute_token_logprobs
    from rlhf.shared_prompt import pack_shared_prompts, response_logprobs, shared_prompt_logprobs

    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    if path == "full":
        return compute_token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids) * resp
    if path == "response":
        return response_logprobs(model, ids, attn, resp, chunk_tokens)
    if path == "shared":
        pack = pack_shared_prompts(ids, attn, resp, groups).to(ids.device)
        return shared_prompt_logprobs(model, pack, chunk_tokens)
    raise ValueError(f"unknown path {path!r}; choose from {PATHS}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_path(path: str, model, batch, groups, repeats: int = 3, chunk_tokens: int = 1024) -> dict:
    """Time forward + backward of the summed response log-probs. Returns seconds (median), the
    last run's log-probs (float, detached) and gradients (by parameter name), and on CUDA the
    peak memory (GiB) during the timed runs."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(repeats + 1 if repeats else 1):  # the first run warms up (allocator, kernels, thread pools)
        model.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        logprobs = path_logprobs(path, model, batch, groups, chunk_tokens)
        logprobs.sum().backward()
        _sync(device)
        if i or not repeats:  # repeats=0: one untimed-warm-up run, for its values only
            times.append(time.perf_counter() - start)
    out = {
        "path": path,
        "seconds": statistics.median(times),
        "logprobs": logprobs.detach().float(),
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        "tokens": _forwarded_tokens(path, batch, groups),
    }
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _forwarded_tokens(path: str, batch, groups) -> int:
    """Positions the decoder body computes (padding included)."""
    if path == "shared":
        from rlhf.shared_prompt import pack_shared_prompts

        pack = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["response_mask"], groups)
        return pack.input_ids.numel()
    return batch["input_ids"].numel()


def differences(result: dict, reference: dict, response_mask: torch.Tensor) -> dict:
    """Max |Δ log-prob| at response positions; max |Δ grad| over all parameters, and the global
    relative L2 error of the gradients ||g - g_ref|| / ||g_ref||."""
    mask = response_mask.to(result["logprobs"].device).bool()
    lp = (result["logprobs"] - reference["logprobs"].to(result["logprobs"].device))[mask].abs()
    num, den, worst = 0.0, 0.0, 0.0
    for name, g_ref in reference["grads"].items():
        g = result["grads"].get(name)
        if g is None:  # a parameter the reference path reached and this one did not
            return {"logprob_max": float(lp.max()), "grad_max": float("inf"), "grad_rel": float("inf")}
        delta = g.float() - g_ref.float().to(g.device)
        worst = max(worst, float(delta.abs().max()))
        num += float(delta.square().sum())
        den += float(g_ref.float().square().sum())
    return {
        "logprob_max": float(lp.max()),
        "logprob_mean": float(lp.mean()),
        "grad_max": worst,
        "grad_rel": (num / den) ** 0.5 if den else 0.0,
    }


def compare_paths(model, batch, groups, repeats: int = 3, chunk_tokens: int = 1024, paths=PATHS) -> list[dict]:
    """Run each path; rows of figures (no tensors), the first path being the reference."""
    rows, reference = [], None
    for path in paths:
        result = run_path(path, model, batch, groups, repeats, chunk_tokens)
        if reference is None:
            reference = result
        row = {k: v for k, v in result.items() if k not in ("logprobs", "grads")}
        row["speedup"] = reference["seconds"] / result["seconds"]
        row.update(differences(result, reference, batch["response_mask"]))
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return rows


def format_table(rows: list[dict]) -> str:
    has_mem = any("peak_gib" in r for r in rows)
    head = f"{'path':<9} {'seconds':>8} {'speedup':>8} {'tokens':>7} {'max|Δlogp|':>11} {'max|Δgrad|':>11} {'rel Δgrad':>10}"
    head += f" {'peak GiB':>9}" if has_mem else ""
    lines = [head]
    for r in rows:
        line = (
            f"{r['path']:<9} {r['seconds']:>8.3f} {r['speedup']:>7.2f}x {r['tokens']:>7d} "
            f"{r['logprob_max']:>11.2e} {r['grad_max']:>11.2e} {r['grad_rel']:>10.2e}"
        )
        line += f" {r['peak_gib']:>9.2f}" if has_mem else ""
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--ragged", action="store_true", help="vary prompt and response lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated subset of {','.join(PATHS)}; the first is the reference",
    )
    args = parser.parse_args(argv)
    paths = tuple(args.paths.split(","))
    if not paths or set(paths) - set(PATHS):
        parser.error(f"--paths: choose from {','.join(PATHS)}, got {args.paths!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")

    model = build_model(args.shape, args.device, args.dtype, args.attn)
    batch, groups = make_batch(
        args.prompts, args.samples, args.prompt_len, args.response_len, model.config.vocab_size, args.ragged
    )
    rows = compare_paths(model, batch, groups, args.repeats, args.chunk_tokens, paths)
    print(
        f"{args.shape} {args.dtype} on {args.device} ({args.attn}, {torch.get_num_threads()} threads): "
        f"{args.prompts} prompts x {args.samples} samples, {args.prompt_len} + {args.response_len} tokens, "
        f"median of {args.repeats}"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
