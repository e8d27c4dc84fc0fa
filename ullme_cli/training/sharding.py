"""FSDP for finetune (`train.distributed: fsdp`): torch's `fully_shard` (FSDP2), checkpoints through DCP.

Wiring: every decoder layer is one FSDP unit, and the root (the peft model or the causal LM) holds the
rest: embeddings, final norm and LM head (tied or not). FSDP2 gathers a unit's parameters in a forward
hook on that unit's module, so every forward of the step must enter through the root module: the LM
logits do already (`lm_logits` calls the model), and `bidirectional.hidden_states` takes the root's
forward for a sharded model (it reads the decoder body's output from a hook) instead of calling the body.

Checkpoints are torch distributed checkpoints (DCP): each process writes its own shards of the trainable
weights and of the optimizer state, and they load back on any number of processes (DCP reshards). The final
model is gathered to rank 0 and saved as a normal Embedder folder.

What runs here: CPU, gloo, 1 and 2 processes (tests/test_distributed.py). CPU offload and a bf16
parameter dtype are GPU-minded options; their CPU runs are tested to train, not timed.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pickle  # only through MetadataUnpickler, which admits the classes DCP writes and refuses any other
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ullme_cli.errors import UllmeError
from ullme_cli.io.outputs import commit_folder
from ullme_cli.model_setup import Runtime
from ullme_cli.models.bidirectional import decoder_of

DCP_FOLDER = "dcp"
PARAM_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # keys: dtypes.TRAINING_DTYPES; None keeps float32


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group; a single process (no torchrun) gets a one-member group of its own."""
    if not dist.is_initialized():  # gloo for CPU tensors too (DCP's metadata, CPU-offloaded shards)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        device_id = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index) if device.type == "cuda" else None
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)


def shard_model(embedder, train, device: torch.device) -> None:
    """fully_shard each decoder layer, then the root, with the recipe's FSDP options."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    if any(p.requires_grad for p in embedder.pooler.parameters()):
        raise UllmeError("train.distributed: fsdp does not shard a trainable pooling head (latent-attention) yet; use ddp")
    if train.fsdp_cpu_offload and device.type != "cuda":
        raise UllmeError("train.fsdp_cpu_offload keeps shards in CPU memory between uses on a GPU; this run is on the CPU already")
    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    param_dtype = PARAM_DTYPES[train.fsdp_param_dtype]
    options = dict(
        mesh=mesh,
        reshard_after_forward=train.fsdp_reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None),
        offload_policy=CPUOffloadPolicy() if train.fsdp_cpu_offload else OffloadPolicy(),
    )
    layers = getattr(decoder_of(embedder.model), "layers", None)
    if layers is None:
        raise UllmeError(f"train.distributed: fsdp: {type(decoder_of(embedder.model)).__name__} has no `.layers` to shard")
    for layer in layers:
        fully_shard(layer, **options)
    # The root's weights (embeddings, norm, head) are needed again at once by the backward, so they stay
    # gathered, as FSDP2 does by default. Resharding them after forward also crashed torch 2.13 on gloo
    # (SIGSEGV in the backward, tiny Llama with tied embeddings).
    fully_shard(embedder.model, **{**options, "reshard_after_forward": False})
    # The bidirectional mask must match the dtype the attention computes in, which is the gathered dtype.
    embedder.model.ullme_compute_dtype = param_dtype


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optimizer": optim_state}


def save_sharded_checkpoint(target: Path, staging: Path, model, optimizer, scalars: dict) -> None:
    """Every process writes its shards into `staging`; rank 0 adds the scalars and renames it to `target`."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(staging / DCP_FOLDER))
    if rank == 0:
        (staging / "trainer_state.json").write_text(json.dumps({**scalars, "format": "dcp", "processes": dist.get_world_size()}))
        commit_folder(staging, target)  # a broken checkpoint of this step, skipped by the resume, is replaced
    dist.barrier()


# What a DCP `.metadata` pickle refers to (seen in torch 2.13's own files): its dataclasses, torch.Size, dtypes,
# a layout and a path. Nothing else is unpickled, so a crafted file cannot name a callable to run.
DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
DCP_METADATA_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                      ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}  # fmt: skip


