"""Encode speed: ullme against sentence-transformers on the same weights, texts, pooling and max length,
and against the FLOP ceiling (2 · non-embedding params · tokens at the measured matmul peak).

Rows: ullme (bf16 where the CPU is fast at it, bidirectional: the product default), ullme causal (same
attention as sentence-transformers, to show the vectors agree), sentence-transformers at its defaults
(fp32), and sentence-transformers in bf16. LLM2Vec needs transformers 4.44 in a side environment; this
script does not build one and says so.

Usage: python benchmarks/encode.py [--texts ullme_cli/resources/demo/corpus.jsonl] [--max-length 128]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", default=str(root / "ullme_cli" / "resources" / "demo" / "corpus.jsonl"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer, models

    from ullme_cli.models.embedder import Embedder
    from ullme_cli.models.loading import resolve_model_source

    texts = [json.loads(line)["text"] for line in Path(args.texts).read_text().splitlines() if line.strip()]
    ours = Embedder.load(args.model, dtype="auto", max_length=args.max_length)
    compute = next(ours.model.parameters()).dtype
    tokens = sum(len(t.ids) for t in ours.tokenize(texts))
    params = sum(p.numel() for p in ours.model.parameters()) - ours.model.get_input_embeddings().weight.numel()
    if not ours.model.config.tie_word_embeddings:
        params -= ours.model.get_output_embeddings().weight.numel()
    ours.encode(texts[:8])  # warm-up
    vectors, seconds = timed(lambda: ours.encode(texts))
    rows = [("ullme (bidirectional)", compute, seconds, vectors)]
    causal = Embedder.load(args.model, dtype="auto", max_length=args.max_length, attention="causal")
    causal.encode(texts[:8])
    causal_vectors, seconds = timed(lambda: causal.encode(texts))
    rows.append(("ullme (causal)", compute, seconds, causal_vectors))

    source = resolve_model_source(args.model)
    for dtype in (torch.float32, compute):
        # A text-only modality config: otherwise sentence-transformers 6 wraps each text in the model's chat
        # template ("message" modality) and embeds other, longer token sequences than ours.
        transformer = models.Transformer(
            source, max_seq_length=args.max_length, model_kwargs={"dtype": dtype},
            modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
            module_output_name="token_embeddings",
        )  # fmt: skip
        if transformer.tokenizer.pad_token is None:
            transformer.tokenizer.pad_token = transformer.tokenizer.eos_token
        st = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(), "mean")], device="cpu")
        st.encode(texts[:8])
        st_vectors, seconds = timed(lambda: st.encode(texts, batch_size=32, normalize_embeddings=True))
        rows.append((f"sentence-transformers {str(dtype).replace('torch.', '')}", dtype, seconds, st_vectors))

    peaks = {d: matmul_peak(d) for d in {torch.float32, compute}}
    print(f"{len(texts)} texts, {tokens} tokens, max_length {args.max_length}, {params / 1e6:.1f}M non-embedding params, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("matmul peak: " + ", ".join(f"{str(d).replace('torch.', '')} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    print(f"{'encoder':<34}{'texts/s':>9}{'tokens/s':>10}{'vs ullme':>10}{'% of peak':>11}{'cos ullme':>11}{'cos causal':>12}")
    base = rows[0][2]
    for name, dtype, seconds, vecs in rows:
        flops = 2 * params * tokens / seconds
        cos = float(np.mean((vecs * vectors).sum(1)))
        cos_causal = float(np.mean((vecs * causal_vectors).sum(1)))
        print(f"{name:<34}{len(texts) / seconds:>9.1f}{tokens / seconds:>10.0f}{base / seconds:>9.2f}x"
              f"{100 * flops / peaks[dtype]:>10.1f}%{cos:>11.4f}{cos_causal:>12.4f}")  # fmt: skip
    print("LLM2Vec: skipped (pins transformers 4.44; no side environment is built by this script)")


if __name__ == "__main__":
    main()
