"""Dynamic batching for services: requests with the same sampling settings share one Engine.sample call.

A request's result never depends on what it was batched with: rows of different requests run in one
U-Net batch, but each request's noise comes from its own seed (`Engine.sample(segments=...)`), so it equals
a direct `Engine.sample(its inputs, seed=its seed)`. Where the engine cannot do that (the Triton step keys
noise in-kernel), a group runs as one call per request, still in arrival order.
"""
from __future__ import annotations

import abc
import collections
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class QueueFull(Exception):
    """The bounded queue is full: answer 503 with Retry-After."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The service is stopping and takes no more work (or could not finish this request)."""


class RequestTimeout(Exception):
    """The request waited in the queue past its deadline."""


@dataclass(eq=False)  # identity, not array comparison
class Job:
    """One request: its arrays ([B, C, H, W] float32), sampling settings, seed and deadline."""

    background: np.ndarray
    mask: np.ndarray | None = None
    x_init: np.ndarray | None = None
    timesteps: int = 300
    sampler: str = "ddpm"
    t_start: float = 1.0
    t_end: float = 0.0
    eta: float = 0.0
    seed: int = 0
    deadline: float = math.inf  # time.monotonic() after which the job is dropped unstarted
    preview_every: int = 0  # step-level batching only: on_preview(steps done, x0_hat) every that many steps
    on_preview: Callable[[int, np.ndarray], None] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return self.background.shape[0]

    @property
    def key(self) -> tuple:
        """Everything that must be equal for two jobs to share one sampling call (the seed need not be)."""
        return (self.timesteps, self.sampler, float(self.t_start), float(self.t_end), float(self.eta),
                self.background.shape[1:], self.mask is not None, self.x_init is not None)


def _sample_one(engine, job: Job) -> np.ndarray:
    return engine.sample(job.background, mask=job.mask, x_init=job.x_init, timesteps=job.timesteps,
                         sampler=job.sampler, t_start=job.t_start, t_end=job.t_end, eta=job.eta, seed=job.seed)


def run_group(engine, jobs: list[Job]) -> list:
    """Sample jobs that share one key; returns, per job, its [B, C_out, H, W] array or the exception it raised."""
    first = jobs[0]
    rows = sum(j.rows for j in jobs)
    if len(jobs) > 1 and getattr(engine.runner, "step_impl", None) == "torch" and rows <= engine.max_batch:
        def cat(name):
            arrays = [getattr(j, name) for j in jobs]
            if arrays[0] is None:
                return None
            if name == "mask":  # [1 or b, 1 or C, H, W] -> [b, C, H, W] so that masks of several jobs stack
                arrays = [np.broadcast_to(m, (j.rows, engine.c_out) + m.shape[2:]) for m, j in zip(arrays, jobs)]
            return np.concatenate(arrays)

        try:
            out = engine.sample(cat("background"), mask=cat("mask"), x_init=cat("x_init"), timesteps=first.timesteps,
                                sampler=first.sampler, t_start=first.t_start, t_end=first.t_end, eta=first.eta,
                                segments=[(j.rows, j.seed) for j in jobs])
            return list(np.split(out, np.cumsum([j.rows for j in jobs])[:-1]))
        except ValueError:
            pass  # one job's input is bad: run them one by one so that only that job gets the error
    results = []
    for job in jobs:
        try:
            results.append(_sample_one(engine, job))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request, not swallowed
            results.append(exc)
    return results


def split_groups(jobs: list[Job], max_rows: int) -> list[list[Job]]:
    """Jobs -> groups of equal key and at most max_rows rows (a larger job alone), in arrival order."""
    groups: list[list[Job]] = []
    open_: dict[tuple, list[Job]] = {}
    for job in jobs:
        group = open_.get(job.key)
        if group is None or sum(j.rows for j in group) + job.rows > max_rows:
            group = open_[job.key] = []
            groups.append(group)
        group.append(job)
    return groups


def finish(job: Job, outcome) -> None:
    """Hand the job its result or exception, unless its client cancelled it (then nobody reads it)."""
    if job.future.set_running_or_notify_cancel():
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


