"""SST data for CARE-SST: synthetic tiles (gradient + k^-3 eddies + fronts), OISST-like backgrounds, cloud masks, and the real-tile preprocessing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLOUD, LAND = 0.0, -999.0  # VIIRS fill values
OISST_LAND = 0.0  # OISST's land fill: exactly 0 in the cells next to VIIRS land (sst-clear tile 23_82, row 0)


def _spectral_field(rng: np.random.Generator, n: int, slope: float, k_min: float = 0.0) -> np.ndarray:
    """Zero-mean, unit-std isotropic Gaussian field on n x n with power spectrum P(k) ~ k^-slope."""
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij"))
    amp = np.zeros_like(k)
    keep = k > max(k_min, 1.0 / n)
    amp[keep] = k[keep] ** (-slope / 2)
    noise = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    field = np.fft.ifft2(noise * amp).real
    return (field - field.mean()) / (field.std() + 1e-12)


@dataclass(frozen=True)
class SyntheticStyle:
    """The ranges the synthetic generator draws from (deg C, px); see TOY and VIIRS."""

    gradient: tuple[float, float]  # large-scale ramp, deg C / px
    eddy_std: tuple[float, float]  # eddy field's std, deg C
    eddy_slope: float  # its 2-D power-spectrum slope, P(k) ~ k^-slope
    fronts: tuple[int, int]  # number of fronts, drawn from [lo, hi)
    front_step: tuple[float, float]  # half the temperature step across a front, deg C
    front_width: tuple[float, float]  # tanh width, px
    noise_std: float  # sensor noise, deg C
    background_sigma: float  # Gaussian blur of the truth before OISST-like coarse-graining, px
    bias_std: float  # the background's per-tile bias, deg C


# The original generator: strong eddies and fronts packed into a 64 px tile (the bundled weights' first run).
TOY = SyntheticStyle(gradient=(0.01, 0.045), eddy_std=(0.4, 1.5), eddy_slope=4.0, fronts=(1, 4),
                     front_step=(0.5, 2.5), front_width=(1.0, 5.0), noise_std=0.015, background_sigma=3.0,
                     bias_std=0.3)
# Matched to the real VIIRS/OISST tiles on 300 px tiles (`python benchmarks/data_stats.py ../shared/data` prints both
# against the real ones): TOY's 64 px tiles have 7x the real per-pixel gradients, half their gradient tail (p99 /
# median 2.5-2.9 against 5.3-5.5) and half OISST's smoothing scale. Many narrow fronts over weaker eddies give the
# tail; a 10 px blur before coarse-graining gives OISST's 12 px effective smoothing.
VIIRS = SyntheticStyle(gradient=(0.004, 0.04), eddy_std=(0.1, 0.6), eddy_slope=4.0, fronts=(3, 10),
                       front_step=(0.1, 1.0), front_width=(0.3, 1.5), noise_std=0.015, background_sigma=10.0,
                       bias_std=0.25)
STYLES = {"toy": TOY, "viirs": VIIRS}


def synthetic_sst(rng: np.random.Generator, size: int = 64, style: SyntheticStyle = TOY) -> np.ndarray:
    """One SST tile in deg C on a ~750 m VIIRS-like pixel grid: large-scale gradient, eddies, fronts, sensor noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = rng.uniform(0, 2 * np.pi)
    sst = rng.uniform(10.0, 22.0) + rng.uniform(*style.gradient) * (
        np.cos(theta) * (xx - size / 2) + np.sin(theta) * (yy - size / 2))
    # Mesoscale/submesoscale eddies: a power-law spectrum (2-D slope 4 is 1-D slope -3).
    sst += rng.uniform(*style.eddy_std) * _spectral_field(rng, size, slope=style.eddy_slope)
    for _ in range(rng.integers(*style.fronts)):
        # A front: a tanh step across a meandering line; widths of a few px give the heavy gradient tail.
        phi = rng.uniform(0, 2 * np.pi)
        along = -np.sin(phi) * xx + np.cos(phi) * yy
        meander = rng.uniform(2, 10) * np.sin(2 * np.pi * along / rng.uniform(30, 120) + rng.uniform(0, 2 * np.pi))
        across = np.cos(phi) * (xx - rng.uniform(0, size)) + np.sin(phi) * (yy - rng.uniform(0, size)) + meander
        sst += rng.uniform(*style.front_step) * np.tanh(across / rng.uniform(*style.front_width))
    sst += style.noise_std * rng.standard_normal((size, size))
    # Seawater freezes at about -1.8 degC and open-ocean SST stays below ~32 degC.
    return np.clip(sst, -1.8, 32.0).astype(np.float32)


