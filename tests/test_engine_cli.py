"""`ddpm-engine sample` and `reconstruct`: outputs on disk, one-line errors with exit code 2, no traceback."""
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from ddpm_engine.engine import load
from ddpm_engine.engine.cli import main

H = W = 16


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for name, arr in {"bg": rng.uniform(-1, 1, (2, 1, H, W)), "x_init": rng.uniform(-1, 1, (2, 1, H, W)),
                      "mask": (rng.uniform(size=(1, 1, H, W)) > 0.5)}.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], arr.astype(np.float32))
    return paths


def test_sample_writes_what_the_api_returns(tiny_engine_dir, arrays, tmp_path, capsys):
    out = tmp_path / "x.npy"
    code = main(["sample", str(tiny_engine_dir), "--background", str(arrays["bg"]), "--mask", str(arrays["mask"]),
                 "--x-init", str(arrays["x_init"]), "--timesteps", "4", "--seed", "3", "-o", str(out)])
    assert code == 0
    assert re.search(r"wrote .* steady-state .*; one-off: load [\d.]+ s, compile [\d.]+ s for 1 shape\(s\)$",
                     capsys.readouterr().out.strip())
    want = load(tiny_engine_dir).sample(np.load(arrays["bg"]), mask=np.load(arrays["mask"]),
                                        x_init=np.load(arrays["x_init"]), timesteps=4, seed=3)
    np.testing.assert_array_equal(np.load(out), want)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_sample_takes_the_multistep_samplers_and_the_log_snr_spacing(tiny_engine_dir, arrays, tmp_path):
    out = tmp_path / "x.npy"
    code = main(["sample", str(tiny_engine_dir), "--background", str(arrays["bg"]), "--timesteps", "5",
                 "--sampler", "dpmpp-2m-sde", "--spacing", "logsnr", "--seed", "3", "-o", str(out)])
    assert code == 0
    want = load(tiny_engine_dir).sample(np.load(arrays["bg"]), timesteps=5, sampler="dpmpp-2m-sde", spacing="logsnr",
                                        seed=3)
    np.testing.assert_array_equal(np.load(out), want)
    assert not np.array_equal(want, load(tiny_engine_dir).sample(np.load(arrays["bg"]), timesteps=5,
                                                                 sampler="dpmpp-2m-sde", seed=3))


def test_reconstruct_synthetic_tiles_writes_arrays_figures_and_a_summary(tiny_engine_dir, tmp_path, capsys):
    code = main(["reconstruct", str(tiny_engine_dir), "--synthetic", "2", "--size", "16", "--samples", "2",
                 "--timesteps", "3", "--t-start", "0.5", "--init", "background", "-o", str(tmp_path / "rec")])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert [t["tile"] for t in summary["tiles"]] == ["synthetic_0", "synthetic_1"]
    assert all("rmse_c" in t and "background_rmse_c" in t for t in summary["tiles"])
    for name in ("synthetic_0", "synthetic_1"):
        mean = np.load(tmp_path / "rec" / f"{name}.npy")
        assert mean.shape == (H, W) and np.isfinite(mean).all()
        assert np.load(tmp_path / "rec" / f"{name}_std.npy").shape == (H, W)
        assert (tmp_path / "rec" / f"{name}.png").stat().st_size > 1000


def test_reconstruct_reports_compiles_apart_from_the_steady_state_steps(tiny_engine_dir, tmp_path, capsys,
                                                                        monkeypatch):
    from ddpm_engine.engine.backend_onnxruntime import OnnxRuntimeBackend

    bind = OnnxRuntimeBackend.bind

    def slow_bind(self, *buffers):  # a compile as slow as OpenVINO's at 300x300 on 2 cores
        time.sleep(1.0)
        return bind(self, *buffers)

    monkeypatch.setattr(OnnxRuntimeBackend, "bind", slow_bind)
    # 3 tiles x 2 samples in batches of 4: rows 4 + 2, two shapes to compile.
    code = main(["reconstruct", str(tiny_engine_dir), "--synthetic", "3", "--size", "16", "--samples", "2",
                 "--batch", "4", "--timesteps", "3", "--no-figures", "-o", str(tmp_path / "rec")])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    timing = json.loads(out[-1])["timing"]
    assert timing["shapes_compiled"] == 2 and timing["compile_seconds"] >= 2.0 and timing["load_seconds"] > 0
    assert timing["seconds"] < 1.0  # the sleeps are not in the steady-state time (a few 16x16 steps: ~0.1 s)
    assert timing["ms_per_step"] == pytest.approx(1000 * timing["seconds"] / (3 * 2))
    line = next(row for row in out if "steady-state" in row)
    assert f"compile {timing['compile_seconds']:.1f} s for 2 shape(s)" in line and "one-off: load" in line


