"""Dataset mixtures (issue 28): several training sources, each capped and weighted, batched one source at a time.

A recipe's `data.sources` (or a `data:` written as a list) names sources; `data.train` alone is one source.
Each source has a path (any input the readers take), `max_rows` (a cap, sampled evenly across a `cluster`
field where rows have one, as the original ULLME does), `weight` (its share of same-source steps), its own
`instruction` and `generation_instruction` (for rows without their own), and `in_batch_negatives` (false:
a row is scored against its own positive and hard negatives only, as for classification and clustering sets).

Batching (`train.batching`):
- `same-source` (the default with several sources): the source of each step is drawn for the **global**
  batch from (seed, step) with the sources' weights, so every process takes the same source at a step and
  gathered negatives share a task. Within a source, rows come in a seeded permutation per epoch, continued
  from that source's earlier steps. A pure function of (seed, step): a resumed run draws the same.
- `mixed`: every row of every source in one seeded permutation per epoch, as a single file is batched.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np

from ullme_cli.data import (
    StreamedExamples,
    TrainingExample,
    cluster_key,
    read_training_examples,
)
from ullme_cli.errors import UllmeError
from ullme_cli.fingerprints import json_fingerprint
from ullme_cli.recipes import BATCHINGS, Source



def cap_indices(clusters, max_rows: int | None, seed: int) -> list[int] | None:
    """Which rows to keep, at most `max_rows`, drawn evenly across `clusters` (each row's `cluster_key`):
    round robin over clusters in a seeded order, rows within a cluster shuffled, as the original ULLME caps
    its datasets; a seeded sample where rows have no cluster. None: keep every row."""
    if max_rows is None or len(clusters) <= max_rows:
        return None
    rng = np.random.default_rng(seed)
    by_cluster: dict[int, list[int]] = {}
    for n, key in enumerate(clusters):
        by_cluster.setdefault(key, []).append(n)
    queues = [list(rng.permutation(rows)) for _, rows in sorted(by_cluster.items())]
    order = rng.permutation(len(queues))
    chosen: list[int] = []
    while len(chosen) < max_rows:
        for q in order:
            if queues[q] and len(chosen) < max_rows:
                chosen.append(int(queues[q].pop()))
    return sorted(chosen)


def cap_evenly(examples: list[TrainingExample], max_rows: int | None, seed: int) -> list[TrainingExample]:
    """`cap_indices` applied to rows in memory."""
    chosen = cap_indices([cluster_key(ex.extra.get("cluster")) for ex in examples], max_rows, seed)
    return examples if chosen is None else [examples[i] for i in chosen]


class StreamedSource:
    """A streamed source's rows after its cap: parsed when asked for, with the source's defaults."""

    def __init__(self, source: Source, rows: StreamedExamples, chosen: list[int] | None):
        self.source, self.rows = source, rows
        self.chosen = None if chosen is None else np.asarray(chosen, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows) if self.chosen is None else len(self.chosen)

    def __getitem__(self, index: int) -> TrainingExample:
        return self.source.with_defaults(self.rows[int(self.chosen[index]) if self.chosen is not None else index])


class Rows:
    """Every source's rows as one sequence: lists in memory and streamed sources side by side."""

    def __init__(self):
        self.parts: list = []
        self.starts: list[int] = []
        self.length = 0

    def add(self, part) -> None:
        self.parts.append(part)
        self.starts.append(self.length)
        self.length += len(part)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TrainingExample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        k = bisect.bisect_right(self.starts, index) - 1
        return self.parts[k][index - self.starts[k]]

    def __iter__(self):
        for part in self.parts:
            yield from (part[i] for i in range(len(part)))


@dataclass
class Mixture:
    """Every source's rows, as one sequence (`Rows`), with each source's range in it."""

    sources: list[Source]
    examples: Rows
    ranges: list[tuple[int, int]] = field(default_factory=list)
    skipped: int = 0
    has_teacher_scores: bool = False
    fingerprint: str = ""  # of the rows trained on, by content (run_inputs)


def read_mixture(sources: list[Source], skip_bad_rows: bool, seed: int) -> Mixture:
    """Read, cap and join the sources. A streamed source keeps no rows in memory (data.StreamedExamples)."""
    mixture = Mixture(sources, Rows())
    streams = []
    for k, source in enumerate(sources):
        if source.streamed:
            rows = StreamedExamples(source.path, skip_bad_rows)
            chosen = cap_indices(rows.clusters, source.max_rows, seed + 7919 * k)
            part, skipped = StreamedSource(source, rows, chosen), rows.skipped
            mixture.has_teacher_scores |= rows.has_teacher_scores
            streams.append([k, rows.fingerprint, None if chosen is None else json_fingerprint(chosen)])
        else:
            examples, skipped = read_training_examples(source.path, skip_bad_rows)
            part = cap_evenly([source.with_defaults(ex) for ex in examples], source.max_rows, seed + 7919 * k)
            mixture.has_teacher_scores |= any(ex.has_teacher_scores for ex in part)
        mixture.ranges.append((len(mixture.examples), len(mixture.examples) + len(part)))
        mixture.examples.add(part)
        mixture.skipped += skipped
    if not streams:  # every row in memory: the fingerprint checkpoints have always recorded
        mixture.fingerprint = json_fingerprint(e.to_json() for e in mixture.examples)
    else:  # streamed rows by their file's content and the cap's choice; in-memory sources by their rows
        kept = [json_fingerprint(e.to_json() for e in part) for part in mixture.examples.parts if not isinstance(part, StreamedSource)]
        mixture.fingerprint = json_fingerprint([streams, kept, [dataclasses.asdict(s) for s in sources]])
    return mixture


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, count: int, salt: int = 0) -> np.ndarray:
    """The order of one epoch's rows. Cached: every row of a step reads the same one or two epochs."""
    return np.random.default_rng([seed, epoch, salt]).permutation(count) if salt else np.random.default_rng(seed + epoch).permutation(count)


