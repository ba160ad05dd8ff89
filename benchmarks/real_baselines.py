"""Non-learned gap fills on the real cases of `ddpm-engine evaluate --real`: what the model has to beat.

    python benchmarks/real_baselines.py --data ../shared/data

Rows: the OISST background alone; the background shifted by the tile's mean observed-minus-background residual;
and the background plus that residual spread into the gaps by normalised convolution with a Gaussian
(Knutsson & Westin 1993), for a few widths. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ddpm_engine.models.evaluate import rmse_under_clouds  # noqa: E402
from ddpm_engine.models.real_data import holdout_real_tiles  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _blur(a: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-int(3 * sigma), int(3 * sigma) + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = (g / g.sum()).float()
    x = F.pad(a[None], (len(r) // 2,) * 4)  # zero padding: outside the tile counts as unobserved
    return F.conv2d(F.conv2d(x, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))[0]


def residual_fill(tile, sigma: float | None) -> torch.Tensor:
    """Background + the observed residual, as a tile mean (sigma None) or Gaussian-weighted near each gap."""
    seen = 1.0 - tile.mask - tile.land
    residual = (tile.x_init - tile.background) * seen
    mean = residual.sum() / seen.sum()
    if sigma is None:
        return tile.background + mean
    weight = _blur(seen, sigma)
    local = torch.where(weight > 1e-3, _blur(residual, sigma) / weight.clamp_min(1e-3), mean)
    return tile.background + local


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (sst-clear/, sst-cloud/)")
    p.add_argument("--masks-per-day", type=int, default=2, help="donor masks per clear tile-day (as evaluate)")
    p.add_argument("--sigmas", default="3,6,12,25", help="comma-separated Gaussian widths in pixels")
    args = p.parse_args(argv)
    tiles = [t for _, t in holdout_real_tiles(args.data, args.masks_per_day)]
    background = rmse_under_clouds(torch.stack([t.background for t in tiles]), tiles)
    shifted = torch.stack([residual_fill(t, None) for t in tiles])
    rows = [("background alone", background), ("background + tile-mean residual", rmse_under_clouds(shifted, tiles))]
    for sigma in (float(s) for s in args.sigmas.split(",")):
        pred = torch.stack([residual_fill(t, sigma) for t in tiles])
        rows.append((f"background + residual, Gaussian {sigma:g} px", rmse_under_clouds(pred, tiles)))
    print(f"{len(tiles)} real cases (300x300), RMSE on the hidden pixels")
    print("| fill | RMSE (C) | / background |\n|---|---|---|")
    for name, rmse in rows:
        print(f"| {name} | {rmse:.3f} | {rmse / background:.2f} |")
    print(json.dumps({"cases": len(tiles), "rmse": {name: round(r, 4) for name, r in rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
