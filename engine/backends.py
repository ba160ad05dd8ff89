"""U-Net backends behind one small interface: bind preallocated buffers once, then run in place."""
from __future__ import annotations

import importlib
from typing import Callable, Protocol

import torch

from .errors import BackendUnavailableError

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
IO_NAMES = ("sample", "timestep", "eps")  # the U-Net's inputs and output, in bind() order
# Where each backend's library comes from, for the error that says what to install.
_EXTRAS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino"),
           "tensorrt": ("tensorrt", "tensorrt")}


class Backend(Protocol):
    """Runs eps = unet(sample, timestep) on buffers the Runner owns (TensorRT's bind/execute vocabulary)."""

    name: str
    device: torch.device
    io_dtypes: dict[str, torch.dtype]  # per IO_NAMES, as the artefact declares them: the Runner allocates these
    capturable: bool  # whether a bound call can be recorded in a CUDA graph (no host sync inside)

    def bind(self, sample: torch.Tensor, timestep: torch.Tensor, eps: torch.Tensor) -> Callable[[], None]:
        """Bind one buffer set ([B, C_in, H, W], [B], [B, C_out, H, W]); the returned call writes eps in place."""


def check_bound(backend: Backend, sample: torch.Tensor, timestep: torch.Tensor, eps: torch.Tensor) -> None:
    """Refuse a buffer whose dtype or device is not what the artefact declares: the runtime would read its bits as
    another type (fp32 timesteps read as fp16) or another device's memory."""
    for name, tensor in zip(IO_NAMES, (sample, timestep, eps)):
        want = backend.io_dtypes[name]
        if tensor.dtype != want or tensor.device != backend.device:
            raise ValueError(f"{backend.name} backend: buffer {name!r} is {tensor.dtype} on {tensor.device}, but the "
                             f"artefact declares {want} on {backend.device}")


def check_backend(name: str) -> str:
    """Return the backend name or raise a ValueError listing the allowed ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; must be one of {list(BACKENDS)}")
    return name


def require(module: str):
    """Import an optional backend library, or raise BackendUnavailableError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = next((e for m, e in _EXTRAS.values() if m == module), module)
        raise BackendUnavailableError(
            f"{module} is not installed ({exc}); install it with: pip install 'ddpm-engine[{extra}]'") from None


def is_available(name: str) -> bool:
    """Whether the backend's library (and, for TensorRT, a CUDA device) is present here."""
    check_backend(name)
    if name == "torch":
        return True
    if name == "tensorrt" and not torch.cuda.is_available():
        return False
    return importlib.util.find_spec(_EXTRAS[name][0]) is not None


class TorchBackend:
    """Eager (or torch.compile'd) PyTorch; the weights from the engine directory, on CPU or CUDA."""

    name = "torch"
    capturable = True

    def __init__(self, model: torch.nn.Module, device="cpu", dtype=torch.float32, compile: bool = False):
        self.device = torch.device(device)
        self.io_dtypes = {"sample": dtype, "timestep": dtype, "eps": dtype}
        self.model = model.to(self.device, dtype).eval()
        self._forward = torch.compile(self.model, dynamic=False) if compile else self.model

    def bind(self, sample, timestep, eps):
        check_bound(self, sample, timestep, eps)

        @torch.no_grad()
        def run():
            eps.copy_(self._forward(sample, timestep))

        return run
