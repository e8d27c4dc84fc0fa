"""Build the multi-task training set and the held-out sets of the second study (issue 15) from ../shared/data.

Training rows (one jsonl, docs/design.md §5, each row with its task's instruction):
- TREC QA `train.csv`: a question → its answer sentences (label 1); hard negatives: its label-0 sentences.
- SICK `SICK_train.txt`: an ENTAILMENT pair's premise → its hypothesis; hard negative: a CONTRADICTION
  partner of the same premise, where there is one (how NLI data trains sentence embedders).
- MSRP `msr-para-train.tsv`: a paraphrase pair (Quality 1), both directions; hard negative: a sentence that
  the same sentence is paired with as a non-paraphrase, where there is one.
Held out, never trained on:
- `sick-test.sts.tsv` (SICK_test_annotated: relatedness 1–5, sentence A, sentence B) for `ullme evaluate --sts`;
- `sick-trial.sts.tsv` (SICK_trial), the STS signal during training;
- `msrp-test.pairs.tsv` (label 0/1, sentence 1, sentence 2) for `ullme evaluate --pairs`;
- TREC QA test is the bundled `ullme_cli/resources/trecqa-test`.
A training row whose pair is also a held-out or dev pair (SICK repeats some pairs across splits, also
reversed) is dropped and counted. MSRP alone would be 78% of the rows, so each task is capped at
`--max-rows-per-task` rows (a seeded sample; 1300 keeps SICK whole and balances MSRP against it). Each row
carries its task's embedding instruction and its generation instruction (the prompt of GRL's generation
terms). The counts go to `counts.json`, for the report.

Usage: python scripts/build_study_data.py [--shared ../shared/data] [-o study-data] [--max-rows-per-task 1300] [--overwrite]
"""

import argparse
import csv
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

from ullme_cli.io.outputs import atomic_folder, guard_output
from ullme_cli.errors import UllmeError

INSTRUCTIONS = {
    "trecqa": "Given a question, retrieve sentences that answer the question",
    "sick": "Given a premise, retrieve a sentence that it entails",
    "msrp": "Given a sentence, retrieve a sentence that paraphrases it",
}
GENERATION_INSTRUCTIONS = {
    "trecqa": "Write a sentence that answers the question: ",
    "sick": "Write a sentence that follows from this one: ",
    "msrp": "Write a sentence that says the same as this one: ",
}


def read_tsv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def trecqa_rows(path: Path) -> list[dict]:
    questions: dict[str, dict] = {}
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            entry = questions.setdefault(row["qtext"].strip(), {"positive": [], "negative": []})
            entry["positive" if row["label"] == "1" else "negative"].append(row["atext"].strip())
    return [{"query": q, **e, "instruction": INSTRUCTIONS["trecqa"]} for q, e in questions.items() if e["positive"]]


def sick_rows(path: Path) -> list[dict]:
    pairs = read_tsv(path)
    contradicted = defaultdict(list)
    for p in pairs:
        if p["entailment_judgment"] == "CONTRADICTION":
            contradicted[p["sentence_A"]].append(p["sentence_B"])
    return [
        {"query": p["sentence_A"], "positive": [p["sentence_B"]], "negative": contradicted.get(p["sentence_A"], [])[:1], "instruction": INSTRUCTIONS["sick"]}
        for p in pairs if p["entailment_judgment"] == "ENTAILMENT"
    ]  # fmt: skip


def msrp_rows(path: Path) -> list[dict]:
    pairs = read_tsv(path)
    not_paraphrase = defaultdict(list)
    for p in pairs:
        if p["Quality"] == "0":
            not_paraphrase[p["#1 String"]].append(p["#2 String"])
            not_paraphrase[p["#2 String"]].append(p["#1 String"])
    rows = []
    for p in pairs:
        if p["Quality"] == "1":
            for a, b in ((p["#1 String"], p["#2 String"]), (p["#2 String"], p["#1 String"])):
                rows.append({"query": a, "positive": [b], "negative": not_paraphrase.get(a, [])[:1], "instruction": INSTRUCTIONS["msrp"]})
    return rows


