"""Sources larger than memory (docs/design.md §5, §11): a jsonl source read as a stream keeps only row offsets, gives
the same rows and batches as reading it whole, takes caps and weights, checks every row up front, and a
resumed run sees the same order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from ullme_cli.errors import UllmeError
from ullme_cli.training.mixture import Batching, Source, read_mixture


def write_rows(path, count: int, start: int = 0, clusters: int = 0):
    with open(path, "w") as handle:
        for n in range(start, start + count):
            row = {"query": f"question {n} " + "word " * 20, "positive": [f"answer {n} " + "text " * 30], "negative": [f"wrong {n}"]}
            if clusters:
                row["cluster"] = f"c{n % clusters}"
            handle.write(json.dumps(row) + "\n")
    return path


def test_a_streamed_source_gives_the_rows_and_batches_of_reading_it_whole(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", 300, clusters=7)
    b = write_rows(tmp_path / "b.jsonl", 120, start=1000)
    for caps in ((None, None), (100, 50)):
        whole = read_mixture([Source(str(a), max_rows=caps[0], weight=2, instruction="A"), Source(str(b), max_rows=caps[1])], False, 3)
        streamed = read_mixture([Source(str(a), max_rows=caps[0], weight=2, instruction="A", stream=True),
                                 Source(str(b), max_rows=caps[1], stream=True)], False, 3)  # fmt: skip
        assert whole.ranges == streamed.ranges
        assert [e.to_json() for e in whole.examples] == [e.to_json() for e in streamed.examples], "the same rows, caps and instructions"
        batches = [Batching(m, 8, seed=5, mode="same-source") for m in (whole, streamed)]
        for step in range(60):
            assert batches[0].indices(step) == batches[1].indices(step)
    # A resumed run rebuilds the mixture and its batching from the files: the same sequence again.
    again = read_mixture([Source(str(a), max_rows=100, weight=2, instruction="A", stream=True), Source(str(b), max_rows=50, stream=True)], False, 3)
    assert again.fingerprint == streamed.fingerprint
    assert [Batching(again, 8, 5, "same-source").indices(s) for s in range(60)] == [batches[1].indices(s) for s in range(60)]


def test_a_streamed_source_checks_every_row_up_front_and_its_fingerprint_follows_the_content(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", 50)
    first = read_mixture([Source(str(path), stream=True)], False, 0).fingerprint
    with open(path, "a") as handle:
        handle.write('{"query": "q", "positive": []}\n')
    with pytest.raises(UllmeError, match=r"a.jsonl:51: .*positive"):
        read_mixture([Source(str(path), stream=True)], False, 0)
    skipped = read_mixture([Source(str(path), stream=True)], True, 0)
    assert skipped.skipped == 1 and len(skipped.examples) == 50 and skipped.fingerprint == first
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0].replace("question 0", "question zero")] + lines[1:50]) + "\n")
    assert read_mixture([Source(str(path), stream=True)], False, 0).fingerprint != first, "same file name, other rows"


@pytest.mark.slow
def test_streaming_memory_is_bounded_by_offsets_not_rows(tmp_path):
    small, large = write_rows(tmp_path / "small.jsonl", 10_000), write_rows(tmp_path / "large.jsonl", 200_000)
    # The peak is VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec from the test worker.
    script = ("import sys\nfrom ullme_cli.training.mixture import Batching, Source, read_mixture\n"
              "m = read_mixture([Source(sys.argv[1], stream=sys.argv[2] == 'stream')], False, 0)\n"
              "b = Batching(m, 32, 0)\n_ = [m.examples[i] for s in range(200) for i in b.indices(s)]\n"
              "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')))")  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    peak = {(name, how): int(subprocess.run([sys.executable, "-c", script, str(path), how], capture_output=True, text=True, check=True, env=env,
                                           cwd=REPO).stdout.split()[-1])
            for name, path in (("small", small), ("large", large)) for how in ("stream", "whole")}  # fmt: skip
    grown = peak[("large", "stream")] - peak[("small", "stream")]
    assert grown < 16 * 2**20, f"streaming 20x the rows added {grown / 2**20:.0f} MiB"
    assert peak[("large", "whole")] - peak[("small", "whole")] > 8 * grown, "reading it whole grows with the rows"
