"""Time one sampler step outside the U-Net: the fused Triton kernel vs the seed's torch operations vs
torch.compile(step_torch), at CARE-SST sizes (B x 1 x 300 x 300) and larger.

    python benchmarks/bench_step.py                     # CUDA if present, else the CPU torch paths
    python benchmarks/bench_step.py --sizes 8x1x300x300,16x4x512x512 --model-dtype fp32

One "step" is everything between two U-Net calls in masked DDPM sampling: the update of step i with its
noise, the re-noised known pixels and the blend before the next call, and the next U-Net input
(the seed's torch.cat, or the fused kernel's write into the x channels of the input buffer).

Reported per row: median time, GB/s over the bytes a step must move (read x, eps_hat, x_init, mask;
write x and the model input's x channels; the same count for every path, so GB/s compare), and that
as a fraction of the device's measured copy bandwidth (torch copy of a large tensor). Prints a table,
then one JSON line per row (prefix "JSON ").
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ddpm_engine.engine import step_table  # noqa: E402
from ddpm_engine.kernels import step_torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CARE_SST = [f"{b}x1x300x300" for b in (1, 2, 4, 8, 16, 32, 64)]
LARGER = ["16x4x512x512", "8x3x1024x1024"]


# --------------------------------------------------------------------------------------------------
# the seed's operations, as it runs them (Diffuzz._alpha_cumprod on the device every call, diffuse with
# randn_like, DDPMSampler.step, blend, torch.cat for the next model input)

S = 0.008
INIT_ALPHA_CUMPROD = math.cos(S / (1 + S) * math.pi * 0.5) ** 2


def seed_alpha_cumprod(t: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.cos((t + S) / (1 + S) * math.pi * 0.5) ** 2 / INIT_ALPHA_CUMPROD, 0.0001, 0.9999)


def seed_diffuse(x, t, noise=None):
    if noise is None:
        noise = torch.randn_like(x)
    alpha_cumprod = seed_alpha_cumprod(t).view(t.size(0), *[1 for _ in x.shape[1:]])
    return alpha_cumprod.sqrt() * x + (1 - alpha_cumprod).sqrt() * noise, noise


def seed_ddpm_step(x, t, t_prev, noise):
    alpha_cumprod = seed_alpha_cumprod(t).view(t.size(0), *[1 for _ in x.shape[1:]])
    alpha_cumprod_prev = seed_alpha_cumprod(t_prev).view(t_prev.size(0), *[1 for _ in x.shape[1:]])
    alpha = alpha_cumprod / alpha_cumprod_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * noise / (1 - alpha_cumprod).sqrt())
    std = ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * torch.randn_like(mu)
    return mu + std * (t_prev != 0).float().view(t_prev.size(0), *[1 for _ in x.shape[1:]])


def seed_step(x, pred_noise, r_range, i, x_init, mask, background, model_dtype):
    """Seed iteration i's update, then iteration i + 1's blend and model input."""
    x = seed_ddpm_step(x, r_range[i], r_range[i + 1], pred_noise.float())
    x_renoised, _ = seed_diffuse(x_init, r_range[i + 1])
    x = x * mask + x_renoised * (1 - mask)
    return x, torch.cat((x, background), dim=1).to(model_dtype)


# --------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must be BxCxHxW, got {text!r}")
    return parts


def step_bytes(shape, model_dtype: torch.dtype, mask_numel: int) -> int:
    n = math.prod(shape)
    m = torch.empty((), dtype=model_dtype).element_size()
    # read x, eps_hat (model dtype), x_init, mask; write x, model_in x channels (model dtype)
    return n * (4 + m + 4 + 4 + m) + 4 * mask_numel


def make_inputs(shape, model_dtype, device, c_bg=1):
    B, C, H, W = shape
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    return dict(
        x=r(B, C, H, W), eps_hat=r(B, C, H, W).to(model_dtype), x_init=r(B, C, H, W).clamp(-1, 1),
        mask=(torch.rand(1, 1, H, W, generator=g, device=device) > 0.3).float(),
        background=r(B, c_bg, H, W), model_in=r(B, C + c_bg, H, W).to(model_dtype),
        t_in=torch.zeros(B, device=device),
    )


def cpu_time_ms(fn, warmup=2, reps=10, budget_s=5.0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps and (time.perf_counter() - start < budget_s or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device, timer) -> float:
    n = (256 << 20) if device.type == "cuda" else (32 << 20)  # 1 GiB on GPUs, 128 MiB on CPUs (fp32)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def paths_for(shape, model_dtype, device, args):
    """name -> zero-argument callable doing one step on preallocated buffers."""
    inp = make_inputs(shape, model_dtype, device)
    tab = step_table(sampler="ddpm", timesteps=300).to(device)
    i = 150
    step = torch.tensor([i], device=device)
    seed = torch.tensor([1234], device=device)
    r_range = torch.linspace(1.0, 0.0, 301)[:, None].expand(-1, shape[0]).to(device)
    x, eps_hat, x_init, mask = inp["x"], inp["eps_hat"], inp["x_init"], inp["mask"]
    model_in, t_in, background = inp["model_in"], inp["t_in"], inp["background"]

    def seed_ops():
        return seed_step(x, eps_hat, r_range, i, x_init, mask, background, model_dtype)

    def torch_spec(eps2, eps1):
        return step_torch(x, eps_hat, tab.rows, step, eps2, eps1, model_in=model_in, t_in=t_in, mask=mask,
                          x_init=x_init)

    def torch_eager():
        return torch_spec(torch.randn_like(x), torch.randn_like(x))

    paths = {"seed torch ops": seed_ops, "step_torch eager": torch_eager}
    if args.compile:
        compiled = torch.compile(torch_eager, dynamic=False)
        paths["torch.compile(step_torch)"] = compiled
    if device.type == "cuda":
        from ddpm_engine.kernels.fused_step_triton import step_triton

        def fused():
            return step_triton(x, eps_hat, tab.rows, step, seed, model_in=model_in, t_in=t_in, mask=mask,
                               x_init=x_init)

        paths["fused triton"] = fused
    return paths, mask.numel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None,
                   help="comma-separated BxCxHxW list (default: B=1..64 x 1x300x300 and two larger sizes on CUDA; "
                        "1x1x300x300 and 8x1x300x300 on CPU)")
    p.add_argument("--model-dtype", choices=sorted(DTYPES), default="bf16", help="the U-Net's input/output dtype")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile(step_torch)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="on CUDA also time each path replayed from a CUDA graph (triton.testing.do_bench_cudagraph)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dtype = DTYPES[args.model_dtype]
    if args.sizes:
        sizes = [parse_size(s) for s in args.sizes.split(",")]
    else:
        sizes = [parse_size(s) for s in (CARE_SST + LARGER if device.type == "cuda" else ["1x1x300x300", "8x1x300x300"])]

    if device.type == "cuda":
        import triton
        from triton.testing import do_bench, do_bench_cudagraph

        timer = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
        graph_timer = lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median")  # noqa: E731
        where = f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), " \
                f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    else:
        timer = cpu_time_ms
        graph_timer = None
        where = f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    copy_gbps = copy_bandwidth_gbps(device, timer)
    print(f"# {where}; model dtype {args.model_dtype}; device copy bandwidth {copy_gbps:.1f} GB/s")
    if device.type != "cuda":
        print("# fused triton rows need CUDA (the kernel runs on CPU only in the Triton interpreter, for tests)")

    rows = []
    header = f"{'size':>16} {'path':>28} {'ms':>10} {'GB/s':>9} {'copy%':>7} {'vs seed':>8}"
    print(header)
    print("-" * len(header))
    for shape in sizes:
        paths, mask_numel = paths_for(shape, model_dtype, device, args)
        nbytes = step_bytes(shape, model_dtype, mask_numel)
        seed_ms = None
        timings = []
        for name, fn in paths.items():
            try:
                for _ in range(3):  # compile / autotune / allocate before timing (do_bench sizes its reps on call 1)
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings.append((name, timer(fn)))
            except Exception as exc:  # e.g. torch.compile without a working C++ compiler
                print(f"# {name} at {shape} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                continue
            if graph_timer is not None and args.cuda_graphs:
                try:
                    timings.append((name + " [graph]", graph_timer(fn)))
                except Exception as exc:
                    print(f"# {name} [graph] at {shape} failed: {type(exc).__name__}: {str(exc)[:160]}")
        for name, ms in timings:
            if name == "seed torch ops":
                seed_ms = ms
        for name, ms in timings:
            gbps = nbytes / (ms * 1e-3) / 1e9
            row = dict(device=device.type, where=where, size="x".join(map(str, shape)), path=name,
                       model_dtype=args.model_dtype, ms=round(ms, 5), gbps=round(gbps, 2),
                       copy_fraction=round(gbps / copy_gbps, 4), copy_gbps=round(copy_gbps, 1), bytes=nbytes,
                       speedup_vs_seed=round(seed_ms / ms, 2) if seed_ms else None)
            rows.append(row)
            speed = f"{row['speedup_vs_seed']:.1f}x" if seed_ms else "-"
            print(f"{row['size']:>16} {name:>28} {ms:>10.4f} {gbps:>9.1f} {100 * gbps / copy_gbps:>6.1f}% {speed:>8}")
    for row in rows:
        print("JSON " + json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
