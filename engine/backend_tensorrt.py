"""TensorRT backend: a deserialised plan run with execute_async_v3 on torch's current stream (the Runner's own)."""
from __future__ import annotations

import torch

from .backends import IO_NAMES, check_bound
from .errors import BackendUnavailableError, EngineFileError


class TensorRTBackend:
    """One engine, one execution context per bound buffer set (shapes and addresses set once, then frozen)."""

    name = "tensorrt"
    capturable = True

    def __init__(self, plan_path, device="cuda"):
        from ddpm_engine.export.tensorrt_build import deserialize_plan, logger, require_tensorrt

        if not torch.cuda.is_available():
            raise BackendUnavailableError("the tensorrt backend needs an NVIDIA GPU with CUDA; none is visible")
        trt = require_tensorrt()
        self.device = torch.device(device)
        self._log = logger()
        self.runtime, self.engine = deserialize_plan(plan_path)  # the runtime must outlive the engine
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != ["eps", "sample", "timestep"]:
            raise EngineFileError(f"{plan_path}: expected tensors sample, timestep, eps; got {names}")
        to_torch = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                    trt.DataType.BF16: torch.bfloat16}
        declared = {name: self.engine.get_tensor_dtype(name) for name in IO_NAMES}
        unknown = {name: str(t) for name, t in declared.items() if t not in to_torch}
        if unknown:
            raise EngineFileError(f"{plan_path}: I/O types {unknown} are not fp32, fp16 or bf16; rebuild the engine")
        self.io_dtypes = {name: to_torch[t] for name, t in declared.items()}

    def bind(self, sample, timestep, eps):
        check_bound(self, sample, timestep, eps)
        context = self.engine.create_execution_context()
        context.set_input_shape("sample", tuple(sample.shape))
        context.set_input_shape("timestep", tuple(timestep.shape))
        for name, tensor in (("sample", sample), ("timestep", timestep), ("eps", eps)):
            context.set_tensor_address(name, tensor.data_ptr())
        missing = context.infer_shapes()
        if missing:
            raise EngineFileError(f"TensorRT could not infer shapes for {missing} at sample shape {tuple(sample.shape)}")

        def run():
            # torch's current stream: the Runner's own stream, or the capturing stream inside a CUDA graph capture.
            mark = self._log.mark()
            if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed: {self._log.errors_since(mark)}")

        run.context = context  # keep the context alive as long as the binding
        return run
