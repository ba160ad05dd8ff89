"""The CARE-SST workload: SST under clouds from VIIRS tiles and an OISST background, batched over many tiles."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ddpm_engine.models.data import Tile, denormalize, load_real_tiles, preprocess, synthetic_tile

from .timing import Stopwatch


@dataclass
class Reconstruction:
    """One tile's result in deg C (NaN on land): the mean over samples, their spread, and the inputs."""

    name: str
    mean: np.ndarray
    std: np.ndarray | None  # per-pixel spread over samples (None with one sample)
    observed: np.ndarray  # NaN under clouds and on land
    background: np.ndarray
    cloud: np.ndarray  # bool
    truth: np.ndarray | None = None  # synthetic tiles only

    def rmse(self) -> tuple[float, float] | None:
        """(reconstruction, background-only) RMSE over cloud pixels in deg C, where the truth is known."""
        if self.truth is None or not self.cloud.any():
            return None
        err = lambda a: float(np.sqrt(np.mean((a[self.cloud] - self.truth[self.cloud]) ** 2)))  # noqa: E731
        return err(self.mean), err(self.background)


def load_npy(path: str | Path, what: str) -> np.ndarray:
    """A float32 array from a .npy file; FileNotFoundError / ValueError naming `what` (e.g. '--viirs')."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    try:
        return np.load(path, allow_pickle=False).astype(np.float32, copy=False)
    except ValueError as exc:
        raise ValueError(f"{what}: {path} is not a readable .npy array ({exc})") from None


def real_tiles(viirs: list[str], oisst: list[str]) -> list[tuple[str, Tile]]:
    """Preprocessed (name, Tile) pairs from matching lists of VIIRS and OISST .npy files."""
    if len(viirs) != len(oisst):
        raise ValueError(f"--viirs and --oisst need the same number of files, got {len(viirs)} and {len(oisst)}")
    out = []
    for v, o in zip(viirs, oisst):
        arrays = [load_npy(v, "--viirs"), load_npy(o, "--oisst")]
        for path, a in zip((v, o), arrays):
            if not np.isfinite(a).all():
                raise ValueError(f"{path} contains NaN or inf (VIIRS uses 0 for cloud and -999 for land)")
        out.append((Path(v).stem, preprocess(*arrays)))
    return out


def directory_tiles(root: str | Path) -> list[tuple[str, Tile]]:
    """Every VIIRS/OISST pair under root/viirs and root/oisst (the layout of the shared CARE-SST tiles)."""
    return [(name, preprocess(v, o)) for name, v, o in load_real_tiles(root)]


def synthetic_tiles(count: int, size: int = 64, seed: int = 2024) -> list[tuple[str, Tile]]:
    """`count` synthetic tiles with known truth (a fixed seed: the same tiles on every machine)."""
    rng = np.random.default_rng(seed)
    return [(f"synthetic_{k}", synthetic_tile(rng, size)) for k in range(count)]


def reconstruct(engine, tiles: list[tuple[str, Tile]], samples: int = 1, batch: int = 8, timesteps: int = 100,
                sampler: str = "ddpm", seed: int = 0, t_start: float = 1.0, init: str = "noise",
                progress: bool = True, spacing: str = "time") -> tuple[list[Reconstruction], dict]:
    """Sample every tile `samples` times in batches of up to `batch` rows; returns results and timing.

    timing: steady-state seconds (per tile, per step) apart from the compiles of new shapes (compile_seconds).

    t_start < 1 with init="background" is CARE-SST's partial-noise start: diffuse the background to t_start.
    """
    if samples < 1 or batch < 1:
        raise ValueError(f"samples and batch must be >= 1, got {samples} and {batch}")
    for name, tile in tiles:  # refuse before any work, not halfway through
        engine.check_image_size(*tile.background.shape[1:])
    rows = [(k, tile) for k, (_, tile) in enumerate(tiles) for _ in range(samples)]
    outputs: dict[int, list[np.ndarray]] = {k: [] for k in range(len(tiles))}
    with (Stopwatch(engine) as watch,
          tqdm(total=len(tiles) * samples, desc="reconstruct", unit="sample", disable=not progress) as bar):
        for b, first in enumerate(range(0, len(rows), batch)):
            chunk = rows[first:first + batch]
            sizes = {tuple(t.background.shape) for _, t in chunk}
            groups = [[r for r in chunk if tuple(r[1].background.shape) == s] for s in sizes]
            for g, group in enumerate(groups):  # tiles of one size share a batch
                stack = lambda field: torch.stack([getattr(t, field) for _, t in group])  # noqa: E731
                x = engine.sample(stack("background"), mask=stack("mask"), x_init=stack("x_init"),
                                  timesteps=timesteps, sampler=sampler, seed=seed + 1000 * b + g,
                                  t_start=t_start, init=init, spacing=spacing)
                for (k, _), out in zip(group, x[:, 0].numpy()):
                    outputs[k].append(out)
                bar.update(len(group))
    elapsed = watch.seconds

    results = []
    for k, (name, tile) in enumerate(tiles):
        land = tile.land[0].numpy() > 0
        deg = lambda a: np.where(land, np.nan, denormalize(np.asarray(a, np.float64), tile.lo, tile.hi))  # noqa: E731
        stack = np.stack(outputs[k])
        cloud = (tile.mask[0].numpy() > 0) & ~land
        results.append(Reconstruction(
            name=name, mean=deg(stack.mean(0)),
            std=(np.where(land, np.nan, stack.std(0) * 0.5 * (tile.hi - tile.lo)) if samples > 1 else None),
            observed=np.where(cloud, np.nan, deg(tile.x_init[0].numpy())), background=deg(tile.background[0].numpy()),
            cloud=cloud, truth=None if tile.truth is None else deg(tile.truth[0].numpy())))
    timing = {**watch.as_dict(), "tiles": len(tiles), "samples": samples, "timesteps": timesteps,
              "seconds_per_tile": elapsed / max(len(tiles), 1),
              "ms_per_step": 1000 * elapsed / max(timesteps * -(-len(rows) // batch), 1)}
    return results, timing


def save_figure(result: Reconstruction, path: Path) -> None:
    """observed | background | reconstruction | truth | spread, on one colour scale (deg C)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("observed", result.observed), ("background", result.background), ("reconstruction", result.mean)]
    if result.truth is not None:
        panels.append(("truth", result.truth))
    finite = np.concatenate([p[np.isfinite(p)] for _, p in panels])
    vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0, 1))
    if result.std is not None:
        panels.append(("spread (std)", result.std))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), constrained_layout=True)
    images = []
    for ax, (title, image) in zip(axes, panels):
        spread = title.startswith("spread")
        images.append(ax.imshow(image, cmap="magma" if spread else "RdYlBu_r", vmin=None if spread else vmin,
                                vmax=None if spread else vmax))
        ax.set_title(title)
        ax.set_axis_off()
    n_sst = len(panels) - (result.std is not None)
    fig.colorbar(images[0], ax=list(axes[:n_sst]), shrink=0.8, label="SST (deg C)")
    if result.std is not None:
        fig.colorbar(images[-1], ax=axes[-1], shrink=0.8, label="deg C")
    rmse = result.rmse()
    fig.suptitle(result.name + (f"  (cloud RMSE {rmse[0]:.3f} C; background {rmse[1]:.3f} C)" if rmse else ""))
    fig.savefig(path, dpi=80)
    plt.close(fig)
