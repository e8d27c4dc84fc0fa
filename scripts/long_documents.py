"""Long-document retrieval on real sentences: truncation against chunk max-sim and chunk mean (issue 41 §4).

The task is built from the bundled TREC QA *test* split (ullme_cli/resources/trecqa-test), which no recipe
trains or tunes on. For each question with an answer, one long document: the question's first answer
sentence placed at a random depth among sentences that answer no question (the other questions' wrong
candidates, shuffled), filled until the document holds at least 4 x max_length model tokens. The question's
own document is its only relevant one; the other questions' documents are the distractors. Seeded.

Each setting runs the real commands in their own processes: `ullme encode` (plain, or --chunk-tokens N with
--chunk-pool none or mean), `ullme index`, `ullme search --format trec`, and the run is scored by the code
of `ullme evaluate --run`. The answer's depth is set against the hit rate at 10, so what truncation loses is
visible.

    python scripts/long_documents.py --out /tmp/long-docs          # default model, max_length 512, sizes 128 256
    python scripts/long_documents.py --build-only --out DIR         # just the task folder (BEIR layout + depths.jsonl)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRECQA = REPO / "ullme_cli" / "resources" / "trecqa-test"
QUERY_INSTRUCTION = "Given a question, retrieve sentences that answer the question"
DEPTH_BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0001))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_task(out: Path, count_tokens, max_length: int, seed: int = 0, factor: int = 4) -> dict:
    """Write the task folder (corpus.jsonl, queries.jsonl, qrels/test.tsv, depths.jsonl); return a summary."""
    corpus = {row["_id"]: row["text"] for row in read_jsonl(TRECQA / "corpus.jsonl")}
    queries = {row["_id"]: row["text"] for row in read_jsonl(TRECQA / "queries.jsonl")}
    relevant: dict[str, list[str]] = {}
    for line in (TRECQA / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, doc, score = line.split("\t")
        if int(score) > 0:
            relevant.setdefault(qid, []).append(doc)
    answers = {d for docs in relevant.values() for d in docs}
    filler = sorted(d for d in corpus if d not in answers)  # sentences that answer no question
    rng = random.Random(seed)
    need = factor * max_length + 8  # a margin: the answer placed elsewhere may join with one token fewer
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    rows, qrels, depths, lengths = [], [], [], []
    for qid in sorted(relevant, key=lambda q: int(q.lstrip("q")) if q.lstrip("q").isdigit() else q):
        answer = corpus[sorted(relevant[qid], key=lambda d: int(d.lstrip("d")))[0]]
        order = filler[:]
        rng.shuffle(order)
        sentences, tokens = [], count_tokens(answer)
        for doc in order:
            if tokens >= need and count_tokens(" ".join([answer, *sentences])) >= need:  # joined text tokenizes shorter
                break
            sentences.append(corpus[doc])
            tokens += count_tokens(corpus[doc])
        depth = rng.random()
        at = round(depth * len(sentences))
        text = " ".join(sentences[:at] + [answer] + sentences[at:])
        start = len(" ".join(sentences[:at])) + (1 if at else 0)
        assert text[start : start + len(answer)] == answer
        doc_id = f"long-{qid}"
        rows.append({"_id": doc_id, "text": text})
        qrels.append(f"{qid}\t{doc_id}\t1")
        depths.append({"qid": qid, "doc": doc_id, "depth": start / len(text), "answer_start": start, "answer_chars": len(answer)})
        lengths.append(count_tokens(text))
    (out / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": queries[q]}) + "\n" for q in sorted(relevant)), encoding="utf-8")
    (out / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    (out / "depths.jsonl").write_text("".join(json.dumps(d) + "\n" for d in depths))
    return {"documents": len(rows), "min_tokens": min(lengths), "mean_tokens": sum(lengths) / len(lengths), "max_length": max_length}


def run(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ullme_cli", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"ullme {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def evaluate_setting(task: Path, work: Path, name: str, model: str, max_length: int, encode_flags: list[str], search_flags: list[str]) -> dict:
    from ullme_cli.evaluation.runner import score_run

    # The query instruction `ullme evaluate` gives TREC QA (resources/instructions.yaml), as the results' other
    # tables use; recorded with the passages, so the index's queries agree.
    common = ["-m", model, "--max-length", str(max_length), "--query-instruction", QUERY_INSTRUCTION, "-q"]
    started = time.perf_counter()
    encoded = run("encode", task / "corpus.jsonl", "-o", work / f"{name}.npy", *common, *encode_flags, "--overwrite")
    seconds = time.perf_counter() - started
    run("index", work / f"{name}.npy", "-o", work / f"{name}-index", "-q", "--overwrite")
    run("encode", task / "queries.jsonl", "-o", work / "queries.npy", "--kind", "query", *common, "--overwrite")
    searched = run("search", work / f"{name}-index", "--embeddings", work / "queries.npy", "-k", "10", "--format", "trec", *search_flags, "-q")
    (work / f"{name}.trec").write_text(searched.stdout)
    scores = score_run(str(work / f"{name}.trec"), str(task / "qrels" / "test.tsv"))
    ranks = {}
    for line in searched.stdout.splitlines():
        qid, _, doc, rank, _, _ = line.split()
        if doc == f"long-{qid}":
            ranks[qid] = int(rank)
    depths = read_jsonl(task / "depths.jsonl")
    by_depth = []
    for low, high in DEPTH_BUCKETS:
        inside = [d["qid"] for d in depths if low <= d["depth"] < high]
        by_depth.append({"depth": f"{low:.0%}-{min(high, 1):.0%}", "queries": len(inside), "hit@10": sum(q in ranks for q in inside) / max(len(inside), 1)})
    return {"setting": name, "ndcg@10": scores["ndcg_at_10"], "hit@10": len(ranks) / len(depths), "by_depth": by_depth,
            "encode_seconds": round(seconds, 1), "encode_log": encoded.stderr.strip().splitlines()[-2:]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--again", action="store_true", help="rerun settings whose result (OUT/NAME.json) exists already")
    args = parser.parse_args()

    import ullme_cli as ullme

    tokenizer = ullme.load(args.model, dtype="float32").tokenizer
    task = args.out / "task"
    summary = build_task(task, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]), args.max_length, args.seed)
    print(json.dumps(summary), flush=True)
    if args.build_only:
        return
    settings = [("truncate", [], [])]
    for size in args.sizes:
        chunking = ["--chunk-tokens", str(size), "--chunk-overlap", str(args.overlap)]
        settings += [(f"chunk{size}-maxsim", chunking, ["--aggregate", "max"]), (f"chunk{size}-mean", [*chunking, "--chunk-pool", "mean"], [])]
    results = []
    for name, encode_flags, search_flags in settings:
        saved = args.out / f"{name}.json"  # each setting's result, so an interrupted run goes on where it stopped
        if saved.exists() and not args.again:
            results.append(json.loads(saved.read_text()))
            continue
        results.append(evaluate_setting(task, args.out, name, args.model, args.max_length, encode_flags, search_flags))
        saved.write_text(json.dumps(results[-1]) + "\n")
        print(json.dumps(results[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps({"task": summary, "results": results}, indent=2) + "\n")
    print("\n| setting | nDCG@10 | hit@10 | " + " | ".join(f"hit@10, answer at {b['depth']}" for b in results[0]["by_depth"]) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in results[0]["by_depth"]) + " |")
    for r in results:
        print(f"| {r['setting']} | {r['ndcg@10']:.3f} | {r['hit@10']:.3f} | " + " | ".join(f"{b['hit@10']:.2f} ({b['queries']})" for b in r["by_depth"]) + " |")


if __name__ == "__main__":
    main()
