"""Cloud-gap reconstruction (CARE-SST's task): RMSE under clouds vs the background alone, synthetic or real tiles.

    ddpm-engine evaluate --model sst-small --figure out.png
    ddpm-engine evaluate --real ../shared/data --t-start 0.5 --init background --samples 4
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from ..engine.reference import reference_sample
from ..engine.timing import Stopwatch, one_off
from .data import Tile, denormalize, synthetic_tile
from .registry import load_model

HELD_OUT_SEED = 20_261_129  # training draws from default_rng([seed, step]): a different stream


def held_out_tiles(n: int = 4, size: int = 64, seed: int = HELD_OUT_SEED) -> list[Tile]:
    """n synthetic tiles the training run never saw."""
    rng = np.random.default_rng(seed)
    return [synthetic_tile(rng, size) for _ in range(n)]


def rmse_under_clouds(pred: torch.Tensor, tiles: list[Tile]) -> float:
    """RMSE in deg C of pred [N, 1, H, W], pooled over the scored pixels of all tiles (each in its own range)."""
    sq, count = 0.0, 0
    for p, tile in zip(pred, tiles):
        scored = tile.scored_pixels
        err = denormalize(p, tile.lo, tile.hi) - denormalize(tile.truth, tile.lo, tile.hi)
        sq += float((err**2 * scored).sum())
        count += int(scored.sum())
    return (sq / max(count, 1)) ** 0.5


@torch.no_grad()
def reconstruct(model, tiles: list[Tile], timesteps: int = 100, sampler: str = "ddpm", samples: int = 1,
                seed: int = 0, t_start: float = 1.0, init: str = "noise") -> torch.Tensor:
    """Inpaint the cloud pixels, `samples` times per tile: [samples, N, 1, H, W] with known pixels re-pasted.

    model: an nn.Module, sampled with reference_sample (the seed's loop), or a loaded Engine (its parity path,
    the same noise).
    """
    background = torch.stack([t.background for t in tiles]).repeat(samples, 1, 1, 1)
    mask = torch.stack([t.mask for t in tiles]).repeat(samples, 1, 1, 1)
    x_init = torch.stack([t.x_init for t in tiles]).repeat(samples, 1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(mask=mask, x_init=x_init, timesteps=timesteps, sampler=sampler, generator=gen, t_start=t_start,
                  init=init)
    if isinstance(model, torch.nn.Module):
        x = reference_sample(model, background, tuple(x_init.shape), **kwargs)
    else:
        x = model.sample(background, **kwargs)
    # The seed does not re-paste known pixels; a reconstruction product does.
    x = x * mask + x_init * (1 - mask)
    return x.reshape(samples, len(tiles), *x.shape[1:])


def evaluate(model, n_tiles: int = 4, size: int = 64, timesteps: int = 100, sampler: str = "ddpm",
             samples: int = 1, seed: int = 0, t_start: float = 1.0, init: str = "noise",
             tiles: list[Tile] | None = None) -> dict:
    """RMSE in deg C over scored cloud pixels: the ensemble mean, a single sample, and the background alone.

    tiles: the tiles to score (default: n_tiles held-out synthetic tiles of `size`); see real_data for real ones.
    Returns {'rmse_model' (mean of the samples), 'rmse_single' (each sample alone, averaged), 'rmse_background',
    'timing' (steady-state 'seconds', and an engine's one-off compiles apart: Stopwatch.as_dict), 'tiles',
    'reconstruction' (the ensemble mean)}.
    """
    tiles = held_out_tiles(n_tiles, size) if tiles is None else tiles
    with Stopwatch(model) as watch:
        recon = reconstruct(model, tiles, timesteps, sampler, samples, seed, t_start, init)
    return {
        "rmse_model": rmse_under_clouds(recon.mean(0), tiles),
        "rmse_single": sum(rmse_under_clouds(r, tiles) for r in recon) / samples,
        "rmse_background": rmse_under_clouds(torch.stack([t.background for t in tiles]), tiles),
        "timing": watch.as_dict(),
        "tiles": tiles,
        "reconstruction": recon.mean(0),
    }


def save_figure(result: dict, path: str) -> None:
    """Rows of observed | background | reconstruction | truth in deg C, cloud pixels blank in 'observed'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles, recon = result["tiles"], result["reconstruction"]
    fig, axes = plt.subplots(len(tiles), 4, figsize=(10, 2.6 * len(tiles)), squeeze=False)
    for row, (tile, rec) in zip(axes, zip(tiles, recon)):
        c = lambda a: denormalize(a[0].numpy(), tile.lo, tile.hi)  # noqa: E731
        observed = np.where(tile.mask[0].numpy() > 0, np.nan, c(tile.x_init))
        panels = (observed, c(tile.background), c(rec), c(tile.truth))
        lo, hi = np.nanmin(panels[3]), np.nanmax(panels[3])
        for ax, img, title in zip(row, panels, ("observed", "background", "reconstruction", "truth")):
            im = ax.imshow(img, vmin=lo, vmax=hi, cmap="RdYlBu_r")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=row.tolist(), shrink=0.8, label="SST (deg C)")
    fig.suptitle(f"RMSE under clouds: reconstruction {result['rmse_model']:.3f} C, "
                 f"background {result['rmse_background']:.3f} C", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="sst-small", help="preset name, checkpoint directory or CARE-SST .pth")
    p.add_argument("--engine", help="sample with this built engine directory (its parity path: the same noise as "
                   "the seed's loop, much faster at 300x300) instead of the eager --model")
    p.add_argument("--real", metavar="DATA", help="score real tiles: the shared data folder holding sst-clear/ and "
                   "sst-cloud/ (clear pixels hidden under other tiles' real cloud masks); default: synthetic tiles")
    p.add_argument("--masks-per-day", type=int, default=2, help="--real: donor cloud masks per clear tile-day "
                   "(default %(default)s)")
    p.add_argument("--crop", type=int, default=None, help="--real: score a centre crop of this size (default: "
                   "the whole 300x300 tile)")
    p.add_argument("--tiles", type=int, default=4, help="held-out synthetic tiles (default %(default)s)")
    p.add_argument("--size", type=int, default=64, help="synthetic tile size in pixels (default %(default)s)")
    p.add_argument("--timesteps", type=int, default=100, help="sampling steps (default %(default)s)")
    p.add_argument("--sampler", default="ddpm", help="sampler name (default %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="samples per tile; > 1 also scores their mean (default 1)")
    p.add_argument("--t-start", type=float, default=1.0, help="first time of the loop (default %(default)s)")
    p.add_argument("--init", default="noise", help="noise, or background: start from diffuse(background, t_start), "
                   "as CARE-SST's partial-noise runs (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed (default %(default)s)")
    p.add_argument("--figure", help="write observed | background | reconstruction | truth to this PNG")
    p.add_argument("--threads", type=int, default=None, help="CPU threads: torch's, and the --engine backend's "
                   "(default: their own choice)")


def register(subparsers) -> None:
    """Add `ddpm-engine evaluate`."""
    p = subparsers.add_parser(
        "evaluate", help="score cloud-gap reconstruction (RMSE in deg C) against the background alone",
        description="Reconstruct SST under clouds and print the RMSE over pixels with known truth, in deg C, for "
        "the ensemble mean, a single sample and the background alone. Synthetic held-out tiles by default; with "
        "--real, real VIIRS tiles whose clear pixels are hidden under other tiles' real cloud masks.")
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print one line of RMSEs; optionally write the figure."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.real:
        from .real_data import holdout_real_tiles

        named = holdout_real_tiles(args.real, args.masks_per_day, args.crop)
        tiles, what = [t for _, t in named], f"{len(named)} real tile-days x masks"
    else:
        tiles, what = held_out_tiles(args.tiles, args.size), f"{args.tiles} synthetic tiles"
    start = time.perf_counter()
    if args.engine:
        from ..engine.api import load

        engine = model = load(args.engine, threads=args.threads)
    else:
        engine, model = None, load_model(args.model)
    load_seconds = time.perf_counter() - start
    # One sampling call for every tile and sample (one noise stream): no progress bar, so say what is running.
    print(f"evaluate: {what} x {args.samples} sample(s), {args.sampler} {args.timesteps} steps ...", file=sys.stderr,
          flush=True)
    r = evaluate(model, timesteps=args.timesteps, sampler=args.sampler, samples=args.samples, seed=args.seed,
                 t_start=args.t_start, init=args.init, tiles=tiles)
    size = "x".join(map(str, tiles[0].mask.shape[1:]))
    print(f"RMSE under clouds ({what}, {size}, {args.sampler} {args.timesteps} steps from t={args.t_start} "
          f"({args.init}), {args.samples} sample(s)): mean {r['rmse_model']:.4f} C, single sample "
          f"{r['rmse_single']:.4f} C, background only {r['rmse_background']:.4f} C, ratio (mean / background) "
          f"{r['rmse_model'] / r['rmse_background']:.3f} [{r['timing']['seconds']:.1f} s steady-state; one-off: "
          f"{one_off(engine, r['timing'], load_seconds)}]")
    if args.figure:
        save_figure(r, args.figure)
        print(f"figure -> {args.figure}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ddpm_engine.models.evaluate`: the same as `ddpm-engine evaluate`."""
    from ..engine.cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
