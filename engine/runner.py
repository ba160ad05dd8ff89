"""The Runner: static buffers per (batch, H, W), one U-Net call plus one fused step per timestep, CUDA graphs on GPU."""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from .backends import Backend
from .samplers import COL_BLEND, StepTable

STEP_IMPLS = ("torch", "triton")


def _randn(out: torch.Tensor, gen) -> torch.Tensor:
    """Fill `out` with N(0, 1) from one generator, or row block by row block from [(rows, generator), ...]."""
    if isinstance(gen, torch.Generator):
        return torch.randn(out.shape, generator=gen, device=out.device, out=out)
    start = 0
    for rows, g in gen:  # each block draws exactly what a batch of `rows` alone would draw from `g`
        block = out[start:start + rows]
        torch.randn(block.shape, generator=g, device=out.device, out=block)
        start += rows
    return out


def _x0_args(bufs: "BufferSet", table: StepTable) -> dict:
    """The step's x0-form arguments: the kernel's compile-time flag, and the history buffer where the table has one."""
    return {"x0_form": table.x0_form, "x0_prev": bufs.x0_prev if table.history else None}


@dataclass
class BufferSet:
    """Everything one (batch, H, W) needs, allocated once; graphs and bindings refer to these addresses."""

    sample: torch.Tensor  # U-Net input [B, C + C_bg, H, W]; background channels written per run
    timestep: torch.Tensor  # U-Net time input [B]
    eps: torch.Tensor  # U-Net output [B, C, H, W]; these three in the dtypes the backend's artefact declares
    x: torch.Tensor  # sampler state [B, C, H, W], fp32
    x_init: torch.Tensor  # known image, fp32
    mask: torch.Tensor  # 1 = generate, fp32 [B, C, H, W]
    init: torch.Tensor  # image the loop starts from, diffused to t_start (CARE-SST variant), fp32
    noise: tuple[torch.Tensor, torch.Tensor]  # (eps0 / eps2, eps1): host-drawn noise
    x0_prev: torch.Tensor  # x0_hat of the previous step, fp32 [B, C, H, W]: multistep samplers' history (DESIGN 3b)
    step: torch.Tensor  # int64 [1]: the step index the kernel reads (advanced on the device)
    seed: torch.Tensor  # int64 [1]: the Philox key
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # step table buffers per T (graphs read them)
    slot_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # a SlotRunner's per-row tables (graphs read them)
    run_unet: Callable[[], None] | None = None
    graphs: dict = field(default_factory=dict)  # (T, draws_noise, masked, x0_form, history) -> (graph, addresses)

    def addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (self.sample, self.timestep, self.eps, self.x, self.x_init, self.mask,
                                            self.init, self.x0_prev, self.step, self.seed))


