"""CARE-SST U-Net building blocks: ConvNeXt-V2 residual blocks (Woo et al. 2023) and memory-kv attention."""
from __future__ import annotations

import torch
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (channels-last inside), eps 1e-6, no affine parameters."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-6, elementwise_affine=False)

    def _channel_mean(self, x: torch.Tensor) -> torch.Tensor:
        # A 1x1 conv with weights 1/C, not ReduceMean over axis 1: ONNX Runtime's reduction rounds differently per
        # batch size, its Conv does not, and a result must not depend on what it was batched with (serve/, slots).
        # The fp16/bf16 ONNX conversion keeps such averaging convs in fp32, as it does reductions.
        c = self.normalized_shape[0]
        return nn.functional.conv2d(x, x.new_full((1, c, 1, 1), 1.0 / c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # Exported over the channel axis of NCHW: OpenVINO ran the channels-last form with a transpose and two
            # reorders per norm (12-15 % of a bf16 call at 64x64 and 300x300).
            mean = self._channel_mean
            centred = x - mean(x)
            return centred / torch.sqrt(mean(centred.square()) + self.eps)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on channels-last input: gamma * (x * n) + beta + x, n = per-channel L2 over H, W / its mean."""

    def __init__(self, channels: int):
        super().__init__()
        # Zero init makes the block start as the identity, as in ConvNeXt-V2 and CARE-SST.
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


def _grouped_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a grouped conv of k inputs per output channel. Exported as a depthwise conv over every input
    channel and a 1x1 conv that sums each group's k: OpenVINO runs the k = 2 grouped conv with a dense AMX kernel
    (14 % of a bf16 300x300 call), its depthwise kernel several times faster."""
    c, k = conv.out_channels, conv.in_channels // conv.groups
    if not torch.onnx.is_in_onnx_export() or k == 1 or conv.groups != c:
        return conv(x)
    y = nn.functional.conv2d(x, conv.weight.reshape(c * k, 1, *conv.kernel_size), padding=conv.padding, groups=c * k)
    sum_groups = torch.eye(c, dtype=y.dtype, device=y.device).repeat_interleave(k, dim=1)  # [c, c*k]: m // k == g
    return nn.functional.conv2d(y, sum_groups[:, :, None, None], conv.bias)


class ResBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 (over [x, skip]) + time bias, LayerNorm, channel MLP with GRN, residual."""

    def __init__(self, c: int, c_emb: int | None = None, c_skip: int = 0, dropout: float = 0.0):
        super().__init__()
        # groups=c over the c + c_skip channels of [x, skip], as CARE-SST has it: output channel g reads the k =
        # (c + c_skip) / c consecutive input channels g*k .. g*k + k - 1 (for k = 2: two x channels, or two skip ones).
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size=7, padding=3, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = nn.Sequential(
            nn.Linear(c, 4 * c), nn.GELU(), GlobalResponseNorm(4 * c), nn.Dropout(dropout), nn.Linear(4 * c, c)
        )
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(c_emb, c)) if c_emb is not None else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, skip: torch.Tensor | None = None):
        residual = x
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        x = _grouped_conv(self.depthwise, x)
        if self.mlp is not None and emb is not None:
            x = x + self.mlp(emb)[:, :, None, None]  # broadcasting == the original's .repeat over H, W
        x = self.channelwise(self.norm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + residual


class DoubleConvNeXt(nn.Module):
    """CARE-SST `Double_Convnext`: a ResBlock without time, then one with the time embedding."""

    def __init__(self, c: int, c_emb: int):
        super().__init__()
        self.block1 = ResBlock(c)
        self.block2 = ResBlock(c, c_emb=c_emb)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x), emb)


def _qkv(to_qkv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the fused 1x1 projection. Exported as three convolutions over the weight's thirds: OpenVINO runs
    the channel split of one fused output with its reference kernel (18 % of a bf16 300x300 call)."""
    if torch.onnx.is_in_onnx_export():
        return tuple(nn.functional.conv2d(x, w) for w in to_qkv.weight.chunk(3))
    return to_qkv(x).chunk(3, dim=1)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # [B, heads*d, H, W] -> [B, heads, d, H*W]; -1 keeps B and H*W symbolic in an ONNX trace.
    b = x.shape[0]
    return x.reshape(b, heads, -1, x.shape[2] * x.shape[3])


class LinearAttention(nn.Module):
    """Linear attention with learned memory key/values (Shen et al. 2021; lucid-rains' DDPM U-Net), plus residual."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        hidden = heads * dim_head
        self.norm = LayerNorm2d(dim)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, dim_head, num_mem_kv))
        self.to_qkv = nn.Conv2d(dim, 3 * hidden, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), LayerNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = (_split_heads(y, self.heads) for y in _qkv(self.to_qkv, self.norm(x)))
        mk, mv = (self.mem_kv[i].unsqueeze(0).expand(b, -1, -1, -1) for i in (0, 1))
        k, v = torch.cat([mk, k], dim=-1), torch.cat([mv, v], dim=-1)
        q = q.softmax(dim=-2) * self.scale  # over features
        k = k.softmax(dim=-1)  # over the sequence (memory slots included)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, x.shape[2], x.shape[3])) + x


class Attention(nn.Module):
    """Softmax self-attention (Vaswani et al. 2017) with learned memory key/values, plus residual."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        hidden = heads * dim_head
        self.norm = LayerNorm2d(dim)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head))
        self.to_qkv = nn.Conv2d(dim, 3 * hidden, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        # [B, heads, N, d] layout for q @ k^T
        q, k, v = (_split_heads(y, self.heads).transpose(-1, -2) for y in _qkv(self.to_qkv, self.norm(x)))
        mk, mv = (self.mem_kv[i].unsqueeze(0).expand(b, -1, -1, -1) for i in (0, 1))
        k, v = torch.cat([mk, k], dim=-2), torch.cat([mv, v], dim=-2)
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(-1, -2)  # [B, heads, d, N]
        return self.to_out(out.reshape(b, -1, x.shape[2], x.shape[3])) + x
