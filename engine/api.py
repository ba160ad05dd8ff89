"""The public API: `load(dir) -> Engine` and `Engine.sample(...)`, the seed's `sample` on a compiled U-Net."""
from __future__ import annotations

import threading

import numpy as np
import torch

from .backends import TorchBackend, check_backend
from .diffusers_schedule import DiffusersSchedule
from .errors import BackendUnavailableError
from .runner import Runner
from .samplers import step_table
from .schedule import CosineSchedule
from .validation import check_sample_inputs, check_seed, init_image


def _as_tensor(name: str, value) -> torch.Tensor | None:
    """numpy or torch -> a float32 CPU tensor (validation happens on it); None stays None."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or a torch.Tensor, got {type(value).__name__}")
    if value.dim() == 3:  # a single image [C, H, W]: the batch of one it obviously means
        value = value.unsqueeze(0)
    return value


class Engine:
    """A loaded engine: one backend, one Runner, the model's channel contract and the built profile."""

    def __init__(self, runner: Runner, *, c_in: int, c_out: int, max_batch: int,
                 size_range: tuple[tuple[int, int], tuple[int, int]] | None = None,
                 schedule: CosineSchedule | DiffusersSchedule | None = None, manifest: dict | None = None,
                 size_multiple: int = 1, opt_size: tuple[int, int] | None = None):
        self.runner, self.c_in, self.c_out, self.max_batch = runner, c_in, c_out, max_batch
        self.size_range, self.schedule, self.manifest = size_range, schedule or CosineSchedule(), manifest or {}
        self.size_multiple, self.opt_size = size_multiple, opt_size
        # One backend: sample() calls and the service's slot steps (engine.slots) take turns with it.
        self.lock = threading.Lock()

    @property
    def backend(self) -> str:
        return self.runner.backend.name

    def check_image_size(self, height: int, width: int) -> None:
        """Raise ValueError unless the engine was built for images of this size."""
        if self.size_range is not None:
            (h_min, w_min), (h_max, w_max) = self.size_range
            if not (h_min <= height <= h_max and w_min <= width <= w_max):
                raise ValueError(f"image size {height}x{width} is outside what this engine was built for "
                                 f"({h_min}x{w_min} .. {h_max}x{w_max}); rebuild with --size")
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"image size {height}x{width} is not a multiple of {self.size_multiple} in H and W, "
                             "which this U-Net needs (it halves them in its down blocks)")

    def check_background(self, background: torch.Tensor) -> None:
        """Raise ValueError unless background [B, C_bg, H, W] has this model's channels and a built size."""
        c_bg = self.c_in - self.c_out
        if c_bg == 0 and background.shape[1]:
            raise ValueError(f"this model takes no background (it is unconditional: input = the {self.c_out}-channel "
                             "sample); drop background and give batch_size, height and width")
        if background.shape[1] != c_bg:
            raise ValueError(f"background has {background.shape[1]} channels; this model takes {c_bg} "
                             f"(input {self.c_in} = {self.c_out} sample + {c_bg} background)")
        self.check_image_size(*background.shape[2:])

    def sample(self, background=None, mask=None, x_init=None, timesteps: int = 300, sampler: str | None = None,
               t_start: float = 1.0, t_end: float = 0.0, seed: int = 0, generator: torch.Generator | None = None,
               eta: float = 0.0, tau: float = 1.0, init: str = "noise", return_intermediates: bool = False,
               intermediates_every: int = 1, segments=None, spacing: str = "time", batch_size: int | None = None,
               height: int | None = None, width: int | None = None):
        """Sample [B, C, H, W] like the seed's `sample`; numpy in gives numpy out.

        background: the conditioning image; a model without one (a diffusers UNet2DModel) takes batch_size, height
            and width instead (default: 1 and the built OPT size; x_init, when given, sets them).

        seed: fast path, noise keyed by the seed (reproducible per seed, backend and batch split).
        generator: parity path, noise drawn host-side in the seed's order (equals `reference_sample`).
        sampler: "ddpm", "ddim" (eta: its stochasticity), "dpmpp-2m" or "dpmpp-2m-sde" (DPM-Solver++(2M),
            Lu et al. 2022); default "ddpm", or for a diffusers model its saved scheduler's (DDPM or DDIM).
        spacing: the time grid, "time" (the seed's, uniform in t) or "logsnr" (uniform in log-SNR). A diffusers
            model runs its scheduler's integer timesteps (timestep_spacing, steps_offset) and has no t_start/t_end.
        return_intermediates: also return the states after every `intermediates_every`-th step, [K, B, C, H, W].
        segments: [(rows, seed), ...] covering the batch in order (a batch assembled from several requests): each
            block of rows gets exactly the result a call with its rows alone and `seed=` that seed would give
            (host-noise step only, i.e. step="torch"; at most max_batch rows in all). All blocks run one table from
            step 0 and the multistep samplers' x0 history is per row, so blocks never share a history.
        """
        as_numpy = isinstance(background if background is not None else x_init, np.ndarray)
        background, mask, x_init, init_from, shape = self.checked_inputs(background, mask, x_init, init, batch_size,
                                                                         height, width)
        check_seed(seed)
        if isinstance(intermediates_every, bool) or not isinstance(intermediates_every, int) or intermediates_every < 1:
            raise ValueError(f"intermediates_every must be an integer >= 1, got {intermediates_every!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if segments is not None:
            generator = self._segment_generators(segments, shape[0], generator)
        if isinstance(self.schedule, DiffusersSchedule):
            if (t_start, t_end, spacing) != (1.0, 0.0, "time"):
                raise ValueError("t_start, t_end and spacing set the seed's continuous time grid; a diffusers model "
                                 f"runs its scheduler's timesteps ({self.schedule.schedule.timestep_spacing!r} "
                                 "spacing): leave them at their defaults")
            table = self.schedule.table(sampler, timesteps, eta=eta, tau=tau)
        else:
            table = step_table(self.schedule, sampler or "ddpm", timesteps, t_start, t_end, eta=eta, tau=tau,
                               spacing=spacing)

        outputs, inters = [], []
        with self.lock:
            for part, part_seed in self.chunks(shape[0], seed):
                x, xs = self._run_chunk(table, background[part], mask, x_init, init_from, part,
                                        part_seed, generator, return_intermediates, intermediates_every)
                outputs.append(x)
                inters.append(xs)
        x = torch.cat(outputs)
        result = (x, torch.cat(inters, dim=1)) if return_intermediates else x
        if as_numpy:
            return tuple(r.numpy() for r in result) if return_intermediates else result.numpy()
        return result

    def checked_inputs(self, background, mask=None, x_init=None, init: str = "noise", batch_size=None, height=None,
                       width=None):
        """Validated float32 CPU tensors (background, mask, x_init, init image or None, sample shape [B, C, H, W]).

        A model without a background (c_in == c_out, e.g. diffusers' UNet2DModel) gets an empty [B, 0, H, W] one
        shaped by x_init or batch_size, height and width.
        """
        background = _as_tensor("background", background)
        mask, x_init = _as_tensor("mask", mask), _as_tensor("x_init", x_init)
        if background is None and self.c_in == self.c_out:
            background = self._no_background(x_init, batch_size, height, width)
        elif (batch_size, height, width) != (None, None, None):
            raise ValueError("batch_size, height and width are for models without a background; here the background "
                             "sets the batch and size")
        if not isinstance(background, torch.Tensor):
            raise ValueError("background is required")
        shape = (background.shape[0] if x_init is None else x_init.shape[0], self.c_out) + tuple(background.shape[2:])
        shape = check_sample_inputs(background, shape, mask, x_init)
        self.check_background(background)
        return background, mask, x_init, init_image(init, background, x_init, self.c_out), shape

    def chunks(self, batch: int, seed: int) -> list[tuple[slice, int]]:
        """(rows, seed) of each chunk a batch runs in: at most max_batch rows each; chunk k uses seed + k so chunks
        differ."""
        return [(slice(start, start + self.max_batch), seed + k)
                for k, start in enumerate(range(0, batch, self.max_batch))]

    def _no_background(self, x_init, batch_size, height, width) -> torch.Tensor:
        """The empty [B, 0, H, W] background of an unconditional model, its shape from x_init or the arguments."""
        for name, value in (("batch_size", batch_size), ("height", height), ("width", width)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if x_init is not None:
            if x_init.dim() != 4:
                raise ValueError(f"x_init must have 4 dimensions [B, C, H, W], got shape {tuple(x_init.shape)}")
            given = (batch_size, height, width)
            batch_size, height, width = x_init.shape[0], x_init.shape[2], x_init.shape[3]
            if any(g is not None and g != v for g, v in zip(given, (batch_size, height, width))):
                raise ValueError(f"batch_size/height/width {given} disagree with x_init's shape "
                                 f"{tuple(x_init.shape)}")
        h_opt, w_opt = self.opt_size or (height, width)
        return torch.empty(batch_size or 1, 0, height or h_opt, width or w_opt)

    def _segment_generators(self, segments, batch: int, generator) -> list[tuple[int, torch.Generator]]:
        """(rows, seed) pairs -> (rows, seeded generator) pairs the Runner draws each block's noise from."""
        if generator is not None:
            raise ValueError("give segments or generator, not both")
        if self.runner.step_impl != "torch":
            raise ValueError("segments need the host-noise step (step='torch'); the Triton step keys noise in-kernel")
        try:
            pairs = [(int(rows), seed) for rows, seed in segments]
        except (TypeError, ValueError):
            raise ValueError(f"segments must be a sequence of (rows, seed) pairs, got {segments!r}") from None
        if any(rows < 1 for rows, _ in pairs) or sum(rows for rows, _ in pairs) != batch:
            raise ValueError(f"segments must have positive row counts summing to the batch size {batch}, got {pairs}")
        if batch > self.max_batch:
            raise ValueError(f"segments cover {batch} rows; at most max_batch={self.max_batch} run in one call")
        return [(rows, torch.Generator(device=self.runner.device).manual_seed(check_seed(seed, "segment seed")))
                for rows, seed in pairs]

    def _run_chunk(self, table, background, mask, x_init, init_image, part, seed, generator, keep, every):
        dev = self.runner.device
        b, h, w = background.shape[0], background.shape[2], background.shape[3]
        padded = self.runner.padded_batch(b, self.max_batch) if generator is None else b

        def rows(t, fill=0.0):  # this chunk's rows on the device, padded up to the captured batch size
            if t is None:
                return None
            t = t.to(dev, torch.float32)
            pad = padded - t.shape[0]
            return t if pad == 0 or t.shape[0] == 1 else torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)])

        bufs = self.runner.buffers(padded, h, w)
        inters = torch.empty(table.timesteps // every, padded, self.c_out, h, w, device=dev) if keep else None
        x = self.runner.run(bufs, table, rows(background), mask=rows(None if mask is None else
                                                                    (mask if mask.shape[0] == 1 else mask[part]), 1.0),
                            x_init=rows(None if x_init is None else x_init[part]),
                            init_image=rows(None if init_image is None else init_image[part]),
                            seed=seed, generator=generator, intermediates=inters, every=every)
        # One copy out (and, on CUDA, the one host sync of the run) so the next call can reuse the buffers.
        return x[:b].to("cpu", copy=True), (inters[:, :b].cpu() if keep else None)


def _open_backend(directory, manifest: dict, backend: str, device: torch.device, threads: int | None,
                  compile: bool):
    """The backend object for an engine directory, deriving its artefact on first use where possible."""
    from ddpm_engine.export import ensure_artefact, read_manifest

    path = ensure_artefact(directory, backend)  # checks hashes, versions and GPU; derives a missing artefact
    entry = read_manifest(directory)["artefacts"][backend]  # re-read: a derived artefact was just recorded
    precision = entry.get("precision", manifest["precision"])
    if backend == "torch":
        from ddpm_engine.export.model_source import load_torch_model

        # Reduced precision only where torch has fast kernels for it; on CPU the torch backend stays fp32.
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        return TorchBackend(load_torch_model(directory), device, dtype if device.type == "cuda" else torch.float32,
                            compile=compile)
    if backend == "onnxruntime":
        from .backend_onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, device, threads=threads)
    if backend == "openvino":
        from .backend_openvino import OpenVinoBackend, compiled_model_cache

        return OpenVinoBackend(path, entry["compile_config"], threads=threads,
                               cache_dir=compiled_model_cache(manifest["cache_key"]))
    from .backend_tensorrt import TensorRTBackend

    return TensorRTBackend(path, device)


