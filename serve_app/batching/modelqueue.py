"""`ModelQueue`: the replica's model queue, between Serve's batch queue and the one forward that runs at a time.

Serve's `@serve.batch` closes batches (its max_batch_size and wait) and its handler hands each one here at once
(serve_app/replica.py, `ModelServer._batched`; with no wait the request path puts each request here itself);
each forward takes the oldest requests waiting, up to the controller's max_batch_size at that moment, so batches
still hold what queued while the last one ran (the server model the controllers assume,
`BatchingConfig.model_blocks_loop`) while the event loop stays free. The replica and the simulator
(serve_app/simulator.py, its default `handler="queue"`) both take their batches from this class, so the simulated
discipline is the replica's own."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

from serve_app.batching.policy import BatchingPolicy

T = TypeVar("T")


class ModelQueue(Generic[T]):
    """Requests whose Serve batch has closed, waiting for the model, oldest first.

    `put` adds a closed batch; `take` pops the next forward's batch (counted by `policy.batch_start`); `feed`
    (the replica) adds a batch and keeps one runner task draining the queue through `run(batch)`, one batch at
    a time. `skip(item)`: an item to drop when its turn comes (a request whose client left)."""

    def __init__(self, policy: BatchingPolicy, skip: Callable[[T], bool] | None = None) -> None:
        if not isinstance(policy, BatchingPolicy):
            raise TypeError(f"policy must be a BatchingPolicy, got {type(policy).__name__}")
        self.policy = policy
        self._skip = skip
        self._items: deque[T] = deque()
        self._runner: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, items: Iterable[T]) -> None:
        self._items.extend(items)

    def take(self) -> list[T]:
        """The next batch: the oldest items not skipped, up to the controller's max_batch_size now (a new cap
        applies from the next forward, as Serve applies it from the next batch it opens); counted as started
        when not empty."""
        cap = self.policy.settings.max_batch_size
        batch: list[T] = []
        while self._items and len(batch) < cap:
            item = self._items.popleft()
            if self._skip is None or not self._skip(item):
                batch.append(item)
        if batch:
            self.policy.batch_start(len(batch))
        return batch

    def feed(self, items: Iterable[T], run: Callable[[list[T]], Awaitable[None]]) -> None:
        """`put`, and start the runner on the running loop unless one is draining already."""
        self.put(items)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self.drain(run))

    async def drain(self, run: Callable[[list[T]], Awaitable[None]]) -> None:
        """Runs the queue dry, one batch at a time: `await run(batch)` for each `take`, which sees what queued
        while the last batch ran."""
        while self._items:
            batch = self.take()
            if batch:
                await run(batch)
