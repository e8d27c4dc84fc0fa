"""What bounds `ullme serve`: every number a request or a flood of them can push against (docs/guide.md
"Serve"). `from_flags` checks each value the CLI gives (finite, in range) before the server starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ullme_cli.constants import SERVE_ON_LONG
from ullme_cli.errors import UllmeError
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

    @classmethod
    def from_flags(cls, max_inputs: int, max_request_mb: float, on_long: str, truncate: bool, timeout: float, max_queue: int,
                   max_wait_ms: float) -> "Limits":  # fmt: skip
        """The limits `ullme serve`'s flags ask for, each checked (finite, in range) in its flag's own unit before it is
        converted; `truncate` is the older spelling of `on_long="truncate"`."""
        for name, value in (("--max-inputs", max_inputs), ("--max-queue", max_queue)):
            if value < 1:
                raise UllmeError(f"{name} must be at least 1, got {value}")
        for name, value, low, high in (("--timeout", timeout, 0, 86400), ("--max-request-mb", max_request_mb, 0, 1024), ("--max-wait-ms", max_wait_ms, None, 10000)):
            if not math.isfinite(value) or not (value > low if low is not None else value >= 0) or value > high:
                raise UllmeError(f"{name} must be {'above 0' if low is not None else '0 or more'} and at most {high:g}, got {value:g}")
        if truncate and on_long not in ("truncate", cls.on_long):
            raise UllmeError(f"--truncate and --on-long {on_long} disagree; give one")
        return cls(max_inputs=max_inputs, max_request_bytes=int(max_request_mb * 2**20), on_long="truncate" if truncate else on_long, timeout=timeout,
                   max_queue=max_queue, max_wait=max_wait_ms / 1000).validate()  # fmt: skip
