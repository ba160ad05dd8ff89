"""Time whole sampling runs side by side on the CARE-SST workload: the seed's eager loop, a diffusers-style eager
loop, torch.compile, and the engine on every available backend and precision; plus build times and efficiency.

    python benchmarks/bench_sample.py                               # sst-small, 64x64 tiles, B = 1 and 8, 10 steps
    python benchmarks/bench_sample.py --size 300 --steps 10,50 --compile --plot
    python benchmarks/bench_sample.py --arch care-sst:dim=64,embed_dim=256 --batch 1 --steps 5   # full CARE-SST size
    python benchmarks/bench_sample.py --checkpoint path/to/netG.pth

Workload (the seed's CARE-SST inpainting): B synthetic tiles of --size (ddpm_engine.models.data.synthetic_tile),
each with its own background, cloud mask and observed x_init; masked DDPM sampling (mask blend before every U-Net
call) for T steps from t = 1 to 0. Every path samples the same inputs with the same model, steps and batch.

Paths ("rows"):
  seed loop (eager)         reference_sample: the seed's loop in eager PyTorch (the baseline of every ratio)
  diffusers-style (eager)   a scheduler object stepping on the host (set_timesteps / step / add_noise), written here
                            after diffusers' DDPMScheduler interface but on the seed's continuous cosine schedule
                            (diffusers' own "squaredcos_cap_v2" is a discrete 1000-step beta table: other numbers,
                            same cost per step)
  seed loop + torch.compile reference_sample with torch.compile(model, dynamic=False), with --compile; the compile
                            time is the row's warm-up figure
  engine <backend> <prec>   ddpm_engine.engine.load(...).sample(..., seed=0) on an engine built into a temp dir;
                            "(default)" marks resolve_precision's rule (bf16 where native); build's own auto times
                            fp32 / bf16 / int8 and records its pick in engine.json (printed below the build table)
  engine openvino int8      build(precision="int8"): NNCF-quantised IR, accepted by the quality gate (its RMSEs
                            printed below the build table)

Timing: one untimed warm-up run per path (2 steps), then --repeats rounds; each round runs every path once, in
an order rotated per round (interleaved, so a burst of load from other jobs hits all paths alike). Reported: the
median and spread ((max - min) / median) of the run time, seconds per sample (run / B), samples/s, ms per step,
the ratio seed-median / path-median, peak memory (the largest growth of resident memory during any of the path's
runs, warm-up included: Linux VmHWM reset before each run, minus VmRSS at its start; memory another path freed and
the allocator kept is not counted again, so it is a lower bound; torch.cuda.max_memory_allocated on GPU), and the
U-Net's share of a step (one U-Net call timed alone, times T, over the run time; noisy on a loaded machine).

Efficiency: U-Net FLOPs per call (torch.utils.flop_counter.FlopCounterMode), achieved U-Net FLOP/s of each row
against the machine's matmul rate measured in the same run (torch.mm, fp32 and bf16; and for OpenVINO rows the
rate of a single 2048x2048 MatMul compiled by OpenVINO in the row's precision: fp32, bf16, and int8 = int8 weights
with a FakeQuantize on the activations, which OpenVINO runs as an int8 GEMM (VNNI / AMX-INT8)), and the step's bytes
(bench_step.step_bytes) against measured copy bandwidth (bench_step.copy_bandwidth_gbps).

Prints tables, then one JSON line per row (prefix "JSON "). Never collected by pytest.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing (bench_step's convention)
sys.path.insert(0, str(HERE))

from bench_step import copy_bandwidth_gbps, cpu_time_ms, paths_for, step_bytes  # noqa: E402

from ddpm_engine.engine import CosineSchedule, build, load, reference_sample  # noqa: E402
from ddpm_engine.export.quality_gate import summary as gate_summary  # noqa: E402
from ddpm_engine.models import PRESETS, build_model, load_model  # noqa: E402
from ddpm_engine.models.data import synthetic_tile  # noqa: E402

CARE_SST_IO = {"c_in": 2, "c_out": 1}  # CARE-SST: x (1 channel) + background (1 channel) -> eps (1 channel)


# --------------------------------------------------------------------------------------------------
# a diffusers-style eager loop: the scheduler is an object stepping on the host, the model is called eagerly


class HostDDPMScheduler:
    """DDPM (Ho et al. 2020) as a diffusers-like scheduler object on the seed's continuous cosine schedule.

    set_timesteps(T) makes the grid t_i = 1 - i / T; step(eps, i, x, generator) returns x_{i+1}; add_noise(x0,
    noise, i) is the forward process at t_i. Coefficients are recomputed on the host at every call (float64
    Python scalars), the way diffusers' DDPMScheduler.step does, and noise is drawn in the seed's order.
    """

    def __init__(self, schedule: CosineSchedule | None = None):
        self.schedule = schedule or CosineSchedule()
        self.timesteps: list[float] = []

    def set_timesteps(self, num_inference_steps: int, t_start: float = 1.0, t_end: float = 0.0) -> None:
        n = num_inference_steps
        self.grid = [t_start + (t_end - t_start) * i / n for i in range(n + 1)]
        self.timesteps = self.grid[:-1]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        a = self.schedule.alpha_cumprod(self.grid[i])
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        a, a_prev = self.schedule.alpha_cumprod(self.grid[i]), self.schedule.alpha_cumprod(self.grid[i + 1])
        alpha = a / a_prev
        mean = (sample - (1 - alpha) / (1 - a) ** 0.5 * model_output) / alpha**0.5
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=sample.device)
        std = ((1 - alpha) * (1 - a_prev) / (1 - a)) ** 0.5 if self.grid[i + 1] != 0 else 0.0
        return mean + std * noise


@torch.no_grad()
def diffusers_style_sample(model, scheduler: HostDDPMScheduler, background, mask, x_init, timesteps: int,
                           generator: torch.Generator) -> torch.Tensor:
    """The loop a diffusers pipeline runs (inpainting blend as in the seed: known pixels re-noised to t_i)."""
    scheduler.set_timesteps(timesteps)
    b = background.shape[0]
    x = torch.randn(x_init.shape, generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        known = scheduler.add_noise(x_init, torch.randn(x.shape, generator=generator), i)
        x = mask * x + (1 - mask) * known
        eps = model(torch.cat((x, background), dim=1), torch.full((b,), t, dtype=torch.float32))
        x = scheduler.step(eps.float(), i, x, generator)
    return x


# --------------------------------------------------------------------------------------------------
# model, workload, machine


def parse_arch(text: str) -> tuple[str, dict]:
    """'care-sst:dim=64,embed_dim=256' -> ('care-sst', {'c_in': 2, 'c_out': 1, 'dim': 64, 'embed_dim': 256})."""
    arch, _, rest = text.partition(":")
    config = dict(CARE_SST_IO)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--arch items must be key=value, got {item!r}")
        config[key.strip()] = int(value)
    return arch, config


def resolve_model(args) -> tuple[torch.nn.Module, str]:
    if args.checkpoint:
        return load_model(args.checkpoint), f"checkpoint {args.checkpoint}"
    if args.arch:
        arch, config = parse_arch(args.arch)
        torch.manual_seed(0)
        cfg = ",".join(f"{k}={v}" for k, v in config.items())
        return build_model(arch, **config).eval(), f"{arch}({cfg}), random weights (same FLOPs as trained)"
    try:
        return load_model(args.model), f"bundled {args.model} (trained weights)"
    except FileNotFoundError:
        preset = PRESETS[args.model]
        torch.manual_seed(0)
        cfg = ",".join(f"{k}={v}" for k, v in preset["model"].items())
        return (build_model(preset["arch"], **preset["model"]).eval(),
                f"{args.model} architecture {preset['arch']}({cfg}), random weights (bundled weights not present)")


def workload(batch: int, size: int, seed: int = 0):
    """B distinct synthetic CARE-SST tiles: background, mask (1 = cloud), x_init, each [B, 1, size, size]."""
    rng = np.random.default_rng(seed)
    tiles = [synthetic_tile(rng, size) for _ in range(batch)]
    stack = lambda name: torch.stack([getattr(t, name) for t in tiles]).float().contiguous()  # noqa: E731
    return stack("background"), stack("mask"), stack("x_init")


def cpu_model_name() -> str:
    try:
        out = os.popen("lscpu 2>/dev/null").read()
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        return set(m.group(1).split()) if m else set()
    except OSError:
        return set()


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("onnxruntime", "openvino", "triton", "tensorrt", "onnx"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", None) or getattr(getattr(mod, "runtime", None), "get_version",
                                                                      lambda: "?")()
        except Exception:  # noqa: BLE001 - optional libraries
            pass
    return out


# --------------------------------------------------------------------------------------------------
# memory


class PeakMemory:
    """Peak memory growth during a block: VmHWM - VmRSS (Linux, VmHWM reset first), or CUDA max allocated."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.proc = Path("/proc/self/status").is_file() and Path("/proc/self/clear_refs").exists()
        self.mib: float | None = None

    @staticmethod
    def _status(key: str) -> int:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) * 1024 if m else 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.proc:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            except OSError:
                self.proc = False
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.proc:
            self.mib = max(0, self._status("VmHWM") - self.base) / 2**20
        return False