class WorkQueue(abc.ABC):
    """A bounded queue drained by one worker thread (`_work`): what the Batcher and the step scheduler share."""

    def __init__(self, max_queue: int, name: str):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    @property
    def depth(self) -> int:
        """Requests waiting (not yet running)."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def _enqueue(self, item) -> None:
        """Queue an item for the worker; raises QueueFull or ShuttingDown instead of growing or accepting after
        close()."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the service is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after_s())
            self._queue.append(item)
            self._cond.notify()

    def close(self, drain_timeout_s: float = 30.0) -> None:
        """Take no new jobs, finish the queued ones for up to drain_timeout_s, reject those not started."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(drain_timeout_s)
        with self._cond:
            left = self._take_unstarted()
        for job in left:
            finish(job, ShuttingDown("the service shut down before this request ran"))

    @abc.abstractmethod
    def retry_after_s(self) -> int:
        """Seconds a refused client should wait: the queue's expected drain time."""

    @abc.abstractmethod
    def _take_unstarted(self) -> list[Job]:
        """Under the lock, after the drain time: remove and return the jobs that have not started."""

    @abc.abstractmethod
    def _work(self) -> None:
        """The worker thread's loop; returns once closed and drained."""


class Batcher(WorkQueue):
    """A bounded queue drained by one worker thread that runs each batch on the engine.

    The worker takes the oldest job, waits up to `window_s` (from that job's arrival) for more rows with the
    same key until `max_batch` rows are there, then samples them together. Cancelled futures (clients that went
    away) and jobs past their deadline are dropped before they cost a model call.
    """

    def __init__(self, engine, max_queue: int = 64, max_batch: int | None = None, window_s: float = 0.005,
                 on_batch=None):
        super().__init__(max_queue, "ddpm-engine-batcher")
        self.engine, self.window_s = engine, window_s
        self.max_batch = min(max_batch or engine.max_batch, engine.max_batch)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.on_batch = on_batch  # called (rows, seconds) after each engine call: metrics
        self._batch_s = 0.0  # moving average of one batch's duration: the Retry-After estimate
        self._thread.start()

    def retry_after_s(self) -> int:
        batches = math.ceil((len(self._queue) + 1) / self.max_batch)
        return max(1, math.ceil(batches * self._batch_s))

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job; raises QueueFull or ShuttingDown instead of growing or accepting after close()."""
        self._enqueue(job)
        return job.future

    def _take_unstarted(self) -> list[Job]:
        left = list(self._queue)
        self._queue.clear()
        return left

    # -- worker ----------------------------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        """Under the lock: wait for work, then pop the oldest job's group (None once closed and empty)."""
        while not self._queue:
            if self._closed:
                return None
            self._cond.wait()
        first = self._queue[0]
        key, until = first.key, first.enqueued + self.window_s
        while not self._closed:
            rows = sum(j.rows for j in self._queue if j.key == key)
            left = until - time.monotonic()
            if rows >= self.max_batch or left <= 0:
                break
            self._cond.wait(left)
        taken, rows, keep = [], 0, collections.deque()
        for job in self._queue:
            fits = job.key == key and (not taken or rows + job.rows <= self.max_batch)
            if fits:
                taken.append(job)
                rows += job.rows
            else:
                keep.append(job)
        self._queue = keep
        return taken

    def _work(self) -> None:
        while True:
            with self._cond:
                taken = self._take()
            if taken is None:
                return
            now = time.monotonic()
            live = []
            for job in taken:
                if not job.future.set_running_or_notify_cancel():
                    continue  # the client went away
                if now > job.deadline:
                    job.future.set_exception(RequestTimeout("the request timed out in the queue"))
                    continue
                live.append(job)
            if not live:
                continue
            start = time.perf_counter()
            try:
                results = run_group(self.engine, live)
            except Exception as exc:  # noqa: BLE001 - never let one batch kill the worker
                results = [exc] * len(live)
            seconds = time.perf_counter() - start
            self._batch_s = seconds if self._batch_s == 0 else 0.8 * self._batch_s + 0.2 * seconds
            if self.on_batch is not None:
                self.on_batch(sum(j.rows for j in live), seconds)
            for job, result in zip(live, results):
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
