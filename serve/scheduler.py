"""Step-level batching for the service (DESIGN.md section 8): requests join the running batch between U-Net steps.

One worker thread drives an `engine.slots.SlotRunner`. Between two steps it frees the slots of requests whose
client went away or whose deadline passed, then chooses the rows of the next step among the running, preempted
and queued chunks of the batch's image size, by the least arrival + remaining steps (arrival counted in steps
run): shortest remaining work first (SRPT) among requests that arrived together, aged so that a long request
waits behind later short ones for at most about its own length. A 20-step request that arrives during a
300-step one runs at once, and the longer one is preempted (its state kept) and resumes where it was.
A step holds at most `step_rows` rows: by default the most whose U-Net cost per row is within 2 % of the
cheapest, measured once per image size (`choose_step_rows`): all slots where a row costs no more in a wider
batch (a GPU; these CPUs at small tiles), fewer where wider steps cost more per row. A request of another image
size waits until the running batch has drained, then starts one of its own; while it waits, no new request of
the running size starts. Same interface as `batcher.Batcher`, so the service can run either.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ddpm_engine.engine.slots import SlotJob, SlotRunner

from .batcher import Job, RequestTimeout, WorkQueue, finish

ROW_COST_TOLERANCE = 0.02  # steps wider than the cheapest per row may cost this much more: measurement noise


def choose_step_rows(seconds: list[float], tolerance: float = ROW_COST_TOLERANCE) -> int:
    """Rows per step from U-Net seconds at 1..n rows: the most whose cost per row is within `tolerance` of the
    cheapest. Wider is not slower per image, and the SRPT order puts short requests into every step anyway;
    narrow steps (measured with bench_serve at 64x64 on a 2-core CPU: 2 rows) let aged long requests hold the
    slots while short ones wait, and cost the 20-step class's p99 1.8x against 4 rows."""
    per_row = [s / rows for rows, s in enumerate(seconds, 1)]
    cheapest = min(per_row)
    return max(rows for rows, c in enumerate(per_row, 1) if c <= cheapest * (1 + tolerance))


@dataclass(eq=False)
class _Request:
    """A job and its chunks: `waiting` not yet started, `parts` all of them (results concatenate in order)."""

    job: Job
    parts: list[SlotJob]
    waiting: collections.deque = field(default_factory=collections.deque)
    order: int = 0  # arrival number: the tie-break, so equal work runs first come first served
    arrival: int = 0  # steps the scheduler had run when it arrived: the priority is arrival + remaining steps

    @property
    def gone(self) -> bool:
        return self.job.future.cancelled()


