"""What bounds `ullme serve`: every number a request or a flood of them can push against (docs/guide.md
"Serve"). The CLI checks each value (finite, in range) before the server starts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_inputs: int = 2048  # texts per request (OpenAI's limit)
    max_request_bytes: int = 8 * 2**20  # one request body, counted as it arrives (Content-Length or chunked)
    on_long: str = "error"  # an input over max_length: 413 (error), cut as `ullme encode` cuts it (truncate), or windows pooled (mean)
    timeout: float = 60.0  # seconds a request may wait for its vectors
    max_queue: int = 8192  # texts waiting for a batch, over all requests
    max_wait: float = 0.005  # seconds the first text of a batch waits for others
    retry_after: int = 1  # seconds, in the 503 answer to overload
    # Request bodies held in memory at once, over all requests: past it a request gets 503, whatever the framing.
    max_buffered_bytes: int = 4 * 8 * 2**20
    # Characters waiting to be tokenized (off the event loop, one request at a time): past it, 503.
    max_tokenizing_chars: int = 4 * 8 * 2**20
    max_connections: int = 256  # open connections; uvicorn answers 503 past it