# --------------------------------------------------------------------------------------------------
# engines: build (timed, with and without cache) and load


def build_engines(model, args, batches, size, workdir: Path, device: torch.device):
    """Build the engines into workdir; return (build rows, [(label, backend, precision, is_default, Engine)])."""
    from ddpm_engine.engine.backends import is_available
    from ddpm_engine.export.build import resolve_backend, resolve_precision

    # Sizes down to 32 and up to 64 at least: the int8 build's calibration and quality gate run on 64x64 synthetic
    # tiles whatever the timed size (the backends compile each buffer set for its exact shape, so this costs nothing).
    profile = dict(batch=(min(batches), max(batches), max(batches)),
                   size=((min(size, 32),) * 2, (size, size), (max(size, 64),) * 2))
    default = resolve_backend("auto", "fp32")
    default_precision = resolve_precision("auto", default)  # what build(backend="auto") makes here
    plans = [("fp32", default, "fp32", True)]  # (dir, backend, precision, verify)
    if default == "openvino" and not args.no_bf16:
        plans.append(("bf16", "openvino", "bf16", True))
    if default == "openvino" and not args.no_int8:
        plans.append(("int8", "openvino", "int8", True))
    if default == "tensorrt":
        plans.append(("fp16", "tensorrt", "fp16", True))
        if is_available("openvino"):
            plans.append(("ov-fp32", "openvino", "fp32", True))
    if args.split_build:  # the same default build without verification: export and backend build alone
        plans.append(("fp32-noverify", default, "fp32", False))

    build_rows, dirs = [], {}
    for name, backend, precision, verify in plans:
        d = workdir / name
        for attempt in ("cold", "cached"):
            t0 = time.perf_counter()
            try:
                res = build(model, d, backend=backend, precision=precision, verify=verify, **profile)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other engines
                print(f"# build {backend} {precision} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                break
            total = time.perf_counter() - t0
            row = dict(kind="build", engine=name, backend=res.backend, precision=precision, verify=verify,
                       attempt=attempt, cached=res.cached, total_s=round(total, 3),
                       stages={s["stage"]: s["seconds"] for s in res.stages})
            gate = res.manifest["artefacts"].get(backend, {}).get("quality_gate")
            if gate:
                row["quality_gate"] = gate  # the manifest's whole record: gate_summary names its precision
            build_rows.append(row)
            dirs[name] = d
            if not verify:
                break  # the unverified build only splits the cold timings

    engines = []
    wanted = [("fp32", default, "fp32")]
    if "fp32" in dirs:
        for backend in ("openvino", "onnxruntime", "torch"):
            if backend != default and (backend == "torch" or is_available(backend)):
                wanted.append(("fp32", backend, "fp32"))
    if "bf16" in dirs:
        wanted.append(("bf16", "openvino", "bf16"))
    if "int8" in dirs:
        wanted.append(("int8", "openvino", "int8"))
    if "fp16" in dirs:
        wanted.append(("fp16", "tensorrt", "fp16"))
    if "ov-fp32" in dirs:
        wanted.append(("ov-fp32", "openvino", "fp32"))
    for name, backend, precision in wanted:
        is_default = backend == default and precision == default_precision
        if name not in dirs:
            continue
        t0 = time.perf_counter()
        try:
            eng = load(dirs[name], backend=backend, threads=args.threads)
        except Exception as exc:  # noqa: BLE001
            print(f"# load {backend} {precision} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        build_rows.append(dict(kind="load", engine=name, backend=backend, precision=precision,
                               total_s=round(time.perf_counter() - t0, 3)))
        label = f"engine {backend} {precision}" + (" (default)" if is_default else "")
        engines.append((label, backend, precision, is_default, eng))
    return build_rows, engines


