"""Real-tile scoring: clear pixels hidden under other tiles' real cloud masks, scored on those pixels only."""
import numpy as np
import pytest
import torch

from ddpm_engine.engine.cli import main
from ddpm_engine.models.data import CLOUD, OISST_LAND, denormalize, fill_oisst_land, preprocess
from ddpm_engine.models.evaluate import rmse_under_clouds
from ddpm_engine.models.real_data import RealCrops, clear_tile_days, cloud_masks, hide_under_mask, holdout_real_tiles


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_clear_tile_days_pair_each_day_with_its_resized_background(shared_data):
    days = clear_tile_days(shared_data)
    assert len(days) == 4  # two nearly clear tiles, two days each
    for name, viirs, oisst in days:
        assert viirs.shape == oisst.shape == (300, 300)
        sea = viirs > 0
        assert sea.mean() > 0.9  # nearly clear
        # The resized OISST is a background for the same water: within a few degrees everywhere.
        assert np.abs(viirs[sea] - oisst[sea]).mean() < 1.5, name
        # OISST's land cells (0) are filled, not smeared into the sea: the background's range is the sea's.
        assert oisst.min() > viirs[sea].min() - 2.0 and oisst.max() - oisst.min() < 6.0, name


def test_oisst_land_cells_take_their_sea_neighbours_values_and_never_set_the_range():
    oisst = np.full((4, 5), 20.0, np.float32)
    oisst[:, 0] = 18.0
    oisst[0, 1:4] = OISST_LAND  # a coast along the top edge, as in sst-clear tile 23_82
    filled = fill_oisst_land(oisst)
    assert filled.min() >= 18.0 and np.array_equal(filled[1:], oisst[1:])
    assert filled[0, 1] == pytest.approx((18.0 + 18.0 + 20.0 + 20.0) / 4)  # its valid neighbours, averaged
    tile = preprocess(np.full((4, 5), 21.0, np.float32), oisst)
    assert (tile.lo, tile.hi) == (18.0, 20.0)
    with pytest.raises(ValueError, match="all land"):
        fill_oisst_land(np.zeros((3, 3), np.float32))


def test_hidden_pixels_are_scored_with_their_truth_and_never_shown_to_the_model():
    rng = np.random.default_rng(0)
    viirs = rng.uniform(10, 20, (16, 16)).astype(np.float32)
    viirs[0, :4] = CLOUD  # the target's own clouds: masked, but without truth, so not scored
    donor = np.zeros((16, 16), bool)
    donor[:8] = True
    tile = hide_under_mask(viirs, np.full((16, 16), 15.0, np.float32), donor)
    hidden = torch.from_numpy(donor)[None].clone()
    hidden[0, 0, :4] = False
    assert torch.equal(tile.scored.bool(), hidden)
    assert torch.equal(tile.mask.bool(), torch.from_numpy(donor)[None])  # own clouds lie inside the donor's here
    truth_c = denormalize(tile.truth, tile.lo, tile.hi)
    assert torch.allclose(truth_c[hidden], torch.from_numpy(viirs)[None][hidden], atol=1e-4)
    # What the model sees under the mask is the background, not the hidden truth.
    assert torch.equal(tile.x_init[tile.mask.bool()], tile.background[tile.mask.bool()])


def test_holdout_cases_use_distinct_real_masks_and_hide_a_real_fraction(shared_data):
    cases = holdout_real_tiles(shared_data, masks_per_day=2, crop=64)
    names = [n for n, _ in cases]
    assert len(cases) == 8 and len(set(names)) == 8
    masks = {n: m for n, m in cloud_masks(shared_data)}
    assert len(masks) == 9
    for _, tile in cases:
        assert tile.mask.shape == (1, 64, 64)
        assert tile.scored.mean().item() > 0.1
        assert torch.all(tile.mask >= tile.scored)
    pooled = np.mean([tile.scored.mean().item() for _, tile in cases])
    assert 0.4 < pooled < 0.95  # real cloud cover of the donors is 46-79 % over whole tiles
    with pytest.raises(ValueError, match="masks_per_day must be in"):
        holdout_real_tiles(shared_data, masks_per_day=10)
    with pytest.raises(ValueError, match="crop must be in"):
        holdout_real_tiles(shared_data, crop=400)


def test_rmse_counts_only_scored_pixels_not_the_targets_own_clouds():
    rng = np.random.default_rng(1)
    viirs = rng.uniform(10, 20, (16, 16)).astype(np.float32)
    viirs[:4, :4] = CLOUD  # own clouds, no truth there
    donor = np.zeros((16, 16), bool)
    donor[:8] = True
    tile = hide_under_mask(viirs, np.full((16, 16), 15.0, np.float32), donor)
    pred = tile.truth.clone()
    pred[0, :4, :4] = 5.0  # anything at all where nothing is known
    assert rmse_under_clouds(pred[None], [tile]) == 0.0
    pred[0, 6, 6] += 0.1  # one scored pixel off
    assert rmse_under_clouds(pred[None], [tile]) > 0.0


