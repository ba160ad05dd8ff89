"""The CARE-SST noise-prediction U-Net (ConvNeXt-V2 blocks + attention), state-dict compatible with CARE-SST `netG`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, DoubleConvNeXt, LayerNorm2d, LinearAttention, ResBlock


def sinusoidal_embedding(t: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[sin(t w), cos(t w)] with w_k = 1 / 10000^(2k / D) on the raw t in [0, 1] (CARE-SST `pos_encoding`)."""
    arg = t.reshape(-1, 1).float() * inv_freq[None, :]
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


def pad_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Zero-pad x to ref's H, W, half of the gap left/top and the rest right/bottom (CARE-SST `Up`)."""
    # A 2x2 stride-2 transposed conv of floor(n / 2) gives n or n - 1, so the gap is 0 or 1 and all of it
    # goes right/bottom (gap // 2 == 0). Pad one and crop to ref: that traces to Pad + Slice with
    # symbolic sizes, where F.pad with a gap computed from shapes would freeze at the traced size.
    if not torch.jit.is_tracing():
        gap_h, gap_w = ref.shape[2] - x.shape[2], ref.shape[3] - x.shape[3]
        if not (0 <= gap_h <= 1 and 0 <= gap_w <= 1):
            return F.pad(x, [gap_w // 2, gap_w - gap_w // 2, gap_h // 2, gap_h - gap_h // 2])
    return F.pad(x, [0, 1, 0, 1])[:, :, : ref.shape[2], : ref.shape[3]]


class Down(nn.Module):
    """LayerNorm + 2x2 stride-2 conv, then a DoubleConvNeXt with the time embedding."""

    def __init__(self, cin: int, cout: int, c_emb: int):
        super().__init__()
        self.down = nn.Sequential(LayerNorm2d(cin), nn.Conv2d(cin, cout, kernel_size=2, stride=2))
        self.block1 = DoubleConvNeXt(cout, c_emb)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.block1(self.down(x), emb)


class Up(nn.Module):
    """LayerNorm + 2x2 stride-2 transposed conv, pad to the skip, ResBlock over [x, skip], timed ResBlock."""

    def __init__(self, cin: int, cout: int, c_skip: int, c_emb: int):
        super().__init__()
        self.up = nn.Sequential(LayerNorm2d(cin), nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2))
        self.block1 = ResBlock(cout, c_skip=c_skip)
        self.block2 = ResBlock(cout, c_emb=c_emb)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = pad_like(self.up(x), skip)
        return self.block2(self.block1(x, skip=skip), emb)


class CareSSTUNet(nn.Module):
    """eps = model(cat([x_t, background]), t): 3 downsamplings, 3 bottleneck stages, linear attention per level."""

    def __init__(self, c_in: int = 2, c_out: int = 1, embed_dim: int = 256, dim: int = 64,
                 heads: int = 4, dim_head: int = 32):
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (sin and cos halves), got {embed_dim}")
        self.c_in, self.c_out, self.embed_dim, self.dim = c_in, c_out, embed_dim, dim
        self.heads, self.dim_head = heads, dim_head
        d, e = dim, embed_dim
        # heads/dim_head default to CARE-SST's 4 x 32; small presets shrink them, since the full-resolution
        # linear attention dominates the CPU cost.
        lin = lambda c: LinearAttention(c, heads, dim_head)  # noqa: E731
        att = lambda c: Attention(c, heads, dim_head)  # noqa: E731
        # Not persistent: CARE-SST computes it on the fly, so it must not appear in the state dict.
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, e, 2).float() / e), persistent=False)

        self.inc = nn.Sequential(nn.Conv2d(c_in, d, kernel_size=3, padding=1, bias=False), LayerNorm2d(d))
        self.inc_block1 = DoubleConvNeXt(d, e)
        self.sa0 = lin(d)
        self.down1 = Down(d, 2 * d, e)
        self.sa1 = lin(2 * d)
        self.down2 = Down(2 * d, 4 * d, e)
        self.sa2 = lin(4 * d)
        self.down3 = nn.Sequential(LayerNorm2d(4 * d), nn.Conv2d(4 * d, 8 * d, kernel_size=2, stride=2))
        for stage in (1, 2, 3):
            setattr(self, f"bot{stage}_1", ResBlock(8 * d))
            setattr(self, f"bot{stage}_2", ResBlock(8 * d))
            setattr(self, f"bot_sa{stage}", att(8 * d))
        self.up1 = Up(8 * d, 4 * d, 4 * d, e)
        self.sa4 = lin(4 * d)
        self.up2 = Up(4 * d, 2 * d, 2 * d, e)
        self.sa5 = lin(2 * d)
        self.up3 = Up(2 * d, d, d, e)
        self.sa6 = lin(d)
        self.outc = nn.Conv2d(d, c_out, kernel_size=1)

    def config(self) -> dict:
        """Constructor arguments, as stored next to the weights."""
        return {"c_in": self.c_in, "c_out": self.c_out, "embed_dim": self.embed_dim, "dim": self.dim,
                "heads": self.heads, "dim_head": self.dim_head}

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(t, self.inv_freq)
        x1 = self.sa0(self.inc_block1(self.inc(x), emb))
        x2 = self.sa1(self.down1(x1, emb))
        x3 = self.sa2(self.down2(x2, emb))
        x4 = self.down3(x3)
        for stage in (1, 2, 3):
            x4 = getattr(self, f"bot{stage}_2")(getattr(self, f"bot{stage}_1")(x4))
            x4 = getattr(self, f"bot_sa{stage}")(x4)
        x = self.sa4(self.up1(x4, emb, x3))
        x = self.sa5(self.up2(x, emb, x2))
        x = self.sa6(self.up3(x, emb, x1))
        return self.outc(x)