def write_lines(path: Path, lines) -> int:
    lines = list(lines)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def held_out_pairs(shared: Path) -> set[tuple[str, str]]:
    """Every sentence pair of the held-out and dev sets, in both orders."""
    sick = [(r["sentence_A"], r["sentence_B"]) for name in ("SICK_test_annotated.txt", "SICK_trial.txt") for r in read_tsv(shared / "sick" / name)]
    msrp = [(r["#1 String"], r["#2 String"]) for r in read_tsv(shared / "msrp" / "msr-para-test.tsv")]
    return {pair for a, b in sick + msrp for pair in ((a, b), (b, a))}


def without_held_out(rows: list[dict], held_out: set[tuple[str, str]]) -> tuple[list[dict], int]:
    """SICK repeats some pairs across its splits (also reversed): a training row whose positive pair is
    held out is dropped, and a held-out hard negative is removed from its row."""
    kept, dropped = [], 0
    for row in rows:
        if any((row["query"], p) in held_out for p in row["positive"]):
            dropped += 1
            continue
        kept.append({**row, "negative": [n for n in row["negative"] if (row["query"], n) not in held_out]})
    return kept, dropped


def capped(rows: list[dict], cap: int, seed: int = 0) -> list[dict]:
    """At most `cap` rows: a seeded sample, in the rows' own order."""
    if cap <= 0 or len(rows) <= cap:
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), cap))
    return [row for i, row in enumerate(rows) if i in keep]


def build(shared: Path, output: Path, overwrite: bool = False, max_rows_per_task: int = 0) -> dict:
    """Write the folder whole or not at all; an existing one is replaced only with `overwrite`."""
    guard_output([output], [shared], overwrite, folder=True)
    with atomic_folder(output) as out:
        return _build(shared, out, max_rows_per_task)


def _build(shared: Path, out: Path, max_rows_per_task: int = 0) -> dict:
    held_out = held_out_pairs(shared)
    built = {"trecqa": trecqa_rows(shared / "trecqa" / "train.csv"), "sick": sick_rows(shared / "sick" / "SICK_train.txt"),
             "msrp": msrp_rows(shared / "msrp" / "msr-para-train.tsv")}  # fmt: skip
    tasks, dropped, available = {}, {}, {}
    for name, task_rows in built.items():
        kept, dropped[name] = without_held_out(task_rows, held_out)
        available[name] = len(kept)
        tasks[name] = [{**row, "generation_instruction": GENERATION_INSTRUCTIONS[name]} for row in capped(kept, max_rows_per_task)]
    rows = [row for task in tasks.values() for row in task]
    write_lines(out / "train.jsonl", (json.dumps(r, ensure_ascii=False) for r in rows))
    for name, task in tasks.items():  # one source per task, for recipes that mix them (recipes/multitask/mixture.yaml)
        write_lines(out / f"train-{name}.jsonl", (json.dumps(r, ensure_ascii=False) for r in task))
    sts = lambda rows: (f"{r['relatedness_score']}\t{r['sentence_A']}\t{r['sentence_B']}" for r in rows)  # noqa: E731
    counts = {
        "train": {name: {"rows": len(task), "available": available[name], "with_hard_negative": sum(bool(r["negative"]) for r in task),
                         "dropped_as_held_out": dropped[name]} for name, task in tasks.items()},  # fmt: skip
        "max_rows_per_task": max_rows_per_task,
        "train_rows": len(rows),
        "sick_test_pairs": write_lines(out / "sick-test.sts.tsv", sts(read_tsv(shared / "sick" / "SICK_test_annotated.txt"))),
        "sick_trial_pairs": write_lines(out / "sick-trial.sts.tsv", sts(read_tsv(shared / "sick" / "SICK_trial.txt"))),
        "msrp_test_pairs": write_lines(out / "msrp-test.pairs.tsv", (f"{p['Quality']}\t{p['#1 String']}\t{p['#2 String']}"
                                                                      for p in read_tsv(shared / "msrp" / "msr-para-test.tsv"))),  # fmt: skip
    }
    (out / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(root.parent / "shared" / "data"))
    parser.add_argument("-o", "--output", default=str(root / "study-data"))
    parser.add_argument("--max-rows-per-task", type=int, default=1300, help="cap each task at this many rows (a seeded sample); 0: no cap")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    try:
        print(json.dumps(build(Path(args.shared), Path(args.output), args.overwrite, args.max_rows_per_task), indent=2))
    except UllmeError as e:
        sys.exit(f"build_study_data: error: {e}")


if __name__ == "__main__":
    main()
