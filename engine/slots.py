"""Iteration-level batching, Orca (Yu et al. 2022): requests join and leave one running U-Net batch at every step.

Each batch row is a slot holding one row of a request at its own place in its own loop: an offset into one
concatenated step table and a step index (int64 device tensors), plus the request's mask, x_init and background.
A step is one U-Net call over the busy slots and one per-row fused step (kernels.fused_step_slots). A running job
can be preempted between steps (its rows of state move onto the job, as vLLM swaps a sequence out) and resumed
later from exactly that state, so a scheduler may choose at every step which jobs hold the slots. Noise is
keyed by the request's own seed and its own step numbering, never by the slot, exactly as the engine's step draws
it (torch step: a generator per request, drawn in its step order; Triton step: Philox keyed by (seed, phase =
step, plane = its own row)): a request's result equals `Engine.sample(its inputs, seed=its seed)` whatever it
shared the batch with and whenever it joined (bitwise on CPU, given a U-Net whose rows do not depend on the batch;
see README "Step-level batching").
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ddpm_engine.kernels.fused_step import initial_torch
from ddpm_engine.kernels.fused_step_slots import step_slots_torch

from .runner import BufferSet, Runner, _randn, capture_step
from .samplers import COL_AO, COL_AX, COL_BLEND, COL_CLIP, COL_RX, COL_RZ, StepTable, step_table
from .validation import check_seed

_CARRIED = ("x", "x_init", "mask", "sample", "timestep", "x0_prev")  # per-row state that survives a change of batch layout


class GeneratorNoise:
    """The torch step's noise: one torch.Generator per request chunk, drawn in the order Engine.sample draws."""

    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def draw(self, phase: int, a: torch.Tensor, b: torch.Tensor, draw_a: bool, draw_b: bool) -> None:
        """Fill a (eps0 / eps2) and b (eps1) of `phase` where asked (phase 0: initial step; i + 1: step i)."""
        if draw_a:
            _randn(a, self.generator)
        if draw_b:
            _randn(b, self.generator)


class PhiloxNoise:
    """The Triton step's noise: Philox keyed by (seed, phase, plane), the chunk's own planes numbered from 0."""

    def __init__(self, seed: int, device: torch.device):
        from ddpm_engine.kernels import philox_noise

        self.seed, self.philox_noise = torch.tensor([seed], dtype=torch.int64, device=device), philox_noise

    def draw(self, phase: int, a: torch.Tensor, b: torch.Tensor, draw_a: bool, draw_b: bool) -> None:
        if draw_a or draw_b:  # one launch gives both; the kernel draws them at every phase, used or not
            na, nb = self.philox_noise(self.seed, phase, a.shape)
            a.copy_(na)
            b.copy_(nb)


@dataclass(eq=False)
class SlotJob:
    """One chunk of a request (at most max_batch rows, as Engine.sample splits it): inputs, table, noise stream."""

    background: torch.Tensor  # [r, C_bg, H, W] on the device
    table: StepTable  # rows on the device
    noise: GeneratorNoise | PhiloxNoise  # keyed by the chunk's seed: the noise Engine.sample would draw
    blends: list[bool]  # per step: whether this chunk blends its known pixels before that step's U-Net call
    seed: int = 0  # the chunk's seed (the per-slot Triton kernel keys its Philox noise by it)
    mask: torch.Tensor | None = None  # [r, C, H, W]
    x_init: torch.Tensor | None = None
    init_image: torch.Tensor | None = None
    step: int = 0  # steps done (host mirror of the device step index)
    start: int = -1  # first batch row while admitted
    preempted: dict[str, torch.Tensor] | None = None  # its rows of the carried state while preempted
    preview_every: int = 0  # > 0: on_preview(steps done, x0_hat [r, C, H, W] numpy) after every that many U-Net calls
    on_preview: Callable[[int, np.ndarray], None] | None = None
    result: torch.Tensor | None = None  # [r, C, H, W] on the CPU once finished

    @property
    def rows(self) -> int:
        return self.background.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.background.shape[2:])

    @property
    def remaining(self) -> int:
        return self.table.timesteps - self.step


