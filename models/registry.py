"""Architectures, bundled presets, and `load_model` for presets, checkpoint directories and CARE-SST `.pth` files."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import read_checkpoint
from .unet import CareSSTUNet

ARCHITECTURES = {"care-sst": CareSSTUNet}
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Bundled presets: the model config; their weights live in weights/<name>/ (see train.py for the recipe).
PRESETS = {
    "sst-small": {"arch": "care-sst", "model": {"c_in": 2, "c_out": 1, "embed_dim": 64, "dim": 16, "heads": 2, "dim_head": 16}},
}


def build_model(arch: str = "care-sst", **config) -> nn.Module:
    """A freshly initialised model, e.g. build_model("care-sst", c_in=2, c_out=1, embed_dim=256, dim=64)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; must be one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config)


def _care_sst_config(state: dict) -> dict:
    # A CARE-SST .pth carries no config: read it off the tensor shapes.
    try:
        dim, c_in = state["inc.0.weight"].shape[:2]
        return {"c_in": int(c_in), "c_out": int(state["outc.weight"].shape[0]), "dim": int(dim),
                "embed_dim": int(state["inc_block1.block2.mlp.1.weight"].shape[1])}
    except KeyError as exc:
        raise ValueError(f"not a CARE-SST U-Net state dict: no parameter {exc.args[0]!r}") from None


def _load_pth(path: Path) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as a PyTorch checkpoint ({exc})") from None
    state = obj.get("netG", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a CARE-SST checkpoint (a dict with a 'netG' state dict)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    return _instantiate("care-sst", _care_sst_config(state), state, path)


def _instantiate(arch: str, config: dict, state: dict, source) -> nn.Module:
    model = build_model(arch, **config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:3]
        raise ValueError(f"{source}: state dict does not match {arch} {config}: {' '.join(s.strip() for s in first)}") from None
    return model.eval()


def load_model(name_or_path: str | Path) -> nn.Module:
    """A trained model in eval mode on CPU: a bundled preset name, a checkpoint directory, or a CARE-SST .pth."""
    name = str(name_or_path)
    if name in PRESETS:
        directory = WEIGHTS_DIR / name
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"preset {name!r} has no bundled weights in {directory} (reinstall the package)")
        config, state = read_checkpoint(directory)
        return _instantiate(config["arch"], config["model"], state, directory)
    path = Path(name_or_path)
    if path.is_dir():
        config, state = read_checkpoint(path)
        return _instantiate(config["arch"], config["model"], state, path)
    if path.is_file():
        if path.suffix in (".pth", ".pt"):
            return _load_pth(path)
        raise ValueError(f"{path}: unsupported model file; give a CARE-SST .pth/.pt or a checkpoint directory")
    raise FileNotFoundError(f"no model {name!r}: not a bundled preset (one of {sorted(PRESETS)}), "
                            "nor an existing checkpoint directory or .pth file")
