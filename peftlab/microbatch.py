"""Gather the inputs of concurrent requests into one forward pass (the server's request batching).

A forward pass over 16 texts can cost less than 16 passes over one, so under concurrent load the requests that queued
while the model was busy are labelled in one call, and each request gets its own rows back. Optionally a batch also
waits up to `wait_s` after its first request for more (a request alone then waits that much longer). The model runs on one worker thread in both modes: a CPU
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
    """A ModelWorker that joins the inputs of the requests waiting for the model into one call.

    A batch takes every request queued when it starts, then waits up to `wait_s` after its first for more. A request
    is never split: a batch closes when adding the next request would pass `max_batch` inputs. If the joined call raises (one request's input the model rejects),
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
                # What queued while the model ran joins at once; then wait up to the deadline for more.
                if not self.queue.empty():
                    request = self.queue.get_nowait()
                elif loop.time() < deadline:
                    try:
                        request = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
                else:
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
