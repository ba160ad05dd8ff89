"""Checks on user inputs to a sampling call; each failure is one ValueError naming the argument."""
from __future__ import annotations

import numpy as np
import torch


def _check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions [B, C, H, W], got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return value


def check_seed(seed, name: str = "seed") -> int:
    """The seed as an int, or ValueError unless it is an integer in [0, 2^63) (a Philox key / generator seed)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2^63), got {seed!r}")
    return int(seed)


def check_shape(shape) -> tuple[int, int, int, int]:
    """The sample shape [B, C, H, W] as a tuple of positive ints."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence [B, C, H, W], got {shape!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be 4 positive sizes [B, C, H, W], got {shape!r}")
    return shape


def check_sample_inputs(background, shape, mask=None, x_init=None) -> tuple[int, int, int, int]:
    """Validate background/mask/x_init against the sample shape; returns the shape (batch taken from x_init if given)."""
    shape = check_shape(shape)
    if x_init is not None:
        _check_tensor("x_init", x_init)
        if tuple(x_init.shape[1:]) != shape[1:]:
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected [B, {shape[1]}, {shape[2]}, {shape[3]}]")
        shape = (x_init.shape[0],) + shape[1:]  # the seed takes the batch size from x_init
    b, c, h, w = shape
    _check_tensor("background", background)
    if background.shape[0] != b or tuple(background.shape[2:]) != (h, w):
        raise ValueError(f"background has shape {tuple(background.shape)}, expected [{b}, C_bg, {h}, {w}]")
    if mask is not None:
        if x_init is None:
            raise ValueError("mask given without x_init: the blend needs the known image x_init")
        _check_tensor("mask", mask)
        if mask.shape[0] not in (1, b) or mask.shape[1] not in (1, c) or tuple(mask.shape[2:]) != (h, w):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected [1 or {b}, 1 or {c}, {h}, {w}]")
        if bool((mask < 0).any()) or bool((mask > 1).any()):
            raise ValueError("mask values must lie in [0, 1] (1 = pixel to generate, 0 = known pixel)")
    return shape


INITS = ("noise", "background", "x_init")


def init_image(init: str, background: torch.Tensor, x_init, channels: int):
    """The image a CARE-SST run starts from (diffused to t_start), or None for pure noise; ValueError if unusable."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; must be one of {list(INITS)}")
    if init == "x_init" and x_init is None:
        raise ValueError("init='x_init' needs x_init")
    if init == "background" and background.shape[1] != channels:
        raise ValueError(f"init='background' needs background with {channels} channels, got {background.shape[1]}")
    return {"noise": None, "background": background, "x_init": x_init}[init]
