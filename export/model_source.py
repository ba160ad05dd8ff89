"""Resolve what `build` is given (module, preset, checkpoint, .pth, engine dir) and keep its weights + config."""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch

from ddpm_engine.engine.errors import EngineError, EngineFileError

from .manifest import MANIFEST

MODEL_DIR = "model"  # inside an engine directory: a ddpm-engine checkpoint (load_model reads it)
_PY_ARCH = "python:"  # arch of a model class outside ddpm_engine.models: "python:package.module:Class"


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of the state dict (names, dtypes, shapes, bytes in name order): independent of the file format."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_config(model: torch.nn.Module) -> dict:
    """Constructor arguments: `config()` (ddpm_engine.models) or a `config` dict attribute, else {}."""
    cfg = getattr(model, "config", None)
    if callable(cfg):
        cfg = cfg()
    return dict(cfg) if isinstance(cfg, dict) else {}


def model_arch(model: torch.nn.Module) -> str:
    """The registry name of the model's class (e.g. 'care-sst'), else 'python:module:Class'."""
    if isinstance(getattr(model, "ARCH", None), str):  # a wrapper that names its own kind (diffusers:UNet2DModel)
        return model.ARCH
    try:
        from ddpm_engine.models import ARCHITECTURES

        for name, cls in ARCHITECTURES.items():
            if type(model) is cls:
                return name
    except ImportError:
        pass
    cls = type(model)
    return f"{_PY_ARCH}{cls.__module__}:{cls.__qualname__}"


def describe_model(model: torch.nn.Module, source: str | None = None) -> dict:
    """The manifest's `model` section: arch, config, weights hash, channel counts, where it came from."""
    from .onnx_export import model_channels

    c_in, c_out = model_channels(model)
    return {"arch": model_arch(model), "config": model_config(model), "weights_sha256": weights_sha256(model),
            "c_in": c_in, "c_out": c_out, "parameters": sum(p.numel() for p in model.parameters()),
            "source": source, "checkpoint": MODEL_DIR}


def resolve_model(model_or_name, scheduler=None) -> tuple[torch.nn.Module, str]:
    """(model in eval mode on CPU, a description of its source) from a module (a diffusers UNet2DModel with its
    `scheduler`), a bundled preset name, a checkpoint directory, a CARE-SST .pth, a diffusers pipeline directory,
    or an existing engine directory (its kept weights)."""
    from . import diffusers_source

    if scheduler is not None and not diffusers_source.is_diffusers_module(model_or_name):
        raise EngineError("scheduler= is for a diffusers UNet2DModel; this model's schedule is the seed's")
    if isinstance(model_or_name, torch.nn.Module):
        from .onnx_export import export_copy

        if diffusers_source.is_diffusers_module(model_or_name):
            return (diffusers_source.wrap_unet(export_copy(model_or_name), scheduler),
                    f"diffusers {type(model_or_name).__name__}")
        return export_copy(model_or_name), f"module {type(model_or_name).__name__}"
    name = str(model_or_name)
    path = Path(name)
    if path.is_dir() and (path / MANIFEST).is_file():
        return load_torch_model(path), f"engine {path}"
    if diffusers_source.is_pipeline_dir(path):
        return diffusers_source.load_pipeline_dir(path), f"diffusers pipeline {path}"
    if path.is_dir() and not (path / "config.json").is_file():
        raise EngineError(f"{path} is not a model directory: not an engine ({MANIFEST}), a ddpm-engine checkpoint "
                          f"(config.json) or a diffusers pipeline ({diffusers_source.PIPELINE_INDEX})")
    try:
        from ddpm_engine.models import load_model
    except ImportError as exc:
        raise EngineError(f"cannot load model {name!r}: ddpm_engine.models is not available ({exc})") from None
    return load_model(name), name


def save_model_checkpoint(model: torch.nn.Module, engine_dir: Path, desc: dict) -> list[str]:
    """Write the weights + config into <engine>/model/ as a ddpm-engine checkpoint; returns relative paths."""
    from ddpm_engine.models.checkpoint import CONFIG, WEIGHTS, save_checkpoint

    directory = Path(engine_dir) / MODEL_DIR
    state = {k: v for k, v in model.state_dict().items()}
    save_checkpoint(directory, state, {"arch": desc["arch"], "model": desc["config"]})
    return [f"{MODEL_DIR}/{WEIGHTS}", f"{MODEL_DIR}/{CONFIG}"]


def load_torch_model(engine_dir: str | Path) -> torch.nn.Module:
    """The PyTorch model kept in an engine directory (eval, CPU), for the torch backend and rebuilds."""
    from ddpm_engine.models.checkpoint import read_checkpoint

    from . import diffusers_source

    directory = Path(engine_dir) / MODEL_DIR
    try:
        config, state = read_checkpoint(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise EngineFileError(f"{engine_dir}: kept PyTorch model is missing or damaged ({exc}); rebuild the engine "
                              "from the original model") from None
    arch = config["arch"]
    if arch == diffusers_source.ARCH:
        return diffusers_source.load_kept(config["model"], state)
    if arch.startswith(_PY_ARCH):
        module, _, qualname = arch[len(_PY_ARCH):].partition(":")
        try:
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError) as exc:
            raise EngineFileError(f"{engine_dir}: model class {arch[len(_PY_ARCH):]} is not importable ({exc})") from None
        model = cls(**config["model"])
        model.load_state_dict(state, strict=True)
        return model.eval()
    from ddpm_engine.models import load_model

    return load_model(directory)