def test_evaluate_cli_on_real_crops_prints_every_rmse(shared_data, capsys):
    code = main(["evaluate", "--real", str(shared_data), "--crop", "32", "--masks-per-day", "1", "--timesteps", "3",
                 "--samples", "2", "--t-start", "0.5", "--init", "background"])
    out = capsys.readouterr().out
    assert code == 0
    assert "4 real tile-days x masks, 32x32" in out
    for part in ("mean ", "single sample ", "background only ", "ratio (mean / background) "):
        assert part in out, out


def test_real_training_crops_come_from_tiles_that_are_never_scored(shared_data):
    crops = RealCrops(shared_data, crop=32)
    scored = {name.split("_day")[0] for name, _, _ in clear_tile_days(shared_data)}
    assert len(crops.names) == 9 and not set(crops.names) & scored
    x0, bg, valid = crops.batch(np.random.default_rng(0), 16)
    assert x0.shape == bg.shape == valid.shape == (16, 1, 32, 32)
    assert (valid.mean(dim=(1, 2, 3)) >= 0.95).all()
    # Gaps hold the background, and crops keep the whole tile's normalisation (values within [-1.5, 1.5]).
    assert torch.equal(x0[valid == 0], bg[valid == 0]) and x0.abs().max() < 1.5


def test_masked_loss_ignores_gap_pixels():
    from ddpm_engine.engine.schedule import CosineSchedule
    from ddpm_engine.models.train import diffusion_loss

    class Echo(torch.nn.Module):
        """Predicts the noise exactly on the left half, and garbage on the right half."""

        def forward(self, x, t):
            out = torch.full_like(x[:, :1], 7.0)
            out[..., :4] = eps[..., :4]
            return out

    x0, bg = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    valid = torch.zeros_like(x0)
    valid[..., :4] = 1.0
    # diffusion_loss draws t then eps from the generator: replay that draw so Echo knows eps.
    g = torch.Generator().manual_seed(5)
    torch.rand(2, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert diffusion_loss(Echo(), x0, bg, CosineSchedule(), torch.Generator().manual_seed(5), valid).item() == 0.0
    assert diffusion_loss(Echo(), x0, bg, CosineSchedule(), torch.Generator().manual_seed(5)).item() > 1.0


def test_fine_tuning_on_real_crops_starts_from_the_given_weights(shared_data, tmp_path):
    from ddpm_engine.models import load_model
    from ddpm_engine.models.train import TrainConfig, train

    cfg = TrainConfig(max_steps=2, batch=4, real=str(shared_data), real_fraction=0.5, init_from="sst-small", lr=1e-9,
                      warmup=1)
    summary = train(cfg, tmp_path / "ft", progress=False)
    assert summary["train"]["real"] == str(shared_data) and summary["step"] == 2
    before, after = load_model("sst-small").state_dict(), load_model(str(tmp_path / "ft")).state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)  # lr ~ 0: still the start weights
    with pytest.raises(ValueError, match="real_fraction must be in"):
        train(TrainConfig(real=str(shared_data), real_fraction=1.5), tmp_path / "bad", progress=False)


def test_real_crops_may_be_larger_and_cloudier_than_the_synthetic_crops(shared_data, tmp_path):
    from ddpm_engine.models.train import TrainConfig, train

    tiny_net = dict(dim=4, embed_dim=16, heads=2, dim_head=8)
    cfg = TrainConfig(max_steps=2, size=16, crop=12, batch=2, warmup=1, real=str(shared_data), real_fraction=0.5,
                      real_crop=48, real_min_clear=0.7)
    summary = train(cfg, tmp_path / "big", progress=False, model_overrides=tiny_net)
    assert summary["step"] == 2 and np.isfinite(summary["loss_last_100"])
    assert summary["train"]["real_crop"] == 48 and summary["train"]["real_min_clear"] == 0.7
    crops = RealCrops(shared_data, crop=48, min_clear=0.7)
    _, _, valid = crops.batch(np.random.default_rng(0), 8)
    assert valid.shape == (8, 1, 48, 48) and (valid.mean(dim=(1, 2, 3)) >= 0.7).all()
    for bad in (dict(real_crop=4), dict(real_min_clear=0.0)):
        with pytest.raises(ValueError, match="real_crop 0 or >= 8"):
            train(TrainConfig(real=str(shared_data), **bad), tmp_path / "bad", progress=False)
