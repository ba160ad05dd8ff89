"""OpenVINO's compiled-model cache: outside the engine directory, used by the next load, off when asked."""
import numpy as np
import pytest
import torch

from ddpm_engine.engine import build, load
from ddpm_engine.engine.backend_openvino import CACHE_ENV, compiled_model_cache
from ddpm_engine.export import check_engine_dir
from ddpm_engine.models import build_model


@pytest.fixture(scope="module")
def openvino_engine_dir(tmp_path_factory):
    """An OpenVINO engine of an untrained CARE-SST U-Net at dim 8 (fp32: the same on every x86 CPU)."""
    torch.manual_seed(0)
    model = build_model("care-sst", c_in=2, c_out=1, embed_dim=16, dim=8, heads=1, dim_head=8).eval()
    out = tmp_path_factory.mktemp("engines") / "tiny-openvino"
    build(model, out, backend="openvino", precision="fp32", batch=(1, 2, 4), size=((8, 8), (16, 16), (32, 32)))
    return out


def _sample(engine):
    return engine.sample(np.zeros((2, 1, 16, 16), np.float32), timesteps=2, seed=0)


def _files(directory):
    return sorted((p.relative_to(directory), p.stat().st_size) for p in directory.rglob("*"))


def test_a_second_load_takes_the_compiled_model_from_the_cache(openvino_engine_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    files = _files(openvino_engine_dir)
    first = load(openvino_engine_dir)
    x = _sample(first)
    folder = compiled_model_cache(first.manifest["cache_key"])
    assert folder.parent == tmp_path / "cache" / "openvino" and list(folder.glob("*.blob"))
    assert (first.runner.compiles, first.runner.backend.cache_hits) == (1, 0)
    second = load(openvino_engine_dir)
    np.testing.assert_array_equal(_sample(second), x)
    assert (second.runner.compiles, second.runner.backend.cache_hits) == (1, 1)  # OpenVINO's LOADED_FROM_CACHE
    assert _files(openvino_engine_dir) == files  # nothing written into the hashed engine directory
    check_engine_dir(openvino_engine_dir, "openvino")


def test_an_empty_cache_setting_compiles_afresh_and_writes_nothing(openvino_engine_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for _ in range(2):
        engine = load(openvino_engine_dir)
        _sample(engine)
        assert engine.runner.backend.cache_dir is None and engine.runner.backend.cache_hits == 0
    assert not list(tmp_path.rglob("*"))


def test_by_default_the_cache_is_in_the_user_cache_folder_per_engine(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiled_model_cache("0123456789abcdef" * 4) == tmp_path / "ddpm-engine" / "openvino" / "0123456789abcdef"
