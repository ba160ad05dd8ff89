"""Scoring on real SST: clear VIIRS pixels hidden under another tile's real cloud mask (shared/data/README.md).

Real truth under real clouds does not exist, so each case takes a nearly clear VIIRS tile-day (the target),
lays a real cloud mask from a cloudy tile (the donor) over it, and scores only the clear pixels it hid.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import CLOUD, Tile, fill_oisst_land, normalize, observed, preprocess, viirs_oisst_files


def _load(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False).astype(np.float32)


def clear_tile_days(root: str | Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, viirs [H, W], oisst [H, W]) per day of every sst-clear tile; OISST resized bilinearly to the tile."""
    days = []
    for v, o in viirs_oisst_files(Path(root) / "sst-clear", "_oisst_"):
        viirs, oisst = _load(v), _load(o)
        if viirs.ndim != 3 or oisst.ndim != 3:
            raise ValueError(f"{v} and {o} must be [H, W, days] and [h, w, 1] arrays, got {viirs.shape} and {oisst.shape}")
        # OISST is at its native 0.25 degrees here: resize it to the VIIRS grid, as the cloudy tiles already are,
        # after filling its land cells, which bilinear resizing would otherwise smear into the sea.
        grid = torch.from_numpy(fill_oisst_land(oisst[..., 0]))[None, None]
        background = F.interpolate(grid, size=viirs.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
        days += [(f"{v.stem}_day{d}", viirs[..., d], background) for d in range(viirs.shape[2])]
    return days


def cloud_masks(root: str | Path) -> list[tuple[str, np.ndarray]]:
    """(name, bool mask, True on cloud) of every sst-cloud VIIRS tile: the real masks laid over clear tiles."""
    files = sorted((Path(root) / "sst-cloud" / "viirs").glob("*_viirs_*.npy"))
    if not files:
        raise FileNotFoundError(f"no cloudy VIIRS tiles under {Path(root) / 'sst-cloud' / 'viirs'}")
    return [(f.stem, _load(f) == CLOUD) for f in files]


def hide_under_mask(viirs: np.ndarray, oisst: np.ndarray, donor: np.ndarray) -> Tile:
    """A Tile whose `scored` pixels are the clear pixels of `viirs` under the donor's clouds, with their truth."""
    valid = observed(viirs)
    hidden = donor & valid
    tile = preprocess(np.where(hidden, CLOUD, viirs), oisst)  # the target's own clouds stay cloud too
    tile.truth = torch.from_numpy(np.where(valid, normalize(viirs, tile.lo, tile.hi), tile.background[0].numpy()))[None]
    tile.scored = torch.from_numpy(hidden.astype(np.float32))[None]
    return tile


def holdout_real_tiles(root: str | Path, masks_per_day: int = 2, crop: int | None = None) -> list[tuple[str, Tile]]:
    """Every clear tile-day under `masks_per_day` different donor masks (round robin), optionally a centre crop.

    A crop keeps tests and quick studies small; it is taken before preprocessing, so the normalisation range is
    the crop's own background range, as for a tile of that size.
    """
    days, masks = clear_tile_days(root), cloud_masks(root)
    if not 1 <= masks_per_day <= len(masks):
        raise ValueError(f"masks_per_day must be in [1, {len(masks)}] (the cloudy tiles under {root}), got {masks_per_day}")
    cases = []
    for k, (name, viirs, oisst) in enumerate(days):
        for j in range(masks_per_day):
            donor_name, donor = masks[(k * masks_per_day + j) % len(masks)]
            v, o, m = viirs, oisst, donor
            if crop is not None:
                if not 8 <= crop <= min(viirs.shape):
                    raise ValueError(f"crop must be in [8, {min(viirs.shape)}], got {crop}")
                i, jj = (viirs.shape[0] - crop) // 2, (viirs.shape[1] - crop) // 2
                v, o, m = (a[i:i + crop, jj:jj + crop] for a in (viirs, oisst, donor))
            cases.append((f"{name}+{donor_name.split('_viirs_')[-1]}", hide_under_mask(v, o, m)))
    return cases


class RealCrops:
    """Random nearly clear crops of real tiles for training, normalised by each whole tile's background range.

    Built from the sst-cloud tiles only: the scored cases (holdout_real_tiles) come from the sst-clear tiles, so a
    tile used for training is never scored. Crops are taken where at least `min_clear` of the pixels are clear;
    the remaining gaps take the background value and are left out of the loss through the `valid` mask.
    """

    def __init__(self, root: str | Path, crop: int, min_clear: float = 0.95, stride: int = 4):
        from .data import load_real_tiles

        self.crop = crop
        self.names, self.x0, self.bg, self.valid, self.corners = [], [], [], [], []
        for name, viirs, oisst in load_real_tiles(Path(root) / "sst-cloud"):
            tile = preprocess(viirs, oisst)
            valid = 1.0 - tile.mask[0].numpy() - tile.land[0].numpy()
            windows = np.lib.stride_tricks.sliding_window_view(valid, (crop, crop))[::stride, ::stride]
            ii, jj = np.nonzero(windows.mean(axis=(2, 3)) >= min_clear)
            self.corners += [(len(self.x0), i * stride, j * stride) for i, j in zip(ii, jj)]
            self.names.append(name)
            self.x0.append(tile.x_init[0].numpy())
            self.bg.append(tile.background[0].numpy())
            self.valid.append(valid.astype(np.float32))
        if not self.corners:
            raise ValueError(f"no {crop}x{crop} crop of the tiles under {root}/sst-cloud is {min_clear:.0%} clear")

    def batch(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, background, valid), each [n, 1, crop, crop], each crop in a random one of the 8 flips/rotations."""
        out = []
        for k in rng.integers(0, len(self.corners), n):
            t, i, j = self.corners[k]
            rot, flip = rng.integers(0, 4), rng.integers(0, 2)
            crops = []
            for a in (self.x0[t], self.bg[t], self.valid[t]):
                c = np.rot90(a[i:i + self.crop, j:j + self.crop], rot)
                crops.append(np.ascontiguousarray(c[:, ::-1] if flip else c))
            out.append(crops)
        return tuple(torch.from_numpy(np.stack(parts))[:, None] for parts in zip(*out))
