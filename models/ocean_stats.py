"""What makes SST look like the ocean, measured the same way on real and synthetic tiles (issue 15, item 2).

The field's own statistics are taken on complete (cloud- and land-free) square windows, so real and synthetic
tiles are compared at the same pixel scale: the isotropic wavenumber spectrum's slope and the gradient
distribution (front sharpness). The background's error against the truth (bias, amplitude, smoothing scale) is
taken over each whole tile's clear pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .data import gaussian_blur, observed

SLOPE_BAND = (1 / 32, 1 / 6)  # cycles/px: above the window's own scale, below the sensor-noise floor
SMOOTHING_SIGMAS = (0.5, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24)  # px, the Gaussian widths searched


def clear_windows(sst: np.ndarray, n: int = 32, stride: int = 16) -> list[np.ndarray]:
    """Every n x n window of sst, on a stride grid, with no cloud or land pixel (32 px: the cloudy tiles have few
    larger ones)."""
    ok = observed(sst)
    return [sst[i:i + n, j:j + n] for i in range(0, sst.shape[0] - n + 1, stride)
            for j in range(0, sst.shape[1] - n + 1, stride) if ok[i:i + n, j:j + n].all()]


def _detrend(field: np.ndarray) -> np.ndarray:
    """The field minus its least-squares plane, so the window's edges do not leak a ramp into the spectrum."""
    n, m = field.shape
    yy, xx = np.mgrid[0:n, 0:m]
    a = np.c_[np.ones(n * m), xx.ravel(), yy.ravel()]
    return field - (a @ np.linalg.lstsq(a, field.ravel(), rcond=None)[0]).reshape(n, m)


def spectral_slope(field: np.ndarray, band: tuple[float, float] = SLOPE_BAND) -> float:
    """Log-log slope of the isotropic 1-D wavenumber spectrum E(k) = k * mean |FFT|^2 on the ring at k (Hann window)."""
    n = field.shape[0]
    if field.shape != (n, n) or n < 16:
        raise ValueError(f"need a square window of at least 16 px, got {field.shape}")
    power = np.abs(np.fft.fft2(_detrend(field) * np.outer(np.hanning(n), np.hanning(n)))) ** 2
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij")).ravel()
    ring = np.rint(k * n).astype(int)  # ring r holds wavenumbers near r / n
    rings = np.arange(1, n // 2)
    kc = rings / n
    e = np.array([power.ravel()[ring == r].mean() for r in rings]) * kc
    sel = (kc >= band[0]) & (kc <= band[1])
    return float(np.polyfit(np.log(kc[sel]), np.log(e[sel]), 1)[0])


def gradient_stats(field: np.ndarray) -> tuple[float, float]:
    """(median |grad SST| in units/px, its 99th percentile over the median): front strength and sharpness."""
    gy, gx = np.gradient(field.astype(np.float64))
    g = np.hypot(gx, gy)
    med = float(np.median(g))
    return med, float(np.percentile(g, 99) / max(med, 1e-12))


def background_error(sst: np.ndarray, background: np.ndarray) -> tuple[float, float, float]:
    """(|bias|, std, smoothing sigma in px) of the background against the truth, over the tile's clear pixels.

    The smoothing scale is the Gaussian sigma whose blur of the truth (normalised convolution over the clear
    pixels), bias removed, is closest to the background.
    """
    ok = observed(sst)
    if ok.sum() < 16:
        raise ValueError(f"a tile with {int(ok.sum())} clear pixels has no background error to measure")
    err = (sst - background)[ok]
    bias = float(err.mean())
    w = ok.astype(np.float32)
    fits = []
    for s in SMOOTHING_SIGMAS:
        num, den = (gaussian_blur(a, s)[0, 0].numpy() for a in (np.where(ok, sst, 0.0), w))
        blurred = num / np.maximum(den, 1e-6)
        fits.append(np.std((blurred - background)[ok & (den > 0.5)]))
    return abs(bias), float(err.std()), float(SMOOTHING_SIGMAS[int(np.argmin(fits))])


@dataclass
class OceanStats:
    """Medians over the windows (field) and tiles (background) of one set, in deg C and pixels."""

    windows: int
    spectral_slope: float
    gradient_median: float  # deg C / px
    gradient_p99_over_median: float
    window_range: float  # max - min within a window
    background_bias: float  # |mean(sst - background)| over a tile's clear pixels
    background_error_std: float
    background_smoothing_px: float

    def row(self, name: str) -> str:
        """One markdown table row."""
        v = asdict(self)
        return f"| {name} | " + " | ".join(f"{v[k]:.3g}" if isinstance(v[k], float) else str(v[k]) for k in v) + " |"


def ocean_stats(tiles: list[tuple[np.ndarray, np.ndarray]]) -> OceanStats:
    """OceanStats of (sst, background) tiles in deg C, VIIRS fill values marking cloud and land."""
    windows = [w for sst, _ in tiles for w in clear_windows(sst)]
    if not windows:
        raise ValueError("no complete 32 px window in these tiles to measure")
    field = np.median([[spectral_slope(w), *gradient_stats(w), float(w.max() - w.min())] for w in windows], axis=0)
    back = np.median([background_error(sst, bg) for sst, bg in tiles], axis=0)
    return OceanStats(len(windows), *(float(v) for v in field), *(float(v) for v in back))


def table_header() -> str:
    """The markdown header matching OceanStats.row."""
    names = ["set", *OceanStats.__dataclass_fields__]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)
