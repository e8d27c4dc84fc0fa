"""Dynamic batching for `ullme serve`: concurrent requests share batches under ullme's token budget.

One worker thread owns the model. Requests put their tokenized texts in a bounded queue and await a
future; the worker waits at most `max_wait` after the first text arrives for others to join, takes up to
`token_budget` tokens (the oldest text first, then the waiting texts for the same model closest to its
length: a batch never mixes models, such as two adapters on one base), runs them in
length-sorted groups that pad little (`padding_groups`: one padded batch of mixed traffic ran at half the
offline rate on a 2-core EPYC), and hands each vector back to its request.

- The queue is bounded in texts: a request that would overflow it is refused at once (`Overloaded`),
  so memory stays bounded under any load and the caller can answer 503 with Retry-After.
- A request that is cancelled (its client went away, or it timed out) takes its waiting texts out of the
  queue; texts already in a running batch finish, and their vectors are dropped.
- `close()` stops taking requests, finishes everything queued, then ends the worker.

No web framework is imported here; serving/app.py puts HTTP around it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ullme_cli.errors import UllmeError


class Overloaded(UllmeError):
    """The queue cannot take this request now."""


class Closed(UllmeError):
    """The server is shutting down and takes no new work."""


@dataclass(eq=False)
class _Job:
    items: Sequence  # Tokenized
    model: str  # which of the served models encodes them
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    vectors: list = field(default_factory=list)
    remaining: int = 0

    def deliver(self, position: int, vector: np.ndarray) -> None:
        self.vectors[position] = vector
        self.remaining -= 1
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(self._resolve, np.stack(self.vectors))

    def fail(self, error: BaseException) -> None:
        self.remaining = -1  # never resolves twice
        self.loop.call_soon_threadsafe(self._reject, error)

    def _resolve(self, matrix: np.ndarray) -> None:
        if not self.future.done():
            self.future.set_result(matrix)

    def _reject(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Batcher:
    """Batches texts from concurrent requests for one `encode_batch(model, items) -> (n, d)` function."""

    def __init__(
        self,
        encode_batch: Callable[[str, Sequence], np.ndarray],
        token_budget: int,
        max_queue: int,
        max_wait: float = 0.005,
        max_batch: int = 256,
        on_batch: Callable[[int, int], None] | None = None,
    ):
        self.encode_batch, self.token_budget, self.max_queue = encode_batch, token_budget, max_queue
        self.max_wait, self.max_batch, self.on_batch = max_wait, max_batch, on_batch
        self._pending: deque[tuple[_Job, int]] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._run, name="ullme-batcher", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Texts waiting for a batch."""
        return len(self._pending)

    async def embed(self, items: Sequence, model: str = "") -> np.ndarray:
        """The vectors of `items` from `model`, in order, computed in shared batches. Raises Overloaded or
        Closed at once when the queue cannot take them; cancelling the awaiting task withdraws the waiting texts."""
        if not items:
            raise ValueError("no texts to embed")
        loop = asyncio.get_running_loop()
        job = _Job(items, model, loop, loop.create_future(), [None] * len(items), len(items))
        with self._lock:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._pending) + len(items) > self.max_queue:
                raise Overloaded(f"the queue holds {len(self._pending)} texts, and takes at most {self.max_queue}")
            self._pending.extend((job, position) for position in range(len(items)))
            self._lock.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._withdraw(job)
            raise

    def _withdraw(self, job: _Job) -> None:
        with self._lock:
            kept = [entry for entry in self._pending if entry[0] is not job]
            if len(kept) != len(self._pending):
                self._pending = deque(kept)

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the queued ones, and stop the worker."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._worker.join(timeout)

    # ---------------------------------------------------------------- the worker thread
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._lock.wait()
                if not self._pending:  # closing, and nothing left
                    return
                deadline = time.monotonic() + self.max_wait
                while not self._closing and not self._full() and (left := deadline - time.monotonic()) > 0:
                    self._lock.wait(left)
                if not self._pending:  # every waiting text was withdrawn meanwhile
                    continue
                batch = self._take()
            self._encode(batch)

    def _full(self) -> bool:
        return len(self._pending) >= self.max_batch or sum(len(job.items[p].ids) for job, p in self._pending) >= self.token_budget

    def _take(self) -> list[tuple[_Job, int]]:
        """The oldest waiting text, then the waiting texts for its model closest to its length while their
        tokens fit the budget (the oldest always goes, so no text waits behind shorter ones forever)."""
        oldest = self._pending[0]
        size = lambda entry: len(entry[0].items[entry[1]].ids)  # noqa: E731
        window = [entry for entry in list(self._pending)[: 4 * self.max_batch] if entry[0].model == oldest[0].model]
        chosen, tokens = [oldest], size(oldest)
        for entry in sorted(window[1:], key=lambda e: abs(size(e) - size(oldest))):
            if len(chosen) == self.max_batch:
                break
            if tokens + size(entry) <= self.token_budget:
                chosen.append(entry)
                tokens += size(entry)
        taken = {id(entry) for entry in chosen}
        self._pending = deque(entry for entry in self._pending if id(entry) not in taken)
        return chosen

    def _encode(self, batch: list[tuple[_Job, int]]) -> None:
        items = [job.items[position] for job, position in batch]
        model = batch[0][0].model
        vectors: list = [None] * len(items)
        try:
            for group in padding_groups([len(item.ids) for item in items]):
                for row, vector in zip(group, self.encode_batch(model, [items[i] for i in group])):
                    vectors[row] = vector
                if self.on_batch is not None:
                    self.on_batch(len(group), max(len(items[i].ids) for i in group) * len(group))
        except Exception as error:  # noqa: BLE001 - the requests in this batch fail; the server carries on
            for job in {id(job): job for job, _ in batch}.values():
                job.fail(error)
            return
        for (job, position), vector in zip(batch, vectors):
            if job.remaining > 0:
                job.deliver(position, vector)


def padding_groups(lengths: Sequence[int], min_tokens: int = 384, max_waste: float = 0.15) -> list[list[int]]:
    """Positions of `lengths` in length-sorted groups: a group closes once it holds `min_tokens` real tokens
    (enough rows for efficient matmuls) and the next text would make more than `max_waste` of its padded
    tokens padding. Measured on the demo corpus, 25 mixed texts at a time, 2-core EPYC: one padded batch
    7.3 texts/s, these groups 11.6, offline encode (sorted over the whole corpus) 14.0."""
    groups: list[list[int]] = []
    real = 0
    for position in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        length = lengths[position]
        if groups and real >= min_tokens and 1 - (real + length) / (length * (len(groups[-1]) + 1)) > max_waste:
            groups.append([])
            real = 0
        if not groups:
            groups.append([])
        groups[-1].append(position)
        real += length
    return groups
