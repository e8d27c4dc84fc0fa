"""What bounds `ullme serve`: every number a request or a flood of them can push against (docs/guide.md
"Serve"). The CLI checks each value (finite, in range) before the server starts."""

from __future__ import annotations

from dataclasses import dataclass

from ullme_cli.constants import SERVE_ON_LONG
from ullme_cli.options import check_choices, option


@dataclass(frozen=True)
class Limits:
    max_inputs: int = option(2048, "Texts per request (OpenAI's limit); more is a 413.")
    max_request_bytes: int = 8 * 2**20  # one request body, counted as it arrives (Content-Length or chunked)
    on_long: str = option("error", "An input longer than --max-length is a 413 (error), is cut as encode cuts it (truncate), or is embedded as windows of "
                               "max_length pooled by their token-weighted mean (mean)", SERVE_ON_LONG)  # fmt: skip
    timeout: float = option(60.0, "Seconds a request may wait for its vectors (then 504).")
    max_queue: int = option(8192, "Texts waiting for a batch, over all requests; past it requests get 503 with Retry-After.")
    max_wait: float = 0.005  # seconds the first text of a batch waits for others
    retry_after: int = 1  # seconds, in the 503 answer to overload
    # Request bodies held in memory at once, over all requests: past it a request gets 503, whatever the framing.
    max_buffered_bytes: int = 4 * 8 * 2**20
    # Characters waiting to be tokenized (off the event loop, one request at a time): past it, 503.
    max_tokenizing_chars: int = 4 * 8 * 2**20
    max_connections: int = 256  # open connections; uvicorn answers 503 past it

    def validate(self) -> "Limits":
        check_choices(self)
        return self