# --------------------------------------------------------------------------------------------------
# efficiency


def unet_flops(model, batch: int, size: int, c_in: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.randn(batch, c_in, size, size), torch.rand(batch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return int(counter.get_total_flops())


def matmul_gflops(dtype: torch.dtype, n: int, device: torch.device) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    fn = lambda: torch.mm(a, b)  # noqa: E731
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    else:
        ms = cpu_time_ms(fn, warmup=2, reps=7, budget_s=6.0)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def openvino_matmul_gops(precision: str, n: int, threads: int | None) -> float:
    """GOP/s of one [n, n] x [n, n] MatMul compiled by OpenVINO in `precision` (int8: int8 weights dequantised by a
    scale and a FakeQuantize on the activations, NNCF's layout, which OpenVINO lowers to an int8 GEMM)."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([n, n], np.float32, name="x")
    if precision == "int8":
        w = ops.multiply(ops.convert(ops.constant(rng.integers(-127, 128, (n, n)).astype(np.int8)), np.float32),
                         ops.constant(np.full((n, 1), 0.01, np.float32)))
        y = ops.matmul(ops.fake_quantize(x, -4.0, 4.0, -4.0, 4.0, 256), w, False, True)
    else:
        y = ops.matmul(x, ops.constant(rng.standard_normal((n, n)).astype(np.float32)), False, False)
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16",
           **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    request = ov.Core().compile_model(ov.Model([y], [x]), "CPU", cfg).create_infer_request()
    feed = rng.standard_normal((n, n)).astype(np.float32)
    ms = cpu_time_ms(lambda: request.infer([feed]), warmup=2, reps=7, budget_s=4.0)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def step_cost(batch: int, size: int, device: torch.device) -> dict:
    """bench_step's one-step paths at [B, 1, size, size] (fp32 model I/O): ms and GB/s of the engine's CPU step."""
    opts = argparse.Namespace(compile=False)
    shape = (batch, 1, size, size)
    paths, mask_numel = paths_for(shape, torch.float32, device, opts)
    nbytes = step_bytes(shape, torch.float32, mask_numel)
    out = {"bytes": nbytes}
    for name in ("seed torch ops", "step_torch eager"):
        fn = paths[name]
        fn()
        ms = cpu_time_ms(fn, warmup=2, reps=15, budget_s=3.0)
        out[name] = {"ms": round(ms, 4), "gbps": round(nbytes / (ms * 1e-3) / 1e9, 3)}
    return out


def unet_call_ms(fn, reps: int) -> float:
    fn()  # first call: allocation / lazy init
    return cpu_time_ms(fn, warmup=0, reps=reps, budget_s=5.0)  # at least 3 timed calls, more while under 5 s


# --------------------------------------------------------------------------------------------------


def diffusers_pipeline_rows(pipe_dir: str, batches: list[int], steps: list[int], repeats: int,
                            threads: int | None) -> int:
    """The diffusers row: DDPMPipeline/DDIMPipeline (eager U-Net, host scheduler) against engines built from the same
    saved pipeline, end to end (noise to decoded [0, 1] images), run interleaved; medians, U-Net FLOP efficiency,
    and the parity of each engine with the pipeline given the same CPU generator. --threads applies to all paths
    (on a loaded 2-core machine a second torch thread made one eager U-Net call 10-25x slower)."""
    import diffusers

    from ddpm_engine.export.diffusers_source import load_pipeline_dir

    pipe = diffusers.DiffusionPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    wrapped = load_pipeline_dir(pipe_dir)
    size = wrapped.default_size[0]
    print(f"# {cpu_model_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); load average "
          f"{[round(v, 2) for v in os.getloadavg()]}; {type(pipe).__name__} {pipe_dir}, {size}x{size}")
    peak = matmul_gflops(torch.float32, 1024, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as work:
        engines = {}
        for backend in ("onnxruntime", "openvino", "torch"):
            t0 = time.perf_counter()
            build(pipe_dir, Path(work) / backend, backend=backend, precision="fp32", batch=(1, 1, max(batches)))
            engines[f"engine {backend} fp32"] = load(Path(work) / backend, threads=threads)
            print(f"# built {backend} in {time.perf_counter() - t0:.1f} s")
        for b in batches:
            flops = unet_flops(wrapped, b, size, wrapped.c_in)
            for T in steps:
                paths = {f"diffusers {type(pipe).__name__}": lambda g: torch.from_numpy(pipe(
                    batch_size=b, num_inference_steps=T, generator=g, output_type="np").images).permute(0, 3, 1, 2)}
                for name, engine in engines.items():
                    paths[name] = lambda g, e=engine: (e.sample(batch_size=b, timesteps=T, generator=g) / 2
                                                       + 0.5).clamp(0, 1)
                outs = {name: fn(torch.Generator().manual_seed(0)) for name, fn in paths.items()}  # warm-up + parity
                times = {name: [] for name in paths}
                for r in range(repeats):
                    for name in list(paths)[r % len(paths):] + list(paths)[:r % len(paths)]:
                        t0 = time.perf_counter()
                        paths[name](torch.Generator().manual_seed(0))
                        times[name].append(time.perf_counter() - t0)
                base = statistics.median(times[next(iter(paths))])
                print(f"\nB={b} T={T}: U-Net {flops / 1e6:.1f} MFLOP per call; fp32 matmul peak {peak:.0f} GFLOP/s")
                print(f"{'path':32} {'median s':>9} {'spread':>7} {'x diffusers':>11} {'GFLOP/s':>8} {'% peak':>7} "
                      f"{'max|d| vs diffusers':>19}")
                for name, ts in times.items():
                    med = statistics.median(ts)
                    gfs = flops * T / med / 1e9
                    diff = (outs[name] - outs[next(iter(paths))]).abs().max().item()
                    print(f"{name:32} {med:9.3f} {(max(ts) - min(ts)) / med:7.2f} {base / med:11.2f} {gfs:8.2f} "
                          f"{100 * gfs / peak:7.2f} {diff:19.2e}")
                    print("JSON " + json.dumps({"kind": "diffusers", "path": name, "batch": b, "steps": T,
                                                "median_s": med, "speedup": base / med, "gflops": gfs,
                                                "max_abs_diff": diff}))
    print(f"# load average at end {[round(v, 2) for v in os.getloadavg()]}")
    return 0


def fmt_s(s: float) -> str:
    return f"{s:.3f}" if s < 100 else f"{s:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="sst-small", help="bundled preset (default sst-small; random weights of the "
                                                          "same architecture if its weights are not bundled yet)")
    src.add_argument("--arch", default=None, help="a fresh model, e.g. care-sst:dim=64,embed_dim=256 (full CARE-SST; "
                                                  "c_in=2, c_out=1 unless given)")
    src.add_argument("--checkpoint", default=None, help="a checkpoint directory or a CARE-SST .pth")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--steps", default="10", help="comma-separated step counts T (default 10)")
    p.add_argument("--size", type=int, default=64, help="tile size (default 64 for speed; CARE-SST tiles are 300)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per (batch, steps) (default 3)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every path (default: libraries' "
                                                             "defaults, = cores)")
    p.add_argument("--compile", action="store_true",
                   help="add the seed loop with torch.compile(model) (off by default: inductor takes minutes per "
                        "batch size to compile on 2 cores)")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="skip the diffusers-style row")
    p.add_argument("--no-bf16", action="store_true", help="skip the OpenVINO bf16 engine")
    p.add_argument("--no-int8", action="store_true", help="skip the OpenVINO int8 engine (NNCF + quality gate)")
    p.add_argument("--no-split-build", dest="split_build", action="store_false",
                   help="skip the unverified build that separates export time from verification time")
    p.add_argument("--no-efficiency", dest="efficiency", action="store_false",
                   help="skip matmul/copy rates and the per-call U-Net timings")
    p.add_argument("--engines-only", action="store_true", help="time only the seed loop and the engines")
    p.add_argument("--skip", default="", help="comma-separated substrings of path names not to time, e.g. "
                                              "'engine torch' (the seed loop is always timed)")
    p.add_argument("--plot", nargs="?", const=str(HERE / "bench_sample.png"), default=None,
                   help="write a PNG of throughput vs batch per path (default path benchmarks/bench_sample.png)")
    p.add_argument("--workdir", default=None, help="build engines here (default: a temporary directory, removed)")
    p.add_argument("--markdown", action="store_true", help="also print the tables as Markdown (for RESULTS.md)")
    p.add_argument("--diffusers-pipeline", default=None, metavar="DIR",
                   help="instead of CARE-SST: a saved diffusers DDPM/DDIM pipeline, timed as DDPMPipeline/DDIMPipeline "
                        "against the engine built from it (same model, --steps, --batch, sampler of its scheduler)")
    p.add_argument("--from-log", default=None, metavar="FILE",
                   help="run nothing: read the JSON lines of an earlier run's output and print its Markdown tables "
                        "(and --plot)")
    args = p.parse_args(argv)
    if args.from_log:
        return from_log(args.from_log, args.plot)
    batches = sorted({int(b) for b in args.batch.split(",")})
    steps = [int(s) for s in args.steps.split(",")]
    if min(batches) < 1 or min(steps) < 1 or args.size < 8 or args.repeats < 1:
        p.error("batch sizes, steps and repeats must be >= 1 and --size >= 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.diffusers_pipeline:
        return diffusers_pipeline_rows(args.diffusers_pipeline, batches, steps, args.repeats, args.threads)
    if args.engines_only:
        args.compile = args.diffusers = False

    device = torch.device("cpu")  # engines pick CUDA themselves where it exists; the eager baselines run on CPU
    if torch.cuda.is_available():
        device = torch.device("cuda")
    model, model_label = resolve_model(args)
    model = model.to(device).eval()
    c_in = model.c_in
    meta = dict(kind="meta", machine=cpu_model_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                bf16_isa=bool({"avx512_bf16", "amx_bf16"} & cpu_flags()), versions=versions(), model=model_label,
                size=args.size, batches=batches, steps=steps, repeats=args.repeats, device=device.type,
                gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                loadavg_start=[round(v, 2) for v in os.getloadavg()], command="python " + shlex.join(
                    [Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else "main(" + repr(argv) + ")")
    print(f"# {meta['machine']} ({meta['cores']} cores, torch threads {meta['torch_threads']}, bf16 ISA "
          f"{'yes' if meta['bf16_isa'] else 'no'}); load average {meta['loadavg_start']}")
    print("# " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print(f"# model: {model_label}; workload: CARE-SST masked DDPM, {args.size}x{args.size} synthetic tiles")
    if device.type == "cuda":
        print("# GPU: " + meta["gpu"])

    # ---- engines ------------------------------------------------------------------------------------------
    tmp = tempfile.TemporaryDirectory(prefix="bench_sample-") if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    print(f"# building engines in {workdir} ...", flush=True)
    build_rows, engines = build_engines(model, args, batches, args.size, workdir, device)

    print("\n## Build and load times (s)")
    print(f"{'engine':>14} {'backend':>12} {'prec':>5} {'verify':>6} {'attempt':>7} {'total':>8}  stages")
    for r in build_rows:
        if r["kind"] == "build":
            stages = "; ".join(f"{k} {v:.2f}" for k, v in r["stages"].items() if v >= 0.005)
            print(f"{r['engine']:>14} {r['backend']:>12} {r['precision']:>5} {str(r['verify']):>6} "
                  f"{r['attempt']:>7} {r['total_s']:>8.2f}  {stages}")
        else:
            print(f"{r['engine']:>14} {r['backend']:>12} {r['precision']:>5} {'':>6} {'load':>7} {r['total_s']:>8.2f}"
                  "  (load: open + compile the artefact for this machine)")
    for r in build_rows:
        if r.get("quality_gate") and r["attempt"] == "cold":
            print(f"# quality gate {gate_summary(r['quality_gate'])}")

    # ---- machine rates ------------------------------------------------------------------------------------
    rates = {}
    if args.efficiency:
        n = 2048 if device.type == "cpu" else 8192
        rates["mm_fp32_gflops"] = round(matmul_gflops(torch.float32, n, device), 1)
        rates["mm_bf16_gflops"] = round(matmul_gflops(torch.bfloat16, n, device), 1)
        timer = (lambda fn: cpu_time_ms(fn, warmup=2, reps=7, budget_s=4.0)) if device.type == "cpu" else None
        if timer is not None:
            rates["copy_gbps"] = round(copy_bandwidth_gbps(device, timer), 2)
        print(f"\n# measured now: torch.mm {n}x{n} fp32 {rates['mm_fp32_gflops']} GFLOP/s, bf16 "
              f"{rates['mm_bf16_gflops']} GFLOP/s; copy bandwidth {rates.get('copy_gbps', '?')} GB/s")
        if any(backend == "openvino" for _, backend, *_ in engines):
            for prec in ("fp32", "bf16", "int8"):
                rates[f"ov_mm_{prec}_gops"] = round(openvino_matmul_gops(prec, 2048, args.threads), 1)
            print("# measured now: OpenVINO MatMul 2048x2048 " + ", ".join(
                f"{prec} {rates[f'ov_mm_{prec}_gops']} GOP/s" for prec in ("fp32", "bf16", "int8")))

    # ---- the timed runs -----------------------------------------------------------------------------------
    compiled = torch.compile(model, dynamic=False) if args.compile else None
    rows, extra = [], []
    for b in batches:
        background, mask, x_init = (t.to(device) for t in workload(b, args.size))
        shape = (b, model.c_out, args.size, args.size)
        flops = unet_flops(model, b, args.size, c_in) if args.efficiency else None

        def seed_run(T, m=model):
            return reference_sample(m, background, shape, mask=mask, x_init=x_init, timesteps=T,
                                    generator=torch.Generator(device=device).manual_seed(0))

        paths = {"seed loop (eager)": seed_run}
        if args.diffusers:
            sched = HostDDPMScheduler()
            paths["diffusers-style (eager)"] = lambda T: diffusers_style_sample(
                model, sched, background, mask, x_init, T, torch.Generator(device=device).manual_seed(0))
        if compiled is not None:
            paths["seed loop + torch.compile"] = lambda T: seed_run(T, compiled)
        info = {name: dict(backend="torch", precision="fp32", default=False) for name in paths}
        for label, backend, precision, is_default, eng in engines:
            if b > eng.max_batch:
                continue
            paths[label] = (lambda e: lambda T: e.sample(background, mask=mask, x_init=x_init, timesteps=T, seed=0))(eng)
            info[label] = dict(backend=backend, precision=precision, default=is_default, engine=eng)

        for name in [n for n in paths if n != "seed loop (eager)"]:
            if any(k.strip() and k.strip() in name for k in args.skip.split(",")):
                del paths[name]

        # warm-up (allocation, OpenVINO/ONNX Runtime first inference, torch.compile) with 2 steps
        setup, first_mem = {}, {}
        for name, fn in list(paths.items()):
            gc.collect()
            t0 = time.perf_counter()
            try:
                with PeakMemory(device) as pm:
                    fn(2)
            except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a working compiler
                print(f"# {name} at B={b} failed in warm-up: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                del paths[name]
                continue
            setup[name] = time.perf_counter() - t0
            first_mem[name] = pm.mib

        # per-call U-Net time (the rest of a step is the sampler's own work)
        unet_ms = {}
        if args.efficiency:
            x_in, t_in = torch.randn(b, c_in, args.size, args.size, device=device), torch.rand(b, device=device)
            with torch.no_grad():
                unet_ms["eager"] = unet_call_ms(lambda: model(x_in, t_in), 5)
                if compiled is not None and "seed loop + torch.compile" in paths:
                    unet_ms["compiled"] = unet_call_ms(lambda: compiled(x_in, t_in), 5)
            for name, i in info.items():
                if "engine" in i and name in paths:
                    bufs = i["engine"].runner.buffers(b, args.size, args.size)
                    unet_ms[name] = unet_call_ms(bufs.run_unet, 5)

        for T in steps:
            times = {name: [] for name in paths}
            mem = {name: [] for name in paths}
            names = list(paths)
            for r in range(args.repeats):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    gc.collect()
                    with PeakMemory(device) as pm:
                        t0 = time.perf_counter()
                        paths[name](T)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        times[name].append(time.perf_counter() - t0)
                    if pm.mib is not None:
                        mem[name].append(pm.mib)
            seed_med = statistics.median(times["seed loop (eager)"])
            for name in names:
                ts = times[name]
                med = statistics.median(ts)
                i = info[name]
                u = unet_ms.get(name) or (unet_ms.get("compiled") if "compile" in name else unet_ms.get("eager"))
                row = dict(kind="sample", path=name, backend=i["backend"], precision=i["precision"],
                           default_engine=i["default"], batch=b, steps=T, size=args.size, repeats=len(ts),
                           median_s=round(med, 4), min_s=round(min(ts), 4), max_s=round(max(ts), 4),
                           spread=round((max(ts) - min(ts)) / med, 3), s_per_sample=round(med / b, 4),
                           samples_per_s=round(b / med, 4), ms_per_step=round(1e3 * med / T, 2),
                           vs_seed=round(seed_med / med, 2), warmup_s=round(setup[name], 2),
                           peak_mem_mib=round(max(mem[name] + [first_mem[name]]), 1)
                           if first_mem[name] is not None else None)
                if flops is not None:
                    row["unet_gflop_per_call"] = round(flops / 1e9, 4)
                    row["achieved_gflops"] = round(flops * T / med / 1e9, 2)
                    peak = rates.get({"bf16": "mm_bf16_gflops", "fp32": "mm_fp32_gflops"}.get(i["precision"], ""))
                    if peak:
                        row["of_mm_peak"] = round(flops * T / med / 1e9 / peak, 4)
                    ov_peak = rates.get(f"ov_mm_{i['precision']}_gops") if i["backend"] == "openvino" else None
                    if ov_peak:  # against the same runtime's matmul in the same precision (int8: int8 ops)
                        row["of_ov_mm_peak"] = round(flops * T / med / 1e9 / ov_peak, 4)
                if u is not None:
                    row["unet_ms_per_call"] = round(u, 2)
                    row["unet_share"] = round(u * T / (1e3 * med), 3)
                rows.append(row)
        if args.efficiency:
            sc = step_cost(b, args.size, device)
            if "copy_gbps" in rates:
                for k in ("seed torch ops", "step_torch eager"):
                    sc[k]["of_copy"] = round(sc[k]["gbps"] / rates["copy_gbps"], 4)
            extra.append(dict(kind="step", batch=b, size=args.size, **sc))

    # ---- report -------------------------------------------------------------------------------------------
    print(f"\n## Sampling, CARE-SST workload ({args.size}x{args.size}, masked DDPM), median of {args.repeats} "
          "interleaved rounds")
    head = (f"{'path':>34} {'B':>3} {'T':>4} {'run s':>8} {'spread':>7} {'s/sample':>9} {'samples/s':>10} "
            f"{'ms/step':>9} {'vs seed':>8} {'peak MiB':>9} {'U-Net %':>8} {'GFLOP/s':>8} {'of mm':>6} {'of OV mm':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        share = f"{100 * r['unet_share']:.0f}%" if "unet_share" in r else "-"
        eff = f"{r['achieved_gflops']:.1f}" if "achieved_gflops" in r else "-"
        ofmm = f"{100 * r['of_mm_peak']:.1f}%" if "of_mm_peak" in r else "-"
        ofov = f"{100 * r['of_ov_mm_peak']:.1f}%" if "of_ov_mm_peak" in r else "-"
        memv = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "-"
        print(f"{r['path']:>34} {r['batch']:>3} {r['steps']:>4} {fmt_s(r['median_s']):>8} "
              f"{100 * r['spread']:>6.0f}% {fmt_s(r['s_per_sample']):>9} {r['samples_per_s']:>10.3f} "
              f"{r['ms_per_step']:>9.1f} {r['vs_seed']:>7.2f}x {memv:>9} {share:>8} {eff:>8} {ofmm:>6} {ofov:>8}")

    if args.efficiency:
        print(f"\n## Efficiency: U-Net FLOPs per call, one U-Net call alone, one sampler step alone ({args.size}x"
              f"{args.size})")
        for b in batches:
            r0 = next((r for r in rows if r["batch"] == b and "unet_gflop_per_call" in r), None)
            if r0:
                print(f"B={b}: U-Net {r0['unet_gflop_per_call']:.3f} GFLOP/call; calls alone (ms): " + ", ".join(
                    f"{r['path'].replace('engine ', '')} {r['unet_ms_per_call']:.1f}" for r in rows
                    if r["batch"] == b and r["steps"] == steps[0] and "unet_ms_per_call" in r))
        for e in extra:
            s, f = e["seed torch ops"], e["step_torch eager"]
            cp = f" = {100 * f['of_copy']:.1f}% of copy bandwidth" if "of_copy" in f else ""
            print(f"B={e['batch']}: step moves {e['bytes'] / 1e6:.2f} MB; seed ops {s['ms']:.3f} ms ({s['gbps']:.2f} "
                  f"GB/s), engine step_torch {f['ms']:.3f} ms ({f['gbps']:.2f} GB/s{cp})")

    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    meta.update(rates)
    print(f"\n# load average at the end {meta['loadavg_end']} (noisy if well above the core count)")
    for row in [meta] + build_rows + rows + extra:
        print("JSON " + json.dumps(row, default=str))

    if args.markdown:
        print("\n" + markdown(meta, build_rows, rows, extra))
    if args.plot:
        write_plot(rows, args.plot, args.size, meta)
        print(f"# plot: {args.plot}")
    if tmp is not None:
        del engines
        gc.collect()
        tmp.cleanup()
    return 0


def markdown(meta: dict, build_rows: list, rows: list, extra: list) -> str:
    """RESULTS.md tables: sampling (ratios to the seed loop), build/load times, step cost."""
    out = [f"Machine: {meta['machine']}, {meta['cores']} cores, torch threads {meta['torch_threads']}; "
           f"load average {meta['loadavg_start']} at the start, {meta.get('loadavg_end')} at the end. "
           f"Model: {meta['model']}. Measured torch.mm rate {meta.get('mm_fp32_gflops', '?')} GFLOP/s fp32, "
           f"{meta.get('mm_bf16_gflops', '?')} GFLOP/s bf16; OpenVINO MatMul {meta.get('ov_mm_fp32_gops', '?')} fp32, "
           f"{meta.get('ov_mm_bf16_gops', '?')} bf16, {meta.get('ov_mm_int8_gops', '?')} int8 GOP/s; copy bandwidth "
           f"{meta.get('copy_gbps', '?')} GB/s.", "",
           "| path | B | T | run s (median) | spread | s/sample | samples/s | ms/step | vs seed | peak MiB | U-Net share "
           "| U-Net GFLOP/s | of mm rate | of OV mm rate | warm-up s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = lambda k: f"{100 * r[k]:.0f} %" if r.get(k) is not None else "-"  # noqa: E731
        pct1 = lambda k: f"{100 * r[k]:.1f} %" if r.get(k) is not None else "-"  # noqa: E731
        out.append(f"| {r['path']} | {r['batch']} | {r['steps']} | {fmt_s(r['median_s'])} | {pct('spread')} | "
                   f"{fmt_s(r['s_per_sample'])} | {r['samples_per_s']:.3g} | {r['ms_per_step']:.1f} | "
                   f"**{r['vs_seed']:.2f}x** | {r['peak_mem_mib'] if r['peak_mem_mib'] is not None else '-'} | "
                   f"{pct('unet_share')} | {r.get('achieved_gflops', '-')} | {pct1('of_mm_peak')} | "
                   f"{pct1('of_ov_mm_peak')} | {r['warmup_s']} |")
    out += ["", "| engine dir | backend | precision | verify | build | total s | stages (s) |", "|---|---|---|---|---|---|---|"]
    for r in build_rows:
        if r["kind"] == "build":
            stages = "; ".join(f"{k} {v:.2f}" for k, v in r["stages"].items() if v >= 0.005)
            out.append(f"| {r['engine']} | {r['backend']} | {r['precision']} | {r['verify']} | {r['attempt']} | "
                       f"{r['total_s']:.2f} | {stages} |")
        else:
            out.append(f"| {r['engine']} | {r['backend']} | {r['precision']} | | load | {r['total_s']:.2f} | "
                       "open + compile for this CPU |")
    if extra:
        out += ["", "| B | step bytes | seed ops ms | seed GB/s | engine step_torch ms | engine GB/s | of copy bw |",
                "|---|---|---|---|---|---|---|"]
        for e in extra:
            s, f = e["seed torch ops"], e["step_torch eager"]
            of = f"{100 * f['of_copy']:.1f} %" if "of_copy" in f else "-"
            out.append(f"| {e['batch']} | {e['bytes'] / 1e6:.2f} MB | {s['ms']:.3f} | {s['gbps']:.2f} | {f['ms']:.3f} | "
                       f"{f['gbps']:.2f} | {of} |")
    return "\n".join(out)


def from_log(path: str, plot: str | None) -> int:
    """Markdown tables (and the plot) from the "JSON " lines of an earlier run's output."""
    items = [json.loads(line[5:]) for line in Path(path).read_text().splitlines() if line.startswith("JSON ")]
    meta = next((i for i in items if i.get("kind") == "meta"), None)
    if meta is None:
        print(f"{path}: no JSON meta line (is it bench_sample.py output?)", file=sys.stderr)
        return 2
    rows = [i for i in items if i.get("kind") == "sample"]
    print(f"Command: `{meta['command']}`\n")
    print(markdown(meta, [i for i in items if i.get("kind") in ("build", "load")], rows,
                   [i for i in items if i.get("kind") == "step"]))
    if plot and rows:
        write_plot(rows, plot, meta["size"], meta)
        print(f"\n# plot: {plot}")
    return 0


def plot_labels(rows, meta) -> dict[str, str]:
    """Legend label per path: engines by backend and precision, "(default)" on the one build(backend="auto") makes
    on the run's machine by the build code's own rule (resolve_precision with the run's bf16 ISA), not the label an
    older log carries."""
    from ddpm_engine.export.build import resolve_precision

    backend = next((r["backend"] for r in rows if r.get("default_engine")), None)
    default = (backend, resolve_precision("auto", backend, cpu_bf16=meta["bf16_isa"])) if backend else None
    labels = {}
    for r in rows:
        if r["path"].startswith("engine "):
            engine = (r["backend"], r["precision"])
            labels[r["path"]] = f"engine {engine[0]} {engine[1]}" + (" (default)" if engine == default else "")
        else:
            labels[r["path"]] = r["path"]
    return labels


def write_plot(rows, path, size, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    T = rows[0]["steps"]
    labels = plot_labels(rows, meta)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["path"] for r in rows):
        pts = sorted((r["batch"], r["samples_per_s"]) for r in rows if r["path"] == name and r["steps"] == T)
        style = "--" if "engine" not in name else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=labels[name])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["batch"] for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"samples/s ({T} steps, {size}x{size})")
    ax.set_title(f"Throughput vs batch, {meta['machine']} ({meta['device']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