class SlotRunner:
    """Up to `slots` rows of any requests of one image size, stepped together; not thread-safe (one worker drives it)."""

    def __init__(self, engine, slots: int | None = None, cuda_graphs: bool = True):
        slots = engine.max_batch if slots is None else slots
        if not 1 <= slots <= engine.max_batch:
            raise ValueError(f"slots must be in [1, {engine.max_batch}] (the engine's built maximum batch), got {slots}")
        self.engine, self.slots, self.device = engine, slots, engine.runner.device
        # A Triton-step engine's slots step in one launch that draws each row's noise in-kernel (its request's seed,
        # step and planes); the torch step's noise comes from per-request generators on the host.
        self._triton = engine.runner.step_impl == "triton"
        self._noise = PhiloxNoise if self._triton else GeneratorNoise
        if self._triton:  # imported here: triton is optional, and only Triton-step engines get here
            from ddpm_engine.kernels.fused_step_slots_triton import step_slots_triton

            self._step_slots_triton = step_slots_triton
        # Buffers of its own on the same backend: an Engine.sample call between two steps must not overwrite slots.
        self._runner = Runner(engine.runner.backend, c_out=engine.c_out, c_in=engine.c_in, step="torch",
                              cuda_graphs=False)
        # Where the engine's own loop replays CUDA graphs (Triton step on CUDA, a capturable backend), so do the
        # slots: one graph per slot count (buffer set), valid for any mix of requests, since every per-row input
        # of the step lives in that set's persistent tensors.
        self.cuda_graphs = cuda_graphs and engine.runner.cuda_graphs
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.jobs: list[SlotJob] = []  # admitted, in row order
        self._bufs: BufferSet | None = None
        self._per_row: dict[str, torch.Tensor] = {}

    @property
    def busy(self) -> int:
        return sum(j.rows for j in self.jobs)

    @property
    def size(self) -> tuple[int, int] | None:
        """The image size of the running batch (None when idle: any size may start one)."""
        return self.jobs[0].size if self.jobs else None

    def prepare(self, background, mask=None, x_init=None, timesteps: int = 300, sampler: str = "ddpm",
                t_start: float = 1.0, t_end: float = 0.0, eta: float = 0.0, tau: float = 1.0, init: str = "noise",
                seed: int = 0, spacing: str = "time") -> list[SlotJob]:
        """A request's chunks, split and seeded as Engine.sample splits them; ValueError naming a bad input."""
        engine = self.engine
        background, mask, x_init, init_from, (_, c, h, w) = engine.checked_inputs(background, mask, x_init, init)
        check_seed(seed)
        table = step_table(engine.schedule, sampler, timesteps, t_start, t_end, eta=eta, tau=tau, spacing=spacing)
        host_blend = (table.rows[:, COL_BLEND] != 0).tolist()
        dev_table = table.to(self.device)
        on_dev = lambda t: None if t is None else t.to(self.device, torch.float32)  # noqa: E731
        parts = []
        for part, part_seed in engine.chunks(background.shape[0], seed):
            bg = on_dev(background[part])
            if bg.shape[0] > self.slots:
                raise ValueError(f"a request of {bg.shape[0]} images cannot run: this server steps at most "
                                 f"{self.slots} images at a time (--max-batch)")
            part_mask = None if mask is None else on_dev(mask if mask.shape[0] == 1 else mask[part])
            parts.append(SlotJob(
                background=bg, table=dev_table,
                noise=self._noise(part_seed, self.device), seed=part_seed,
                blends=[mask is not None and b for b in host_blend],
                mask=None if part_mask is None else part_mask.expand(bg.shape[0], c, h, w),
                x_init=None if x_init is None else on_dev(x_init[part]),
                init_image=None if init_from is None else on_dev(init_from[part])))
        return parts

    def fits(self, job: SlotJob) -> bool:
        """Whether the job can join the running batch now (free slots and the same image size)."""
        return self.busy + job.rows <= self.slots and self.size in (None, job.size)

    @torch.no_grad()
    def admit(self, job: SlotJob) -> None:
        """Give the job free slots and run its initial step (x_T and its first blend) for those rows only; a
        preempted job resumes from the state it left with instead."""
        if not self.fits(job):
            raise ValueError(f"a job of {job.rows} images of size {job.size} does not fit: {self.busy}/{self.slots} "
                             f"slots busy with size {self.size}")
        with self.engine.lock:
            resumed = job.preempted is not None
            self._layout(self.jobs + [job])
            if resumed:
                return
            b, rows, c = self._bufs, slice(job.start, job.start + job.rows), self.engine.c_out
            b.sample[rows, c:].copy_(job.background)
            blend = job.blends[0]
            if job.mask is not None:
                b.mask[rows].copy_(job.mask)
                b.x_init[rows].copy_(job.x_init)
            b.x0_prev[rows].zero_()  # a multistep sampler's history starts empty, as in Engine.sample
            eps0, eps1 = b.noise[0][rows], b.noise[1][rows]
            job.noise.draw(0, eps0, eps1, True, blend)
            initial_torch(b.x[rows], job.table.rows, eps0, eps1 if blend else None, model_in=b.sample[rows],
                          t_in=b.timestep[rows], mask=b.mask[rows] if blend else None,
                          x_init=b.x_init[rows] if blend else None, init_image=job.init_image)

    @torch.no_grad()
    def step(self) -> list[SlotJob]:
        """One U-Net call over the busy slots and one per-row fused step; returns the jobs that finished (freed)."""
        if not self.jobs:
            return []
        b = self._bufs
        with self.engine.lock:
            previews = [j for j in self.jobs if j.preview_every and (j.step + 1) % j.preview_every == 0]
            if self.cuda_graphs and not previews:  # a preview reads the U-Net output between the two: no graph
                self._graph().replay()
            else:
                b.run_unet()
                for job in previews:
                    job.on_preview(job.step + 1, self._x0_hat(job))
                self._fused_step()
            finished = []
            for job in self.jobs:
                job.step += 1
                if job.remaining == 0:
                    job.result = b.x[job.start:job.start + job.rows].to("cpu", copy=True)
                    finished.append(job)
            if finished:
                self._layout([j for j in self.jobs if j.result is None])
        return finished

    def _fused_step(self) -> None:
        """Every slot's fused step after the U-Net call, then step += 1 on the device."""
        b, p = self._bufs, self._per_row
        per_row = dict(draws=p["draws"], masked=p["masked"], x0_form=p["x0_form"], history=p["history"],
                       x0_prev=b.x0_prev, model_in=b.sample, t_in=b.timestep, mask=b.mask, x_init=b.x_init)
        if self._triton:
            self._step_slots_triton(b.x, b.eps, p["table"], p["offset"], p["step"], p["length"], p["seed"],
                                    p["plane0"], **per_row)
        else:
            for job in self.jobs:  # each job's own draws for its step: eps2, then the eps1 of its next blend
                rows = slice(job.start, job.start + job.rows)
                blend_next = job.step + 1 < job.table.timesteps and job.blends[job.step + 1]
                job.noise.draw(job.step + 1, b.noise[0][rows], b.noise[1][rows], job.table.draws_step_noise,
                               blend_next)
            step_slots_torch(b.x, b.eps, p["table"], p["offset"], p["step"], p["length"], *b.noise, **per_row)
        p["step"].add_(1)

    def _graph(self) -> torch.cuda.CUDAGraph:
        """The captured step (U-Net + fused step + step += 1) of the current buffer set, captured on first use."""
        b = self._bufs
        if "slots" not in b.graphs:
            def one_step():
                b.run_unet()
                self._fused_step()

            b.graphs["slots"] = capture_step(one_step, (b.x, b.sample, b.timestep, b.x0_prev, self._per_row["step"]),
                                             self.device, self._pool)
        return b.graphs["slots"]

    def evict(self, jobs) -> None:
        """Free the slots of jobs that will not finish (cancelled, past their deadline); effective from the next step."""
        gone = set(jobs)
        with self.engine.lock:
            for job in gone:
                job.preempted = None
            self._layout([j for j in self.jobs if j not in gone])

    def preempt(self, jobs) -> None:
        """Free the slots of running jobs that will resume later (`admit`): their rows of state move onto the job."""
        out = set(jobs)
        with self.engine.lock:
            for job in out:
                job.preempted = self._state(job)
            self._layout([j for j in self.jobs if j not in out])

    @torch.no_grad()
    def unet_seconds(self, size: tuple[int, int], rounds: int = 5, budget_s: float = 1.0) -> list[float]:
        """Seconds of one U-Net call at 1, 2, ..., `slots` rows of this size: the best of up to `rounds` calls each
        (at least two; fewer once the rounds have taken `budget_s`, so large tiles stay cheap to measure), after a
        warm-up call that also compiles the shape. Each round times every row count in turn, so a change in the
        machine's load moves them alike. The cost curve a scheduler sizes its steps by; only while idle."""
        if self.jobs:
            raise RuntimeError("unet_seconds times the slots' own buffers: call it while no job is admitted")
        cuda = self.device.type == "cuda"

        def timed(bufs) -> float:
            if cuda:
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            bufs.run_unet()
            if cuda:
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - start

        with self.engine.lock:
            sets = [self._runner.buffers(n, *size) for n in range(1, self.slots + 1)]
            for bufs in sets:
                timed(bufs)  # warm-up
            calls, spent = [[] for _ in sets], 0.0
            while len(calls[0]) < 2 or (len(calls[0]) < rounds and spent < budget_s):
                for bufs, seconds in zip(sets, calls):
                    seconds.append(timed(bufs))
                    spent += seconds[-1]
        return [min(seconds) for seconds in calls]

    def _x0_hat(self, job: SlotJob) -> np.ndarray:
        """The job's current estimate of the clean image, from this step's U-Net output: x0 = a_x x + a_o o (clipped)
        where its table has the x0 columns, else Ho et al. 2020 eq. 15 for an eps model, x0 = (x - r_z eps) / r_x
        (r_x, r_z: sqrt(abar), sqrt(1 - abar) at the step's time, the table's renoise columns)."""
        rows, row = slice(job.start, job.start + job.rows), job.table.rows[job.step]
        x, out = self._bufs.x[rows], self._bufs.eps[rows].float()
        if job.table.x0_form:
            x0 = row[COL_AX] * x + row[COL_AO] * out
            if row[COL_CLIP] > 0:
                x0 = x0.clamp(-row[COL_CLIP], row[COL_CLIP])
        else:
            x0 = (x - row[COL_RZ] * out) / row[COL_RX]
        return x0.cpu().numpy()

    def _state(self, job: SlotJob) -> dict[str, torch.Tensor]:
        """A copy of a running job's rows of the carried state (a copy: the next buffer set may be this one)."""
        rows = slice(job.start, job.start + job.rows)
        return {name: getattr(self._bufs, name)[rows].clone() for name in _CARRIED}

    def _layout(self, jobs: list[SlotJob]) -> None:
        """Place jobs in rows 0..n-1 of the buffer set for n rows (the smallest batch that holds them), carrying
        the state of the ones already running or preempted, and rebuild the per-row table offsets and step indices."""
        states = {j: self._state(j) for j in jobs if j.start >= 0 and j in self.jobs}
        states.update({j: j.preempted for j in jobs if j.preempted is not None})
        for j in self.jobs:
            j.start = -1
        n = sum(j.rows for j in jobs)
        self.jobs, self._per_row = jobs, {}
        if n == 0:
            self._bufs = None
            return
        self._bufs = self._runner.buffers(n, *jobs[0].size)
        flags = ("draws", "masked", "x0_form", "history")
        start, offset, per_row = 0, 0, {k: [] for k in ("offset", "step", "length", "seed", "plane0", *flags)}
        for j in jobs:
            j.start, start = start, start + j.rows
            if j in states:
                for name, value in states[j].items():
                    getattr(self._bufs, name)[j.start:start].copy_(value)
                j.preempted = None
            per_row["plane0"] += [k * self.engine.c_out for k in range(j.rows)]  # its own planes, from 0
            for key, value in (("offset", offset), ("step", j.step), ("length", j.table.timesteps), ("seed", j.seed),
                               ("draws", j.table.draws_step_noise), ("masked", j.mask is not None),
                               ("x0_form", j.table.x0_form), ("history", j.table.history)):
                per_row[key] += [value] * j.rows
            offset += j.table.timesteps
        # Copied into the buffer set's persistent per-row tensors, never reallocated (its captured graph reads
        # them); the concatenated step table only grows, and a larger one means capturing that graph again.
        tables, dev = self._bufs.slot_rows, self.device
        for key, value in per_row.items():
            dtype = torch.bool if key in flags else torch.int64
            if key not in tables:
                tables[key] = torch.empty(n, dtype=dtype, device=dev)
            tables[key].copy_(torch.tensor(value, dtype=dtype))
        table = torch.cat([j.table.rows for j in jobs])
        if "table" not in tables or tables["table"].shape[0] < table.shape[0]:
            tables["table"] = torch.zeros(1 << (table.shape[0] - 1).bit_length(), table.shape[1],
                                          dtype=table.dtype, device=dev)
            self._bufs.graphs.pop("slots", None)
        tables["table"][:table.shape[0]].copy_(table)
        self._per_row = tables
