"""Shared pytest setup."""
import os

import torch

# Triton kernels (kernels/fused_step_triton.py) run in Triton's interpreter on machines without CUDA. The
# @triton.jit decorator reads this at import time, so it must be set before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_tensorrt() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config, items):
    """Skip `cuda` tests without an NVIDIA GPU and `tensorrt` tests without TensorRT, saying which is missing."""
    import pytest

    skips = {}
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; none is visible")
    if not _has_tensorrt():
        missing = "the tensorrt package is not installed" if torch.cuda.is_available() else "no CUDA GPU is visible"
        skips["tensorrt"] = pytest.mark.skip(reason=f"needs TensorRT and an NVIDIA GPU; {missing}")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
