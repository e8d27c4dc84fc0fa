"""Long texts as windows of the model's own tokens, and their vectors pooled back into one per text.

A text is tokenized once, whole (instruction prefix included, no truncation). Its content tokens are cut
into windows of `size` tokens that overlap by `overlap`; each window keeps the text's leading tokens (special
tokens and the instruction, where the kind has one) and its trailing special tokens, so every window is
embedded as the setup embeds a text. A text that fits in one window gives exactly `Embedder.tokenize`'s tokens.

Each window knows its character span in the text (`text[start:end]` is the passage it covers) and its
token count, the weight of the token-weighted mean (vLLM's chunked pooling):

    v(doc) = Σ_k n_k · v_k / ‖Σ_k n_k · v_k‖      n_k: the content tokens of window k

`encode --chunk-tokens`, `serve --on-long mean` and `mine` over a chunked corpus all go through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ullme_cli.errors import UllmeError

CHUNK_SEPARATOR = "#"  # a chunk's id is DOCID#k


@dataclass(frozen=True)
class Chunk:
    doc: int  # the text's position in the input
    number: int  # k: the window's place in its text
    tokens: object  # models.embedder.Tokenized: what the model embeds
    start: int  # the window's character span in the text
    end: int
    count: int  # its content tokens: the weight of the token-weighted mean


def chunk_id(doc_id: str, number: int) -> str:
    return f"{doc_id}{CHUNK_SEPARATOR}{number}"


def windows(count: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) token windows of `size` covering `count` tokens, each starting `size - overlap` after the
    previous; the last one ends at `count`. No tokens gives one empty window (the text still has a vector)."""
    if size < 1 or not 0 <= overlap < size:
        raise UllmeError(f"chunk windows need 0 <= overlap < size, got size {size} and overlap {overlap}")
    spans, start = [], 0
    while True:
        stop = min(start + size, count)
        spans.append((start, stop))
        if stop >= count:
            return spans
        start += size - overlap


def chunk_texts(embedder, texts: Sequence[str], kind: str, instruction: str | None, size: int | None, overlap: int = 0,
                ids: Sequence[str] | None = None) -> list[Chunk]:  # fmt: skip
    """Every text's windows, in text order then window order. `size` None: as many tokens as max_length leaves
    beside the text's instruction and special tokens (`serve --on-long mean`)."""
    from ullme_cli.models.embedder import Tokenized  # the embedder module loads torch

    prefix = embedder.instruction_prefix(kind, instruction)
    if prefix:
        embedder.require_room_for_text(prefix)
    tokenizer = embedder.tokenizer
    add_eos = embedder.setup.pooling == "last-token"
    eos = tokenizer.eos_token_id
    if not getattr(tokenizer, "is_fast", False):
        raise UllmeError("chunking needs a fast tokenizer (one that gives character offsets); this model's is a slow one")
    encoded = tokenizer([prefix + t for t in texts], add_special_tokens=True, truncation=False, return_offsets_mapping=True,
                        return_special_tokens_mask=True, verbose=False)  # fmt: skip
    chunks: list[Chunk] = []
    for row, (all_ids, offsets, special) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"], encoded["special_tokens_mask"])):
        # Every window starts with the text's leading special tokens and instruction tokens (those ending inside the
        # prefix); as in `tokenize`, they are left out of pooling only where there is an instruction.
        head = 0
        while head < len(all_ids) and (special[head] or (prefix and offsets[head][1] <= len(prefix))):
            head += 1
        tail = len(all_ids)
        while tail > head and special[tail - 1]:
            tail -= 1
        lead, content, trail = all_ids[:head], all_ids[head:tail], all_ids[tail:]
        if add_eos and (not trail or trail[-1] != eos):
            trail = trail + [eos]
        room = embedder.setup.max_length - len(lead) - len(trail)
        if size is None and room < 1:
            raise UllmeError(f"max_length {embedder.setup.max_length} leaves no room for text beside {len(lead) + len(trail)} instruction and special tokens")
        if size is not None and size > room:
            name = f"text '{ids[row]}'" if ids is not None else f"text {row}"
            raise UllmeError(f"--chunk-tokens {size}: {name} has {len(lead) + len(trail)} instruction and special tokens, which leave room "
                             f"for {room} of max_length {embedder.setup.max_length}; use --chunk-tokens {max(room, 1)} or less")  # fmt: skip
        text = texts[row]
        for number, (a, b) in enumerate(windows(len(content), size or room, overlap)):
            if b > a:
                start = max(offsets[head + a][0] - len(prefix), 0)  # a token straddling the prefix starts at the text's 0
                end = max(offsets[head + b - 1][1] - len(prefix), start)
                while start < end and text[start].isspace():  # byte-level BPE tokens carry the space before a word
                    start += 1
                while end > start and text[end - 1].isspace():
                    end -= 1
            else:
                start = end = 0 if not content else len(text)
            chunks.append(Chunk(row, number, Tokenized(lead + content[a:b] + trail, len(lead) if prefix else 0), start, end, b - a))
    return chunks


def pool_mean(vectors: np.ndarray, chunks: Sequence[Chunk], documents: int, normalize: bool = True) -> np.ndarray:
    """One vector per document: the token-weighted mean of its chunks' vectors, renormalised (module docstring).
    A document of one chunk keeps that chunk's vector as it is (the vector of the text unchunked); one whose
    chunks hold no token takes their plain mean."""
    pooled = np.zeros((documents, vectors.shape[1]), dtype=np.float64)
    weights = np.zeros(documents, dtype=np.float64)
    windows_of = np.zeros(documents, dtype=np.int64)
    for row, chunk in enumerate(chunks):
        weight = max(chunk.count, 1e-12)
        pooled[chunk.doc] += weight * vectors[row].astype(np.float64)
        weights[chunk.doc] += weight
        windows_of[chunk.doc] += 1
    pooled /= np.maximum(weights, 1e-300)[:, None]
    if normalize:
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    pooled = pooled.astype(np.float32)
    for row, chunk in enumerate(chunks):
        if windows_of[chunk.doc] == 1:
            pooled[chunk.doc] = vectors[row]
    return pooled


def chunk_map_rows(chunks: Sequence[Chunk], doc_ids: Sequence[str]) -> list[dict]:
    """The sidecar rows of chunk vectors: each chunk's document, place, character span and token count."""
    return [{"doc": doc_ids[c.doc], "chunk": c.number, "start": c.start, "end": c.end, "tokens": c.count} for c in chunks]