class Runner:
    """Drives the timestep loop for one backend; not thread-safe by itself (Engine holds a lock around it)."""

    def __init__(self, backend: Backend, c_out: int, c_in: int, step: str | None = None,
                 cuda_graphs: bool = True, max_buffer_sets: int = 8, debug: bool = False):
        self.backend, self.c_out, self.c_in = backend, c_out, c_in
        self.device = backend.device
        if step is None:
            step = "triton" if self.device.type == "cuda" else "torch"
        if step not in STEP_IMPLS:
            raise ValueError(f"unknown step implementation {step!r}; must be one of {list(STEP_IMPLS)}")
        # Imported here, not at module level: ddpm_engine.kernels reads the step-table layout from this package.
        from ddpm_engine import kernels

        if step == "triton" and not kernels.HAS_TRITON:
            raise ValueError("step='triton' needs the triton package: pip install 'ddpm-engine[triton]'")
        self.kernels, self.step_impl = kernels, step
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and step == "triton" and backend.capturable
        self.max_buffer_sets, self.debug = max_buffer_sets, debug
        self._sets: OrderedDict[tuple[int, int, int], BufferSet] = OrderedDict()
        # One-off cost of new buffer sets (OpenVINO compiles the model for each shape here), so callers can report
        # it apart from the steady-state steps: seconds and binds since the Runner was made.
        self.compile_seconds, self.compiles = 0.0, 0
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # The loop runs on a stream of its own: on the default stream TensorRT adds device syncs (and warns).
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # -- buffers ---------------------------------------------------------------------------------

    def padded_batch(self, batch: int, max_batch: int) -> int:
        """With CUDA graphs, round the batch up to a power of two (capped at max_batch): fewer graphs to capture.

        Padding rows never change the real rows: the in-kernel noise is keyed by each element's own index.
        """
        if not self.cuda_graphs:
            return batch
        return min(1 << (batch - 1).bit_length(), max_batch)

    def buffers(self, batch: int, height: int, width: int) -> BufferSet:
        """The buffer set for this size, allocated and bound on first use (least recently used one evicted)."""
        key = (batch, height, width)
        if key in self._sets:
            self._sets.move_to_end(key)
            return self._sets[key]
        if len(self._sets) >= self.max_buffer_sets:
            self._sets.popitem(last=False)
        start = time.perf_counter()
        dev, io, c = self.device, self.backend.io_dtypes, self.c_out
        state = lambda: torch.zeros(batch, c, height, width, device=dev)  # noqa: E731
        bufs = BufferSet(
            sample=torch.zeros(batch, self.c_in, height, width, device=dev, dtype=io["sample"]),
            timestep=torch.zeros(batch, device=dev, dtype=io["timestep"]),
            eps=torch.zeros(batch, c, height, width, device=dev, dtype=io["eps"]),
            x=state(), x_init=state(), mask=state(), init=state(), noise=(state(), state()), x0_prev=state(),
            step=torch.zeros(1, dtype=torch.int64, device=dev),
            seed=torch.zeros(1, dtype=torch.int64, device=dev),
        )
        bufs.run_unet = self.backend.bind(bufs.sample, bufs.timestep, bufs.eps)
        self.compile_seconds += time.perf_counter() - start
        self.compiles += 1
        self._sets[key] = bufs
        return bufs

    def predict_eps(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """One U-Net call through the bound buffers, eps = model(sample, t): what a step sees, for accuracy checks."""
        bufs = self.buffers(sample.shape[0], *sample.shape[2:])
        bufs.sample.copy_(sample)
        bufs.timestep.copy_(timestep)
        bufs.run_unet()
        return bufs.eps.clone()

    def _rows(self, bufs: BufferSet, table: StepTable) -> torch.Tensor:
        # One persistent rows buffer per T: a captured graph reads its address, so new tables are copied in.
        rows = bufs.rows.get(table.timesteps)
        if rows is None:
            rows = bufs.rows[table.timesteps] = torch.empty_like(table.rows, device=self.device)
        rows.copy_(table.rows, non_blocking=True)
        return rows

    # -- the loop --------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, bufs: BufferSet, table: StepTable, background: torch.Tensor, mask=None, x_init=None,
            init_image=None, seed: int = 0, generator: torch.Generator | None = None,
            intermediates: torch.Tensor | None = None, every: int = 1) -> torch.Tensor:
        """Sample into bufs.x from inputs already shaped [B, ...]; returns bufs.x (valid until the next run).

        generator: noise drawn host-side in the seed's order (parity with reference_sample); a list of
        (rows, generator) pairs gives each block of rows its own stream (requests batched together);
        otherwise `seed` keys the noise (in-kernel Philox for Triton, a seeded torch.Generator for torch).
        intermediates: a [T // every, B, C, H, W] buffer receiving the state after every `every`-th step.
        """
        if self.stream is None:
            return self._run(bufs, table, background, mask, x_init, init_image, seed, generator, intermediates, every)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the inputs were written on the caller's stream
        with torch.cuda.stream(self.stream):
            x = self._run(bufs, table, background, mask, x_init, init_image, seed, generator, intermediates, every)
        caller.wait_stream(self.stream)  # the caller reads x (and frees the inputs) after the loop
        return x

    def _run(self, bufs, table, background, mask, x_init, init_image, seed, generator, intermediates, every):
        c = self.c_out
        bufs.sample[:, c:].copy_(background)  # background channels: written once per run, read T times
        if mask is not None:
            bufs.mask.copy_(mask.expand_as(bufs.mask))
            bufs.x_init.copy_(x_init)
        if init_image is not None:
            bufs.init.copy_(init_image)
        rows = self._rows(bufs, table)
        if table.history:
            bufs.x0_prev.zero_()  # the first step has b_h = 0; a stale non-finite value must not leak in as 0 * inf
        host_noise = generator is not None or self.step_impl == "torch"
        if host_noise:
            if generator is None:
                generator = torch.Generator(device=self.device).manual_seed(int(seed))
            self._loop_host_noise(bufs, table, rows, mask is not None, init_image is not None, generator,
                                  intermediates, every)
        else:
            self._loop_device_noise(bufs, table, rows, mask is not None, init_image is not None, int(seed),
                                    intermediates, every)
        return bufs.x

    def _loop_host_noise(self, bufs, table, rows, masked, has_init, gen, intermediates, every):
        """Noise from `gen` in the seed's order: x_T; then per step eps1 (blending steps), then eps2."""
        host_rows = table.rows.tolist()
        T = table.timesteps
        eps_a, eps_b = bufs.noise
        blends = [masked and r[COL_BLEND] != 0 for r in host_rows]
        mask, x_init = (bufs.mask, bufs.x_init) if masked else (None, None)
        init_img = bufs.init if has_init else None

        _randn(eps_a, gen)
        eps1 = _randn(eps_b, gen) if blends[0] else None
        k = self.kernels
        x0_args = _x0_args(bufs, table)
        if self.step_impl == "triton":
            k.initial_triton(bufs.x, rows, None, model_in=bufs.sample, t_in=bufs.timestep,
                           mask=mask if blends[0] else None, x_init=x_init, init_image=init_img,
                           eps0=eps_a, eps1=eps1)
            bufs.step.zero_()
        else:
            k.initial_torch(bufs.x, rows, eps_a, eps1, model_in=bufs.sample, t_in=bufs.timestep,
                          mask=mask if blends[0] else None, x_init=x_init, init_image=init_img)
        for i in range(T):
            bufs.run_unet()
            eps2 = _randn(eps_a, gen) if table.draws_step_noise and (i + 1 < T or table.last_step_draws) else None
            blend_next = i + 1 < T and blends[i + 1]
            eps1 = _randn(eps_b, gen) if blend_next else None
            x_out = intermediates[i // every] if intermediates is not None and (i + 1) % every == 0 else None
            if self.step_impl == "triton":
                k.step_triton(bufs.x, bufs.eps, rows, bufs.step, None, model_in=bufs.sample, t_in=bufs.timestep,
                            mask=mask if blend_next else None, x_init=x_init, x_out=x_out,
                            draws_step_noise=eps2 is not None, eps1=eps1, eps2=eps2, **x0_args)
                bufs.step.add_(1)
            else:
                k.step_torch(bufs.x, bufs.eps, rows, i, eps2, eps1, model_in=bufs.sample, t_in=bufs.timestep,
                           mask=mask if blend_next else None, x_init=x_init, x_out=x_out, **x0_args)

    def _loop_device_noise(self, bufs, table, rows, masked, has_init, seed, intermediates, every):
        """Fast path: in-kernel Philox noise, step index on the device; on CUDA, one graph replayed T times."""
        k = self.kernels
        mask, x_init = (bufs.mask, bufs.x_init) if masked else (None, None)
        init_img = bufs.init if has_init else None
        x0_args = _x0_args(bufs, table)
        bufs.seed.fill_(seed)
        bufs.step.zero_()
        k.initial_triton(bufs.x, rows, bufs.seed, model_in=bufs.sample, t_in=bufs.timestep, mask=mask,
                       x_init=x_init, init_image=init_img)

        def one_step(x_out=None):
            bufs.run_unet()
            k.step_triton(bufs.x, bufs.eps, rows, bufs.step, bufs.seed, model_in=bufs.sample, t_in=bufs.timestep,
                        mask=mask, x_init=x_init, x_out=x_out, draws_step_noise=table.draws_step_noise, **x0_args)
            bufs.step.add_(1)

        if self.cuda_graphs and intermediates is None:
            graph = self._graph(bufs, (table.timesteps, table.draws_step_noise, masked, table.x0_form, table.history),
                                one_step)
            for _ in range(table.timesteps):
                graph.replay()
            return
        for i in range(table.timesteps):
            take = intermediates is not None and (i + 1) % every == 0
            one_step(intermediates[i // every] if take else None)

    def _graph(self, bufs: BufferSet, key, one_step) -> torch.cuda.CUDAGraph:
        """Capture one step (U-Net + fused step + step += 1) once per buffer set and loop kind; replay it T times."""
        entry = bufs.graphs.get(key)
        if entry is not None:
            graph, addresses = entry
            if self.debug and addresses != bufs.addresses():
                raise RuntimeError("CUDA graph buffers moved since capture: the graph would read stale memory")
            return graph
        graph = capture_step(one_step, (bufs.x, bufs.sample, bufs.timestep, bufs.step, bufs.x0_prev), self.device,
                             self._pool)
        bufs.graphs[key] = (graph, bufs.addresses())
        return graph


def capture_step(one_step: Callable[[], None], changed: tuple[torch.Tensor, ...], device: torch.device,
                 pool) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one step. Warmed up on a side stream first (lazy initialisation, autotuning and TensorRT's
    first enqueue must not be captured), then captured on it; the buffers the step changes are restored after
    both runs, so the first replay starts from the state the caller left."""
    saved = tuple(buf.clone() for buf in changed)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        one_step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=side):
        one_step()
    for buf, value in zip(changed, saved):
        buf.copy_(value)
    return graph
