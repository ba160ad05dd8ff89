"""Small noise-prediction nets for the export tests (not collected: no test_ prefix)."""
import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def single_thread():
    """One torch thread and one verification thread (2 shared cores: oversubscription stalls), restored after."""
    threads, old = torch.get_num_threads(), os.environ.get("DDPM_ENGINE_VERIFY_THREADS")
    torch.set_num_threads(1)
    os.environ["DDPM_ENGINE_VERIFY_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("DDPM_ENGINE_VERIFY_THREADS", None)
        else:
            os.environ["DDPM_ENGINE_VERIFY_THREADS"] = old


class LayerNorm2d(nn.Module):
    """LayerNorm over channels, channels-last inside (exports as one LayerNormalization)."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), (self.c,), eps=1e-6).permute(0, 3, 1, 2)


class DecomposedNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) spelled out: exports as ReduceMean/Sub/Pow/Sqrt/Div."""

    def forward(self, x):
        mu = x.mean(dim=1, keepdim=True)
        d = x - mu
        return d / torch.sqrt((d ** 2).mean(dim=1, keepdim=True) + 1e-6)


class GRN(nn.Module):
    """Global response norm (L2 over H, W): a sum of squares that overflows fp16 at large sizes."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(1, 1, 1, c) * 0.1)
        self.beta = nn.Parameter(torch.randn(1, 1, 1, c) * 0.1)

    def forward(self, x):
        g = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        return self.gamma * (x * (g / (g.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + x


class Block(nn.Module):
    def __init__(self, c, e):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.mlp = nn.Linear(e, c)
        self.norm = LayerNorm2d(c)
        self.l1, self.grn, self.l2 = nn.Linear(c, 2 * c), GRN(2 * c), nn.Linear(2 * c, c)

    def forward(self, x, emb):
        h = self.norm(self.dw(x) + self.mlp(F.gelu(emb))[:, :, None, None]).permute(0, 2, 3, 1)
        return x + self.l2(self.grn(F.gelu(self.l1(h)))).permute(0, 3, 1, 2)


class Attention(nn.Module):
    def __init__(self, c, heads=2, dim_head=4):
        super().__init__()
        self.h, self.dh = heads, dim_head
        self.norm = DecomposedNorm()
        self.qkv = nn.Conv2d(c, 3 * heads * dim_head, 1, bias=False)
        self.out = nn.Conv2d(heads * dim_head, c, 1)

    def forward(self, x):
        b, _, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.h, self.dh, hh * ww).unbind(1)
        a = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q * self.dh ** -0.5, k), -1)
        return x + self.out(torch.einsum("bhij,bhdj->bhdi", a, v).reshape(b, self.h * self.dh, hh, ww))


class TinyUNet(nn.Module):
    """model(sample [B, c_in, H, W], timestep [B]) -> eps [B, c_out, H, W] at any H, W (odd ones padded)."""

    def __init__(self, c_in=2, c_out=1, dim=8, embed_dim=16):
        super().__init__()
        self.c_in, self.c_out, self.embed_dim = c_in, c_out, embed_dim
        self.config = {"c_in": c_in, "c_out": c_out, "dim": dim, "embed_dim": embed_dim}
        self.inc = nn.Conv2d(c_in, dim, 3, padding=1)
        self.b1 = Block(dim, embed_dim)
        self.down = nn.Conv2d(dim, 2 * dim, 2, stride=2)
        self.b2, self.attn = Block(2 * dim, embed_dim), Attention(2 * dim)
        self.up = nn.ConvTranspose2d(2 * dim, dim, 2, stride=2)
        self.b3, self.outc = Block(dim, embed_dim), nn.Conv2d(dim, c_out, 1)

    def forward(self, x, t):
        k = torch.arange(self.embed_dim // 2, dtype=torch.float32)
        a = t[:, None].float() / (10000 ** (2 * k / self.embed_dim))[None]
        e = torch.cat([a.sin(), a.cos()], -1)
        h1 = self.b1(self.inc(x), e)
        u = self.up(self.attn(self.b2(self.down(h1), e)))
        dy, dx = h1.shape[2] - u.shape[2], h1.shape[3] - u.shape[3]
        u = F.pad(u, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.outc(self.b3(u + h1, e))


class FixedSizeNet(nn.Module):
    """Runs at any size in PyTorch, but int() on the shape bakes the traced H*W into the graph's Reshape."""

    def __init__(self, c_in=2, c_out=1):
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.config = {"c_in": c_in, "c_out": c_out}
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x, t):
        y = self.conv(x) + t[:, None, None, None]
        b, c, h, w = y.shape[0], y.shape[1], int(y.shape[2]), int(y.shape[3])
        return y.reshape(b, c, h * w).softmax(-1).reshape(b, c, h, w) * (h * w)


class LoudNet(nn.Module):
    """Outputs around 1e5: fine in fp32 and bf16, overflows fp16 (max 65504)."""

    def __init__(self, c_in=2, c_out=1):
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.config = {"c_in": c_in, "c_out": c_out}
        self.conv = nn.Conv2d(c_in, c_out, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1e5)

    def forward(self, x, t):
        return self.conv(x.abs() + 1.0) + t[:, None, None, None]


class SumSquaresNet(nn.Module):
    """eps = x / ||x||_HW * sqrt(HW): the L2 norm's sum of squares exceeds 65504 above ~256x256 unit values."""

    def __init__(self, c_in=2, c_out=1):
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.config = {"c_in": c_in, "c_out": c_out}
        self.conv = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, t):
        y = self.conv(x) + t[:, None, None, None]
        n = torch.sqrt((y * y).sum(dim=(2, 3), keepdim=True))
        return y / n * (y.shape[2] * y.shape[3]) ** 0.5
