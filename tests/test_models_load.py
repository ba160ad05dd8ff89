"""load_model: bundled presets, checkpoint directories, CARE-SST .pth files, and clear errors for the rest."""
import pytest
import torch

from ddpm_engine.models import PRESETS, build_model, load_model


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _tiny():
    torch.manual_seed(0)
    return build_model("care-sst", c_in=2, c_out=1, embed_dim=16, dim=4, heads=2, dim_head=8).eval()


def test_bundled_preset_loads_offline_in_eval_mode():
    model = load_model("sst-small")
    assert not model.training and model.config() == PRESETS["sst-small"]["model"]
    with torch.no_grad():
        assert model(torch.randn(1, 2, 24, 24), torch.tensor([0.5])).shape == (1, 1, 24, 24)


def test_care_sst_pth_with_netG_loads_unchanged(tmp_path):
    # CARE-SST's own layout: 4 x 32 attention heads; the config is read off the tensor shapes.
    model = build_model("care-sst", c_in=2, c_out=1, embed_dim=32, dim=8).eval()
    torch.save({"netG": model.state_dict(), "epoch": 3}, tmp_path / "care.pth")
    loaded = load_model(tmp_path / "care.pth")
    assert loaded.config() == model.config()
    x, t = torch.randn(1, 2, 30, 30), torch.tensor([0.4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


def test_unknown_name_lists_presets():
    with pytest.raises(FileNotFoundError, match="sst-small"):
        load_model("sst-huge")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model"):
        load_model(tmp_path / "nope.pth")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unsupported"):
        load_model(tmp_path / "model.onnx")


def test_corrupt_pth(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read"):
        load_model(tmp_path / "bad.pth")


def test_pth_without_a_state_dict(tmp_path):
    torch.save({"netG": "oops"}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="netG"):
        load_model(tmp_path / "odd.pth")


def test_mismatched_state_dict_names_the_problem(tmp_path):
    state = _tiny().state_dict()
    state.pop("sa0.mem_kv")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"netG": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match"):
        load_model(tmp_path / "bad.pth")


def test_foreign_state_dict_is_not_a_care_sst_unet(tmp_path):
    torch.save({"netG": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a CARE-SST"):
        load_model(tmp_path / "other.pth")
