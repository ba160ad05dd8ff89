"""int8 OpenVINO IR by NNCF post-training quantisation, calibrated on the U-Net inputs the sampler really feeds it."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .openvino_build import IR_DIR, cpu_supports, require_openvino
from .precision import is_channel_mean

INT8_IR_NAME = "model.int8.xml"
# Not the held-out tiles the quality gate scores (models.evaluate.HELD_OUT_SEED) nor reconstruct's synthetic ones.
CALIBRATION_SEED = 31_415


@dataclass(frozen=True)
class CalibrationSettings:
    """The sampler run whose U-Net inputs calibrate the int8 ranges: the main job's (DDPM from the background
    diffused to t = 0.5, masked) on synthetic training-distribution tiles, fewer steps over the same times."""

    tiles: int = 4
    size: int = 64
    timesteps: int = 20
    t_start: float = 0.5
    init: str = "background"
    sampler: str = "ddpm"
    seed: int = CALIBRATION_SEED

    def as_dict(self) -> dict:
        return asdict(self)


def fit_size(size: int, profile) -> int:
    """The largest multiple of the profile's multiple within [min, max] that is <= size (the tiles must be
    a size the engine takes)."""
    (h_min, w_min), _, (h_max, w_max) = profile.sizes
    size = max(min(size, h_max, w_max), h_min, w_min)
    return size - size % profile.multiple


def calibration_inputs(onnx_path: str | Path, profile, settings: CalibrationSettings = CalibrationSettings()
                       ) -> list[dict[str, np.ndarray]]:
    """The (sample = cat([x_t, background]), timestep) of every U-Net call of the seed's loop (`reference_sample`)
    run with the fp32 graph in OpenVINO on synthetic tiles: real-looking backgrounds and cloud masks, and x_t at
    exactly the times the sampler visits."""
    from ddpm_engine.engine.reference import reference_sample
    from ddpm_engine.models.data import synthetic_tile

    ov = require_openvino()
    fp32 = ov.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    recorded = []

    def unet(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feed = {"sample": sample.numpy().copy(), "timestep": t.numpy().copy()}
        recorded.append(feed)
        return torch.from_numpy(fp32(feed)[0])

    rng = np.random.default_rng(settings.seed)
    tiles = [synthetic_tile(rng, fit_size(settings.size, profile)) for _ in range(settings.tiles)]
    stack = lambda field: torch.stack([getattr(t, field) for t in tiles])  # noqa: E731
    reference_sample(unet, stack("background"), tuple(stack("x_init").shape), mask=stack("mask"),
                     x_init=stack("x_init"), timesteps=settings.timesteps, sampler=settings.sampler,
                     t_start=settings.t_start, init=settings.init,
                     generator=torch.Generator().manual_seed(settings.seed))
    return recorded


def time_only_ops(model) -> list[str]:
    """Names of the ops that do not depend on the image input `sample`: the timestep embedding and each block's
    projection of it. They are tiny, feed every block, and a rounding there shifts the whole step: kept out of
    int8 (the same rule as precision.plan_precision for fp16/bf16)."""
    sample = next(p for p in model.get_parameters() if p.get_friendly_name() == "sample")
    image = {sample.get_friendly_name()}
    for op in model.get_ordered_ops():  # topological order: an op's inputs come before it
        if any(v.get_node().get_friendly_name() in image for v in op.input_values()):
            image.add(op.get_friendly_name())
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_friendly_name() not in image and op.get_type_name() in ("MatMul", "Convolution")]


def boundary_ops(model) -> list[str]:
    """The U-Net's first and last heavy op (the image in, eps out). Kept out of int8 by measurement: quantising the
    first conv (x_t and the background, two channels of different ranges) and the output conv (its error is the
    eps error itself) moved the main job's cloud RMSE +1.05 % from fp32 on reconstruct's 4 synthetic tiles (100
    steps); without them +0.12 %, and no slower."""
    heavy = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in ("MatMul", "Convolution")]
    return [heavy[0], heavy[-1]]


def channel_means(model) -> list[str]:
    """The norms' means over channels, written as 1x1 convs of equal weights (models.layers.LayerNorm2d): reductions,
    kept out of int8 as precision.plan_precision keeps them fp32 (quantised, they moved sst-small's gate from
    -0.02 % to -0.46 % of fp32's cloud RMSE)."""
    out = []
    for op in model.get_ordered_ops():
        weights = op.input_value(1).get_node() if op.get_type_name() == "Convolution" else None
        if weights is None or weights.get_type_name() != "Constant":
            continue
        if is_channel_mean(weights.get_data()):
            out.append(op.get_friendly_name())
    return out


def quantize_openvino_ir(onnx_path: str | Path, engine_dir: str | Path, profile,
                         settings: CalibrationSettings = CalibrationSettings()) -> dict:
    """Quantise the fp32 ONNX graph with NNCF into <engine>/openvino/model.int8.xml (+ .bin); returns the manifest
    entry (without hashes). What is not quantised (norms and their channel means, softmax, the time embedding, the
    first and last layer) runs in the compile-time precision: bf16 where the CPU has it natively, else fp32."""
    import logging

    import nncf

    nncf.set_log_level(logging.WARNING)  # not its per-op INFO lines in the build's output
    ov = require_openvino()
    inputs = calibration_inputs(onnx_path, profile, settings)
    model = ov.Core().read_model(str(onnx_path))
    time_ops, ends = time_only_ops(model), boundary_ops(model)
    ignored = time_ops + ends + channel_means(model)
    # TRANSFORMER (NNCF's scheme for attention models: SmoothQuant, softmax and norms unquantised): the fastest of
    # the schemes tried with sst-small at B = 2 128x128 (162 ms against 194 for NNCF's default, bf16 elsewhere;
    # same run, load 6.7); ignoring the depthwise convs or the MLP MatMuls as well was not faster.
    quantized = nncf.quantize(model, nncf.Dataset(inputs), subset_size=len(inputs),
                              model_type=nncf.ModelType.TRANSFORMER,
                              ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    out = Path(engine_dir) / IR_DIR
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out / INT8_IR_NAME), compress_to_fp16=False)
    hint = "bf16" if cpu_supports("bf16") else "f32"
    stem = INT8_IR_NAME.removesuffix(".xml")
    return {
        "path": f"{IR_DIR}/{INT8_IR_NAME}",
        "files": [f"{IR_DIR}/{INT8_IR_NAME}", f"{IR_DIR}/{stem}.bin"],
        "precision": "int8",
        "inference_precision_hint": hint,
        "compile_config": {"INFERENCE_PRECISION_HINT": hint},
        "native": cpu_supports("int8"),
        "source": Path(onnx_path).name,
        "quantization": {"tool": f"nncf {nncf.__version__}", "model_type": "transformer",
                         "calibration": {**settings.as_dict(), "calls": len(inputs)},
                         "kept_out_of_int8": {"time embedding ops": len(time_ops), "first and last layer": ends,
                                              "never quantised": "norms, softmax"}},
    }
