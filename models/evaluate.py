"""Cloud-gap reconstruction on held-out synthetic tiles (CARE-SST's task): RMSE under clouds vs the background alone.

    python -m ddpm_engine.models.evaluate --model sst-small --figure out.png
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from ..engine.reference import reference_sample
from .data import Tile, denormalize, synthetic_tile
from .registry import load_model

HELD_OUT_SEED = 20_261_129  # training draws from default_rng([seed, step]): a different stream


def held_out_tiles(n: int = 4, size: int = 64, seed: int = HELD_OUT_SEED) -> list[Tile]:
    """n synthetic tiles the training run never saw."""
    rng = np.random.default_rng(seed)
    return [synthetic_tile(rng, size) for _ in range(n)]


def _rmse_under_clouds(pred: torch.Tensor, tiles: list[Tile]) -> float:
    # In deg C, pooled over all cloud pixels of all tiles (each tile has its own normalisation range).
    sq, count = 0.0, 0
    for p, tile in zip(pred, tiles):
        err = denormalize(p, tile.lo, tile.hi) - denormalize(tile.truth, tile.lo, tile.hi)
        sq += float((err**2 * tile.mask).sum())
        count += int(tile.mask.sum())
    return (sq / max(count, 1)) ** 0.5


@torch.no_grad()
def reconstruct(model, tiles: list[Tile], timesteps: int = 100, sampler: str = "ddpm", samples: int = 1,
                seed: int = 0, t_start: float = 1.0, init: str = "noise") -> torch.Tensor:
    """Inpaint the cloud pixels with reference_sample; samples > 1 returns the ensemble mean. [N, 1, H, W]."""
    background = torch.stack([t.background for t in tiles]).repeat(samples, 1, 1, 1)
    mask = torch.stack([t.mask for t in tiles]).repeat(samples, 1, 1, 1)
    x_init = torch.stack([t.x_init for t in tiles]).repeat(samples, 1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    x = reference_sample(model, background, tuple(x_init.shape), mask=mask, x_init=x_init, timesteps=timesteps,
                         sampler=sampler, generator=gen, t_start=t_start, init=init)
    x = x.reshape(samples, len(tiles), *x.shape[1:]).mean(0)
    # The seed does not re-paste known pixels; a reconstruction product does.
    return x * mask[: len(tiles)] + x_init[: len(tiles)] * (1 - mask[: len(tiles)])


def evaluate(model, n_tiles: int = 4, size: int = 64, timesteps: int = 100, sampler: str = "ddpm",
             samples: int = 1, seed: int = 0, t_start: float = 1.0, init: str = "noise") -> dict:
    """{'rmse_model', 'rmse_background'} in deg C over cloud pixels, plus the tiles and reconstructions."""
    tiles = held_out_tiles(n_tiles, size)
    start = time.perf_counter()
    recon = reconstruct(model, tiles, timesteps, sampler, samples, seed, t_start, init)
    return {
        "rmse_model": _rmse_under_clouds(recon, tiles),
        "rmse_background": _rmse_under_clouds(torch.stack([t.background for t in tiles]), tiles),
        "seconds": time.perf_counter() - start,
        "tiles": tiles,
        "reconstruction": recon,
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


def main(argv: list[str] | None = None) -> int:
    """Print both RMSEs; optionally write the figure."""
    p = argparse.ArgumentParser(prog="python -m ddpm_engine.models.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sst-small", help="preset name, checkpoint directory or CARE-SST .pth")
    p.add_argument("--tiles", type=int, default=4, help="held-out synthetic tiles (default %(default)s)")
    p.add_argument("--size", type=int, default=64, help="tile size in pixels (default %(default)s)")
    p.add_argument("--timesteps", type=int, default=100, help="sampling steps (default %(default)s)")
    p.add_argument("--sampler", default="ddpm", help="ddpm or ddim (default %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="samples per tile; > 1 scores their mean (default 1)")
    p.add_argument("--t-start", type=float, default=1.0, help="first time of the loop (default %(default)s)")
    p.add_argument("--init", default="noise", help="noise, or background: start from diffuse(background, t_start), "
                   "as CARE-SST's partial-noise runs (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed (default %(default)s)")
    p.add_argument("--figure", help="write observed | background | reconstruction | truth to this PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        r = evaluate(load_model(args.model), args.tiles, args.size, args.timesteps, args.sampler, args.samples,
                     args.seed, args.t_start, args.init)
    except (ValueError, FileNotFoundError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(f"RMSE under clouds ({args.tiles} tiles {args.size}x{args.size}, {args.sampler} {args.timesteps} steps "
          f"from t={args.t_start} ({args.init}), "
          f"{args.samples} sample(s)): model {r['rmse_model']:.4f} C, background only {r['rmse_background']:.4f} C "
          f"[{r['seconds']:.1f} s]")
    if args.figure:
        save_figure(r, args.figure)
        print(f"figure -> {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