def gaussian_blur(field: np.ndarray, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (truncated at 3 sigma, rounded), edges replicated, as a [1, 1, H, W] tensor: the
    smoothing OISST-like backgrounds get, and the one models/ocean_stats.py fits to real ones."""
    x = torch.from_numpy(np.ascontiguousarray(field, dtype=np.float32))[None, None]
    r = np.arange(-int(3 * sigma + 0.5), int(3 * sigma + 0.5) + 1)
    g = torch.from_numpy(np.exp(-0.5 * (r / sigma) ** 2)).float()
    g = g / g.sum()
    x = F.pad(x, (len(r) // 2,) * 4, mode="replicate")
    return F.conv2d(F.conv2d(x, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))


def background_for(sst: np.ndarray, rng: np.random.Generator, style: SyntheticStyle = TOY, factor: int = 12
                   ) -> np.ndarray:
    """OISST-like background: Gaussian blur, ~factor x coarse-graining, bilinear back up, plus a small tile bias."""
    x = gaussian_blur(sst, style.background_sigma)
    coarse = F.adaptive_avg_pool2d(x, max(1, round(sst.shape[0] / factor)))
    up = F.interpolate(coarse, size=sst.shape, mode="bilinear", align_corners=False)
    return (up[0, 0].numpy() + rng.normal(0.0, style.bias_std)).astype(np.float32)


def cloud_mask(rng: np.random.Generator, size: int = 64, cover: tuple[float, float] = (0.2, 0.8)) -> np.ndarray:
    """1 on cloud, 0 clear: a smooth random field thresholded so that a fraction in `cover` is cloudy."""
    field = _spectral_field(rng, size, slope=4.0)
    frac = rng.uniform(*cover)
    return (field > np.quantile(field, 1.0 - frac)).astype(np.float32)


def fill_oisst_land(oisst: np.ndarray) -> np.ndarray:
    """OISST with its land cells (exactly 0) filled by the mean of their valid 8-neighbours, growing inward.

    A 0 degC cell would otherwise be interpolated into the sea as a cold background, and set the tile's min-max
    range (one real tile went from 4 to 28.6 degC wide, squeezing its SST into a seventh of [-1, 1]).
    """
    out = np.asarray(oisst, dtype=np.float32).copy()
    gap = out == OISST_LAND
    if gap.all():
        raise ValueError("the OISST tile is all land (0): no background to fill from")
    while gap.any():
        vals = np.pad(np.where(gap, 0.0, out), 1)
        valid = np.pad((~gap).astype(np.float32), 1)
        h, w = out.shape
        shifts = [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)]
        total = sum(vals[i:i + h, j:j + w] for i, j in shifts)
        count = sum(valid[i:i + h, j:j + w] for i, j in shifts)
        edge = gap & (count > 0)  # gap cells touching a valid one: filled this round
        out[edge] = total[edge] / count[edge]
        gap &= ~edge
    return out


def observed(viirs: np.ndarray) -> np.ndarray:
    """True where a VIIRS tile has SST: neither cloud (0) nor land (-999)."""
    return (viirs != CLOUD) & (viirs > LAND + 0.5)


def minmax_range(background: np.ndarray) -> tuple[float, float]:
    """The per-tile normalisation range: the background's min and max (CARE-SST)."""
    lo, hi = float(np.min(background)), float(np.max(background))
    return lo, max(hi, lo + 1e-3)  # a flat background would divide by zero


def normalize(values, lo: float, hi: float):
    """deg C -> [-1, 1] by the tile's background range."""
    return 2.0 * (values - lo) / (hi - lo) - 1.0


def denormalize(values, lo: float, hi: float):
    """[-1, 1] -> deg C, the inverse of `normalize`."""
    return (values + 1.0) * 0.5 * (hi - lo) + lo


@dataclass
class Tile:
    """One preprocessed tile, normalised, as [1, H, W] float32 tensors, plus its range for going back to deg C."""

    x_init: torch.Tensor  # observed SST; cloud and land filled with the background
    background: torch.Tensor
    mask: torch.Tensor  # 1 = cloud (to generate), 0 = observed or land
    land: torch.Tensor  # 1 = land (no SST at all)
    lo: float
    hi: float
    truth: torch.Tensor | None = None  # synthetic tiles, and real tiles with pixels hidden under another's clouds
    scored: torch.Tensor | None = None  # the pixels whose truth is known and scored (None: every mask pixel)

    @property
    def scored_pixels(self) -> torch.Tensor:
        """1 on the pixels an RMSE counts: `scored` where set, else every cloud (mask) pixel."""
        return self.mask if self.scored is None else self.scored


def preprocess(viirs: np.ndarray, oisst: np.ndarray) -> Tile:
    """CARE-SST preprocessing of a real pair: VIIRS 0 = cloud, -999 = land, OISST 0 = land (filled); min-max by the
    OISST tile's range."""
    viirs = np.asarray(viirs, dtype=np.float32)
    oisst = np.asarray(oisst, dtype=np.float32)
    if viirs.shape != oisst.shape or viirs.ndim != 2:
        raise ValueError(f"viirs and oisst must be 2-D arrays of one shape, got {viirs.shape} and {oisst.shape}")
    land = viirs <= LAND + 0.5
    cloud = (viirs == CLOUD) & ~land
    oisst = fill_oisst_land(oisst)
    lo, hi = minmax_range(oisst)
    bg = normalize(oisst, lo, hi)
    # Gaps take the background value: known-pixel blending then holds land at the background, and the
    # model never sees the fill values.
    obs = np.where(cloud | land, bg, normalize(viirs, lo, hi))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]  # noqa: E731
    return Tile(t(obs), t(bg), t(cloud), t(land), lo, hi)


