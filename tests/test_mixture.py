"""Dataset mixtures and same-source batches (docs/design.md §5; ullme_cli/training/mixture.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import run_cli

from ullme_cli.data import TrainingExample
from ullme_cli.errors import UllmeError
from ullme_cli.losses import InfoNCELoss
from ullme_cli.recipes import load_recipe
from ullme_cli.training.mixture import Batching, Mixture, Source, cap_evenly
from ullme_cli.training.trainer import batch_indices


def mixture(sizes: dict[str, int], weights: dict[str, float] | None = None) -> Mixture:
    sources = [Source(f"{name}.jsonl", weight=(weights or {}).get(name, 1.0)) for name in sizes]
    examples, ranges = [], []
    for name, size in sizes.items():
        ranges.append((len(examples), len(examples) + size))
        examples += [TrainingExample(f"{name} q{i}", [f"{name} p{i}"]) for i in range(size)]
    return Mixture(sources, examples, ranges)


def test_sources_are_drawn_in_their_weights_proportions_over_1000_steps():
    batching = Batching(mixture({"a": 50, "b": 30, "c": 20}, {"a": 2, "b": 1, "c": 1}), batch_size=4, seed=3)
    counts = Counter(batching.source_at(step) for step in range(1000))
    for k, share in enumerate((0.5, 0.25, 0.25)):
        assert abs(counts[k] / 1000 - share) < 0.05, counts


def test_every_step_on_every_rank_takes_rows_of_one_source_and_a_resume_draws_the_same():
    m = mixture({"a": 17, "b": 9, "c": 40})
    ranks = [Batching(m, batch_size=3, seed=1, world=2) for _ in range(2)]
    for step in range(300):
        k = ranks[0].source_at(step)
        start, stop = m.ranges[k]
        rows = [i for rank, b in enumerate(ranks) for i in b.indices(step, rank)]
        assert all(start <= i < stop for i in rows), (step, k, rows)
        assert ranks[1].source_at(step) == k  # the global batch's source: the same on every process
    resumed = Batching(m, batch_size=3, seed=1, world=2)  # a new process after a kill, starting at step 287
    assert [resumed.indices(step, 1) for step in range(287, 300)] == [ranks[1].indices(step, 1) for step in range(287, 300)]


def test_every_row_of_a_source_comes_once_per_epoch_of_that_source():
    m = mixture({"a": 12, "b": 8})
    batching = Batching(m, batch_size=4, seed=0)
    seen = Counter()
    for step in range(200):
        if batching.source_at(step) == 1:
            seen.update(batching.indices(step))
            if sum(seen.values()) == 8:
                break
    assert sorted(seen) == list(range(12, 20)) and set(seen.values()) == {1}


def test_one_source_batches_exactly_as_before():
    m = mixture({"only": 23})
    batching = Batching(m, batch_size=5, seed=4, world=2)
    assert not batching.same_source
    assert all(batching.indices(s, r) == batch_indices(s, 5, 23, 4, r, 2) for s in range(30) for r in range(2))


def test_a_cap_samples_evenly_across_clusters():
    rows = [TrainingExample(f"q{c}{i}", ["p"], extra={"cluster": c}) for c, size in (("x", 100), ("y", 10), ("z", 5)) for i in range(size)]
    capped = cap_evenly(rows, 15, seed=0)
    assert Counter(ex.extra["cluster"] for ex in capped) == {"x": 5, "y": 5, "z": 5}
    assert cap_evenly(rows, 15, seed=0) == capped and cap_evenly(rows, 500, seed=0) == rows


def test_own_candidates_only_by_hand():
    """A row of a source with in_batch_negatives: false is scored against its own positive and negatives."""
    torch.manual_seed(0)
    q, p, neg = (torch.nn.functional.normalize(torch.randn(n, 8), dim=-1) for n in (3, 3, 6))  # 2 negatives a row
    own = torch.tensor([True, False, False])
    tau = 0.05
    s = lambda a, b: float(a @ b) / tau  # noqa: E731
    row0 = -(s(q[0], p[0]) - np.log(np.exp(s(q[0], p[0])) + np.exp(s(q[0], neg[0])) + np.exp(s(q[0], neg[1]))))
    full = lambda i: -(s(q[i], p[i]) - np.log(sum(np.exp(s(q[i], c)) for c in [*p, *neg])))  # noqa: E731
    assert InfoNCELoss(tau)(q, p, neg, own_only=own).item() == pytest.approx(np.mean([row0, full(1), full(2)]), rel=1e-5)


def test_recipes_take_sources_as_a_list_and_refuse_what_cannot_apply(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "data:\n  - {path: a.jsonl, instruction: 'Find it', max_rows: 10, weight: 2}\n  - b.jsonl\n"
    )
    recipe = load_recipe(str(tmp_path / "r.yaml"))
    sources = recipe.data.source_list()
    assert [(s.name, s.weight, s.max_rows, s.instruction) for s in sources] == [("a.jsonl", 2, 10, "Find it"), ("b.jsonl", 1.0, None, None)]
    with pytest.raises(UllmeError, match="mixed does not apply source weights"):
        load_recipe(str(tmp_path / "r.yaml"), ["train.batching=mixed"])
    (tmp_path / "bad.yaml").write_text("data:\n  - {path: a.jsonl}\n  - {path: b.jsonl, weight: -1}\n")
    with pytest.raises(UllmeError, match=r"'data.sources\[1\].weight' has an invalid value -1"):
        load_recipe(str(tmp_path / "bad.yaml"))
    (tmp_path / "typo.yaml").write_text("data:\n  - {path: a.jsonl, wieght: 2}\n")
    with pytest.raises(UllmeError, match=r"unknown key 'data.sources\[0\].wieght'"):
        load_recipe(str(tmp_path / "typo.yaml"))
    (tmp_path / "both.yaml").write_text("data: {train: a.jsonl, sources: [b.jsonl]}\n")
    with pytest.raises(UllmeError, match="data.train' and data.sources do not mix"):
        load_recipe(str(tmp_path / "both.yaml"))


def test_a_two_source_finetune_logs_each_steps_source(tiny_llama, tmp_path):
    import yaml

    for name, prefix in (("qa", "who"), ("nli", "a man")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"query": f"{prefix} {i}", "positive": f"{prefix} answer {i}"}) + "\n"
                                                        for i in range(12)))  # fmt: skip
    recipe = {"output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_llama), "max_length": 64},
              "data": [{"path": "qa.jsonl", "instruction": "Answer"}, {"path": "nli.jsonl", "in_batch_negatives": False, "weight": 2}],
              "train": {"steps": 6, "batch_size": 2, "warmup_steps": 0, "log_every": 1}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("finetune", tmp_path / "recipe.yaml", "-q")
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    batching = Batching(mixture({"qa.jsonl": 12, "nli.jsonl": 12}, {"nli.jsonl": 2}), 2, 0)
    assert [r["source"] for r in records] == [["qa.jsonl", "nli.jsonl"][batching.source_at(s)] for s in range(6)]
