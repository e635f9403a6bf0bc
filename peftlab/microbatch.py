"""Gather the inputs of concurrent requests into one forward pass (the server's request batching).

A forward pass over 16 texts costs far less than 16 passes over one, so under concurrent load the server waits a few
milliseconds after the first request for others, labels all their inputs in one call, and hands each request its own
rows. One request alone waits at most `wait_s` longer. The model runs on one worker thread in both modes: a CPU
forward pass already uses every intra-op thread, and two at once only contend for them.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence


class ModelWorker:
    """Runs `fn(inputs) -> rows` (one row per input) on one thread, one call at a time, without blocking the loop."""

    def __init__(self, fn: Callable[[list], Sequence]):
        self.fn = fn
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def __call__(self, inputs: list) -> list:
        """The rows for `inputs`, computed now (no batching across requests)."""
        return list(await asyncio.get_running_loop().run_in_executor(self.executor, self.fn, inputs))

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class MicroBatcher(ModelWorker):
    """A ModelWorker that joins the inputs of requests arriving within `wait_s` of each other into one call.

    A request is never split: a batch closes when adding the next request would pass `max_batch` inputs, or when
    `wait_s` has passed since its first request. If the joined call raises (one request's input the model rejects),
    each request of that batch is run alone, so only the request at fault gets the error.
    """

    def __init__(self, fn: Callable[[list], Sequence], *, max_batch: int, wait_s: float):
        super().__init__(fn)
        self.max_batch, self.wait_s = max_batch, wait_s
        self.queue: asyncio.Queue[tuple[list, asyncio.Future]] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def __call__(self, inputs: list) -> list:
        if self.task is None:  # started on first use, inside the server's event loop
            self.task = asyncio.get_running_loop().create_task(self._gather_and_run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((inputs, future))
        return await future

    async def _gather_and_run(self) -> None:
        loop = asyncio.get_running_loop()
        waiting: tuple[list, asyncio.Future] | None = None  # a request that did not fit the previous batch
        while True:
            batch = [waiting or await self.queue.get()]
            waiting, size = None, len(batch[0][0])
            deadline = loop.time() + self.wait_s
            while size < self.max_batch:
                try:
                    request = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if size + len(request[0]) > self.max_batch:
                    waiting = request
                    break
                batch.append(request)
                size += len(request[0])
            await self._run(batch)

    async def _run(self, batch: list[tuple[list, asyncio.Future]]) -> None:
        live = [(inputs, future) for inputs, future in batch if not future.cancelled()]  # client gone: skip it
        if not live:
            return
        try:
            rows = await super().__call__([x for inputs, _ in live for x in inputs])
        except Exception as err:
            if len(live) == 1:
                if not live[0][1].done():
                    live[0][1].set_exception(err)
            else:
                for request in live:
                    await self._run([request])
            return
        start = 0
        for inputs, future in live:
            if not future.done():
                future.set_result(rows[start:start + len(inputs)])
            start += len(inputs)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await super().close()
