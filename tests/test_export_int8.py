"""int8 OpenVINO engines (NNCF) kept only through the quality gate; `--precision auto` picks by measurement."""
import random

import numpy as np
import pytest
import torch

from ddpm_engine.engine import load
from ddpm_engine.export import build, read_manifest
from ddpm_engine.export.precision_choice import choose
from ddpm_engine.export.quality_gate import GateSettings, QualityGateError

pytest.importorskip("nncf")
pytest.importorskip("openvino")

BATCH, SIZE = (1, 1, 2), ((32, 32), (32, 32), (32, 32))
# The gate's job cut down to seconds for an untrained dim-8 U-Net: same sampler, start and paired seeds.
GATE = GateSettings(tiles=2, size=32, samples=2, timesteps=8)


def _care_sst():
    from ddpm_engine.models import build_model

    torch.manual_seed(0)
    return build_model("care-sst", c_in=2, c_out=1, dim=8, embed_dim=16, heads=1, dim_head=8).eval()


@pytest.fixture(scope="module")
def auto_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "auto"
    return build(_care_sst(), out, backend="openvino", precision="auto", batch=BATCH, size=SIZE, gate=GATE,
                 verify=False)


@pytest.mark.slow
def test_int8_build_passes_the_gate_is_recorded_and_samples(tmp_path):
    result = build(_care_sst(), tmp_path / "e", backend="openvino", precision="int8", batch=BATCH, size=SIZE,
                   gate=GATE, verify=False)
    m = read_manifest(tmp_path / "e")
    entry = m["artefacts"]["openvino"]
    assert m["precision"] == entry["precision"] == "int8" and result.manifest == m
    assert entry["quantization"]["calibration"]["calls"] == 20  # one per step of the calibration run
    gate = entry["quality_gate"]
    assert gate["passed"] and gate["relative_difference"] <= GATE.tolerance and gate["rmse_fp32"] > 0
    assert not (tmp_path / "e" / "openvino" / "model.xml").exists()  # the fp32 IR was only the gate's reference
    x = load(tmp_path / "e").sample(torch.zeros(1, 1, 32, 32), timesteps=3, seed=0)
    assert x.shape == (1, 1, 32, 32) and torch.isfinite(x).all()
    # The norms' channel means (1x1 convs of equal weights, 2 per LayerNorm2d) take no quantised input.
    import openvino as ov

    from ddpm_engine.export.quantize import channel_means

    ir = ov.Core().read_model(str(tmp_path / "e" / "openvino" / "model.int8.xml"))
    means = set(channel_means(ir))
    norms = sum(type(m).__name__ == "LayerNorm2d" for m in _care_sst().modules())
    assert len(means) == 2 * norms
    ops = {op.get_friendly_name(): op for op in ir.get_ordered_ops()}
    fed = [ops[n].input_value(0).get_node().get_type_name() for n in means]
    assert "FakeQuantize" not in fed and any(o.get_type_name() == "FakeQuantize" for o in ops.values()), fed


@pytest.mark.slow
def test_gate_refuses_an_int8_artefact_outside_tolerance_naming_precision_backend_rmse(tmp_path):
    # Tolerance 0: int8 is never bit-equal to fp32 end to end, so the gate must refuse it and write nothing.
    strict = GateSettings(tiles=2, size=32, samples=2, timesteps=8, tolerance=0.0)
    with pytest.raises(QualityGateError) as err:
        build(_care_sst(), tmp_path / "e", backend="openvino", precision="int8", batch=BATCH, size=SIZE,
              gate=strict, verify=False)
    msg = str(err.value)
    assert "--precision int8" in msg and "openvino" in msg and "RMSE" in msg and "fp32's" in msg
    assert not (tmp_path / "e").exists()


def test_int8_for_a_backend_that_cannot_run_it_is_refused_by_name(tmp_path):
    for backend in ("onnxruntime", "torch"):
        with pytest.raises(ValueError, match=rf"--precision int8 .*the {backend} backend cannot run it"):
            build(_care_sst(), tmp_path / backend, backend=backend, precision="int8", batch=BATCH, size=SIZE)
        assert not (tmp_path / backend).exists()


def test_int8_for_a_model_without_background_is_refused_by_name(tmp_path):
    from export_standin import TinyUNet

    torch.manual_seed(0)
    unconditional = TinyUNet(c_in=1, c_out=1).eval()  # a diffusers-style model: no background to condition on
    with pytest.raises(ValueError, match=r"--precision int8 on the openvino backend needs the quality gate"):
        build(unconditional, tmp_path / "e", backend="openvino", precision="int8", batch=BATCH, size=SIZE)


@pytest.mark.slow
def test_auto_records_timings_and_gates_and_is_not_slower_than_fp32(auto_engine):
    m = auto_engine.manifest
    choice = m["precision_choice"]
    timings = choice["timings_ms"]
    assert {"fp32", "int8"} <= set(timings) and choice["shape"] == {"batch": 1, "height": 32, "width": 32}
    assert m["precision"] == choice["chosen"] == m["artefacts"]["openvino"]["precision"]
    assert timings[choice["chosen"]] <= timings["fp32"]
    assert "int8" in choice["gate"] and "loadavg_1min" in choice


def test_info_shows_the_auto_choice(auto_engine, capsys):
    from ddpm_engine.engine.cli import main

    assert main(["info", str(auto_engine.directory)]) == 0
    out = capsys.readouterr().out
    assert f"auto         chose {auto_engine.manifest['precision']}" in out and "fp32" in out and " ms" in out


def test_choose_takes_the_fastest_precision_that_passed_the_gate():
    assert choose({"fp32": 100, "bf16": 80, "int8": 60}, {"bf16": True, "int8": True}) == "int8"
    assert choose({"fp32": 100, "bf16": 80, "int8": 60}, {"bf16": True, "int8": False}) == "bf16"
    assert choose({"fp32": 100, "bf16": 110, "int8": 105}, {"bf16": True, "int8": True}) == "fp32"
    assert choose({"fp32": 100, "int8": 100}, {"int8": True}) == "fp32"  # a tie keeps full precision
    assert choose({"fp32": 100, "int8": 50}, {}) == "fp32"  # never gated: never chosen


def test_choose_is_never_slower_than_fp32():
    rng = random.Random(0)
    for _ in range(500):
        timings = {p: rng.uniform(1, 10) for p in ("fp32", "bf16", "int8")}
        passed = {p: rng.random() < 0.5 for p in ("bf16", "int8")}
        chosen = choose(timings, passed)
        assert timings[chosen] <= timings["fp32"] and (chosen == "fp32" or passed[chosen])
        assert timings[chosen] == min(t for p, t in timings.items() if p == "fp32" or passed[p])


def test_gate_is_deterministic_so_fp32_and_reduced_runs_are_paired(auto_engine):
    from ddpm_engine.export import Profile
    from ddpm_engine.export.quality_gate import gate_rmse

    directory, profile = auto_engine.directory, Profile.from_dict(auto_engine.manifest["profile"])
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    first, again = (gate_rmse(directory / "model.onnx", f32, profile, GATE) for _ in range(2))
    assert first == again and np.isfinite(first) and first > 0
