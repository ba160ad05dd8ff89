"""Steps against reconstruction quality on the CARE-SST task (issue 12): which sampler reaches a given cloud RMSE
in the fewest model calls, and how long that takes on the default CPU engine.

    python benchmarks/bench_quality.py --quick                  # minutes: 1 synthetic tile + 4 real 64x64 crops, 5/10 steps
    python benchmarks/bench_quality.py --out out/quality        # the study (hours on 2 CPU cores)
    python benchmarks/bench_quality.py --engine engines/sst-small --steps 5,10,20 --samplers ddpm,dpmpp-2m-sde

Grid: samplers (DDPM, DDIM, DPM-Solver++(2M), DPM-Solver++(2M) SDE) x steps (5, 10, 20, 50, 100, 200) x start:
"full" (pure noise at t = 1) and "bg0.5" (the background diffused to t = 0.5, the main job's start). Every run
inpaints the cloud pixels of every tile with --samples members (seeded, the engine's fast path).

Tiles: held-out synthetic tiles (ddpm_engine.models.evaluate.held_out_tiles: truth known everywhere) and the real
cases of `ddpm-engine evaluate --real` (ddpm_engine.models.real_data, as ../shared/data/README.md says): each
clear VIIRS tile-day of sst-clear with --real-masks cloud masks of sst-cloud tiles laid over its clear pixels;
those hidden pixels are the scored ones, with the VIIRS values as truth (the clear tile's own few clouds are
generated too, but not scored); --crop takes a centre crop.

Metrics, in deg C over the scored pixels of all tiles pooled: rmse_single (each member's RMSE, averaged over the
members), rmse_mean (the RMSE of the members' mean), spread (RMS over pixels of the members' standard deviation,
unbiased), and spread_skill = spread * sqrt((M + 1) / M) / rmse_mean (1 for a calibrated ensemble of M members).
Time: seconds per tile (all members) of each run, after one untimed warm-up call per tile shape (reported apart:
it compiles the shape); the load average beside each row. The seed's eager loop (reference_sample, 100 DDPM
steps from the main job's start) is timed on the same tiles for comparison. The summary gives, per sampler and
start, the fewest steps within 2 % of the sampler's own largest-step rmse_mean, and of DDPM's 100-step one.
Prints a table and "JSON " lines; with --out, writes results.json, table.md and rmse_vs_calls.png (matplotlib).
Never collected by pytest.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ddpm_engine.engine import build, load, reference_sample  # noqa: E402
from ddpm_engine.engine.samplers import SAMPLERS  # noqa: E402
from ddpm_engine.models import load_model  # noqa: E402
from ddpm_engine.models.data import denormalize  # noqa: E402
from ddpm_engine.models.evaluate import held_out_tiles, rmse_under_clouds  # noqa: E402
from ddpm_engine.models.real_data import holdout_real_tiles  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STARTS = {"full": (1.0, "noise"), "bg0.5": (0.5, "background")}


def real_tiles(root: Path, masks: int, crop: int | None) -> list:
    """`ddpm-engine evaluate --real`'s cases (models.real_data.holdout_real_tiles): Tiles scored on hidden pixels."""
    return [tile for _, tile in holdout_real_tiles(root, masks, crop)]


def scores(members: np.ndarray, tiles) -> dict:
    """rmse_single, rmse_mean, spread, spread_skill in deg C from members [M, N, H, W] (normalised units)."""
    as_pred = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None]  # noqa: E731
    m = len(members)
    rmse_mean = rmse_under_clouds(as_pred(members.mean(0)), tiles)
    rmse_single = float(np.mean([rmse_under_clouds(as_pred(member), tiles) for member in members]))
    var, count = 0.0, 0  # the ensemble's spread, pooled over the same pixels
    for k, tile in enumerate(tiles):
        scored = tile.scored_pixels[0].numpy() > 0
        deg = denormalize(members[:, k].astype(np.float64), tile.lo, tile.hi)[:, scored]
        var += float(deg.var(0, ddof=1).sum()) if m > 1 else 0.0
        count += int(scored.sum())
    spread = math.sqrt(var / count)
    return {"rmse_single": rmse_single, "rmse_mean": rmse_mean, "spread": spread,
            "spread_skill": spread * math.sqrt((m + 1) / m) / rmse_mean if m > 1 else float("nan")}


