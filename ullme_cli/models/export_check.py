"""What an export checks before its file is moved into place: another runtime's vectors of the same probe
texts against the torch model's, held to a floor on the min or the mean cosine (models/onnx_export.py,
models/gguf_export.py). A NaN cosine fails every floor."""

from __future__ import annotations

import numpy as np

from ullme_cli.errors import UllmeError
from ullme_cli.models.mteb_face import cosine_pairwise

# Short and long, digits, accents, one letter: texts whose first character a byte-level BPE may merge with a
# preceding space, and one longer than the others, so a padded batch and a graph's lengths are exercised.
PROBES = ("Who wrote Hamlet?", "A tiny probe.", "The quick brown fox jumps over the lazy dog, and then it runs far into the woods "
          "where nobody can see it any more, past the river and the old mill.", "x", "3 apples and 4 pears", "Ünïcödé, naïve café")  # fmt: skip


def probe_cosines(references: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    return cosine_pairwise(references, theirs).numpy()


def agreement(references: np.ndarray, theirs: np.ndarray) -> dict:
    """The record an export keeps of its check: min and mean cosine over the probe vectors."""
    cosines = probe_cosines(references, theirs)
    return {"min_cosine": round(float(cosines.min()), 6), "mean_cosine": round(float(cosines.mean()), 6), "texts": len(cosines)}


def require_floor(check: dict, statistic: str, floor: float, what: str) -> None:
    """Refuse the export when `check`'s `statistic` ("min" or "mean") cosine is under `floor` (or NaN)."""
    value = check[f"{statistic}_cosine"]
    if not value >= floor:
        raise UllmeError(f"{what} differ from the torch model's ({statistic} cosine {value:.6f} < {floor} on {check['texts']} probe texts); not written")