def read_dcp_metadata(path: Path):
    """A DCP checkpoint's `.metadata`, through an unpickler that admits only the classes DCP writes there.

    torch's own reader calls `pickle.load` on it: a crafted file could run any code. Any other global it
    names is refused with an UllmeError naming the file and the global."""
    class MetadataUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module in DCP_METADATA_MODULES:
                value = getattr(importlib.import_module(module), name, None)
                if isinstance(value, type) and value.__module__ == module:
                    return value
            elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            elif (module, name) in DCP_METADATA_NAMES:
                return getattr(importlib.import_module(module), name)
            raise UllmeError(f"{path}: names {module}.{name}, which DCP metadata never holds; refused (a pickle can run code)")

    with open(path, "rb") as f:
        return MetadataUnpickler(f).load()


def safe_reader(folder: Path):
    """torch's FileSystemReader, with its metadata read by `read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(folder))


def check_sharded_checkpoint(checkpoint: Path) -> None:
    """A DCP checkpoint reads back when its metadata does and every file it names is there."""
    folder = checkpoint / DCP_FOLDER
    try:
        metadata = safe_reader(folder).read_metadata()
    except UllmeError:
        raise
    except Exception as e:  # noqa: BLE001 - a missing or torn .metadata file
        raise UllmeError(f"{folder}: unreadable DCP checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for item in (metadata.storage_data or {}).values():
        if not (folder / item.relative_path).is_file():
            raise UllmeError(f"{folder / item.relative_path}: missing from the DCP checkpoint")


def load_sharded_checkpoint(checkpoint: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(model, optimizer)
    dcp.load(state, storage_reader=safe_reader(checkpoint / DCP_FOLDER))  # fails on any trainable key the checkpoint lacks
    # Not strict: the frozen weights (LoRA's base) are not in a checkpoint; they come from the model files.
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # fmt: skip


def gather_full_weights(model, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole (or the trainable part of the) model's weights on rank 0's CPU; a collective: all ranks call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def unsharded_copy(recipe, weights: dict[str, torch.Tensor]):
    """A plain Embedder of the recipe's model with the gathered weights: what rank 0 saves at the end."""
    from ullme_cli.models.embedder import load_embedder

    copy = load_embedder(recipe.model.setup(), Runtime(dtype=recipe.model.dtype, device="cpu"))
    copy.weights_changed()
    if recipe.lora.enabled:
        copy.add_lora(recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.target_modules)
    result = copy.model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise UllmeError(f"internal: gathered weights that the model does not have: {result.unexpected_keys[:3]}")
    return copy


def options_from_accelerate(plugin, train):
    """The recipe's train section with accelerate's FSDP config applied: `accelerate launch --config_file
    recipes/accelerate/fsdp.yaml` shards as `train.distributed: fsdp` does, with the config's options.
    Wrapping (per decoder layer) and checkpoints (DCP) stay ours; the config's wrap and state-dict
    settings are not used."""
    reshard = plugin.reshard_after_forward
    if not isinstance(reshard, bool):  # an FSDP1 sharding strategy: FULL_SHARD reshards, SHARD_GRAD_OP does not
        reshard = "FULL_SHARD" in str(reshard).upper()
    offload = plugin.cpu_offload  # a bool, FSDP2's OffloadPolicy (CPUOffloadPolicy offloads) or FSDP1's CPUOffload
    offload = offload if isinstance(offload, bool) else type(offload).__name__ == "CPUOffloadPolicy" or getattr(offload, "offload_params", False) is True
    policy = plugin.mixed_precision_policy
    param_dtype = "bfloat16" if getattr(policy, "param_dtype", None) == torch.bfloat16 else train.fsdp_param_dtype
    return dataclasses.replace(train, distributed="fsdp", fsdp_reshard_after_forward=reshard, fsdp_cpu_offload=offload,
                               fsdp_param_dtype=param_dtype, gradient_checkpointing=train.gradient_checkpointing or bool(plugin.activation_checkpointing))  # fmt: skip
