"""ONNX Runtime backend: an InferenceSession run with IO binding on the Runner's buffers (no copies)."""
from __future__ import annotations

import numpy as np
import torch

from .backends import check_bound, require
from .errors import BackendUnavailableError, EngineFileError

_NP = {torch.float32: np.float32, torch.float16: np.float16}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


class OnnxRuntimeBackend:
    """CPUExecutionProvider, or CUDAExecutionProvider where onnxruntime-gpu is installed and asked for."""

    name = "onnxruntime"
    capturable = False  # run_with_iobinding synchronises the stream

    def __init__(self, onnx_path, device="cpu", threads: int | None = None):
        ort = require("onnxruntime")
        self.device = torch.device(device)
        want = ["CUDAExecutionProvider"] if self.device.type == "cuda" else ["CPUExecutionProvider"]
        if want[0] not in ort.get_available_providers():
            raise BackendUnavailableError(f"onnxruntime has no {want[0]} here (available: "
                                          f"{ort.get_available_providers()}); install onnxruntime-gpu for CUDA")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=want)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise EngineFileError(f"{onnx_path}: ONNX Runtime cannot load it ({exc}); rebuild the engine") from None
        # ORT falls back to CPU silently when a provider fails to initialise: check what it really uses.
        if self.session.get_providers()[0] != want[0]:
            raise BackendUnavailableError(f"onnxruntime fell back to {self.session.get_providers()} instead of {want}")
        io = {i.name: i.type for i in self.session.get_inputs() + self.session.get_outputs()}
        if set(io) != {"sample", "timestep", "eps"} or [o.name for o in self.session.get_outputs()] != ["eps"]:
            raise EngineFileError(f"{onnx_path}: expected inputs sample, timestep and output eps, got "
                                  f"{[i.name for i in self.session.get_inputs()]} -> "
                                  f"{[o.name for o in self.session.get_outputs()]}")
        unknown = {name: t for name, t in io.items() if t not in _TORCH}
        if unknown:
            raise EngineFileError(f"{onnx_path}: I/O types {unknown} are not float or float16; rebuild the engine")
        self.io_dtypes = {name: _TORCH[t] for name, t in io.items()}

    def bind(self, sample, timestep, eps):
        check_bound(self, sample, timestep, eps)
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for name, tensor in (("sample", sample), ("timestep", timestep)):
            binding.bind_input(name, kind, index, _NP[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output("eps", kind, index, _NP[eps.dtype], tuple(eps.shape), eps.data_ptr())

        def run():
            self.session.run_with_iobinding(binding)

        return run
