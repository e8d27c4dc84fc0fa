"""Rebuild the data bundled in ullme_cli/resources from ../shared/data/trecqa (TREC QA, Wang et al. 2007).

- resources/trecqa-test/: the whole test split in BEIR layout. Each question is a query; every candidate
  sentence of every question is in the corpus; label 1 marks a relevant sentence.
- resources/demo/corpus.jsonl: the candidate sentences of the first 25 test questions, for the README demo.

Usage: python scripts/build_bundled_data.py [--source ../shared/data/trecqa]
"""

import argparse
import csv
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "ullme_cli" / "resources"
SOURCE_NOTE = """# Source

TREC answer-sentence selection data (Wang, Smith and Mitamura, 2007), in the cleaned form of Yao et al.
(2013), as distributed in the public repository brmson/dataset-sts (`data/anssel/wang`). Built by
`scripts/build_bundled_data.py` from the `{split}` split: each question becomes a query, every candidate
sentence becomes a corpus passage, and label 1 marks a relevant passage. For research use, under the terms
of the original TREC QA data.
"""


def read_split(path: Path):
    questions: dict[str, list[tuple[str, int]]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            questions.setdefault(row["qtext"].strip(), []).append((row["atext"].strip(), int(row["label"])))
    return questions


def write_beir(questions, folder: Path, split: str) -> None:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    passage_ids: dict[str, str] = {}
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as corpus, \
         (folder / "queries.jsonl").open("w", encoding="utf-8") as queries, \
         (folder / "qrels" / "test.tsv").open("w", encoding="utf-8") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for qn, (question, candidates) in enumerate(questions.items()):
            qid = f"q{qn}"
            queries.write(json.dumps({"_id": qid, "text": question}) + "\n")
            for text, label in candidates:
                if text not in passage_ids:
                    passage_ids[text] = f"d{len(passage_ids)}"
                    corpus.write(json.dumps({"_id": passage_ids[text], "text": text}) + "\n")
                if label:
                    qrels.write(f"{qid}\t{passage_ids[text]}\t1\n")
    (folder / "SOURCE.md").write_text(SOURCE_NOTE.format(split=split))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "trecqa"))
    args = parser.parse_args()
    test = read_split(Path(args.source) / "test.csv")
    # Only questions with at least one relevant sentence can be scored.
    test = {q: c for q, c in test.items() if any(label for _, label in c)}
    write_beir(test, ROOT / "trecqa-test", "test")
    demo = ROOT / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    seen, rows = set(), []
    for question, candidates in list(test.items())[:25]:
        for text, _ in candidates:
            if text not in seen:
                seen.add(text)
                rows.append({"id": f"d{len(rows)}", "text": text})
    (demo / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (demo / "queries.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "text": q}) + "\n" for i, q in enumerate(list(test)[:25])), encoding="utf-8"
    )
    (demo / "SOURCE.md").write_text(SOURCE_NOTE.format(split="test (first 25 questions)"))
    train = read_split(Path(args.source) / "train.csv")
    folder = ROOT / "trecqa-train"
    folder.mkdir(parents=True, exist_ok=True)
    kept = 0
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for question, candidates in train.items():
            positives = [t for t, label in candidates if label]
            negatives = [t for t, label in candidates if not label]
            if positives and negatives:
                f.write(json.dumps({"query": question, "positive": positives, "negative": negatives}) + "\n")
                kept += 1
    (folder / "SOURCE.md").write_text(SOURCE_NOTE.format(split="train").replace(
        "each question becomes a query, every candidate\nsentence becomes a corpus passage, and label 1 marks a relevant passage",
        "each question with at least one relevant and one\nirrelevant candidate becomes a training row: label-1 sentences are positives, label-0 sentences hard negatives"))
    print(f"trecqa-test: {len(test)} queries; demo: {len(rows)} passages; trecqa-train: {kept} training rows")


if __name__ == "__main__":
    main()
