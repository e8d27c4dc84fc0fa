"""The one agreement check (docs/design.md §10.3): wherever vectors meet, their whole records agree.

A vector is what its record says. Every embeddings meta file, index manifest and encode job carries it:
- the space: the model's weights fingerprint, attention, pooling, instruction template, max_length
  (where texts are truncated), normalisation, compute dtype and Matryoshka truncation;
- the side: the kind (query or passage) and the instruction text placed before every text;
- the storage: the output dtype (float32, float16, int8, binary).

The key sets below are named once, and each meeting point picks one:
- `SAME_SPACE`: vectors scored against each other (a query against an index, a model against corpus
  embeddings). The side is checked on its own there, since a query and a passage differ by design.
- `SAME_VECTORS`: `SAME_SPACE` and the side: vectors made the same way, stored in any output dtype (given
  query embeddings against the index's queries, corpus embeddings against the model that mines).
- `SAME_SIDE`: vectors placed side by side in one matrix or one ranking: `index --add`, several indexes
  searched together, the shards of `join`, multi-process parts, an encode resume.
- `SAME_LAYOUT`: `SAME_SIDE` plus how texts became vectors, the chunking (`encode --chunk-tokens`: window,
  overlap, pooling; None for one vector per text): vectors in one index (`index --add`, `--trained-from`) or
  several indexes ranked together.
- `SAME_JOB`: `SAME_LAYOUT` plus the corpus: pieces of one encode job (the shards of `join`, multi-process
  parts).

A record made before a layout key existed lacks it; absent then means None (one vector per text), which is
what that ullme made.
"""

from __future__ import annotations

from ullme_cli.errors import UllmeError

SPACE_KEYS = ("fingerprint", "attention", "pooling", "instruction_template", "max_length", "normalize", "compute_dtype", "truncate_dim")
SIDE_KEYS = ("kind", "instruction")
STORAGE_KEYS = ("dtype",)

SAME_SPACE = SPACE_KEYS
SAME_VECTORS = (*SPACE_KEYS, *SIDE_KEYS)
SAME_SIDE = (*SPACE_KEYS, *SIDE_KEYS, *STORAGE_KEYS)
LAYOUT_KEYS = ("chunking",)
SAME_LAYOUT = (*SAME_SIDE, *LAYOUT_KEYS)
SAME_JOB = (*SAME_LAYOUT, "corpus_fingerprint")


def disagreement(found: dict, expected: dict, keys=SAME_SIDE) -> str | None:
    """The first key of `keys` on which two records disagree, described; None when they agree."""
    for key in keys:
        if found.get(key) != expected.get(key):
            if key == "fingerprint":
                return f"the model files differ (fingerprint {str(found.get(key))[:12]} against {str(expected.get(key))[:12]})"
            if key == "corpus_fingerprint":
                return "they were made from other corpora (ids or texts differ)"
            return f"'{key}' is {found.get(key)!r} here but {expected.get(key)!r} there"
    return None


def require_agreement(found: dict, expected: dict, found_name: str, expected_name: str, keys=SAME_SIDE) -> None:
    """Refuse to combine vectors (or a model and vectors) whose records differ on `keys`. A record that
    lacks one of them was made by an older ullme, and is named as such (a layout key it lacks means None)."""
    for record, name in ((found, found_name), (expected, expected_name)):
        absent = [k for k in keys if k not in LAYOUT_KEYS and (k not in record or (k == "fingerprint" and not record.get(k)))]
        if absent:
            raise UllmeError(f"{name}: records no '{absent[0]}' (made by an older ullme); make it again")
    problem = disagreement(found, expected, keys)
    if problem:
        raise UllmeError(f"{found_name}: does not agree with {expected_name}: {problem}")
