"""What one `ullme encode` job does with a loaded model (how the model embeds is its ModelSetup). Each option is
declared once, here: its default, choices and help, from which `ullme encode`'s flags are derived (cli.py).
Light on purpose: `ullme --help` imports it."""

from __future__ import annotations

from dataclasses import dataclass

from ullme_cli.constants import CHUNK_POOLS, INPUT_FORMATS, KINDS, ON_LONG
from ullme_cli.dtypes import OUT_DTYPES
from ullme_cli.errors import UllmeError
from ullme_cli.options import UNKNOWN, check_choices, option


@dataclass
class EncodeOptions:
    kind: str = option("passage", "Which instruction applies", KINDS)
    instruction: str | None = option(None, "Instruction for these texts (overrides the model's for --kind).")
    out_dtype: str = option("float32", "Stored dtype", OUT_DTYPES, refusal=UNKNOWN)
    truncate_dim: int | None = option(None, "Keep the first D dimensions (Matryoshka) and renormalize.")
    token_budget: int | None = option(None, "Padded tokens per batch (default 1536 on CPU, 16384 on GPU).")
    input_format: str = option("auto", "The input's format (auto: by suffix, and hf:NAME[:SPLIT] is a dataset; dataset: a save_to_disk folder)",
                               INPUT_FORMATS, refusal="unknown input format '{value}' (choose from {choices})")  # fmt: skip
    on_long: str = option("truncate", "A text longer than --max-length is cut (the summary counts them) or refused", ON_LONG)
    chunk_tokens: int | None = option(None, "Cut each text into windows of N model tokens instead of truncating it (N <= --max-length).")
    chunk_overlap: int = option(0, "Tokens each window shares with the previous one (below --chunk-tokens).")
    chunk_pool: str = option("none", "none: one vector per window, ids DOCID#k, a .chunks.jsonl map of spans; mean: one per text, the token-weighted mean",
                             CHUNK_POOLS)  # fmt: skip

    def chunking(self) -> dict | None:
        """The chunking settings as the vectors' record carries them; None without chunking."""
        if self.chunk_tokens is None:
            return None
        return {"tokens": self.chunk_tokens, "overlap": self.chunk_overlap, "pool": self.chunk_pool}

    def validate(self) -> "EncodeOptions":
        check_choices(self)
        if self.token_budget is not None and self.token_budget < 1:
            raise UllmeError(f"--token-budget must be at least 1, got {self.token_budget}")
        if self.truncate_dim is not None and self.truncate_dim < 1:
            raise UllmeError(f"--truncate-dim must be at least 1, got {self.truncate_dim}")
        validate_chunking(self.chunk_tokens, self.chunk_overlap)
        return self


def validate_chunking(size: int | None, overlap: int, max_length: int | None = None, flag: str = "--chunk-tokens") -> None:
    """Refuse settings that cannot chunk: an overlap without a window or as large as it, a window above
    max_length (once the model is known)."""
    if size is None:
        if overlap:
            raise UllmeError(f"--chunk-overlap {overlap} needs {flag}")
        return
    if size < 1:
        raise UllmeError(f"{flag} must be at least 1, got {size}")
    if not 0 <= overlap < size:
        raise UllmeError(f"--chunk-overlap must be at least 0 and below {flag} ({size}), got {overlap}")
    if max_length is not None and size > max_length:
        raise UllmeError(f"{flag} {size} is above the model's max_length {max_length}: a window must fit in one pass")
