"""`ddpm-engine build` and `ddpm-engine info`: stage lines with timings, readable manifest, one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

from ddpm_engine.engine.cli import main
from ddpm_engine.export import read_manifest
from export_standin import single_thread


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from ddpm_engine.models import build_model
    from ddpm_engine.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("care-sst", c_in=2, c_out=1, dim=8, embed_dim=16, heads=1, dim_head=8)
    directory = tmp_path_factory.mktemp("ckpt") / "care8"
    save_checkpoint(directory, model.state_dict(), {"arch": "care-sst", "model": model.config()})
    return directory


@pytest.fixture(scope="module")
def built(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "eng"
    with single_thread():
        code = main(["build", str(checkpoint), "-o", str(out), "--backend", "onnxruntime", "--batch", "1:1:2",
                     "--size", "16x16:24x24:40x40"])
    assert code == 0
    return out


def test_build_prints_each_stage_with_its_time(built, checkpoint, capsys):
    code = main(["build", str(checkpoint), "-o", str(built), "--backend", "onnxruntime", "--batch", "1:1:2",
                 "--size", "16x16:24x24:40x40"])
    out = capsys.readouterr().out
    assert code == 0
    assert "cache hit" in out and "load model: " in out and " s" in out
    m = read_manifest(built)
    assert m["backend"] == "onnxruntime" and m["model"]["arch"] == "care-sst"
    assert m["model"]["config"]["dim"] == 8 and m["profile"]["width"]["max"] == 40


def test_first_build_output(checkpoint, tmp_path, capsys):
    code = main(["build", str(checkpoint), "-o", str(tmp_path / "e"), "--backend", "openvino", "--precision", "bf16",
                 "--batch", "2", "--size", "24x24", "--no-verify"])
    out = capsys.readouterr().out
    assert code == 0
    for stage in ("load model", "save PyTorch weights", "export ONNX", "OpenVINO IR (bf16)"):
        assert f"  {stage}: " in out, out
    assert "built: " in out and "backend=openvino precision=bf16" in out
    m = read_manifest(tmp_path / "e")
    assert m["profile"]["batch"] == {"min": 2, "opt": 2, "max": 2}
    assert m["artefacts"]["openvino"]["inference_precision_hint"] == "bf16"
    assert ("runs this engine in fp32 here" in out) == (not m["artefacts"]["openvino"]["native"])


def test_info_pretty_prints_the_manifest(built, capsys):
    assert main(["info", str(built), "--check", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    for text in ("backend      onnxruntime", "care-sst", "sample    float32   [batch, 2, height, width]",
                 "batch 1:1:2", "16x16:24x24:40x40", "verified (onnxruntime): max abs error", "gpu          none",
                 "onnxruntime: artefact intact and loadable here"):
        assert text in out, (text, out)
    assert main(["info", str(built), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format_version"] == 1


@pytest.mark.parametrize("argv,message", [
    (["info", "/nonexistent/engine"], "does not exist"),
    (["build", "no-such-model", "-o", "{tmp}/x"], "no model 'no-such-model'"),
    (["build", "{ckpt}", "-o", "{tmp}/x", "--batch", "4:2:1"], "batch must be MIN:OPT:MAX"),
    (["build", "{ckpt}", "-o", "{tmp}/x", "--size", "300y300"], "--size must be HxW"),
    (["build", "{ckpt}", "-o", "{tmp}/x", "--backend", "openvino", "--precision", "fp16"], "openvino backend builds fp32 or bf16"),
    (["build", "-o", "{tmp}/x"], "MODEL is required"),
    (["build", "-o", "{tmp}/x", "--arch", "care-sst:dim"], "--arch options must be key=value"),
    (["build", "-o", "{tmp}/x", "--arch", "care-sst:depth=3"], "--arch care-sst:depth=3"),
    (["build", "{ckpt}", "-o", "{tmp}/x", "--arch", "care-sst"], "give MODEL or --arch, not both"),
])
def test_user_errors_are_one_line_with_exit_2(argv, message, checkpoint, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_info_in_a_subprocess(built):
    proc = subprocess.run([sys.executable, "-m", "ddpm_engine.engine.cli", "info", str(built)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backend      onnxruntime" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "ddpm_engine.engine.cli", "info", str(built / "model.onnx")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "not an engine directory" in bad.stderr