def test_reconstruct_fast_is_the_measured_sampler_steps_and_start(tiny_engine_dir, tmp_path, capsys):
    common = ["reconstruct", str(tiny_engine_dir), "--synthetic", "1", "--size", "16", "--no-figures"]
    assert main([*common, "--fast", "-o", str(tmp_path / "fast")]) == 0
    assert "10 dpmpp-2m-sde steps" in capsys.readouterr().out
    assert main([*common, "--sampler", "dpmpp-2m-sde", "--timesteps", "10", "--t-start", "0.5", "--init", "background",
                 "-o", str(tmp_path / "explicit")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "fast" / "synthetic_0.npy"),
                                  np.load(tmp_path / "explicit" / "synthetic_0.npy"))
    assert main([*common, "--fast", "--timesteps", "50", "-o", str(tmp_path / "x")]) == 2
    assert "--fast sets --timesteps 10; drop --timesteps 50" in capsys.readouterr().err


def test_reconstruct_real_viirs_tiles_marks_land_as_nan(tiny_engine_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    viirs = rng.uniform(10, 20, (H, W)).astype(np.float16)
    viirs[:4] = 0.0  # cloud
    viirs[-3:, :5] = -999.0  # land
    oisst = rng.uniform(10, 20, (H, W)).astype(np.float16)
    np.save(tmp_path / "v.npy", viirs)
    np.save(tmp_path / "o.npy", oisst)
    code = main(["reconstruct", str(tiny_engine_dir), "--viirs", str(tmp_path / "v.npy"), "--oisst",
                 str(tmp_path / "o.npy"), "--timesteps", "2", "--no-figures", "-o", str(tmp_path / "rec")])
    assert code == 0
    mean = np.load(tmp_path / "rec" / "v.npy")
    assert np.isnan(mean[-3:, :5]).all() and np.isfinite(mean[:-3]).all()
    assert not (tmp_path / "rec" / "v.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "{engine}", "--background", "{missing}", "-o", "{tmp}/x.npy"], "--background: no such file"),
        (["sample", "{engine}", "--background", "{bg}", "--mask", "{mask}", "-o", "{tmp}/x.npy"],
         "mask given without x_init"),
        (["sample", "{engine}", "--background", "{bg}", "--timesteps", "0", "-o", "{tmp}/x.npy"],
         "timesteps must be an integer >= 1"),
        (["sample", "{engine}", "--background", "{bg}", "--t-start", "0.1", "--t-end", "0.5", "-o", "{tmp}/x.npy"],
         "t_start must be greater than t_end"),
        (["sample", "{engine}", "--background", "{bg}", "-o", "{tmp}/x.txt"], "--output must end in .npy"),
        (["sample", "{tmp}/no-engine", "--background", "{bg}", "-o", "{tmp}/x.npy"], "does not exist"),
        (["sample", "{engine}", "--background", "{corrupt}", "-o", "{tmp}/x.npy"], "not a readable .npy array"),
        (["sample", "{engine}", "--background", "{bg}", "--sampler", "dpmpp-2m", "--timesteps", "2", "-o",
          "{tmp}/x.npy"], "sampler 'dpmpp-2m' needs timesteps >= 3"),
        (["reconstruct", "{engine}", "--viirs", "{bg}", "-o", "{tmp}/r"], "--viirs needs --oisst"),
        (["reconstruct", "{engine}", "--synthetic", "0", "-o", "{tmp}/r"], "--synthetic must be >= 1"),
        (["reconstruct", "{engine}", "--synthetic", "1", "--size", "64", "-o", "{tmp}/r"],
         "image size 64x64 is outside what this engine was built for"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_code_2(tiny_engine_dir, arrays, tmp_path, capsys, argv, message):
    (tmp_path / "corrupt.npy").write_bytes(b"not numpy")
    fill = {"engine": tiny_engine_dir, "missing": tmp_path / "missing.npy", "tmp": tmp_path, "bg": arrays["bg"],
            "mask": arrays["mask"], "corrupt": tmp_path / "corrupt.npy"}
    code = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_the_installed_command_reports_errors_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddpm_engine.engine.cli", "sample", str(tmp_path / "nope"),
                           "--background", str(tmp_path / "bg.npy"), "-o", str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
