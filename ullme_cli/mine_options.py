"""What one `ullme mine` job does with a loaded model (retrieval/mine.py runs it). Each option is declared once,
here, and `ullme mine`'s flags are derived from the fields (cli.py). Light on purpose: `ullme --help` imports it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ullme_cli.encode_options import validate_chunking
from ullme_cli.errors import UllmeError
from ullme_cli.options import option


@dataclass(frozen=True)
class MiningOptions:
    negatives: int = option(7, "Negatives per query.")
    start: int = 10  # first rank considered (0-based): ranks above it are skipped (the CLI's --range A:B)
    stop: int | None = None  # first rank not considered; None: start + max(100, 10 × negatives)
    sample: bool = option(False, "A random sample of the candidates in the range (seeded by --seed) instead of the best ones.")
    margin: float | None = option(None, "Drop candidates scoring within M of the row's weakest positive (cosine).")
    relative_margin: float | None = option(None, "Drop candidates scoring above the row's weakest positive × (1 − R) (sentence-transformers' rule).")
    max_score: float | None = option(None, "Drop candidates scoring above S (cosine).")
    seed: int = option(0, "Seed of --sample.")
    keep_existing: bool = option(False, "Append to the rows' own negatives instead of replacing them.")
    teacher: str | None = option(None, "Write pos_scores and neg_scores: this embedder's cosines (an ullme folder, a model ullme loads, or a "
                                       "sentence-transformers folder), for loss.weights.distill.")  # fmt: skip
    chunk_tokens: int | None = option(None, "Search the corpus by windows of N tokens: a negative is a document, written as its best window's text.")
    chunk_overlap: int = option(0, "Tokens each window shares with the previous one (below --chunk-tokens).")

    @classmethod
    def parse_range(cls, spec: str) -> tuple[int, int | None]:
        """`A:B` (ranks A to B-1, 0-based), `A:` (from A on)."""
        try:
            first, _, last = spec.partition(":")
            start, stop = int(first or 0), int(last) if last.strip() else None
        except ValueError:
            raise UllmeError(f"--range must look like A:B or A: (ranks, 0-based), got '{spec}'") from None
        if start < 0 or (stop is not None and stop <= start):
            raise UllmeError(f"--range {spec}: need 0 <= A < B")
        return start, stop

    def validate(self) -> "MiningOptions":
        if self.negatives < 1:
            raise UllmeError("--negatives must be at least 1")
        if self.margin is not None and not (math.isfinite(self.margin) and self.margin >= 0):
            raise UllmeError(f"--margin must be a number of at least 0, got {self.margin}")
        if self.relative_margin is not None and not (math.isfinite(self.relative_margin) and 0 <= self.relative_margin < 1):
            raise UllmeError(f"--relative-margin must be at least 0 and below 1, got {self.relative_margin}")
        if self.max_score is not None and not math.isfinite(self.max_score):
            raise UllmeError(f"--max-score must be a finite number, got {self.max_score}")
        if not 0 <= self.seed < 2**32:
            raise UllmeError(f"--seed must be between 0 and 2^32-1, got {self.seed}")
        if self.sample is False and self.seed != 0:
            raise UllmeError("--seed applies to --sample only; add --sample or drop --seed")
        validate_chunking(self.chunk_tokens, self.chunk_overlap)
        return self

    def check_range(self, corpus_size: int, corpus: str) -> None:
        """A range that starts past the corpus would give every row no negatives: refused, not run."""
        if self.start >= corpus_size:
            raise UllmeError(f"--range starts at rank {self.start}, but {corpus} holds {corpus_size} passages; start below {corpus_size}")

    def pool_end(self, corpus_size: int) -> int:
        return min(corpus_size, self.stop if self.stop is not None else self.start + max(100, 10 * self.negatives))
