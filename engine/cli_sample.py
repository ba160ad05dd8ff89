"""`ddpm-engine sample` (generic .npy arrays) and `ddpm-engine reconstruct` (the CARE-SST workload)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .backends import BACKENDS
from .runner import STEP_IMPLS
from .samplers import SAMPLERS, SPACINGS
from .timing import Stopwatch, one_off


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine", metavar="DIR", help="engine directory written by `ddpm-engine build`")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="backend to run (default: the one the engine was built for; others are derived on first use)")
    p.add_argument("--step", choices=STEP_IMPLS, default=None,
                   help="fused-step implementation (default: triton on CUDA, torch on CPU)")
    p.add_argument("--timesteps", type=int, default=100, help="number of sampling steps T")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="DDPM (Ho et al. 2020), DDIM (Song et al. 2021), or DPM-Solver++(2M) and its SDE variant "
                   "(Lu et al. 2022; at least 3 steps); default ddpm, or a diffusers model's saved scheduler's")
    p.add_argument("--spacing", choices=SPACINGS, default="time",
                   help="time grid: uniform in t (the seed's) or uniform in log-SNR")
    p.add_argument("--seed", type=int, default=0, help="noise seed (same seed, backend and batch: same result)")


def register(subparsers) -> None:
    """Add the `sample` and `reconstruct` subcommands."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = subparsers.add_parser(
        "sample", formatter_class=fmt, help="sample from an engine with .npy inputs",
        description="Run the sampling loop on an engine directory. Arrays are float .npy files shaped [B, C, H, W] "
        "(or [C, H, W] for one image); the result is written as [B, C_out, H, W] float32 .npy.")
    _engine_args(s)
    s.add_argument("--background", metavar="NPY",
                   help="conditioning image [B, C_bg, H, W] (required unless the model takes none)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="samples to draw, for a model without a background (default 1, or x_init's batch)")
    s.add_argument("--height", type=int, default=None, help="image height for a model without a background "
                   "(default: the engine's OPT size)")
    s.add_argument("--width", type=int, default=None, help="image width, as --height")
    s.add_argument("--mask", metavar="NPY", help="inpainting mask, 1 = generate, 0 = keep x_init [1|B, 1|C, H, W]")
    s.add_argument("--x-init", metavar="NPY", help="known image [B, C, H, W] (required with --mask)")
    s.add_argument("--t-start", type=float, default=1.0, help="start time in [0, 1]")
    s.add_argument("--t-end", type=float, default=0.0, help="end time in [0, 1], below --t-start")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic, as the seed)")
    s.add_argument("--tau", type=float, default=1.0, help="fraction of the steps that blend the known pixels")
    s.add_argument("--init", choices=("noise", "background", "x_init"), default="noise",
                   help="start from pure noise, or from the background / x_init diffused to --t-start")
    s.add_argument("-o", "--output", required=True, metavar="NPY", help="where to write the samples")
    s.add_argument("--png", metavar="PNG", help="also write a grid of the samples as a PNG ((x / 2 + 0.5) clamped to "
                   "[0, 1], as diffusers decodes them; 1 or 3 channels)")
    s.set_defaults(func=run_sample)

    r = subparsers.add_parser(
        "reconstruct", formatter_class=fmt, help="CARE-SST: reconstruct SST under clouds",
        description="Reconstruct sea-surface temperature under clouds. VIIRS tiles use 0 for cloud and -999 for "
        "land; OISST tiles are the gap-free background on the same grid (deg C). Writes, per tile, the mean "
        "reconstruction in deg C (<name>.npy, NaN on land), the spread over samples (<name>_std.npy with "
        "--samples > 1) and a figure (<name>.png), then prints the time per tile and per step.")
    _engine_args(r)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--viirs", nargs="+", metavar="NPY", help="VIIRS tiles (pair them with --oisst, same order)")
    src.add_argument("--tiles", metavar="DIR", help="a directory with viirs/ and oisst/ subfolders of .npy tiles")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic tiles with known truth (reports RMSE)")
    r.add_argument("--oisst", nargs="+", metavar="NPY", help="OISST background tiles matching --viirs")
    r.add_argument("--size", type=int, default=64, help="size of --synthetic tiles")
    r.add_argument("--samples", type=int, default=1, help="samples per tile (mean and spread are saved)")
    r.add_argument("--t-start", type=float, default=1.0,
                   help="start time in (0, 1]; below 1 with --init background is CARE-SST's partial-noise start")
    r.add_argument("--init", choices=("noise", "background"), default="noise",
                   help="start from pure noise, or from the background diffused to --t-start")
    r.add_argument("--fast", action="store_true",
                   help=f"the measured fast setting: {FAST['sampler']} with {FAST['timesteps']} steps from the "
                   f"background diffused to t = {FAST['t_start']} (within 2 %% of 100-step DDPM's cloud RMSE on real "
                   "300x300 tiles; benchmarks/RESULTS.md 'Steps against quality')")
    r.add_argument("--batch", type=int, default=8, help="rows per engine call (tiles x samples)")
    r.add_argument("--limit", type=int, default=None, help="use only the first N tiles")
    r.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    r.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    r.set_defaults(func=run_reconstruct)


def _save_npy(path: Path, array: np.ndarray) -> None:
    from ddpm_engine.models.checkpoint import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
            np.save(f, array)

    atomic_write(path, write)


def _timed_load(args):
    """(engine, seconds load took): reading and checking the engine directory is a one-off cost of the command."""
    from .api import load

    start = time.perf_counter()
    engine = load(args.engine, backend=args.backend, step=args.step)
    return engine, time.perf_counter() - start


def run_sample(args) -> int:
    from .reconstruct import load_npy

    paths = {"background": args.background, "mask": args.mask, "x-init": args.x_init}
    arrays = {n: None if p is None else load_npy(p, f"--{n}") for n, p in paths.items()}
    out = Path(args.output)
    if out.suffix != ".npy":
        raise ValueError(f"--output must end in .npy, got {out}")
    if args.png and Path(args.png).suffix != ".png":
        raise ValueError(f"--png must end in .png, got {args.png}")
    engine, load_seconds = _timed_load(args)
    shape = {"batch_size": args.batch_size, "height": args.height, "width": args.width}
    with Stopwatch(engine) as watch:
        x = engine.sample(arrays["background"], mask=arrays["mask"], x_init=arrays["x-init"], timesteps=args.timesteps,
                          sampler=args.sampler, t_start=args.t_start, t_end=args.t_end, seed=args.seed, eta=args.eta,
                          tau=args.tau, init=args.init, spacing=args.spacing,
                          **{k: v for k, v in shape.items() if v is not None})
    x = np.asarray(x)  # numpy in gives numpy out; a model without a background returns a tensor
    _save_npy(out, x)
    if args.png:
        from .image_grid import save_png_grid

        save_png_grid(x, args.png)
    print(f"wrote {out}{' and ' + args.png if args.png else ''} {list(x.shape)} in {watch.seconds:.2f} s steady-state "
          f"({1000 * watch.seconds / args.timesteps:.1f} ms/step, backend {engine.backend}); one-off: "
          f"{one_off(engine, watch.as_dict(), load_seconds)}")
    return 0


# `reconstruct --fast`: the fewest steps within 2 % of 100-step DDPM from the main job's start on whole 300x300
# real tiles (`evaluate --real`, 8 cases x 4 samples: 10 steps +1.6 %, 5 steps +3.9 %; on 64x64 crops 5 steps
# already came within 2 %), RESULTS.md "Steps against quality".
FAST = {"sampler": "dpmpp-2m-sde", "timesteps": 10, "t_start": 0.5, "init": "background"}
_FAST_DEFAULTS = {"sampler": None, "timesteps": 100, "t_start": 1.0, "init": "noise"}


def _apply_fast(args) -> None:
    """Set the --fast settings, refusing a flag given alongside it with another value."""
    for name, value in FAST.items():
        given = getattr(args, name)
        if given not in (_FAST_DEFAULTS[name], value):
            raise ValueError(f"--fast sets --{name.replace('_', '-')} {value}; drop --{name.replace('_', '-')} {given}")
        setattr(args, name, value)


def run_reconstruct(args) -> int:
    from .reconstruct import directory_tiles, real_tiles, reconstruct, save_figure, synthetic_tiles

    if args.fast:
        _apply_fast(args)
    args.sampler = args.sampler or "ddpm"  # CARE-SST models: the seed's sampler (None means a diffusers model's own)
    if args.viirs and not args.oisst:
        raise ValueError("--viirs needs --oisst (one background tile per VIIRS tile)")
    if args.oisst and not args.viirs:
        raise ValueError("--oisst is only used with --viirs")
    if args.synthetic is not None and args.synthetic < 1:
        raise ValueError(f"--synthetic must be >= 1, got {args.synthetic}")
    if args.viirs:
        tiles = real_tiles(args.viirs, args.oisst)
    elif args.tiles:
        tiles = directory_tiles(args.tiles)
    else:
        tiles = synthetic_tiles(args.synthetic, args.size)
    tiles = tiles[: args.limit] if args.limit else tiles
    engine, load_seconds = _timed_load(args)
    results, timing = reconstruct(engine, tiles, samples=args.samples, batch=args.batch, timesteps=args.timesteps,
                                  sampler=args.sampler, seed=args.seed, t_start=args.t_start, init=args.init,
                                  spacing=args.spacing)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for res in results:
        _save_npy(out / f"{res.name}.npy", res.mean.astype(np.float32))
        if res.std is not None:
            _save_npy(out / f"{res.name}_std.npy", res.std.astype(np.float32))
        if not args.no_figures:
            save_figure(res, out / f"{res.name}.png")
        rmse = res.rmse()
        summary.append({"tile": res.name, "cloud_fraction": float(res.cloud.mean()),
                        **({"rmse_c": rmse[0], "background_rmse_c": rmse[1]} if rmse else {})})
    for row in summary:
        extra = (f"  cloud RMSE {row['rmse_c']:.3f} C (background only {row['background_rmse_c']:.3f} C)"
                 if "rmse_c" in row else "")
        print(f"{row['tile']}: {100 * row['cloud_fraction']:.0f}% cloud{extra}")
    print(f"{timing['tiles']} tile(s) x {args.samples} sample(s), {args.timesteps} {args.sampler} steps, in "
          f"{timing['seconds']:.1f} s steady-state: {timing['seconds_per_tile']:.2f} s/tile, "
          f"{timing['ms_per_step']:.1f} ms per step (backend {engine.backend}); one-off: "
          f"{one_off(engine, timing, load_seconds)}")
    print(f"outputs in {out}/ ({'npy' if args.no_figures else 'npy + png figures'})")
    print(json.dumps({"timing": {**timing, "load_seconds": load_seconds}, "tiles": summary, "backend": engine.backend}))
    return 0