class StepScheduler(WorkQueue):
    """A bounded queue feeding a batch whose rows are at different steps of different requests."""

    def __init__(self, engine, max_queue: int = 64, max_batch: int | None = None, step_rows: int | None = None,
                 on_batch=None):
        super().__init__(max_queue, "ddpm-engine-scheduler")  # its queue: requests with a chunk out of the slots
        self.engine, self.on_batch = engine, on_batch  # on_batch(rows, seconds) after each step: metrics
        self.slots = SlotRunner(engine, max_batch)
        self.max_batch = self.slots.slots
        if step_rows is not None and not 1 <= step_rows <= self.max_batch:
            raise ValueError(f"step rows (--step-rows) must be in [1, {self.max_batch}] (the slots, --max-batch), "
                             f"got {step_rows}")
        self.step_rows = step_rows  # None: measured per image size (self.measured)
        self.measured: dict[tuple[int, int], tuple[int, list[float]]] = {}  # size -> (rows, U-Net seconds)
        self._running: dict[SlotJob, _Request] = {}  # started chunks, in the slots or preempted
        self._arrivals = itertools.count()
        self._steps_run = 0  # the scheduler's clock, in steps
        self._step_s = 0.0  # moving average of one step's duration: the Retry-After estimate
        self._thread.start()

    def retry_after_s(self) -> int:
        # Under the lock, reading only the queue (the worker changes _running outside it): chunks not in the slots.
        steps = sum(p.remaining * p.rows for r in self._queue for p in r.parts if p.start < 0 and p.result is None)
        return max(1, math.ceil(self._step_s * steps / self.max_batch))

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job; raises ValueError for inputs the engine refuses, QueueFull, or ShuttingDown after close()."""
        parts = self.slots.prepare(job.background, mask=job.mask, x_init=job.x_init, timesteps=job.timesteps,
                                   sampler=job.sampler, t_start=job.t_start, t_end=job.t_end, eta=job.eta,
                                   seed=job.seed)
        if job.preview_every:
            if len(parts) > 1:
                raise ValueError(f"previews need a request of at most {self.engine.max_batch} images (the engine's "
                                 f"batch), got {job.rows}")
            parts[0].preview_every, parts[0].on_preview = job.preview_every, job.on_preview
        self._enqueue(_Request(job, parts, collections.deque(parts), next(self._arrivals), self._steps_run))
        return job.future

    def _take_unstarted(self) -> list[Job]:
        # A request with a chunk started is running: it finishes (its deadline still applies).
        left = [r for r in self._queue if len(r.waiting) == len(r.parts)]
        self._queue = collections.deque(r for r in self._queue if len(r.waiting) != len(r.parts))
        return [r.job for r in left]

    # -- worker ----------------------------------------------------------------------------------

    def _candidates(self) -> list[tuple[SlotJob, _Request]]:
        """Under the lock: drop gone or expired unstarted requests, then list the chunks that may run next step."""
        now = time.monotonic()
        # Requests with a chunk already started are _evict_gone's (it frees their slots outside this lock).
        for request in [r for r in self._queue if (r.gone or now > r.job.deadline) and len(r.waiting) == len(r.parts)]:
            self._queue.remove(request)
            finish(request.job, RequestTimeout("the request timed out in the queue"))
        out = list(self._running.items())
        size = out[0][0].size if out else None
        for request in self._queue:  # in arrival order, up to the first request of another image size
            if not request.waiting:
                continue  # preempted, nothing unstarted: its chunks are in _running
            if size not in (None, request.waiting[0].size):
                break  # it waits for the running size to drain; later requests wait behind it, not starve it
            size = request.waiting[0].size
            out += [(p, request) for p in request.waiting]
        return out

    @staticmethod
    def _choose(candidates: list[tuple[SlotJob, _Request]], width: int) -> list[SlotJob]:
        """The least arrival + remaining steps first, up to `width` rows (a chunk wider than that runs alone)."""
        chosen, rows = [], 0
        for part, _ in sorted(candidates, key=lambda c: (c[1].arrival + c[0].remaining, c[1].order)):
            if not chosen or rows + part.rows <= width:
                chosen.append(part)
                rows += part.rows
        return chosen

    def _width(self, size: tuple[int, int]) -> int:
        if self.step_rows is not None:
            return self.step_rows
        if self.max_batch == 1:
            return 1
        if size not in self.measured:  # once per size, while the slots are idle (a new size starts on empty slots)
            seconds = self.slots.unet_seconds(size)
            self.measured[size] = (choose_step_rows(seconds), seconds)
        return self.measured[size][0]

    def _evict_gone(self) -> None:
        """Free at this step boundary the slots of requests whose client went away or whose deadline passed."""
        now = time.monotonic()
        gone = [p for p, r in self._running.items() if r.gone or now > r.job.deadline]
        if gone:  # a cancelled request's future takes no exception: only the expired ones hear of it
            self._fail(gone, RequestTimeout("the request passed its deadline while running"))

    def _next_rows(self) -> bool:
        """Arrange the slots for the next step; False when there is nothing to run."""
        with self._cond:
            candidates = self._candidates()
        if not candidates:
            return False
        chosen = self._choose(candidates, self._width(candidates[0][0].size))
        owner = dict(candidates)
        with self._cond:
            for part in chosen:  # the chosen unstarted chunks start now
                if part not in self._running:
                    owner[part].waiting.remove(part)
                    self._running[part] = owner[part]
            # the queue holds the requests with a chunk out of the slots: unstarted or preempted
            out = {r for p, r in self._running.items() if p not in chosen}
            self._queue = collections.deque(sorted({*(r for r in self._queue if r.waiting), *out},
                                                   key=lambda r: r.order))
        self.slots.preempt([p for p in self.slots.jobs if p not in chosen])
        for part in chosen:
            if part not in self.slots.jobs:
                try:
                    self.slots.admit(part)
                except Exception as exc:  # noqa: BLE001 - that request gets the error; the worker lives on
                    self._fail([part], exc)
        return True

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._running:
                    if self._closed:
                        return
                    self._cond.wait()
            self._evict_gone()
            if not self._next_rows() or not self.slots.jobs:
                continue  # the queued requests were all gone, or failed to start: back to waiting for work
            rows, start = self.slots.busy, time.perf_counter()
            try:
                finished = self.slots.step()
            except Exception as exc:  # noqa: BLE001 - the batch's requests get the error; the worker lives on
                self._fail(list(self._running), exc)
                continue
            seconds = time.perf_counter() - start
            self._steps_run += 1
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
