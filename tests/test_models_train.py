"""Training: a few steps of the seed's recipe, checkpoints that round-trip, resuming, and the CLI."""
import json

import numpy as np
import pytest
import torch

from ddpm_engine.engine.cli import main
from ddpm_engine.engine.schedule import CosineSchedule
from ddpm_engine.models import build_model, load_model
from ddpm_engine.models.checkpoint import read_checkpoint, save_checkpoint
from ddpm_engine.models.data import training_batch
from ddpm_engine.models.train import TrainConfig, diffusion_loss, ema_update, train


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


TINY = dict(size=16, crop=12, batch=2, warmup=2, save_every=2)
SMALL_NET = dict(dim=4, embed_dim=16, heads=2, dim_head=8)  # the recipe is what is tested, not the preset's size


def test_a_few_steps_write_a_loadable_checkpoint_and_resume(tmp_path):
    out = tmp_path / "run"
    s = train(TrainConfig(max_steps=3, **TINY), out, progress=False, model_overrides=SMALL_NET)
    assert s["step"] == 3 and np.isfinite(s["loss_last_100"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "care-sst" and cfg["train"]["batch"] == 2 and cfg["step"] == 3
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temp files behind
    model = load_model(out)
    assert not model.training and model.c_in == 2 and model.c_out == 1 and model.dim == 4

    s = train(TrainConfig(max_steps=5, **TINY), out, progress=False, model_overrides=SMALL_NET)
    assert s["step"] == 5  # continued from step 3, not restarted
    with pytest.raises(ValueError, match="different recipe"):
        train(TrainConfig(max_steps=6, **{**TINY, "lr": 0.5}), out, progress=False, model_overrides=SMALL_NET)
    with pytest.raises(ValueError, match="different recipe"):
        train(TrainConfig(max_steps=6, **TINY), out, progress=False, model_overrides={**SMALL_NET, "dim": 8})


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = build_model("care-sst", embed_dim=16, dim=4, heads=2, dim_head=8).eval()
    save_checkpoint(tmp_path, model.state_dict(), {"arch": "care-sst", "model": model.config()})
    config, state = read_checkpoint(tmp_path)
    assert config["model"] == model.config()
    loaded = load_model(tmp_path)
    x, t = torch.randn(2, 2, 20, 20), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


def test_loss_is_mse_on_the_noise_and_ema_moves_toward_the_weights():
    torch.manual_seed(0)
    model = build_model("care-sst", embed_dim=16, dim=4, heads=2, dim_head=8)
    x0, bg = training_batch(np.random.default_rng(0), 2, 16)
    loss = diffusion_loss(model, x0, bg, CosineSchedule(), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and 0.1 < loss.item() < 10  # an untrained net predicts noise poorly but finitely
    ema = build_model("care-sst", embed_dim=16, dim=4, heads=2, dim_head=8)
    before = (ema.outc.bias - model.outc.bias).abs().sum().item()
    ema_update(ema, model, 0.5)
    assert (ema.outc.bias - model.outc.bias).abs().sum().item() == pytest.approx(0.5 * before, rel=1e-5)


def test_cli_train_runs_and_reports(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "cli"), "--max-steps", "1", "--size", "16", "--crop", "16", "--batch", "1", "--quiet"])
    assert rc == 0 and "1 steps" in capsys.readouterr().out
    assert (tmp_path / "cli" / "model.safetensors").is_file()


def test_cli_train_rejects_unknown_preset_in_one_line(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "x"), "--preset", "huge", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "sst-small" in err and len(err.strip().splitlines()) == 1
