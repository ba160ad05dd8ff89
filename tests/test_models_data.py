"""Synthetic SST tiles look like the real VIIRS/OISST tiles; CARE-SST preprocessing and its inverse."""
import dataclasses

import numpy as np
import pytest
import torch

from ddpm_engine.models.data import (TOY, background_for, cloud_mask, denormalize, load_real_tiles, normalize, preprocess,
                                     synthetic_sst, synthetic_tile, training_batch, viirs_oisst_files)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _stats(a, ok=None):
    """Value range and |one-pixel difference| statistics over valid pixel pairs."""
    ok = np.ones(a.shape, bool) if ok is None else ok
    gx, gy = np.diff(a, axis=1)[ok[:, 1:] & ok[:, :-1]], np.diff(a, axis=0)[ok[1:] & ok[:-1]]
    g = np.abs(np.concatenate([gx, gy]))
    return {"min": a[ok].min(), "max": a[ok].max(), "range": np.ptp(a[ok]), "grad_mean": g.mean(),
            "grad_median": np.median(g), "grad_p99": np.percentile(g, 99)}


@pytest.fixture(scope="module")
def real(shared_data):
    return load_real_tiles(shared_data / "sst-cloud")


def _mean_stats(list_of_stats):
    return {k: float(np.mean([s[k] for s in list_of_stats])) for k in list_of_stats[0]}


def test_synthetic_tiles_match_real_value_ranges_and_gradients(real):
    rng = np.random.default_rng(0)
    syn = [synthetic_sst(rng, 300) for _ in range(12)]
    s = _mean_stats([_stats(a) for a in syn])
    r = _mean_stats([_stats(v, (v != 0) & (v > -900)) for _, v, _ in real])
    # Plausible ocean temperatures, and per-tile ranges of the same order as the real 300 px tiles.
    assert all(-2 < a.min() and a.max() < 35 for a in syn)
    assert 0.5 < s["range"] / r["range"] < 2
    # Typical and front-like gradients within a factor 2 of VIIRS (one 750 m pixel apart).
    for k in ("grad_mean", "grad_median", "grad_p99"):
        assert 0.5 < s[k] / r[k] < 2, (k, s[k], r[k])


def test_synthetic_backgrounds_are_smooth_like_oisst(real):
    rng = np.random.default_rng(1)
    bg = [background_for(synthetic_sst(rng, 300), rng) for _ in range(8)]
    s = _mean_stats([_stats(b) for b in bg])
    r = _mean_stats([_stats(o) for _, _, o in real])
    assert 0.4 < s["grad_mean"] / r["grad_mean"] < 2.5, (s["grad_mean"], r["grad_mean"])


def test_background_is_a_blurred_biased_copy_of_the_truth():
    rng = np.random.default_rng(2)
    truth = synthetic_sst(rng, 96)
    bg = background_for(truth, rng, dataclasses.replace(TOY, bias_std=0.0))
    assert _stats(bg)["grad_mean"] < 0.8 * _stats(truth)["grad_mean"]
    assert _stats(bg)["grad_p99"] < 0.5 * _stats(truth)["grad_p99"]  # fronts are smeared out
    assert abs(bg.mean() - truth.mean()) < 0.2 and np.sqrt(((bg - truth) ** 2).mean()) < 1.5


def test_cloud_masks_are_binary_with_20_to_80_percent_cover():
    rng = np.random.default_rng(3)
    covers = [cloud_mask(rng, 64).mean() for _ in range(20)]
    assert all(0.18 < c < 0.82 for c in covers) and np.std(covers) > 0.05
    m = cloud_mask(rng, 64)
    assert set(np.unique(m)) <= {0.0, 1.0}


def test_preprocess_marks_cloud_and_land_and_normalises_by_background_range():
    oisst = np.linspace(10, 20, 36, dtype=np.float32).reshape(6, 6)
    viirs = oisst + 0.5
    viirs[0, :3] = 0.0  # cloud
    viirs[5, 5] = -999.0  # land
    tile = preprocess(viirs, oisst)
    assert tile.mask[0, 0, :3].tolist() == [1, 1, 1] and tile.mask.sum() == 3
    assert tile.land[0, 5, 5] == 1 and tile.land.sum() == 1 and tile.mask[0, 5, 5] == 0
    assert (tile.lo, tile.hi) == (10.0, 20.0)
    assert tile.background.min() == -1 and tile.background.max() == 1
    # Gaps hold the background; observed pixels are the VIIRS values on the background's scale.
    assert torch.equal(tile.x_init[0, 0, :3], tile.background[0, 0, :3])
    back = denormalize(tile.x_init[0, 2, 2].item(), tile.lo, tile.hi)
    assert back == pytest.approx(viirs[2, 2], abs=1e-5)


def test_normalize_and_denormalize_are_inverse():
    v = np.array([3.0, 12.5, 27.0])
    np.testing.assert_allclose(denormalize(normalize(v, 10.0, 14.0), 10.0, 14.0), v)


def test_preprocess_real_tile_stays_near_unit_range(real):
    name, viirs, oisst = real[0]
    tile = preprocess(viirs, oisst)
    assert 0.2 < tile.mask.mean() < 0.9
    observed = tile.x_init[tile.mask == 0]
    assert -2 < observed.min() and observed.max() < 2


def test_synthetic_tile_and_training_batch_shapes():
    rng = np.random.default_rng(4)
    tile = synthetic_tile(rng, 32)
    assert tile.truth.shape == tile.x_init.shape == tile.mask.shape == (1, 32, 32)
    assert torch.equal(tile.x_init * (1 - tile.mask), tile.truth * (1 - tile.mask))
    x0, bg = training_batch(rng, 3, 24)
    assert x0.shape == bg.shape == (3, 1, 24, 24) and bg.amin() == -1 and bg.amax() == 1


def test_viirs_oisst_files_pairs_by_name_and_names_what_is_missing(tmp_path):
    (tmp_path / "viirs").mkdir()
    (tmp_path / "oisst").mkdir()
    with pytest.raises(FileNotFoundError, match="no VIIRS tiles"):
        viirs_oisst_files(tmp_path)
    for name in ("20220101_viirs_1_2.npy", "20220101-OISST_1_2.npy", "20220101_oisst_1_2.npy"):
        np.save(tmp_path / ("viirs" if "_viirs_" in name else "oisst") / name, np.zeros((2, 2), np.float32))
    assert [o.name for _, o in viirs_oisst_files(tmp_path)] == ["20220101-OISST_1_2.npy"]
    assert [o.name for _, o in viirs_oisst_files(tmp_path, "_oisst_")] == ["20220101_oisst_1_2.npy"]
    (tmp_path / "oisst" / "20220101-OISST_1_2.npy").unlink()
    with pytest.raises(FileNotFoundError, match="no OISST tile .*20220101-OISST_1_2.npy for"):
        viirs_oisst_files(tmp_path)
