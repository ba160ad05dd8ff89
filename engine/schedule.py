"""The seed's cosine noise schedule (Nichol & Dhariwal 2021, eq. 17), always evaluated in float64."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CosineSchedule:
    """abar(t) = clamp(cos^2(((t+s)/(1+s)) pi/2) / cos^2((s/(1+s)) pi/2), lo, hi) on continuous t in [0, 1]."""

    s: float = 0.008
    scaler: float = 1.0
    clamp_min: float = 1e-4
    clamp_max: float = 0.9999

    def __post_init__(self):
        if not (self.s > 0 and math.isfinite(self.s)):
            raise ValueError(f"CosineSchedule: s must be a positive finite number, got {self.s!r}")
        if not (self.scaler > 0 and math.isfinite(self.scaler)):
            raise ValueError(f"CosineSchedule: scaler must be a positive finite number, got {self.scaler!r}")
        if not (0.0 < self.clamp_min < self.clamp_max < 1.0):
            raise ValueError(
                f"CosineSchedule: need 0 < clamp_min < clamp_max < 1, got {self.clamp_min!r}, {self.clamp_max!r}"
            )

    def _warp(self, t: np.ndarray) -> np.ndarray:
        # The seed's optional time warp: k > 1 spends more steps near t = 1, k < 1 near t = 0.
        if self.scaler > 1:
            return 1 - (1 - t) ** self.scaler
        if self.scaler < 1:
            return t**self.scaler
        return t

    def alpha_cumprod(self, t):
        """abar(t) in float64; accepts a float, a numpy array or a torch tensor (returned as float64)."""
        if isinstance(t, torch.Tensor):
            return torch.from_numpy(self.alpha_cumprod(t.detach().cpu().double().numpy())).to(t.device)
        t = self._warp(np.asarray(t, dtype=np.float64))
        s = self.s
        num = np.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2
        den = math.cos(s / (1 + s) * math.pi * 0.5) ** 2
        out = np.clip(num / den, self.clamp_min, self.clamp_max)
        return float(out) if out.ndim == 0 else out

    def time_at(self, abar) -> np.ndarray:
        """The t with alpha_cumprod(t) = abar, for abar inside the clamp range (the cosine and the warp inverted)."""
        s = self.s
        den = math.cos(s / (1 + s) * math.pi * 0.5) ** 2
        w = np.arccos(np.sqrt(np.asarray(abar, dtype=np.float64) * den)) * 2 / math.pi * (1 + s) - s
        if self.scaler > 1:
            return 1 - (1 - w) ** (1 / self.scaler)
        if self.scaler < 1:
            return w ** (1 / self.scaler)
        return w


def diffuse(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: CosineSchedule) -> torch.Tensor:
    """q(x_t | x_0) sample: sqrt(abar) x0 + sqrt(1 - abar) eps (Ho et al. 2020, eq. 4); t is [B]."""
    a = schedule.alpha_cumprod(t.reshape(-1))  # float64
    view = (-1,) + (1,) * (x0.dim() - 1)
    sa = a.sqrt().to(x0.dtype).view(view)
    sb = (1 - a).sqrt().to(x0.dtype).view(view)
    return sa * x0 + sb * eps