class Batching:
    """Which rows each process trains on at each step (see the module docstring)."""

    def __init__(self, mixture: Mixture, batch_size: int, seed: int, mode: str = "auto", world: int = 1):
        if mode not in BATCHINGS:
            raise UllmeError(f"train.batching must be one of {', '.join(BATCHINGS)}, got '{mode}'")
        self.mixture, self.batch_size, self.seed, self.world = mixture, batch_size, seed, world
        self.same_source = mode == "same-source" or (mode == "auto" and len(mixture.sources) > 1)
        # A batch drawn from fewer rows than it holds repeats rows, and each copy is the others' in-batch
        # negative: the loss then pushes a text away from itself. Refused rather than trained on in silence.
        needed = batch_size * world
        sizes = [(s.name, stop - start) for s, (start, stop) in zip(mixture.sources, mixture.ranges)] if self.same_source \
            else [(", ".join(s.name for s in mixture.sources), len(mixture.examples))]  # fmt: skip
        for name, rows in sizes:
            if rows < needed:
                per = f"train.batch_size {batch_size} x {world} processes" if world > 1 else f"train.batch_size {batch_size}"
                how = "each batch is drawn from one source" if self.same_source and len(mixture.sources) > 1 else "a batch holds distinct rows"
                raise UllmeError(f"data source {name}: {rows} training row(s), fewer than {per} ({how}); "
                                 "add rows or lower train.batch_size")  # fmt: skip
        weights = np.array([s.weight for s in mixture.sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self._drawn: list[int] = []  # the source of steps 0, 1, ... (drawn once, then reused)
        self._earlier: list[int] = []  # how many steps before each drawn step took its source
        self._taken = [0] * len(mixture.sources)

    def source_at(self, step: int) -> int:
        """The source of global step `step`: a pure function of (seed, step) and the weights."""
        while len(self._drawn) <= step:
            k = int(np.random.default_rng([self.seed, len(self._drawn), 2801]).choice(len(self.weights), p=self.weights))
            self._drawn.append(k)
            self._earlier.append(self._taken[k])
            self._taken[k] += 1
        return self._drawn[step]

    def indices(self, step: int, rank: int = 0) -> list[int]:
        """The rows of `step` for process `rank`, as indices into the mixture's examples."""
        if not self.same_source:
            return _positions(step, self.batch_size, len(self.mixture.examples), self.seed, rank, self.world)
        k = self.source_at(step)
        start, stop = self.mixture.ranges[k]  # continued from the source's own earlier steps
        return [start + i for i in _positions(self._earlier[step], self.batch_size, stop - start, self.seed, rank, self.world, salt=k + 1)]


def _positions(step: int, batch_size: int, count: int, seed: int, rank: int, world: int, salt: int = 0) -> list[int]:
    """Rows of `step` for `rank`: a seeded permutation per epoch, read in order (salt 0: the single-file order
    ullme always used, so one-source runs and their resumes are unchanged)."""
    global_size = batch_size * world
    first = step * global_size + rank * batch_size
    rows = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, count)
        rows.append(int(epoch_permutation(seed, epoch, count, salt)[offset]))
    return rows
