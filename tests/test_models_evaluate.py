"""`evaluate`: the bundled sst-small model fills cloud gaps better than the background alone (the issue's acceptance
test), and the CLI reports an engine's compiles apart from its steady-state time."""
import re

import pytest

from ddpm_engine.models import load_model
from ddpm_engine.models.evaluate import evaluate, save_figure


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.mark.slow
def test_sst_small_beats_the_background_under_clouds(tmp_path):
    # reference_sample, DDPM, 100 steps from diffuse(background, 0.5) (CARE-SST's partial-noise start), on 4
    # held-out 64x64 synthetic tiles, scoring the mean of 4 samples per tile (the README states the numbers).
    result = evaluate(load_model("sst-small"), n_tiles=4, size=64, timesteps=100, sampler="ddpm", samples=4,
                      t_start=0.5, init="background")
    assert result["rmse_model"] < 0.9 * result["rmse_background"], result
    save_figure(result, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_evaluate_cli_with_an_engine_reports_its_compile_apart(tiny_engine_dir, capsys):
    from ddpm_engine.engine.cli import main

    code = main(["evaluate", "--engine", str(tiny_engine_dir), "--tiles", "2", "--size", "16", "--timesteps", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"\[[\d.]+ s steady-state; one-off: load [\d.]+ s, compile [\d.]+ s for 1 shape\(s\)\]", out), out
