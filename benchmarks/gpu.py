"""GPU speed at real model shapes (issue 29 §3): encode and training steps of random-weight models built
from the public configs of Qwen2-1.5B and Mistral-7B (weights do not change speed, and real ones cannot be
downloaded on the GPU machine), in bf16, through ullme's own code paths.

Rows, per shape:
- the bf16 matmul peak, measured in the same run (median of single 8192² matmuls; 2048² on CPU);
- encode: ullme (`Embedder.encode_batch` over `plan_batches` at the GPU token budget, bidirectional) in
  tokens/s and MFU = 2 · non-embedding parameters · real tokens / s / peak (attention FLOPs left out, as
  usual for MFU; padding counts as waste);
- the sentence-transformers anchor (`SentenceTransformer` on the same weights saved to a temporary folder,
  bf16, batch 128, mean pooling): only where the shape's bf16 weights fit `--st-max-gb` of disk time,
  i.e. the 1.5B shape by default (saving and reloading 14 GB for the 7B shape would take minutes of the
  15-minute budget); the 7B row says so;
- a LoRA (r16, all-linear) contrastive step and a GRL step (contrastive + DPO + KL), each with and without
  gradient checkpointing: step time, tokens/s, MFU with model FLOPs = 4 · N · tokens (forward 2N, backward
  through frozen weights 2N; recomputation not counted), and peak memory.
- padding-free batches (§2, `Embedder.packing`): encode, and the two steps without checkpointing, with each
  batch's texts packed end to end in rows (a block-diagonal 4-D mask through SDPA). Where the GPU's SDPA
  takes no flash kernel with an arbitrary mask, the attention part may run slower while the linear layers
  skip the padding: the rows measure the sum.

Texts are random words of a made-up vocabulary, tokenized by a word-level tokenizer built in memory, with
lengths spread over 16-512 tokens: every step runs ullme's real tokenize → collate → embed path.

Usage: python benchmarks/gpu.py [--shapes qwen2-1.5b,mistral-7b] [--texts 2048] [--batch 32] [--max-seconds 780]
       python benchmarks/gpu.py --shapes tiny --device cpu --texts 64 --batch 4    (a check of the script on CPU)
Every phase is bounded: the script stops starting new phases after --max-seconds and says what it skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import tempfile
import time

import numpy as np
import torch

SHAPES = {  # public config.json values; vocab sizes matter for the embedding and LM-head memory only
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=None),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024),
}  # fmt: skip
VOCAB_WORDS = 400


def word_tokenizer():
    """A word-level tokenizer over w0..wN plus specials, built in memory (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(VOCAB_WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_texts(count: int, low: int, high: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{w}" for w in rng.integers(0, VOCAB_WORDS, rng.integers(low, high))) for _ in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the median single n² matmul, n = 8192 on a GPU (2048 on CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def build(shape: str, device: torch.device, dtype: torch.dtype):
    """An ullme Embedder over a random-weight model of `shape`, made directly on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ullme_cli.model_setup import ModelSetup
    from ullme_cli.models.embedder import Embedder

    values = dict(SHAPES[shape])
    config = AutoConfig.for_model(values.pop("model_type"), **values, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    setup = ModelSetup(model=f"random-{shape}", pooling="mean", max_length=512, generation_instruction="Answer: ")
    return Embedder(model, word_tokenizer(), setup, device)


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)


def encode_rate(embedder, texts: list[str]) -> dict:
    from ullme_cli.models.embedder import plan_batches

    items = embedder.tokenize(texts)
    batches = plan_batches([len(t.ids) for t in items], embedder.default_token_budget)
    embedder.encode_batch([items[i] for i in batches[0]])  # warm-up: kernels, allocator
    sync(embedder.device)
    start = time.perf_counter()
    for batch in batches:
        embedder.encode_batch([items[i] for i in batch])
    sync(embedder.device)
    seconds = time.perf_counter() - start
    return {"tokens": sum(len(t.ids) for t in items), "seconds": seconds}


def st_rate(embedder, texts: list[str], batch_size: int = 128) -> dict:
    """sentence-transformers on the same weights: saved to a temporary folder, loaded in bf16, mean pooling."""
    from sentence_transformers import SentenceTransformer, models

    with tempfile.TemporaryDirectory(prefix="ullme-gpu-bench-") as folder:
        embedder.model.save_pretrained(folder, safe_serialization=True)
        embedder.tokenizer.save_pretrained(folder)
        dtype = next(embedder.model.parameters()).dtype
        transformer = models.Transformer(folder, max_seq_length=512, model_args={"dtype": dtype})
        dimension = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
        st = SentenceTransformer(modules=[transformer, models.Pooling(dimension(), "mean")], device=str(embedder.device))
        st.encode(texts[:batch_size], batch_size=batch_size)
        sync(embedder.device)
        start = time.perf_counter()
        st.encode(texts, batch_size=batch_size)
        sync(embedder.device)
        seconds = time.perf_counter() - start
        del st, transformer
    return {"seconds": seconds}


def step_rate(embedder, texts: list[str], weights: dict, batch: int, checkpointing: bool, steps: int = 3, packing: bool = False) -> dict:
    from ullme_cli.data import TrainingExample
    from ullme_cli.recipes import LossSection
    from ullme_cli.training.step import StepLoss

    device = embedder.device
    if checkpointing:
        embedder.enable_gradient_checkpointing()
    embedder.packing = packing
    embedder.model.train()
    rows = [TrainingExample(texts[i], [texts[i + 1]], [texts[i + 2]]) for i in range(0, 3 * batch, 3)]
    loss = StepLoss(embedder, LossSection(weights=weights), negatives_per_query=1)
    tokens = sum(len(t.ids) for ex in rows for t in embedder.tokenize([ex.query, *ex.positives, *ex.negatives]))
    if "dpo" in weights or "kl" in weights:  # the generation passes read prompt + passage again, causally
        from ullme_cli.models import generation

        tokens += sum(len(p) + len(c) for p, c in generation.generation_pairs(embedder, [generation.generation_prompt(embedder, ex.query) for ex in rows] * 2,
                                                                            [t for ex in rows for t in (*ex.positives, *ex.negatives)]))  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    times = []
    for i in range(steps + 1):
        embedder.model.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        with autocast:
            loss.backward(rows, torch.Generator().manual_seed(i))
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if checkpointing:
        model = embedder.model.get_base_model() if hasattr(embedder.model, "get_base_model") else embedder.model
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    embedder.model.eval()
    embedder.packing = False
    return {"seconds": statistics.median(times), "tokens": tokens, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="qwen2-1.5b,mistral-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32, help="rows per training step")
    parser.add_argument("--st-max-gb", type=float, default=4.0, help="run the sentence-transformers anchor only for shapes whose bf16 weights are at most this large")
    parser.add_argument("--max-seconds", type=float, default=780)
    args = parser.parse_args()
    started = time.monotonic()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; compute dtype {dtype}")
    peak = matmul_peak(device, dtype)
    print(f"matmul peak ({dtype}): {peak / 1e12:.1f} TFLOP/s")
    texts = random_texts(args.texts, 16, 512)
    results = {}
    for shape in args.shapes.split(","):
        if time.monotonic() - started > args.max_seconds:
            print(f"{shape}: skipped, past --max-seconds")
            continue
        embedder = build(shape, device, dtype)
        n = non_embedding_parameters(embedder.model)
        row = results[shape] = {"non_embedding_parameters": n}
        encoded = encode_rate(embedder, texts)
        rate = encoded["tokens"] / encoded["seconds"]
        row["encode"] = {"tokens_per_s": rate, "mfu": 2 * n * rate / peak}
        print(f"\n{shape}: {n / 1e9:.2f} B non-embedding parameters")
        print(f"  encode ullme: {rate:,.0f} tokens/s, {len(texts) / encoded['seconds']:.1f} texts/s, MFU {100 * row['encode']['mfu']:.1f}%")
        embedder.packing = True
        packed = encode_rate(embedder, texts)
        embedder.packing = False
        row["encode+packing"] = {"tokens_per_s": packed["tokens"] / packed["seconds"], "mfu": 2 * n * packed["tokens"] / packed["seconds"] / peak}
        print(f"  encode ullme, padding-free: {row['encode+packing']['tokens_per_s']:,.0f} tokens/s, MFU {100 * row['encode+packing']['mfu']:.1f}%, "
              f"{encoded['seconds'] / packed['seconds']:.2f}x the padded encode")  # fmt: skip
        weights_gb = sum(p.numel() for p in embedder.model.parameters()) * 2 / 1e9
        if weights_gb <= args.st_max_gb:
            st = st_rate(embedder, texts)
            row["encode"]["vs_st_bf16"] = st["seconds"] / encoded["seconds"]
            print(f"  encode sentence-transformers {str(dtype).replace('torch.', '')} (batch 128): {encoded['tokens'] / st['seconds']:,.0f} tokens/s; "
                  f"ullme is {row['encode']['vs_st_bf16']:.2f}x")  # fmt: skip
        else:
            print(f"  sentence-transformers anchor: not run ({weights_gb:.1f} GB of bf16 weights to save and reload; --st-max-gb {args.st_max_gb:g})")
        embedder.add_lora(r=16, alpha=32, dropout=0.0)
        for label, weights in (("contrastive", {"contrastive": 1.0}), ("grl", {"contrastive": 1.0, "dpo": 0.5, "kl": 1.0})):
            for checkpointing, packing in ((False, False), (True, False), (False, True)):
                variant = "".join(("+checkpointing" if checkpointing else "", "+packing" if packing else ""))
                words = "".join((", gradient checkpointing" if checkpointing else "", ", padding-free" if packing else ""))
                if time.monotonic() - started > args.max_seconds:
                    print(f"  {label} step{words}: skipped, past --max-seconds")
                    continue
                try:
                    measured = step_rate(embedder, texts, weights, args.batch, checkpointing, packing=packing)
                except torch.OutOfMemoryError:
                    print(f"  {label} step, batch {args.batch}{words}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                step_tokens = measured["tokens"] / measured["seconds"]
                mfu = 4 * n * step_tokens / peak
                row[f"{label}{variant}"] = {**measured, "mfu": mfu}
                print(f"  LoRA {label} step, batch {args.batch}{words}: {measured['seconds']:.3f} s, "
                      f"{step_tokens:,.0f} tokens/s, MFU {100 * mfu:.1f}% (4N per token), peak {measured['peak_gib']:.1f} GiB")  # fmt: skip
        del embedder
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\nresults: " + json.dumps(results, default=float))
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
