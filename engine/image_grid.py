"""Samples as a PNG grid, decoded as diffusers' pipelines do ((x / 2 + 0.5) clamped to [0, 1]); no imaging library."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def to_grid(samples: np.ndarray, columns: int | None = None) -> np.ndarray:
    """[B, C, H, W] samples on [-1, 1] -> one [rows*H, cols*W, C] uint8 image (C = 1 or 3), tiles row-major."""
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"a PNG grid needs [B, 1 or 3, H, W] samples, got shape {tuple(samples.shape)}")
    b, c, h, w = samples.shape
    cols = columns or int(np.ceil(np.sqrt(b)))
    rows = -(-b // cols)
    # DDPMPipeline's output_type="pil": (x / 2 + 0.5).clamp(0, 1), then * 255 rounded
    pixels = np.round(np.clip(samples / 2 + 0.5, 0.0, 1.0) * 255).astype(np.uint8)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = pixels[i].transpose(1, 2, 0)
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit greyscale or RGB PNG (W3C PNG spec: IHDR, one zlib IDAT of filter-0 scanlines, IEND)."""
    h, w, c = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    colour = {1: 0, 3: 2}[c]  # PNG colour types: 0 greyscale, 2 truecolour
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    scanlines = b"".join(b"\x00" + image[y].tobytes() for y in range(h))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines)) + \
        chunk(b"IEND", b"")


def save_png_grid(samples: np.ndarray, path: str | Path) -> None:
    """Write the samples' grid to `path` atomically."""
    from ddpm_engine.models.checkpoint import atomic_write

    data = png_bytes(to_grid(samples))
    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))
