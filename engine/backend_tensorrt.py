"""TensorRT 11 backend: a deserialised plan run with execute_async_v3 on torch's current CUDA stream."""
from __future__ import annotations

import torch

from .backends import require
from .errors import BackendUnavailableError, EngineFileError


def error_logger(trt):
    """A trt.ILogger that keeps error messages for our exceptions (the API itself only returns None/False)."""
    severe = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)

    class ErrorLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in severe:
                self.errors.append(msg)

    return ErrorLogger()


class TensorRTBackend:
    """One engine, one execution context per bound buffer set (shapes and addresses set once, then frozen)."""

    name = "tensorrt"
    capturable = True

    def __init__(self, plan_path, device="cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailableError("the tensorrt backend needs an NVIDIA GPU with CUDA; none is visible")
        trt = require("tensorrt")
        self._trt = trt
        self.device = torch.device(device)
        self._log = error_logger(trt)
        self.runtime = trt.Runtime(self._log)
        with open(plan_path, "rb") as f:
            plan = f.read()
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:  # incompatible TensorRT version or GPU architecture, or a corrupt plan
            raise EngineFileError(f"{plan_path}: TensorRT {trt.__version__} cannot deserialise this plan "
                                  f"({'; '.join(self._log.errors) or 'no reason given'}); rebuild it on this "
                                  "machine with `ddpm-engine build --backend tensorrt`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != ["eps", "sample", "timestep"]:
            raise EngineFileError(f"{plan_path}: expected tensors sample, timestep, eps; got {names}")
        to_torch = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                    trt.DataType.BF16: torch.bfloat16}
        self.dtype = to_torch[self.engine.get_tensor_dtype("sample")]

    def bind(self, sample, timestep, eps):
        context = self.engine.create_execution_context()
        context.set_input_shape("sample", tuple(sample.shape))
        context.set_input_shape("timestep", tuple(timestep.shape))
        for name, tensor in (("sample", sample), ("timestep", timestep), ("eps", eps)):
            context.set_tensor_address(name, tensor.data_ptr())
        missing = context.infer_shapes()
        if missing:
            raise EngineFileError(f"TensorRT could not infer shapes for {missing} at sample shape {tuple(sample.shape)}")

        def run():
            # torch's current stream: inside a CUDA graph capture this is the capturing stream.
            if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed: {'; '.join(self._log.errors)}")

        run.context = context  # keep the context alive as long as the binding
        return run
