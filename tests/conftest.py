"""Shared pytest setup."""
import os

import torch

# Triton kernels (kernels/fused_step_triton.py) run in Triton's interpreter on machines without CUDA. The
# @triton.jit decorator reads this at import time, so it must be set before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
