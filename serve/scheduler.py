"""Step-level batching for the service (DESIGN.md section 8): requests join the running batch between U-Net steps.

One worker thread drives an `engine.slots.SlotRunner`: between two steps it frees the slots of requests whose
client went away or whose deadline passed, admits queued requests into free slots (in arrival order; a request of
another image size waits until the running batch has drained, then starts one of its own), steps the batch once
and hands finished requests their result. Same interface as `batcher.Batcher`, so the service can run either.
"""
from __future__ import annotations

import collections
import concurrent.futures
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ddpm_engine.engine.slots import SlotJob, SlotRunner

from .batcher import Job, RequestTimeout, WorkQueue, finish


@dataclass(eq=False)
class _Request:
    """A job and its chunks: `waiting` not yet admitted, `parts` all of them (results concatenate in order)."""

    job: Job
    parts: list[SlotJob]
    waiting: collections.deque = field(default_factory=collections.deque)

    @property
    def gone(self) -> bool:
        return self.job.future.cancelled()


class StepScheduler(WorkQueue):
    """A bounded queue feeding a batch whose rows are at different steps of different requests."""

    def __init__(self, engine, max_queue: int = 64, max_batch: int | None = None, on_batch=None):
        super().__init__(max_queue, "ddpm-engine-scheduler")  # its queue holds _Requests not (fully) admitted
        self.engine, self.on_batch = engine, on_batch  # on_batch(rows, seconds) after each step: metrics
        self.slots = SlotRunner(engine, max_batch)
        self.max_batch = self.slots.slots
        self._running: dict[SlotJob, _Request] = {}
        self._step_s = 0.0  # moving average of one step's duration: the Retry-After estimate
        self._thread.start()

    def retry_after_s(self) -> int:
        steps = sum(p.remaining * p.rows for r in self._queue for p in r.waiting)
        return max(1, math.ceil(self._step_s * steps / self.max_batch))

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job; raises ValueError for inputs the engine refuses, QueueFull, or ShuttingDown after close()."""
        parts = self.slots.prepare(job.background, mask=job.mask, x_init=job.x_init, timesteps=job.timesteps,
                                   sampler=job.sampler, t_start=job.t_start, t_end=job.t_end, eta=job.eta,
                                   seed=job.seed)
        self._enqueue(_Request(job, parts, collections.deque(parts)))
        return job.future

    def _take_unstarted(self) -> list[Job]:
        # A request with a chunk in the slots is running: it finishes (its deadline still applies).
        left = [r for r in self._queue if len(r.waiting) == len(r.parts)]
        self._queue = collections.deque(r for r in self._queue if len(r.waiting) != len(r.parts))
        return [r.job for r in left]

    # -- worker ----------------------------------------------------------------------------------

    def _admissible(self) -> list[SlotJob]:
        """Under the lock: drop gone or expired queued requests, then pop the chunks that join at this boundary."""
        now = time.monotonic()
        # Requests with a chunk already running are _evict_gone's (it frees their slots outside this lock).
        for request in [r for r in self._queue if (r.gone or now > r.job.deadline) and len(r.waiting) == len(r.parts)]:
            self._queue.remove(request)
            finish(request.job, RequestTimeout("the request timed out in the queue"))
        admitted, rows, size = [], self.slots.busy, self.slots.size
        while self._queue:  # strictly in arrival order: a large or other-size request is not starved by later ones
            request = self._queue[0]
            part = request.waiting[0]
            if rows + part.rows > self.slots.slots or size not in (None, part.size):
                break
            request.waiting.popleft()
            self._running[part] = request
            admitted.append(part)
            rows, size = rows + part.rows, part.size
            if not request.waiting:
                self._queue.popleft()
        return admitted

    def _evict_gone(self) -> None:
        """Free at this step boundary the slots of requests whose client went away or whose deadline passed."""
        now = time.monotonic()
        gone = [p for p, r in self._running.items() if r.gone or now > r.job.deadline]
        if gone:  # a cancelled request's future takes no exception: only the expired ones hear of it
            self._fail(gone, RequestTimeout("the request passed its deadline while running"))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._running:
                    if self._closed:
                        return
                    self._cond.wait()
            self._evict_gone()
            with self._cond:
                admitted = self._admissible()
            for part in admitted:
                try:
                    self.slots.admit(part)
                except Exception as exc:  # noqa: BLE001 - that request gets the error; the worker lives on
                    self._fail([part], exc)
            if not self.slots.jobs:  # the queued requests were all gone: back to waiting for work
                continue
            rows, start = self.slots.busy, time.perf_counter()
            try:
                finished = self.slots.step()
            except Exception as exc:  # noqa: BLE001 - the batch's requests get the error; the worker lives on
                self._fail(list(self._running), exc)
                continue
            seconds = time.perf_counter() - start
            self._step_s = seconds if self._step_s == 0 else 0.9 * self._step_s + 0.1 * seconds
            if self.on_batch is not None:
                self.on_batch(rows, seconds)
            for part in finished:
                request = self._running.pop(part)
                if not request.waiting and all(p.result is not None for p in request.parts):
                    finish(request.job, np.concatenate([p.result.numpy() for p in request.parts]))

    def _fail(self, parts: list[SlotJob], exc: Exception) -> None:
        """The requests of these chunks end with `exc`: all their chunks leave the slots and the queue."""
        requests = {self._running[p] for p in parts}
        self.slots.evict([p for p, r in self._running.items() if r in requests])
        for request in requests:
            for p in request.parts:
                self._running.pop(p, None)
            with self._cond:
                if request in self._queue:
                    self._queue.remove(request)
            finish(request.job, exc)

