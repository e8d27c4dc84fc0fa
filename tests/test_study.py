"""scripts/study.py end to end on a tiny model: every fine-tune, every evaluation, the report and the plot."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_study_script_writes_the_report_and_plot_and_resumes(tiny_llama, tmp_path):
    sts = tmp_path / "shared" / "sts" / "2099"
    sts.mkdir(parents=True)
    pairs = [("4.8", "A man is playing a guitar .", "A man plays the guitar ."), ("0.4", "A cat sleeps .", "Stocks fell sharply today ."),
             ("2.5", "A woman is cooking .", "A woman is eating ."), ("3.6", "Kids play soccer .", "Children are playing football ."),
             ("1.0", "The sun is hot .", "He bought a new car .")]  # fmt: skip
    (sts / "tiny.test.tsv").write_text("".join("\t".join(p) + "\n" for p in pairs))
    report = tmp_path / "docs" / "results.md"
    command = [sys.executable, str(REPO / "scripts" / "study.py"), "--model", str(tiny_llama), "--steps", "2", "--seeds", "0",
               "--shared", str(tmp_path / "shared"), "--runs", str(tmp_path / "runs"), "--report", str(report)]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    text = report.read_text()
    for row in ("| base, bidirectional + mean (no fine-tuning) |", "| base, causal + last-token (no fine-tuning) |", "| bidirectional + contrastive |", "| bidirectional + GRL |", "| causal + contrastive |"):
        assert row in text
    assert "GRL − contrastive, nDCG@10:" in text and "STS-2099-tiny" in text and "### Limits of this study" in text
    assert (report.parent / "study_curves.png").stat().st_size > 10_000
    assert first.stderr.count("$ ullme finetune") == 3 and first.stderr.count("$ ullme evaluate") == 5
    # A second run reuses every fine-tune, and every evaluation through `ullme evaluate`'s own fingerprinted
    # cache: a summary left beside the results is not trusted by its path, so a wrong score in it is replaced.
    summary = tmp_path / "runs" / "eval" / "bidirectional-grl-seed0" / "summary.json"
    right = json.loads(summary.read_text())["tasks"]
    wrong = json.loads(summary.read_text())
    for task in wrong["tasks"].values():
        for metric in [m for m, v in task.items() if isinstance(v, float)]:
            task[metric] = 0.123456
    summary.write_text(json.dumps(wrong))
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ ullme finetune" not in again.stderr, again.stderr[-3000:]
    assert report.read_text() == text and json.loads(summary.read_text())["tasks"] == right