def load(directory, backend: str | None = None, step: str | None = None, device: str | None = None,
         cuda_graphs: bool = True, debug: bool = False, threads: int | None = None,
         compile: bool = False) -> Engine:
    """Open an engine directory for `backend` (default: the one it was built for) and return a ready Engine.

    step: "torch" or "triton" (default: Triton on CUDA, torch on CPU); device: "cpu"/"cuda" (default: CUDA for
    tensorrt, and for torch/onnxruntime where a GPU is visible); debug: check buffer addresses on graph replay.
    """
    from ddpm_engine.export import Profile, read_manifest

    manifest = read_manifest(directory)
    backend = check_backend(backend or manifest["backend"])
    if device is None:
        device = "cuda" if backend == "tensorrt" or (backend == "torch" and torch.cuda.is_available()) else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("device 'cuda' requested but no CUDA GPU is visible")
    impl = _open_backend(directory, manifest, backend, device, threads, compile)
    model = manifest["model"]
    profile = Profile.from_dict(manifest["profile"])
    runner = Runner(impl, c_out=int(model["c_out"]), c_in=int(model["c_in"]), step=step,
                    cuda_graphs=cuda_graphs, debug=debug)
    schedule = DiffusersSchedule.from_dict(manifest["schedule"]) if "schedule" in manifest else None
    return Engine(runner, c_in=int(model["c_in"]), c_out=int(model["c_out"]), max_batch=profile.batch[2],
                  size_range=(profile.sizes[0], profile.sizes[2]), manifest=manifest, schedule=schedule,
                  size_multiple=profile.multiple, opt_size=profile.opt_size)
