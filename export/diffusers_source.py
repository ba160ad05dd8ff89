"""diffusers models as build inputs: a pipeline directory, or a UNet2DModel with its scheduler (build time only)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ddpm_engine.engine.diffusers_schedule import DiffusersSchedule
from ddpm_engine.engine.errors import EngineError

PIPELINE_INDEX = "model_index.json"
ARCH = "diffusers:UNet2DModel"
_INSTALL = "pip install 'ddpm-engine[diffusers]'"


def require_diffusers():
    """Import diffusers, or raise EngineError saying what needs it and how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise EngineError(f"building a diffusers model (and running its torch backend) needs diffusers ({exc}); "
                          f"install it with: {_INSTALL}. Engines run on onnxruntime/openvino/tensorrt without it") \
            from None
    return diffusers


def is_diffusers_module(obj) -> bool:
    """Whether obj is a diffusers model or scheduler instance (checked without importing diffusers)."""
    return type(obj).__module__.split(".")[0] == "diffusers"


class DiffusersUNet(torch.nn.Module):
    """A UNet2DModel behind the engine's contract: (sample [B, C, H, W], timestep [B]) -> model output [B, C, H, W]."""

    ARCH = ARCH

    def __init__(self, unet: torch.nn.Module, schedule: dict):
        super().__init__()
        cfg = unet.config
        if type(unet).__name__ != "UNet2DModel":
            raise EngineError(f"the U-Net is a {type(unet).__name__}; diffusers engines take a UNet2DModel")
        if cfg.class_embed_type is not None or cfg.num_class_embeds is not None:
            raise EngineError("class-conditional UNet2DModel (class_embed_type / num_class_embeds set) is not "
                              "supported: the engine graph takes (sample, timestep) only, and a call without "
                              "class_labels fails")
        if cfg.out_channels != cfg.in_channels:
            raise EngineError(f"UNet2DModel has in_channels={cfg.in_channels} but out_channels={cfg.out_channels}: "
                              "learned variances (2C outputs) are not supported")
        self.unet, self.schedule = unet.eval(), DiffusersSchedule.from_dict(schedule).as_dict()
        self.c_in = self.c_out = int(cfg.in_channels)
        # Every down block but the last halves H and W, and the up path concatenates skips of equal size.
        self.size_multiple = 2 ** (len(cfg.down_block_types) - 1)
        self.max_timestep = float(self.schedule["num_train_timesteps"] - 1)  # verification draws t in [0, this)
        size = cfg.sample_size
        self.default_size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample

    def config(self) -> dict:
        """The kept config: the U-Net's constructor arguments and the manifest's schedule section."""
        unet = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        return {"unet": json.loads(json.dumps(unet)), "schedule": self.schedule}


def wrap_unet(unet: torch.nn.Module, scheduler) -> DiffusersUNet:
    """A UNet2DModel instance and a DDPMScheduler / DDIMScheduler instance -> the module `build` exports."""
    if scheduler is None:
        raise EngineError("a diffusers UNet2DModel needs its scheduler: build(unet, out, scheduler=scheduler)")
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return DiffusersUNet(unet, DiffusersSchedule.from_config(type(scheduler).__name__, config).as_dict())


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineError(f"{path}: cannot read the {what} ({exc})") from None


def is_pipeline_dir(path: Path) -> bool:
    """A directory that looks like a saved diffusers pipeline (has model_index.json, unet/ or scheduler/)."""
    return path.is_dir() and any((path / p).exists() for p in (PIPELINE_INDEX, "unet", "scheduler"))


def load_pipeline_dir(path: str | Path) -> DiffusersUNet:
    """The U-Net and scheduler config of a `save_pretrained` pipeline directory (model_index.json, unet/, scheduler/)."""
    path = Path(path)
    if not (path / PIPELINE_INDEX).is_file():
        raise EngineError(f"{path} is not a diffusers pipeline directory: {PIPELINE_INDEX} is missing (write it "
                          "with pipeline.save_pretrained)")
    index = _read_json(path / PIPELINE_INDEX, "pipeline index")
    parts = {}
    for part in ("unet", "scheduler"):
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2) or not (path / part).is_dir():
            raise EngineError(f"{path} is not a diffusers pipeline this engine can build: {PIPELINE_INDEX} names no "
                              f"{part!r} component or {path / part} is missing (need unet/ and scheduler/)")
        parts[part] = entry[1]
    if parts["unet"] != "UNet2DModel":
        raise EngineError(f"{path}: the unet is a {parts['unet']}; diffusers engines take a UNet2DModel")
    config = _read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    schedule = DiffusersSchedule.from_config(config.get("_class_name", parts["scheduler"]),
                                             {k: v for k, v in config.items() if not k.startswith("_")})
    unet = require_diffusers().UNet2DModel.from_pretrained(path / "unet")
    return DiffusersUNet(unet, schedule.as_dict())


def load_kept(config: dict, state: dict) -> DiffusersUNet:
    """The DiffusersUNet kept in an engine directory (its config and state dict), for the torch backend."""
    unet = require_diffusers().UNet2DModel.from_config(config["unet"])
    model = DiffusersUNet(unet, config["schedule"])
    model.load_state_dict(state, strict=True)
    return model.eval()