def sample_members(engine, tiles, samples: int, steps: int, sampler: str, start: str, seed: int) -> np.ndarray:
    """[M, N, H, W]: every tile inpainted `samples` times (one call per size group; seeds differ per member)."""
    t_start, init = STARTS[start]
    stack = lambda f: torch.stack([getattr(t, f) for t in tiles])  # noqa: E731
    bg, mask, x_init = stack("background"), stack("mask"), stack("x_init")
    members = []
    for m in range(samples):
        x = engine.sample(bg, mask=mask, x_init=x_init, timesteps=steps, sampler=sampler, t_start=t_start,
                          init=init, seed=seed + m)
        members.append((x * mask + x_init * (1 - mask))[:, 0].numpy())  # a product re-pastes the observed pixels
    return np.stack(members)


def seed_baseline(model, tiles, samples: int, steps: int) -> float:
    """Seconds per tile of the seed's eager loop (reference_sample, DDPM, the main job's start), all members."""
    t_start, init = STARTS["bg0.5"]
    stack = lambda f: torch.stack([getattr(t, f) for t in tiles]).repeat(samples, 1, 1, 1)  # noqa: E731
    bg, mask, x_init = stack("background"), stack("mask"), stack("x_init")
    t0 = time.perf_counter()
    reference_sample(model, bg, tuple(x_init.shape), mask=mask, x_init=x_init, timesteps=steps, t_start=t_start,
                     init=init, generator=torch.Generator().manual_seed(0))
    return (time.perf_counter() - t0) / len(tiles)


def summary(rows: list[dict]) -> list[dict]:
    """Per (tiles, start, sampler): the fewest steps within 2 % of its own largest-step rmse_mean and of DDPM-100's."""
    out = []
    for tiles, start in sorted({(r["tiles"], r["start"]) for r in rows}):
        group = [r for r in rows if r["tiles"] == tiles and r["start"] == start]
        ddpm100 = next((r["rmse_mean"] for r in group if r["sampler"] == "ddpm" and r["steps"] == 100), None)
        for sampler in sorted({r["sampler"] for r in group}):
            runs = sorted((r for r in group if r["sampler"] == sampler), key=lambda r: r["steps"])
            own = runs[-1]["rmse_mean"]
            within = lambda ref: next((r["steps"] for r in runs if r["rmse_mean"] <= 1.02 * ref), None)  # noqa: E731
            out.append({"tiles": tiles, "start": start, "sampler": sampler, "largest_steps": runs[-1]["steps"],
                        "steps_within_2pct_of_own": within(own),
                        "steps_within_2pct_of_ddpm100": within(ddpm100) if ddpm100 else None})
    return out


