"""The checks that need a CUDA GPU, which CI never has. Run on a GPU machine: python scripts/gpu_check.py

1. The attention switch on CUDA's SDPA kernels: the last token reaches the first only in bidirectional mode.
2. Generation log-probs equal the model's own logits on CUDA (families that scale logits after the head).
3. GradCache's RNG replay: a chunk embedded again from its saved state (CPU and CUDA) gives the same
   vector under dropout; replaying the CPU state alone, as before, does not.
4. fp16 training with the gradient scaler: overflowing steps are skipped, the scale is checkpointed, and a
   resume from a checkpoint ends with bit-identical adapter weights.
5. FSDP (one process, NCCL): equal to the unsharded run; bf16 gathered weights with CPU offload and
   gradient checkpointing train, and resume exactly from their DCP checkpoint.
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from tiny_models import save_tiny, tiny_model, tiny_tokenizer  # noqa: E402

from ullme_cli.models import generation  # noqa: E402

DEVICE = torch.device("cuda")
TEXTS = [json.loads(line)["text"] for line in (REPO / "ullme_cli/resources/demo/corpus.jsonl").read_text().splitlines()]


def check_switch() -> str:
    from ullme_cli.models.bidirectional import TESTED_MODEL_TYPES, hidden_states

    failed = []
    for family in TESTED_MODEL_TYPES:
        model = tiny_model(family).to(DEVICE)
        ids = torch.randint(3, 300, (2, 10), device=DEVICE)
        changed = ids.clone()
        changed[:, -1] = (ids[:, -1] + 1) % 300 + 3
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # one right-padded row
        with torch.no_grad():
            first = {m: [hidden_states(model, x, mask, m)[0, 0] for x in (ids, changed)] for m in ("bidirectional", "causal")}
        if not (first["bidirectional"][0] - first["bidirectional"][1]).abs().max() > 1e-4:
            failed.append(f"{family}: bidirectional had no effect")
        if not torch.allclose(*first["causal"], atol=1e-5, rtol=1e-4):
            failed.append(f"{family}: causal leaked")
    assert not failed, failed
    return f"{len(TESTED_MODEL_TYPES)} families"


def check_generation_logits() -> str:
    from ullme_cli.model_setup import ModelSetup
    from ullme_cli.models.embedder import Embedder

    tokenizer = tiny_tokenizer(TEXTS)
    worst = 0.0
    for family, scales in [("granite", {"logits_scaling": 4.0}), ("cohere", {"logit_scale": 0.5}), ("cohere2", {"logit_scale": 0.5}),
                           ("gemma2", {"final_logit_softcapping": 3.0}), ("llama", {})]:  # fmt: skip
        model = tiny_model(family, **scales).to(DEVICE)
        for side in ("left", "right"):
            embedder = Embedder(model, tokenizer, ModelSetup(model="tiny", padding_side=side), DEVICE)
            prompts, continuations = ["Who wrote it ?", "Why"], ["Hugo Young wrote the biography .", "because of the rain"]
            scores = generation.generation_logprobs(embedder, prompts, continuations)
            for row, (p, c) in enumerate(zip(prompts, continuations)):
                p_ids, c_ids = tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logprobs = model(input_ids=torch.tensor([p_ids + c_ids], device=DEVICE)).logits.float().log_softmax(-1)[0]
                expected = sum(logprobs[len(p_ids) + j - 1, t].item() for j, t in enumerate(c_ids)) / len(c_ids)
                worst = max(worst, abs(scores["mean"][row].item() - expected))
    assert worst < 1e-4, worst
    return f"largest difference in mean log-prob {worst:.2e}"


def check_grad_cache_replay(folder: Path) -> str:
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.training.step import replayed_rng, rng_state

    embedder = Embedder.load(str(folder), dtype="float32", device="cuda").add_lora(r=4, alpha=8, dropout=0.3)
    with torch.no_grad():  # LoRA's B starts at zero, which would hide the dropout in front of A
        for name, p in embedder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    embedder.model.train()
    batch = embedder.collate(embedder.tokenize(TEXTS[:8]))
    with torch.no_grad():
        state = rng_state(DEVICE)
        cached = embedder.embed(batch)
        with replayed_rng(state, DEVICE):
            replayed = embedder.embed(batch)
        torch.set_rng_state(state[0])  # what the old code did: the CPU state alone
        cpu_only = embedder.embed(batch)
    same = (cached - replayed).abs().max().item()
    old = (cached - cpu_only).abs().max().item()
    assert same < 1e-6 and old > 1e-3, (same, old)
    return f"replay differs by {same:.1e}; replaying the CPU state alone differed by {old:.2e}"


def check_fp16_resume(folder: Path, work: Path) -> str:
    from safetensors.torch import load_file

    from ullme_cli.recipes import load_recipe
    from ullme_cli.training.trainer import finetune

    recipe = {
        "output_dir": str(work / "run"), "model": {"name": str(folder), "max_length": 64},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.1}, "data": {"train": str(REPO / "ullme_cli/resources/trecqa-train/train.jsonl")},
        "loss": {"strategy": "grl"},
        "train": {"steps": 10, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 1, "keep_checkpoints": 10,
                  "mixed_precision": "fp16", "grad_cache_chunk": 2, "learning_rate": 1e-2},
    }  # fmt: skip
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    finetune(load_recipe(str(work / "r.yaml")), show_progress=False)
    run = work / "run"
    scales = [json.loads((c / "trainer_state.json").read_text())["grad_scaler"]["scale"] for c in sorted((run / "checkpoints").glob("step-*"))]
    finished = load_file(run / "model" / "adapter" / "adapter_model.safetensors")
    for later in ("step-0000009", "step-0000010"):
        shutil.rmtree(run / "checkpoints" / later)
    shutil.rmtree(run / "model")
    finetune(load_recipe(str(work / "r.yaml")), resume=True, show_progress=False)
    again = load_file(run / "model" / "adapter" / "adapter_model.safetensors")
    difference = max((again[n].float() - t.float()).abs().max().item() for n, t in finished.items())
    moved = any(t.abs().sum() > 0 for n, t in finished.items() if "lora_B" in n)
    # CUDA's atomic adds make float sums vary in the last bits; a lost scale would skip whole steps.
    assert difference < 1e-4 and moved, (difference, moved)
    return f"scales per step {scales}; resumed weights within {difference:.1e}"


def check_fsdp(folder: Path, work: Path) -> str:
    """FSDP on CUDA (one process, NCCL): equal to the unsharded run in fp32; with bf16 gathered weights, CPU
    offload and gradient checkpointing it trains, and a resume from its DCP checkpoint is exact."""
    from safetensors.torch import load_file

    from ullme_cli.recipes import load_recipe
    from ullme_cli.training.curves import read_metrics
    from ullme_cli.training.trainer import finetune

    def run(name: str, steps: int = 4, **train) -> Path:
        recipe = {
            "output_dir": str(work / name), "model": {"name": str(folder), "max_length": 64},
            "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "data": {"train": str(REPO / "ullme_cli/resources/trecqa-train/train.jsonl")},
            "loss": {"strategy": "grl"},
            "train": {"steps": steps, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 2, "keep_checkpoints": 5, "learning_rate": 1e-3, **train},
        }  # fmt: skip
        (work / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        finetune(load_recipe(str(work / f"{name}.yaml")), show_progress=False)
        return work / name

    def losses(folder: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(folder) if "loss" in r]

    def adapter(folder: Path) -> dict:
        return load_file(folder / "model" / "adapter" / "adapter_model.safetensors")

    plain, sharded = run("plain"), run("sharded", distributed="fsdp")
    loss_gap = max(abs(a - b) for a, b in zip(losses(plain), losses(sharded)))
    weight_gap = max((adapter(plain)[n] - t).abs().max().item() for n, t in adapter(sharded).items())
    assert loss_gap < 1e-4 and weight_gap < 1e-4, (loss_gap, weight_gap)
    options = {"distributed": "fsdp", "fsdp_param_dtype": "bfloat16", "fsdp_cpu_offload": True, "gradient_checkpointing": True}
    offload = run("offload", steps=6, **options)
    finished = adapter(offload)
    shutil.rmtree(offload / "model")
    shutil.rmtree(offload / "checkpoints" / "step-0000006")
    finetune(load_recipe(str(work / "offload.yaml")), resume=True, show_progress=False)
    resumed_gap = max((adapter(offload)[n].float() - t.float()).abs().max().item() for n, t in finished.items())
    assert all(abs(x) < 1e3 for x in losses(offload)) and resumed_gap < 1e-4, (losses(offload), resumed_gap)
    return (f"fp32 FSDP vs unsharded: losses within {loss_gap:.1e}, weights within {weight_gap:.1e}; bf16 + CPU offload + "
            f"checkpointing: losses {[round(x, 3) for x in losses(offload)]}, resume from step 4 within {resumed_gap:.1e}")  # fmt: skip


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU here: these checks need one")
        return 2
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    work = Path(tempfile.mkdtemp(prefix="ullme-gpu-"))
    folder = save_tiny(work / "tiny", "llama", TEXTS)
    checks = [("attention switch on CUDA", check_switch), ("generation logits on CUDA", check_generation_logits),
              ("GradCache RNG replay on CUDA", lambda: check_grad_cache_replay(folder)),
              ("fp16 scaler and exact resume on CUDA", lambda: check_fp16_resume(folder, work)),
              ("FSDP on CUDA", lambda: check_fsdp(folder, work))]  # fmt: skip
    failures = 0
    for name, check in checks:
        try:
            print(f"PASS {name}: {check()}", flush=True)
        except Exception:  # noqa: BLE001 - report every check, then fail
            failures += 1
            print(f"FAIL {name}:\n{traceback.format_exc()}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
