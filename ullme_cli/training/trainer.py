"""`ullme finetune`: the training loop.

One step, top to bottom: take the step's batch and seed its random draws (both pure functions of seed,
step and process, so a resumed run sees the same data and draws), compute the recipe's loss,
backpropagate, average gradients and logged losses across processes, clip, step the optimiser and
schedule, log, optionally evaluate, and checkpoint every N steps.

Checkpoints hold the trainable weights and the optimiser state in safetensors plus JSON
(no pickle); they are written to a staging folder and renamed into place, so a SIGKILL leaves either the
old checkpoint or the new one. `--resume` continues from the newest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ullme_cli.data import TrainingExample
from ullme_cli.dtypes import AUTOCAST
from ullme_cli.errors import UllmeError
from ullme_cli.evaluation.local_tasks import beir_retrieval_task, sts_task
from ullme_cli.evaluation.runner import run_evaluation
from ullme_cli.fingerprints import tensors_fingerprint
from ullme_cli.instructions import load_instruction_table
from ullme_cli.io.outputs import (
    STAGING_MARK,
    atomic_folder,
    atomic_path,
    atomic_write_text,
    guard_output,
    output_lock,
)
from ullme_cli.model_setup import Runtime
from ullme_cli.models.loading import DTYPES, model_inputs
from ullme_cli.progress import progress_bar
from ullme_cli.recipes import Recipe, TrainSection, dump_recipe
from ullme_cli.training.curves import (
    METRICS_FILE,
    last_eval_metrics,
    plot_runs,
    read_runs,
    sources_in,
)
from ullme_cli.training.mixture import Batching, _positions, read_mixture

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINAL = "model"
CURVES = "curves.png"


def batch_indices(step: int, batch_size: int, count: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """The examples of `step` for process `rank` of one source: a seeded permutation per epoch, read in order
    (several sources: training/mixture.py's Batching)."""
    return _positions(step, batch_size, count, seed, rank, world)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of every random draw in one step of one process (dropout, positives and negatives, masks).

    A pure function of (seed, step, rank), so no RNG state needs checkpointing, and a resumed run draws exactly
    what the uninterrupted run drew.
    """
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def trainable_parameters(embedder) -> dict[str, torch.nn.Parameter]:
    named = {f"model.{n}": p for n, p in embedder.model.named_parameters() if p.requires_grad}
    named.update({f"pooler.{n}": p for n, p in embedder.pooler.named_parameters() if p.requires_grad})
    return named


# Train settings that do not change what a step computes: a resume may differ in them.
RESUME_FREE_SETTINGS = {"log_every", "checkpoint_every", "keep_checkpoints", "report_to", "gradient_checkpointing", "packing",
                        "grad_cache_chunk", "distributed", "fsdp_reshard_after_forward", "fsdp_cpu_offload"}  # fmt: skip


def run_inputs(recipe: Recipe, base_fingerprint: str, data_fingerprint: str, processes: int = 1) -> dict:
    """What a checkpoint was trained from, by content: the base model (its setup and weights fingerprint),
    the training rows (the mixture's fingerprint), and every setting that changes a step. A resume compares
    them (`check_inputs`)."""
    settings = dataclasses.asdict(recipe)
    return json.loads(json.dumps({
        "base_model": base_fingerprint, "model_dtype": recipe.model.dtype,
        "data": data_fingerprint, "negatives_per_query": recipe.data.negatives_per_query,
        **({"sources": settings["data"]["sources"]} if recipe.data.sources else {}),
        "lora": {k: v for k, v in settings["lora"].items() if k != "merge"}, "loss": settings["loss"],
        "train": {k: v for k, v in settings["train"].items() if k not in RESUME_FREE_SETTINGS | {"batch_size"}},
        "global_batch_size": recipe.train.batch_size * processes,  # a resume on other process counts keeps it
    }))  # fmt: skip


def check_inputs(checkpoint: Path, recorded: dict | None, current: dict) -> None:
    """UllmeError naming what differs when `checkpoint` was trained from other inputs than this run's."""
    if recorded is None:  # written before checkpoints recorded their inputs (ullme 0.x): nothing to compare
        log.warning(f"{checkpoint}: records no training inputs; cannot check that it was trained from this recipe's model and data")
        return

    # A setting added since the checkpoint was written counts as its default there (the old code's behaviour).
    defaults = dataclasses.asdict(Recipe())
    differ = [key for key in current if recorded.get(key) != current[key]]
    for key in ("lora", "loss", "train"):  # name the setting, not the section
        if key in differ:
            differ.remove(key)
            section = current[key], recorded.get(key) or {}
            differ += [f"{key}.{k}" for k in section[0] if section[1].get(k, defaults[key].get(k)) != section[0][k]]
    if differ:
        raise UllmeError(f"{checkpoint}: trained from other inputs than this run ({', '.join(differ)} differ); "
                         "resume with the recipe, model and data it was trained from, or start a new output_dir")  # fmt: skip


def save_checkpoint(folder: Path, step: int, params: dict, optimizer, keep: int, scaler=None, sharded_model=None, inputs: dict | None = None) -> Path:
    """Trainable weights and optimizer state at `step`, written whole or not at all; the newest `keep` stay.

    With `sharded_model` (FSDP) every process calls this and writes its shards (DCP, see sharding.py)."""
    root = folder / CHECKPOINTS
    target = root / f"step-{step:07d}"
    names = list(params)
    if sharded_model is not None:
        from ullme_cli.training.sharding import save_sharded_checkpoint

        scalars = {"step": step, "names": names, "param_groups": [], "inputs": inputs}
        save_sharded_checkpoint(target, root / f".{target.name}{STAGING_MARK}dcp", sharded_model, optimizer, scalars)
        if torch.distributed.get_rank() == 0:
            _keep_newest(root, keep)
        return target
    tensors = {f"param.{n}": p.detach().contiguous().cpu() for n, p in params.items()}
    state = optimizer.state_dict()
    scalars = {"step": step, "param_groups": state["param_groups"], "names": names, "inputs": inputs}
    if scaler is not None:  # fp16: the loss scale and its growth counter, so that a resume scales the same
        scalars["grad_scaler"] = scaler.state_dict()
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optim.{index}.{slot}"] = value.detach().contiguous().cpu()
    with atomic_folder(target) as staging:
        save_file(tensors, staging / "state.safetensors")
        (staging / "trainer_state.json").write_text(json.dumps(scalars))
    _keep_newest(root, keep)
    return target


def _keep_newest(root: Path, keep: int) -> None:
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted((folder / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def remove_staging_leftovers(folder: Path) -> None:
    """Staging folders that a kill left behind (atomic_folder's `.NAME.staging-*`): never a finished output."""
    for parent in (folder, folder / CHECKPOINTS):
        for leftover in parent.glob(f".*{STAGING_MARK}*") if parent.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)


def require_kind(checkpoint: Path, sharded: bool) -> None:
    """Only the kind of checkpoint the recipe asks for is read: a sharded (DCP) one under
    `train.distributed: fsdp`, else safetensors. The other kind is refused before any of its files is parsed."""
    if (checkpoint / "dcp").exists() != sharded:
        written, wanted = ("fsdp", "ddp") if not sharded else ("ddp", "fsdp")
        raise UllmeError(f"{checkpoint}: written with train.distributed: {written}; resume it with the same setting, not {wanted}")


def read_checkpoint(checkpoint: Path, sharded: bool = False) -> tuple[dict | None, dict]:
    """The tensors and scalars of a checkpoint of the recipe's kind (`require_kind`); UllmeError naming the
    file when either is unreadable. A sharded (DCP) checkpoint has no tensors here: they load into the
    sharded model (sharding.py)."""
    require_kind(checkpoint, sharded)
    if sharded:
        from ullme_cli.training.sharding import check_sharded_checkpoint

        check_sharded_checkpoint(checkpoint)
        tensors = None
    else:
        tensors = _read_tensors(checkpoint)
    try:
        scalars = json.loads((checkpoint / "trainer_state.json").read_text())
        if not isinstance(scalars, dict) or not {"step", "names", "param_groups"} <= set(scalars):
            raise ValueError("fields missing")
    except (OSError, ValueError) as e:
        raise UllmeError(f"{checkpoint / 'trainer_state.json'}: unreadable ({e})") from None
    return tensors, scalars


def _read_tensors(checkpoint: Path) -> dict:
    try:
        return load_file(checkpoint / "state.safetensors")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a truncated file
        raise UllmeError(f"{checkpoint / 'state.safetensors'}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def newest_complete_checkpoint(folder: Path, sharded: bool = False) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint whose files read back whole; newer broken ones are reported and skipped. One of
    the other kind (DCP against safetensors) stops the resume: it is another run's, not a broken one."""
    for checkpoint in sorted((folder / CHECKPOINTS).glob("step-*"), reverse=True):
        require_kind(checkpoint, sharded)  # outside the try: another kind is refused, not skipped as broken
        try:
            return (checkpoint, *read_checkpoint(checkpoint, sharded))
        except UllmeError as e:
            log.warning(f"skipping a broken checkpoint: {e}")
    return None


def load_checkpoint(checkpoint: Path, tensors: dict | None, scalars: dict, params: dict, optimizer, scaler=None, sharded_model=None) -> int:
    if scalars["names"] != list(params):
        raise UllmeError(f"{checkpoint}: its parameters do not match this recipe's model; start a new output_dir")
    if sharded_model is not None:  # the kind matches: read_checkpoint read only the recipe's (require_kind)
        from ullme_cli.training.sharding import load_sharded_checkpoint

        load_sharded_checkpoint(checkpoint, sharded_model, optimizer)
        return scalars["step"]
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    optim_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, slot = key.split(".", 2)
            optim_state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": scalars["param_groups"]})
    if scaler is not None and scalars.get("grad_scaler"):
        scaler.load_state_dict(scalars["grad_scaler"])
    return scalars["step"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step`. A line torn by a kill mid-write (the last one) is dropped."""
    if path.exists():
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def evaluate_during_training(embedder, tasks: dict, out: Path, step: int, weights: str) -> dict[str, float]:
    """The recipe's eval sets scored on the model as it is at `step`: nDCG@10, recall@10 and MRR@10 of the
    retrieval set (`eval_ndcg_at_10`, ...), the cosine Spearman of the STS file (`eval_sts_spearman`).

    mteb's own result files land in `<output_dir>/eval/`, keyed by the fingerprint of the weights at this
    step, so a resumed run reuses the evaluations it already made, and other weights never do.
    """
    embedder.model.eval()
    try:
        results = run_evaluation(embedder, f"{out.name}-step{step}", list(tasks.values()), str(out / "eval"), load_instruction_table(),
                                 show_progress=False, weights=weights)  # fmt: skip
    finally:
        embedder.model.train()
    record = {}
    for kind, result in zip(tasks, results):
        if kind == "retrieval":
            record.update({f"eval_{metric}": float(result.scores[metric]) for metric in ("ndcg_at_10", "recall_at_10", "mrr_at_10")})
        else:
            record["eval_sts_spearman"] = float(result.scores["cosine_spearman"])
    return record


def flat_config(recipe: Recipe) -> dict:
    """The recipe as `section.key: value` scalars, the hyperparameters that TensorBoard shows."""
    return {f"{section}.{k}": v for section, values in recipe.to_dict().items() if isinstance(values, dict)
            for k, v in values.items() if isinstance(v, (int, float, str, bool))}  # fmt: skip


def draw_curves(out: Path) -> None:
    """<output_dir>/curves.png from metrics.jsonl; without matplotlib, say how to get it and go on."""
    try:
        series = read_runs([out])
        (records,) = series.values()
        with atomic_path(out / CURVES) as tmp:
            plot_runs(series, tmp, by_source=len(sources_in(records)) > 1)  # a mixture: loss per source
    except UllmeError as e:
        log.info(f"no {CURVES}: {e}")


def finetune(recipe: Recipe, resume: bool = False, show_progress: bool = True) -> dict:
    out = Path(recipe.output_dir)
    # Everything the run reads is an input: output_dir may not be, lie inside or hold any of them (the recipe
    # file included: finetune writes its resolved recipe into output_dir).
    sources = [s.path for s in recipe.data.source_list()]
    inputs = [recipe.source, *sources, *model_inputs(recipe.model.model), recipe.eval.task_dir, recipe.eval.sts]
    guard_output([out], inputs, folder=True, exists_ok=True)
    if not resume and latest_checkpoint(out) is not None:
        raise UllmeError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it, or pick another output_dir")
    if not resume and (out / FINAL).exists():
        raise UllmeError(f"{out}: holds a finished model of an earlier run; pick another output_dir")
    # One lock per run: under torchrun or accelerate every process runs this, and rank 0 holds it for all.
    with output_lock(out) if os.environ.get("RANK", "0") == "0" else nullcontext():
        return _finetune_locked(recipe, out, resume, show_progress)


@dataclass
class Run:
    """What one training run holds from `prepare` to `finish`."""

    recipe: Recipe
    out: Path
    train: TrainSection  # the recipe's, with accelerate's FSDP options applied
    mixture: object  # training/mixture.py's Mixture: the rows of every source, and the sources
    eval_tasks: dict
    tracking: dict
    accelerator: object
    embedder: object
    base_fingerprint: str  # the loaded model's, before training changes its weights
    inputs: dict  # what a checkpoint records it was trained from (run_inputs)
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: object
    loss_fn: object  # training/step.py's StepLoss
    batching: object = None
    scheduler: object = None
    step: int = 0
    skipped_steps: int = 0  # fp16: steps the loss scaler skipped for a gradient that overflowed

    @property
    def sharded(self) -> bool:
        return self.train.distributed == "fsdp"

    @property
    def metrics_path(self) -> Path:
        return self.out / METRICS_FILE


def _finetune_locked(recipe: Recipe, out: Path, resume: bool, show_progress: bool) -> dict:
    run = prepare(recipe, out)
    if resume_run(run, resume):
        log.info(f"{out / FINAL}: already trained from this recipe's model, data and settings (step {run.step}); nothing to do")
        return {"steps": run.step, "output": str(out / FINAL), "examples": len(run.mixture.examples), "already_finished": True}
    with progress_bar("finetune", total=run.train.steps, enabled=show_progress and run.accelerator.is_main_process) as advance:
        advance(run.step)
        first_step, training_seconds = run.step, 0.0
        while run.step < run.train.steps:
            started = time.perf_counter()
            loss, parts, grad_norm = train_step(run)
            training_seconds += time.perf_counter() - started
            record = {"step": run.step, "loss": loss, **parts, "lr": run.scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm, "steps_per_s": (run.step - first_step) / max(training_seconds, 1e-9)}  # fmt: skip
            if run.scaler is not None:
                record["skipped_steps"] = run.skipped_steps
            log_and_checkpoint(run, record)
            advance(1, loss=loss, **parts)
    return finish(run)


def prepare(recipe: Recipe, out: Path) -> Run:
    """Read the data and eval sets, load the model, add LoRA, build the optimiser and the step's loss.
    Nothing is written: a recipe the data or model cannot take fails here."""
    from accelerate import Accelerator

    from ullme_cli.models.embedder import load_embedder
    from ullme_cli.training.step import StepLoss

    t = recipe.train
    sources = recipe.data.source_list()
    mixture = read_mixture(sources, recipe.data.skip_bad_rows, t.seed)
    if "distill" in recipe.loss.resolved_weights() and not mixture.has_teacher_scores:
        raise UllmeError("loss.weights.distill: no training row carries pos_scores or neg_scores (teacher scores); write them with "
                         "`ullme mine ... --teacher MODEL`")  # fmt: skip
    if mixture.skipped:
        log.warning(f"skipped {mixture.skipped} malformed rows of {', '.join(s.path for s in sources)}")
    if len(sources) > 1:
        log.info("sources: " + ", ".join(f"{s.name} {stop - start} rows" for s, (start, stop) in zip(sources, mixture.ranges)))

    eval_tasks = {}  # built now, so that a bad eval set fails before training starts
    if recipe.eval.task_dir:

        eval_tasks["retrieval"] = beir_retrieval_task(recipe.eval.task_dir)
    if recipe.eval.sts:

        eval_tasks["sts"] = sts_task(recipe.eval.sts)
    # Autocast is ours (train_step), so accelerate runs without a precision of its own.
    tracking = {}
    if t.report_to == "tensorboard":  # accelerate's tracker, written locally under output_dir
        from accelerate.utils import ProjectConfiguration

        try:
            import tensorboard  # noqa: F401 - an optional extra, asked for only by train.report_to
        except ImportError:
            raise UllmeError("train.report_to: tensorboard needs the tensorboard package: pip install 'ullme[tensorboard]'") from None
        tracking = {"log_with": "tensorboard", "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))}
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **tracking)
    if accelerator.distributed_type.value == "DEEPSPEED":
        raise UllmeError("finetune: DeepSpeed is not supported (it cannot be tested here); use FSDP: train.distributed: fsdp, "
                         "or accelerate launch --config_file recipes/accelerate/fsdp.yaml")  # fmt: skip
    if accelerator.distributed_type.value == "FSDP":  # accelerate's FSDP config: its options, our wrapping (sharding.py)
        from ullme_cli.training.sharding import options_from_accelerate

        t = options_from_accelerate(accelerator.state.fsdp_plugin, t)
        if eval_tasks:
            raise UllmeError("eval.task_dir and eval.sts are not run under FSDP yet; evaluate the final model with `ullme evaluate`")
    batching = Batching(mixture, t.batch_size, t.seed, t.batching, accelerator.num_processes)  # refuses a source smaller than a batch
    torch.manual_seed(t.seed)
    embedder = load_embedder(recipe.model.setup(), Runtime(dtype=recipe.model.dtype, device=str(accelerator.device)))
    base_fingerprint = embedder.setup.fingerprint
    inputs = run_inputs(recipe, base_fingerprint, mixture.fingerprint, accelerator.num_processes)
    embedder.weights_changed()
    if recipe.lora.enabled:
        embedder.add_lora(recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.target_modules)
    if t.gradient_checkpointing:
        embedder.enable_gradient_checkpointing()
    embedder.packing = t.packing
    embedder.model.train()
    if t.distributed == "fsdp":
        from ullme_cli.training.sharding import shard_model

        shard_model(embedder, t, accelerator.device)
    params = trainable_parameters(embedder)
    optimizer = torch.optim.AdamW(params.values(), lr=t.learning_rate, weight_decay=t.weight_decay)
    # fp16 needs loss scaling (small gradients underflow); bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(accelerator.device.type) if AUTOCAST[t.mixed_precision] == "float16" else None  # fp16 needs loss scaling
    # A recipe the model cannot take (a Matryoshka size above its own) is refused here, before anything is written.
    loss_fn = StepLoss(embedder, recipe.loss, recipe.data.negatives_per_query, t.grad_cache_chunk, scale=scaler.scale if scaler else lambda x: x)
    return Run(recipe, out, t, mixture, eval_tasks, tracking, accelerator, embedder, base_fingerprint, inputs, params, optimizer, scaler, loss_fn, batching)


def resume_run(run: Run, resume: bool) -> bool:
    """Load the newest complete checkpoint when resuming (after checking it was trained from the same
    inputs), set up batching and the schedule at that step, and start the run's files in output_dir. A run
    whose finished model is there already and whose last checkpoint has the same inputs is left as it is
    (`--resume` of a finished run does nothing); one whose last checkpoint is broken trains again from the
    newest good one, of the same inputs, and saves the same model. A finished model with nothing to check it
    against is an error. Returns whether the run is finished already (nothing to train or write)."""
    from transformers import get_cosine_schedule_with_warmup

    t, accelerator, out = run.train, run.accelerator, run.out
    if resume and accelerator.is_main_process:
        remove_staging_leftovers(out)
    accelerator.wait_for_everyone()
    found = newest_complete_checkpoint(out, run.sharded) if resume else None
    if found is None and (out / FINAL).exists():  # nothing to check the finished model against: never replace it
        raise UllmeError(f"{out / FINAL}: holds a finished model and no checkpoint that says what it was trained from; pick another output_dir")
    if found is not None:
        checkpoint, tensors, scalars = found
        check_inputs(checkpoint, scalars.get("inputs"), run.inputs)
        if (out / FINAL).exists() and scalars["step"] >= t.steps:  # finished from these same inputs: nothing to do
            run.step = scalars["step"]
            return True
        run.step = load_checkpoint(checkpoint, tensors, scalars, run.params, run.optimizer, run.scaler, run.embedder.model if run.sharded else None)
        for group in run.optimizer.param_groups:  # the schedule below is replayed from the start: it needs the base lr
            group["lr"] = group["initial_lr"] = t.learning_rate
        log.info(f"resuming from {checkpoint} (step {run.step})")
    run.scheduler = get_cosine_schedule_with_warmup(run.optimizer, t.warmup_steps, t.steps, last_epoch=-1)
    with warnings.catch_warnings():  # fast-forwarding a fresh scheduler to the resumed step is not a misuse
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for _ in range(run.step):
            run.scheduler.step()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", dump_recipe(run.recipe))
    if run.tracking:
        accelerator.init_trackers("finetune", config=flat_config(run.recipe))
    _truncate_metrics(run.metrics_path, run.step)
    return False


def train_step(run: Run) -> tuple[float, dict[str, float], float]:
    """One optimiser step: the step's batch and seeded draws, the loss and its backward pass, gradients and
    logged losses averaged across processes, clipping, the optimiser and the schedule. Returns the loss, its
    components (global means) and the gradient norm."""
    t, accelerator, params = run.train, run.accelerator, run.params
    batch: list[TrainingExample] = [run.mixture.examples[i] for i in run.batching.indices(run.step, accelerator.process_index)]
    run.optimizer.zero_grad(set_to_none=True)
    seed = step_seed(t.seed, run.step, accelerator.process_index)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    autocast_dtype = DTYPES.get(AUTOCAST[t.mixed_precision])
    with torch.autocast(accelerator.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss, parts = run.loss_fn.backward(batch, generator)
    if accelerator.num_processes > 1:  # DDP by hand (FSDP reduces its own gradients)
        for p in params.values() if not run.sharded else ():
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")
        reduced = accelerator.reduce(torch.tensor([loss, *parts.values()], device=accelerator.device), reduction="mean")
        loss, parts = float(reduced[0]), dict(zip(parts, reduced[1:].tolist()))  # log the global means
    refuse_non_finite_loss(run.step + 1, loss, parts)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    # max_grad_norm 0 means no clipping (the norm is still logged); clipping to 0 would zero every gradient.
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), t.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    if not math.isfinite(float(grad_norm)):
        if run.scaler is None:
            raise UllmeError(f"step {run.step + 1}: the gradient is not finite (norm {float(grad_norm)}; loss {loss:.6g}, "
                             f"{', '.join(f'{k} {v:.6g}' for k, v in parts.items())}); stopped before the optimizer step, so the "
                             "last checkpoint stays as it was and no model is saved")  # fmt: skip
        run.skipped_steps += 1  # fp16: the scaler skips this step and shrinks its scale (counted in metrics.jsonl)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skips the step when a gradient overflowed, and shrinks the scale
        run.scaler.update()
    else:
        run.optimizer.step()
    if not all_finite(params.values(), accelerator):
        raise UllmeError(f"step {run.step + 1}: the optimizer step left weights that are not finite (train.learning_rate "
                         f"{t.learning_rate:g}); the last checkpoint stays as it was and no model is saved")  # fmt: skip
    with warnings.catch_warnings():  # a scaler's skipped step is not a misordered scheduler
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        run.scheduler.step()
    run.step += 1
    return loss, parts, float(grad_norm)


def refuse_non_finite_loss(step: int, loss: float, parts: dict[str, float]) -> None:
    """A NaN or infinite loss stops the run, naming the step and the components that are not finite,
    before its gradients reach the weights."""
    bad = {name: value for name, value in parts.items() if not math.isfinite(value)}
    if bad or not math.isfinite(loss):
        named = ", ".join(f"{name} = {value}" for name, value in bad.items()) or f"loss = {loss}"
        raise UllmeError(f"step {step}: the loss is not finite ({named}); stopped before the optimizer step, so the last "
                         "checkpoint stays as it was and no model is saved")  # fmt: skip


def all_finite(tensors, accelerator) -> bool:
    """Whether every element of `tensors` is finite, on every process (an FSDP shard checks its own part)."""
    bad = sum(int((~torch.isfinite(getattr(p, "to_local", lambda: p)().detach())).sum()) for p in tensors)
    if accelerator.num_processes > 1:
        bad = int(accelerator.reduce(torch.tensor([bad], device=accelerator.device), reduction="sum")[0])
    return bad == 0


def log_and_checkpoint(run: Run, record: dict) -> None:
    """After a step: its source, the eval sets when due, a line of metrics.jsonl (and the tracker), and a
    checkpoint every train.checkpoint_every steps and after the last."""
    t, accelerator, step = run.train, run.accelerator, run.step
    if run.batching.same_source:
        record["source"] = run.mixture.sources[run.batching.source_at(step - 1)].name
    evaluate_now = bool(run.eval_tasks) and (step == t.steps or (run.recipe.eval.every and step % run.recipe.eval.every == 0))
    if evaluate_now and accelerator.is_main_process:
        weights = tensors_fingerprint(run.params.items(), salt=run.base_fingerprint)
        record.update(evaluate_during_training(run.embedder, run.eval_tasks, run.out, step, weights))
    if accelerator.is_main_process and (step % t.log_every == 0 or step == t.steps or evaluate_now):
        with run.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if run.tracking:
            accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step)
    if step % t.checkpoint_every == 0 or step == t.steps:
        if run.sharded:  # every process writes its shards
            save_checkpoint(run.out, step, run.params, run.optimizer, t.keep_checkpoints, run.scaler, sharded_model=run.embedder.model, inputs=run.inputs)
        elif accelerator.is_main_process:
            save_checkpoint(run.out, step, run.params, run.optimizer, t.keep_checkpoints, run.scaler, inputs=run.inputs)


def finish(run: Run) -> dict:
    """Save the final model (gathered from the shards under FSDP) with its training record, and draw the curves."""
    recipe, accelerator, embedder, out = run.recipe, run.accelerator, run.embedder, run.out
    if accelerator.is_main_process:
        embedder.report_truncation("finetune")
    embedder.model.eval()
    if run.sharded:  # gathered on rank 0 (a collective), which saves a plain copy
        from ullme_cli.training.sharding import gather_full_weights, unsharded_copy

        weights = gather_full_weights(embedder.model, trainable_only=recipe.lora.enabled)
        embedder = unsharded_copy(recipe, weights) if accelerator.is_main_process else embedder
    if accelerator.is_main_process:
        sources = [s.path for s in run.mixture.sources]
        embedder.training = {
            "recipe": dump_recipe(recipe), "data": {"train": ", ".join(sources), "sources": sources, "rows": len(run.mixture.examples), "skipped": run.mixture.skipped},
            "steps": run.step, "eval": last_eval_metrics(run.metrics_path), "eval_task": ", ".join(filter(None, (recipe.eval.task_dir, recipe.eval.sts))) or None,
        }  # fmt: skip
        embedder.matryoshka_dims = recipe.loss.matryoshka() or None
        embedder.save(out / FINAL, merge_lora=recipe.lora.merge, reference_base=True)  # a LoRA run: the adapter, not a copy of the base
        draw_curves(out)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group before exit; gloo aborts at teardown otherwise
    return {"steps": run.step, "output": str(out / FINAL), "examples": len(run.mixture.examples)}
