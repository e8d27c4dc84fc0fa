"""Encode speed: ullme against sentence-transformers on the same weights, texts, pooling and max length,
and against the FLOP ceiling (2 · non-embedding params · tokens at the measured matmul peak).

Rows: ullme (bf16 where the CPU is fast at it, bidirectional: the product default), ullme causal (same
attention as sentence-transformers, to show the vectors agree), sentence-transformers at its defaults
(fp32), sentence-transformers in bf16, sentence-transformers' ONNX Runtime backend in fp32 and with its own
dynamic int8 quantization (a side environment, `--build-onnx-venv`: benchmarks/.onnx-venv), its OpenVINO
backend in fp32 (`--build-openvino-venv`: benchmarks/.openvino-venv), and LLM2Vec in bf16. LLM2Vec pins transformers 4.44, so it runs in a
side environment (`--build-llm2vec-venv` makes one in benchmarks/.llm2vec-venv from the package registry);
without one the row is skipped with the reason.

The compile policy (ullme_cli/models/compile_policy.py) is asked what it would choose for a corpus of
`--large-job` texts (100,000) of this corpus's lengths, at the eager rate measured here. Where it chooses
to compile, the compiled encoder is a row ("ullme default, large job"), timed in its steady state, and its
one-time cost is printed on a line of its own: the first pass over the corpus in a fresh interpreter with an
empty inductor cache, then again in another fresh interpreter with that cache (what a second run pays).
`--compile` adds the compiled row whatever the policy chooses.
Each ullme row also shows its vectors' cosine to fp32 vectors of the same setup (mean and 1st percentile).
The last line is `speedup vs sentence-transformers fp32: X.XXx` for ullme's default. The matmul peak is
the fastest of 15 single timed 2048² matmuls; "% shapes" is against the rate of the model's own linear layers
at 1536 tokens, timed alone (`model_shape_peak`), which the 2048² figure sometimes falls below.

Usage: python benchmarks/encode.py [--texts ullme_cli/resources/demo/corpus.jsonl] [--max-length 128] [--limit N]
       [--repeats 3] [--build-llm2vec-venv] [--llm2vec-python PATH] [--int8-dynamic] [--build-onnx-venv]
       [--build-openvino-venv] [--compile] [--large-job 100000]
       python benchmarks/encode.py --first-pass CACHE_DIR   (internal: one compiled first pass, in JSON)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


DEMO_CORPUS = Path(__file__).resolve().parent.parent / "ullme_cli" / "resources" / "demo" / "corpus.jsonl"


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, texts, max length and text limit that the encode benchmarks share."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--texts", default=str(DEMO_CORPUS))
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--limit", type=int, default=0, help="only the first N texts (0: all)")


def read_texts(args: argparse.Namespace) -> list[str]:
    from ullme_cli.data import read_corpus

    return [record.text for record in read_corpus(args.texts)][: args.limit or None]


def call_seconds(fn, repeats: int = 15) -> list[float]:
    """The times of `repeats` single calls of `fn` after three warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, repeats: int = 15) -> float:
    """The median time of single calls (`call_seconds`). One timed loop of matmuls moved between 73 and 111
    GFLOP/s from run to run on the 2-core EPYC; the median of single ones is steadier."""
    return float(np.median(call_seconds(fn, repeats)))


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 15) -> float:
    """FLOP/s of the fastest of `repeats` single size² matmuls. A peak is the best the hardware gives: a stall
    of the shared host only slows a call down, and the median once read 201 GFLOP/s against 360-395 in the
    runs around it (2026-12-03, the EPYC with avx512_bf16), which doubled a step's share of the "peak"."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / min(call_seconds(lambda: a @ b, repeats))


def model_shape_peak(model, dtype: torch.dtype, tokens: int = 1536, repeats: int = 15) -> float:
    """FLOP/s of the matmuls one decoder layer runs on a batch of `tokens` tokens (the CPU token budget), each
    timed alone (`median_seconds`): the rate the hardware gives this model's own shapes, with none of the
    elementwise work. A 2048² matmul is not a ceiling for them on the EPYC: its 16 MB operands miss the cache
    that the model's smaller weights fit, and the model's encode ran above that "peak" in several runs."""
    layer = next(module for module in model.modules() if module.__class__.__name__.endswith("DecoderLayer"))
    shapes = [(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    flops = seconds = 0.0
    for fan_in, fan_out in shapes:
        x, w = torch.randn(tokens, fan_in, dtype=dtype), torch.randn(fan_out, fan_in, dtype=dtype)
        flops += 2 * tokens * fan_in * fan_out
        seconds += median_seconds(lambda: torch.nn.functional.linear(x, w), repeats)
    return flops / seconds


def int8_dynamic(embedder, skip=("down_proj", "lm_head")):
    """torch's dynamic int8 quantization of the Linear layers (weights int8, activations quantized per
    tensor at run time), without the layers that carry activation outliers. A lever measured, not used."""
    from torch.ao.quantization import quantize_dynamic

    names = {n for n, m in embedder.model.named_modules() if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip)}
    embedder.model = quantize_dynamic(embedder.model, names, dtype=torch.qint8)
    return embedder


def interleaved(encoders, repeats: int) -> tuple[list, list[float]]:
    """[(name, dtype, seconds, vectors)] and each encoder's first-run seconds. The first run is the warm-up (a
    compiled encoder compiles there) and gives the vectors; then `repeats` rounds run every encoder once in
    turn, and each keeps its fastest round. This 2-core machine's speed drifts by 20–30% over minutes; timing
    the encoders one after another put that drift into their ratios (ullme against sentence-transformers fp32
    moved between 1.03x and 1.31x from run to run)."""
    outputs, firsts = [], []
    for _, _, fn in encoders:
        start = time.perf_counter()
        outputs.append(fn())
        firsts.append(time.perf_counter() - start)
    best = [float("inf")] * len(encoders)
    for _ in range(repeats):
        for n, (_, _, fn) in enumerate(encoders):
            start = time.perf_counter()
            fn()
            best[n] = min(best[n], time.perf_counter() - start)
    return [(name, dtype, seconds, np.asarray(out)) for (name, dtype, _), seconds, out in zip(encoders, best, outputs)], firsts


LLM2VEC_VENV = Path(__file__).resolve().parent / ".llm2vec-venv"


def side_venv(folder: Path) -> list[str]:
    """A new virtual environment at `folder` with a current pip (ensurepip's pip 23 fails to resolve
    against today's registry metadata) and the CPU torch wheel, installed before any package asks for a
    torch that would pull the CUDA build; returns its pip install command."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    return pip


def build_llm2vec_venv() -> None:
    pip = side_venv(LLM2VEC_VENV)
    subprocess.run(pip + ["llm2vec==0.2.3", "transformers==4.44.2"], check=True)


def legacy_model_folder(source: Path, into: Path) -> Path:
    """The model folder in a form transformers 4.44 reads: same weights (linked), tokenizer files rewritten.

    transformers 5 saves `tokenizer_class: TokenizersBackend` and BPE merges as pairs; tokenizers < 0.20
    knows neither. The vocabulary and merges are the same, so the tokens are too.
    """
    into.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name not in ("tokenizer.json", "tokenizer_config.json"):
            os.symlink(item, into / item.name)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"].get("merges", [])]
    tokenizer["model"].pop("ignore_merges", None)
    (into / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
    (into / "tokenizer_config.json").write_text(json.dumps(config))
    return into


def llm2vec_row(python: Path, source: Path, texts: list[str], max_length: int, dtype: torch.dtype, repeats: int):
    """(name, seconds, vectors) from LLM2Vec in its side environment, or (reason, None, None)."""
    if not python.exists():
        return f"skipped: no side environment at {python} (pass --build-llm2vec-venv to make one)", None, None
    with tempfile.TemporaryDirectory() as tmp:
        folder = legacy_model_folder(source, Path(tmp) / "model")
        job = {"model": str(folder), "texts": texts, "repeats": repeats, "max_length": max_length, "dtype": str(dtype).replace("torch.", ""), "out": f"{tmp}/v.npy"}
        script = Path(__file__).resolve().parent / "llm2vec_encode.py"
        run = subprocess.run([str(python), str(script)], input=json.dumps(job), capture_output=True, text=True)
        if run.returncode != 0:
            return f"skipped: LLM2Vec failed ({run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode})", None, None
        info = json.loads(run.stdout.strip().splitlines()[-1])
        return f"LLM2Vec {info['llm2vec']} (tf {info['transformers']}) {job['dtype']}", info["seconds"], np.load(job["out"])


ONNX_VENV = Path(__file__).resolve().parent / ".onnx-venv"
OPENVINO_VENV = Path(__file__).resolve().parent / ".openvino-venv"


def build_side_backend_venv(backend: str) -> None:
    pip = side_venv(ONNX_VENV if backend == "onnx" else OPENVINO_VENV)
    subprocess.run(pip + [f"sentence-transformers[{backend}]"], check=True)


def side_backend_rows(backend: str, python: Path, source: Path, texts: list[str], max_length: int, repeats: int, quantization: str):
    """[(name, seconds, vectors, reference)] from sentence-transformers' ONNX Runtime backend (fp32, and its
    dynamic int8) or OpenVINO backend (fp32) in its side environment, with the same route's torch fp32
    vectors there (their accuracy reference), and the reason when rows are missing."""
    if not python.exists():
        return [], f"skipped: no side environment at {python} (pass --build-{backend}-venv to make one)"
    with tempfile.TemporaryDirectory() as tmp:
        model = legacy_model_folder(source, Path(tmp) / "model")  # the side environment has transformers 4.x
        job = {"backend": backend, "model": str(model), "texts": texts, "max_length": max_length, "repeats": repeats,
               "quantization": quantization, "out": f"{tmp}/v"}  # fmt: skip
        run = subprocess.run([str(python), str(Path(__file__).resolve().parent / "st_backend_encode.py")], input=json.dumps(job), capture_output=True, text=True)
        rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        reference = next((np.load(r["reference"]) for r in rows if "reference" in r), None)
        found = [(r["name"], r["seconds"], np.load(r["vectors"]), reference) for r in rows if "name" in r]
        reason = None
        if run.returncode != 0:
            reason = f"{backend} rows stopped: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}"
        return found, reason


def causal_fp32(args, texts: list[str]) -> np.ndarray:
    from ullme_cli.models.embedder import Embedder

    if not hasattr(causal_fp32, "vectors"):
        causal_fp32.vectors = Embedder.load(args.model, dtype="float32", max_length=args.max_length, attention="causal").encode(texts)
    return causal_fp32.vectors


def first_pass(args) -> None:
    """One compiled encoder's first pass over the corpus in this fresh interpreter, and a second pass: JSON."""
    from ullme_cli.models.embedder import Embedder

    texts = read_texts(args)
    embedder = Embedder.load(args.model, dtype="auto", max_length=args.max_length, compile=True)
    start = time.perf_counter()
    embedder.encode(texts)
    first = time.perf_counter() - start
    start = time.perf_counter()
    embedder.encode(texts)
    print(json.dumps({"first": first, "second": time.perf_counter() - start}))


def compile_cost(args) -> tuple[float, float, float]:
    """(cold first pass, warm-cache first pass, steady pass) seconds, each first pass in a fresh interpreter;
    the cold one with an empty inductor cache, the warm one with the cache the cold one filled."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        command = [sys.executable, __file__, "--first-pass", cache, "--model", args.model, "--texts", args.texts,
                   "--max-length", str(args.max_length), "--limit", str(args.limit)]  # fmt: skip
        runs = []
        for _ in range(2):
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs[0]["first"], runs[1]["first"], min(r["second"] for r in runs)


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser()
    add_corpus_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="time each encoder this many times; report the fastest")
    parser.add_argument("--llm2vec-python", default=str(LLM2VEC_VENV / "bin" / "python"))
    parser.add_argument("--build-llm2vec-venv", action="store_true", help="create benchmarks/.llm2vec-venv first")
    parser.add_argument("--int8-dynamic", action="store_true", help="also time torch's dynamic int8 quantization, plain and after SmoothQuant (levers, not the default)")
    parser.add_argument("--compile", action="store_true", help="also time ullme with --compile (torch.compile, dynamic shapes)")
    parser.add_argument("--large-job", type=int, default=100_000, help="the corpus size whose default (the compile policy's choice) is timed")
    parser.add_argument("--first-pass", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--ullme-onnx", action="store_true", help="also time `ullme export --format onnx` folders (float32 and --quantize int8) in ONNX Runtime, beside ullme's torch float32")
    parser.add_argument("--onnx-python", default=str(ONNX_VENV / "bin" / "python"))
    parser.add_argument("--build-onnx-venv", action="store_true", help="create benchmarks/.onnx-venv (sentence-transformers[onnx]) first")
    parser.add_argument("--onnx-quantization", default="avx2", help="export_dynamic_quantized_onnx_model's config: avx2, avx512, avx512_vnni, arm64")
    parser.add_argument("--openvino-python", default=str(OPENVINO_VENV / "bin" / "python"))
    parser.add_argument("--build-openvino-venv", action="store_true", help="create benchmarks/.openvino-venv (sentence-transformers[openvino]) first")
    args = parser.parse_args()
    if args.first_pass:
        return first_pass(args)
    if args.build_llm2vec_venv and not LLM2VEC_VENV.exists():
        build_llm2vec_venv()
    if args.build_onnx_venv and not ONNX_VENV.exists():
        build_side_backend_venv("onnx")
    if args.build_openvino_venv and not OPENVINO_VENV.exists():
        build_side_backend_venv("openvino")
    from sentence_transformers import SentenceTransformer, models

    from ullme_cli.data import read_training_examples
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.models.loading import resolve_model_source
    from ullme_cli.models.onnx_export import smooth_for_int8

    texts = read_texts(args)
    ours = Embedder.load(args.model, dtype="auto", max_length=args.max_length)
    compute = next(ours.model.parameters()).dtype
    tokens = sum(len(t.ids) for t in ours.tokenize(texts))
    params = sum(p.numel() for p in ours.model.parameters()) - ours.model.get_input_embeddings().weight.numel()
    if not ours.model.config.tie_word_embeddings:
        params -= ours.model.get_output_embeddings().weight.numel()
    # In-process encoders: (name, dtype, encode function). They are timed in interleaved rounds below.
    encoders = [("ullme (bidirectional)", compute, lambda: ours.encode(texts))]
    causal = Embedder.load(args.model, dtype="auto", max_length=args.max_length, attention="causal")
    encoders.append(("ullme (causal)", compute, lambda: causal.encode(texts)))
    # The policy's choice for a large job of these texts, from the eager rate of one pass measured here.
    policy = ours.compile_policy
    start = time.perf_counter()
    Embedder.load(args.model, dtype="auto", max_length=args.max_length, compile=False).encode(texts)
    eager_rate = len(texts) / (time.perf_counter() - start)
    large_compiles, expected, source = policy.verdict(args.large_job / eager_rate)
    policy_line = (f"compile policy for {args.large_job} texts (about {args.large_job / eager_rate:.0f} s eager): "
                   f"{'compile' if large_compiles else 'eager'}" + (f" ({policy.reason_not})" if policy.reason_not else
                                                                     f"; compiling expected to take {expected:.0f} s ({source})"))  # fmt: skip
    if args.compile or large_compiles:
        cold, warm, steady = compile_cost(args)
        compiled = Embedder.load(args.model, dtype="auto", max_length=args.max_length, compile=True)
        encoders.append(("ullme --compile", compute, lambda: compiled.encode(texts)))
    if args.int8_dynamic:
        quantized = int8_dynamic(Embedder.load(args.model, dtype="float32", max_length=args.max_length))
        encoders.append(("ullme int8 dynamic (not the default)", torch.float32, lambda: quantized.encode(texts)))
        # Calibrated on TREC QA train texts, none of which is in the timed corpus.
        train = root / "ullme_cli" / "resources" / "trecqa-train" / "train.jsonl"
        examples, _ = read_training_examples(str(train))
        calibration = [text for example in examples[:64] for text in (example.query, example.positives[0])]
        smoothed = Embedder.load(args.model, dtype="float32", max_length=args.max_length)
        smooth_for_int8(smoothed, calibration)  # the fold `ullme export --format onnx --quantize int8` uses
        smoothed = int8_dynamic(smoothed)
        encoders.append(("ullme int8 SmoothQuant (not the default)", torch.float32, lambda: smoothed.encode(texts)))

    if args.ullme_onnx:  # the real export and backend: `ullme export --format onnx [--quantize int8]`, then `--backend onnx`
        from ullme_cli.models.onnx_export import export_onnx

        if compute != torch.float32:
            torch32 = Embedder.load(args.model, dtype="float32", max_length=args.max_length, compile=False)
            encoders.append(("ullme float32 (torch)", torch.float32, lambda: torch32.encode(texts)))
        exported = Path(tempfile.mkdtemp(prefix="ullme-onnx-"))
        for quantize in (None, "int8"):
            export_onnx(args.model, str(exported / (quantize or "float32")), quantize)
            onnx_embedder = Embedder.load(str(exported / (quantize or "float32")), max_length=args.max_length, backend="onnx")
            encoders.append((f"ullme ONNX {quantize or 'float32'}", torch.float32, lambda e=onnx_embedder: e.encode(texts)))

    source = resolve_model_source(args.model)
    for dtype in dict.fromkeys((torch.float32, compute)):  # one row when the compute dtype is fp32
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
        encoders.append((f"sentence-transformers {str(dtype).replace('torch.', '')}", dtype,
                         lambda st=st: st.encode(texts, batch_size=32, normalize_embeddings=True)))  # fmt: skip
    rows, _ = interleaved(encoders, args.repeats)
    vectors, causal_vectors = rows[0][3], rows[1][3]
    fp32 = vectors if compute == torch.float32 else Embedder.load(args.model, dtype="float32", max_length=args.max_length).encode(texts)
    side_notes, side_references = {}, {}
    for backend, python in (("onnx", args.onnx_python), ("openvino", args.openvino_python)):
        found, side_notes[backend] = side_backend_rows(backend, Path(python), Path(source), texts, args.max_length, args.repeats, args.onnx_quantization)
        rows += [(name, torch.float32, seconds, vecs) for name, seconds, vecs, _ in found]
        side_references.update({name: reference for name, _, _, reference in found})

    name, seconds, l2v_vectors = llm2vec_row(Path(args.llm2vec_python), Path(source), texts, args.max_length, compute, args.repeats)
    llm2vec_note = name if l2v_vectors is None else None
    if l2v_vectors is not None:
        rows.append((name, compute, seconds, l2v_vectors))

    peaks = {d: matmul_peak(d) for d in {torch.float32, compute}}
    shape_peaks = {d: model_shape_peak(ours.model, d) for d in peaks}
    print(f"{len(texts)} texts, {tokens} tokens, max_length {args.max_length}, {params / 1e6:.1f}M non-embedding params, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("matmul peak: " + ", ".join(f"{str(d).replace('torch.', '')} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items())
          + "; the model's own linear shapes at 1536 tokens: " + ", ".join(f"{str(d).replace('torch.', '')} {p / 1e9:.0f} GFLOP/s" for d, p in shape_peaks.items()))
    print(f"{'encoder':<40}{'texts/s':>9}{'tokens/s':>10}{'vs ullme':>10}{'% of peak':>11}{'% shapes':>10}{'cos ullme':>11}{'cos causal':>12}"
          f"{'fp32 mean':>11}{'fp32 p1':>9}")  # fmt: skip
    base = rows[0][2]
    for name, dtype, seconds, vecs in rows:
        flops = 2 * params * tokens / seconds
        cos = float(np.mean((vecs * vectors).sum(1)))
        cos_causal = float(np.mean((vecs * causal_vectors).sum(1)))
        # Against fp32 vectors of the same setup: ullme rows against ullme fp32, the ONNX and OpenVINO rows
        # against sentence-transformers on torch fp32 in their own environment; LLM2Vec has none.
        reference = causal_fp32(args, texts) if "causal" in name else fp32 if name.startswith("ullme") else side_references.get(name)
        to_fp32 = (vecs * reference).sum(1) if reference is not None else None
        accuracy = f"{to_fp32.mean():>11.4f}{np.percentile(to_fp32, 1):>9.4f}" if to_fp32 is not None else ""
        print(f"{name:<40}{len(texts) / seconds:>9.1f}{tokens / seconds:>10.0f}{base / seconds:>9.2f}x"
              f"{100 * flops / peaks[dtype]:>10.1f}%{100 * flops / shape_peaks[dtype]:>9.1f}%{cos:>11.4f}{cos_causal:>12.4f}{accuracy}")  # fmt: skip
    st_fp32 = next(seconds for name, _, seconds, _ in rows if name == "sentence-transformers float32")
    fastest_st = min((seconds, name) for name, _, seconds, _ in rows if name.startswith("sentence-transformers"))
    print(f"ullme eager vs the fastest sentence-transformers route ({fastest_st[1]}): {fastest_st[0] / base:.2f}x")
    print(policy_line)
    large = next(seconds for name, _, seconds, _ in rows if name == "ullme --compile") if large_compiles else base
    if args.compile or large_compiles:
        print(f"one-time compile cost: first pass {cold:.1f} s with an empty inductor cache, {warm:.1f} s with a warm one, "
              f"against {steady:.1f} s for a compiled pass (fresh interpreters)")  # fmt: skip
    for backend, note in side_notes.items():
        if note:
            print(f"{backend}: {note}")
    print(f"speedup vs sentence-transformers fp32: {st_fp32 / base:.2f}x")
    if args.ullme_onnx:
        seconds = {name: secs for name, _, secs, _ in rows}
        torch32 = seconds.get("ullme float32 (torch)", base)
        print(f"ullme ONNX int8 vs ullme torch float32: {torch32 / seconds['ullme ONNX int8']:.2f}x; ONNX float32 vs torch float32: "
              f"{torch32 / seconds['ullme ONNX float32']:.2f}x; ONNX int8 vs ullme's default ({str(compute).replace('torch.', '')}): {base / seconds['ullme ONNX int8']:.2f}x")  # fmt: skip
    print(f"large-job default ({'compiled' if large_compiles else 'eager'}): {len(texts) / large:.1f} texts/s, "
          f"{100 * 2 * params * tokens / large / shape_peaks[compute]:.1f}% of the model-shape rate")  # fmt: skip
    print(f"speedup vs the fastest sentence-transformers route: {fastest_st[0] / large:.2f}x")
    if llm2vec_note:
        print(f"LLM2Vec: {llm2vec_note}")


if __name__ == "__main__":
    main()