def viirs_oisst_files(root: str | Path, oisst_infix: str = "-OISST_") -> list[tuple[Path, Path]]:
    """(viirs, oisst) paths of every root/viirs/*_viirs_*.npy and its partner in root/oisst, named with `_viirs_`
    replaced by `oisst_infix` (the shared tiles: `-OISST_` in sst-cloud, `_oisst_` in sst-clear)."""
    root = Path(root)
    pairs = []
    for v in sorted((root / "viirs").glob("*_viirs_*.npy")):
        o = root / "oisst" / v.name.replace("_viirs_", oisst_infix)
        if not o.exists():
            raise FileNotFoundError(f"no OISST tile {o} for {v}")
        pairs.append((v, o))
    if not pairs:
        raise FileNotFoundError(f"no VIIRS tiles (*_viirs_*.npy) under {root / 'viirs'}")
    return pairs


def load_real_tiles(root: str | Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, viirs, oisst) for every VIIRS tile under root/viirs with its OISST partner under root/oisst."""
    return [(v.stem, np.load(v).astype(np.float32), np.load(o).astype(np.float32))
            for v, o in viirs_oisst_files(root)]


def synthetic_tile(rng: np.random.Generator, size: int = 64, style: SyntheticStyle = TOY) -> Tile:
    """A synthetic (truth, background, cloud mask) tile, preprocessed exactly like a real one."""
    truth = synthetic_sst(rng, size, style)
    bg = background_for(truth, rng, style)
    mask = cloud_mask(rng, size)
    tile = preprocess(np.where(mask > 0, CLOUD, truth), bg)
    tile.truth = torch.from_numpy(normalize(truth, tile.lo, tile.hi))[None]
    tile.mask = torch.from_numpy(mask)[None]  # a synthetic SST of exactly 0.0 must not count as cloud
    return tile


def training_batch(rng: np.random.Generator, batch: int, size: int = 64, crop: int | None = None,
                   style: SyntheticStyle = TOY) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, background), each [B, 1, crop, crop] normalised by the whole size x size tile's background range.

    Random crops of larger tiles train 4x cheaper per step than whole tiles, while the values keep the
    normalisation statistics of the tile size the model will be run on.
    """
    crop = size if crop is None else crop
    if not 1 <= crop <= size:
        raise ValueError(f"crop must be in [1, size={size}], got {crop}")
    x0, bg = [], []
    for _ in range(batch):
        truth = synthetic_sst(rng, size, style)
        back = background_for(truth, rng, style)
        lo, hi = minmax_range(back)
        i, j = rng.integers(0, size - crop + 1, size=2)
        x0.append(normalize(truth[i:i + crop, j:j + crop], lo, hi))
        bg.append(normalize(back[i:i + crop, j:j + crop], lo, hi))
    return torch.from_numpy(np.stack(x0))[:, None], torch.from_numpy(np.stack(bg))[:, None]