def table(rows: list[dict]) -> str:
    head = ("| tiles | start | sampler | steps | RMSE single (C) | RMSE mean of M (C) | spread (C) | spread/skill "
            "| s/tile |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['tiles']} | {r['start']} | {r['sampler']} | {r['steps']} | {r['rmse_single']:.3f} | "
                     f"{r['rmse_mean']:.3f} | {r['spread']:.3f} | {r['spread_skill']:.2f} | {r['s_per_tile']:.2f} |")
    return "\n".join(lines)


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["tiles"], r["start"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (tiles, start) in zip(axes[0], panels):
        for sampler in SAMPLERS:
            runs = sorted((r for r in rows if (r["tiles"], r["start"], r["sampler"]) == (tiles, start, sampler)),
                          key=lambda r: r["steps"])
            if runs:
                ax.plot([r["steps"] for r in runs], [r["rmse_mean"] for r in runs], marker="o", label=sampler)
        ax.set(xscale="log", xlabel="model calls (steps)", ylabel="cloud RMSE, mean of M (deg C)",
               title=f"{tiles} tiles, start {start}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 synthetic tile and 4 real 64x64 crops, steps 5,10, 2 members")
    p.add_argument("--engine", metavar="DIR", help="an sst-small engine directory (default: build one in a temp dir)")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated samplers")
    p.add_argument("--steps", default="5,10,20,50,100,200", help="comma-separated step counts")
    p.add_argument("--starts", default="full,bg0.5", help=f"comma-separated starts from {list(STARTS)}")
    p.add_argument("--samples", type=int, default=4, help="members per tile (M)")
    p.add_argument("--synthetic", type=int, default=8, help="held-out synthetic tiles")
    p.add_argument("--size", type=int, default=64, help="synthetic tile size")
    p.add_argument("--real-masks", type=int, default=3, help="sst-cloud masks per sst-clear tile-day (0: no real tiles)")
    p.add_argument("--crop", type=int, default=None, help="a CROP x CROP centre crop of the real tiles (default: the full 300x300)")
    p.add_argument("--baseline-steps", type=int, default=100, help="steps of the seed-loop timing row (0: none)")
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    p.add_argument("--out", type=Path, help="write results.json, table.md and rmse_vs_calls.png here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.samples, args.synthetic, args.real_masks, args.crop = "5,10", 2, 1, 1, 64
        args.baseline_steps = 10
    samplers, starts = args.samplers.split(","), args.starts.split(",")
    steps = [int(s) for s in args.steps.split(",")]

    workloads = {"synthetic": held_out_tiles(args.synthetic, args.size)} if args.synthetic else {}
    if args.real_masks:
        workloads["real"] = real_tiles(args.data, args.real_masks, args.crop)
    sizes = sorted({tuple(t.background.shape[1:]) for tiles in workloads.values() for t in tiles})
    batch = max(len(tiles) for tiles in workloads.values())
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.engine or Path(tmp) / "sst-small"
        if not args.engine:
            t0 = time.perf_counter()
            build("sst-small", directory, backend="auto", batch=(1, batch, batch),
                  size=(sizes[0], sizes[-1], sizes[-1]))
            print(f"# built the default CPU engine in {time.perf_counter() - t0:.1f} s")
        engine = load(directory)
        meta = {"backend": engine.backend, "samples": args.samples, "load": os.getloadavg(), "threads":
                torch.get_num_threads(), "tiles": {k: len(v) for k, v in workloads.items()}, "sizes": sizes}
        print("# " + json.dumps(meta))
        rows, meta["warmup_s"] = [], {}
        for name, tiles in workloads.items():
            t0 = time.perf_counter()  # the first call of a shape compiles it (OpenVINO) and allocates the buffers
            sample_members(engine, tiles, 1, 3, samplers[0], starts[0], seed=10_000)
            meta["warmup_s"][name] = time.perf_counter() - t0
            print(f"# warm-up of the {name} shape (3 steps): {meta['warmup_s'][name]:.2f} s")
            for start in starts:
                for n in steps:
                    for sampler in samplers:
                        t0 = time.perf_counter()
                        members = sample_members(engine, tiles, args.samples, n, sampler, start, seed=0)
                        row = {"tiles": name, "start": start, "sampler": sampler, "steps": n,
                               **scores(members, tiles), "s_per_tile": (time.perf_counter() - t0) / len(tiles),
                               "load": os.getloadavg()[0]}
                        rows.append(row)
                        print("JSON " + json.dumps(row), flush=True)
        if args.baseline_steps:
            first = next(iter(workloads.values()))
            s = seed_baseline(load_model("sst-small"), first, args.samples, args.baseline_steps)
            meta["seed_loop"] = {"steps": args.baseline_steps, "s_per_tile": s, "tiles": next(iter(workloads))}
            print(f"# seed loop (reference_sample, DDPM, {args.baseline_steps} steps, start bg0.5): {s:.2f} s/tile")
    print(table(rows))
    for line in summary(rows):
        print("JSON " + json.dumps({"summary": line}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary(rows)},
                                                          indent=1))
        (args.out / "table.md").write_text(table(rows) + "\n")
        write_plot(rows, args.out / "rmse_vs_calls.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
