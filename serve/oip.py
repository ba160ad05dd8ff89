"""The Open Inference Protocol (KServe v2 REST) for one engine: metadata, infer request parsing, responses.

Framework-free (bytes and dicts in, bytes and dicts out) so that the Starlette service and the Ray Serve
deployment speak exactly the same protocol, including the binary tensor data extension: with the
`Inference-Header-Content-Length: N` header the first N bytes of the body are the JSON header and the rest
are the raw little-endian tensors of the inputs that declare `parameters.binary_data_size`, in order.
"""
from __future__ import annotations

import json
import math

import numpy as np

from .batcher import Job
from ddpm_engine.engine.samplers import SAMPLERS

HEADER_LENGTH = "inference-header-content-length"
INPUTS = ("background", "mask", "x_init")
OUTPUT = "sample"
VERSION = "1"
DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "FP64": np.dtype("<f8")}
# Request parameters this model takes, with their defaults (also listed in the model metadata).
PARAMETERS = {"timesteps": 300, "sampler": "ddpm", "seed": 0, "t_start": 1.0, "t_end": 0.0, "eta": 0.0}
# tritonclient's own request parameters: accepted, and ignored (the server's --timeout-s is every request's
# deadline; the scheduler orders requests itself).
IGNORED = ("timeout", "priority")
ACCEPTED = (*PARAMETERS, "binary_data_output", *IGNORED)


class ProtocolError(Exception):
    """A request the service refuses: HTTP status + a message naming the problem."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def server_metadata() -> dict:
    from importlib import metadata

    try:
        version = metadata.version("ddpm-engine")
    except metadata.PackageNotFoundError:
        version = "0"
    return {"name": "ddpm-engine", "version": version, "extensions": ["binary_tensor_data"]}


def check_servable(engine) -> None:
    """Raise EngineError for engines the protocol cannot drive yet: diffusers models (no background, integer time)."""
    from ddpm_engine.engine.diffusers_schedule import DiffusersSchedule
    from ddpm_engine.engine.errors import EngineError

    if isinstance(engine.schedule, DiffusersSchedule):
        raise EngineError("serving a diffusers engine is not supported yet (requests carry a background and the "
                          "seed's t_start/t_end); sample it with engine.sample or `ddpm-engine sample`")


def model_metadata(engine, name: str) -> dict:
    c_bg = engine.c_in - engine.c_out
    size = engine.size_range
    return {
        "name": name, "versions": [VERSION], "platform": f"ddpm-engine/{engine.backend}",
        "inputs": [
            {"name": "background", "datatype": "FP32", "shape": [-1, c_bg, -1, -1]},
            {"name": "mask", "datatype": "FP32", "shape": [-1, -1, -1, -1], "optional": True},
            {"name": "x_init", "datatype": "FP32", "shape": [-1, engine.c_out, -1, -1], "optional": True},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, engine.c_out, -1, -1]}],
        "parameters": {"max_batch": engine.max_batch, "min_size": list(size[0]) if size else None,
                       "max_size": list(size[1]) if size else None,
                       "request_parameters": {"timesteps": "int (default 300)", "sampler": " | ".join(SAMPLERS),
                                              "seed": "int (default 0)", "t_start": "float (default 1.0)",
                                              "t_end": "float (default 0.0)", "eta": "float (default 0.0, ddim)",
                                              "binary_data_output": "bool (default false)",
                                              "timeout": "ignored", "priority": "ignored"}},
    }


def _split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(400, f"Inference-Header-Content-Length must be an integer, got {header_length!r}") \
                from None
        if not 0 < n <= len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
        json_part, binary = body[:n], memoryview(body)[n:]
    try:
        header = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(400, "request body must be a JSON object with an 'inputs' list")
    return header, binary


def _tensor(spec, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    """One input spec -> (name, float32 array, new binary offset)."""
    if not isinstance(spec, dict):
        raise ProtocolError(400, "each input must be a JSON object with name, shape, datatype and data")
    name = spec.get("name")
    if name not in INPUTS:
        raise ProtocolError(400, f"unknown input {name!r}; this model takes {list(INPUTS)}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                              for s in shape) or len(shape) not in (3, 4):
        raise ProtocolError(400, f"input {name!r}: shape must be 3 or 4 positive integers [B, C, H, W], "
                                 f"got {shape!r}")
    datatype = spec.get("datatype")
    if datatype not in DTYPES:
        raise ProtocolError(400, f"input {name!r}: datatype must be one of {list(DTYPES)}, got {datatype!r}")
    dtype, count = DTYPES[datatype], math.prod(shape)
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, f"input {name!r}: parameters must be a JSON object")
    _check_keys(f"of input {name!r}", params, ("binary_data_size",))
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
            raise ProtocolError(400, f"input {name!r}: binary_data_size {size!r} does not match shape {shape} "
                                     f"of {datatype} ({count * dtype.itemsize} bytes)")
        if offset + size > len(binary):
            raise ProtocolError(400, f"input {name!r}: the body holds {len(binary) - offset} binary bytes, "
                                     f"{size} declared")
        array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
        offset += size
    else:
        data = spec.get("data")
        if data is None:
            raise ProtocolError(400, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        try:
            array = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError):
            raise ProtocolError(400, f"input {name!r}: data must be a (flat or nested) list of numbers") from None
        if array.size != count:
            raise ProtocolError(400, f"input {name!r}: data has {array.size} values, shape {shape} needs {count}")
        array = array.reshape(shape)
    array = array.astype(np.float32)  # a copy: owns its memory, not a view of the request body
    if array.ndim == 3:
        array = array[None]
    if not np.isfinite(array).all():
        raise ProtocolError(400, f"input {name!r} contains NaN or inf")
    return name, array, offset


def _check_keys(where: str, params: dict, accepted) -> None:
    """400 for a key the server would otherwise silently ignore (a typo like 'seeed' must not run with seed 0)."""
    unknown = [k for k in params if k not in accepted]
    if unknown:
        raise ProtocolError(400, f"unknown parameter {unknown[0]!r} {where}; accepted: {list(accepted)}")


def _parameter(params: dict, name: str):
    """A request parameter as the type of its default: JSON's 4.0 is the integer 4, but 4.5 and true are refused."""
    default = PARAMETERS[name]
    value = params.get(name, default)
    want = type(default)
    if isinstance(value, bool):
        ok = False
    elif want is int:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    elif want is float:
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ProtocolError(400, f"parameter {name!r} must be {want.__name__}, got {value!r}")
    return want(value)


def _flag(params: dict, name: str, default: bool) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):  # bool("false") is True: a string would silently mean the opposite
        raise ProtocolError(400, f"parameter {name!r} must be a JSON boolean (true or false), got {value!r}")
    return value


def parse_infer(body: bytes, header_length: str | None, engine, max_timesteps: int = 1000) -> tuple[Job, dict]:
    """An infer request body -> (validated Job, response options {id, binary}); ProtocolError(400) when wrong."""
    return _parse_request(*_split_body(body, header_length), engine, max_timesteps)


def _parse_request(header: dict, binary: memoryview, engine, max_timesteps: int) -> tuple[Job, dict]:
    """A decoded infer header and its binary tensor data -> (validated Job, response options)."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, "request must have a non-empty 'inputs' list (background, optional mask, x_init)")
    arrays, offset = {}, 0
    for spec in inputs:
        name, array, offset = _tensor(spec, binary, offset)
        if name in arrays:
            raise ProtocolError(400, f"input {name!r} given twice")
        arrays[name] = array
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} binary bytes after the declared inputs")
    if "background" not in arrays:
        raise ProtocolError(400, "input 'background' is required")
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, "request parameters must be a JSON object")
    _check_keys("in the request", params, ACCEPTED)
    job = Job(arrays["background"], mask=arrays.get("mask"), x_init=arrays.get("x_init"),
              **{name: _parameter(params, name) for name in PARAMETERS})
    if not 1 <= job.timesteps <= max_timesteps:
        raise ProtocolError(400, f"parameter 'timesteps' must be in [1, {max_timesteps}] on this server, "
                                 f"got {job.timesteps}")
    validate(engine, job)
    binary_out = _flag(params, "binary_data_output", False)
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise ProtocolError(400, "'outputs' must be a list of JSON objects")
        for out in outputs:
            if out.get("name") != OUTPUT:
                raise ProtocolError(400, f"unknown output {out.get('name')!r}; this model has [{OUTPUT!r}]")
            out_params = out.get("parameters") or {}
            if not isinstance(out_params, dict):
                raise ProtocolError(400, f"output {OUTPUT!r}: parameters must be a JSON object")
            _check_keys(f"of output {OUTPUT!r}", out_params, ("binary_data",))
            binary_out = _flag(out_params, "binary_data", binary_out)
    request_id = header.get("id")
    return job, {"id": request_id if isinstance(request_id, str) else None, "binary": binary_out}


def parse_generate(body: bytes, engine, max_timesteps: int = 1000) -> tuple[Job, dict]:
    """A generate_stream body (Triton's generate extension: a JSON object with the inputs as nested lists by name,
    `parameters` as for infer plus `preview_every`, default 10) -> (validated Job with preview_every, options)."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(400, f"request body is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError(400, "request must be a JSON object with the inputs by name and optional 'parameters'")
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, "request parameters must be a JSON object")
    every = params.get("preview_every", 10)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every != int(every) or every < 1:
        raise ProtocolError(400, f"parameter 'preview_every' must be an integer >= 1, got {every!r}")
    unknown = [k for k in request if k not in (*INPUTS, "id", "parameters")]
    if unknown:
        raise ProtocolError(400, f"unknown key {unknown[0]!r}; a generate request has the inputs {list(INPUTS)}, "
                                 "'id' and 'parameters'")
    inputs = []
    for name in INPUTS:
        if name in request:
            try:
                array = np.asarray(request[name], dtype=np.float32)
            except (TypeError, ValueError):
                raise ProtocolError(400, f"input {name!r} must be a nested list of numbers") from None
            inputs.append({"name": name, "shape": list(array.shape), "datatype": "FP32",
                           "data": array.ravel().tolist()})
    header = {"inputs": inputs, "parameters": {k: v for k, v in params.items() if k != "preview_every"}}
    job, options = _parse_request(header, memoryview(b""), engine, max_timesteps)
    job.preview_every = int(every)
    request_id = request.get("id")
    return job, {"id": request_id if isinstance(request_id, str) else None}


def stream_event(name: str, options: dict, step: int, steps: int, output: str, array: np.ndarray) -> bytes:
    """One server-sent event of generate_stream: the model, the steps done of `steps`, `output` as a nested list."""
    event = {"model_name": name, "model_version": VERSION, "step": step, "steps": steps, output: array.tolist()}
    if options.get("id") is not None:
        event["id"] = options["id"]
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def validate(engine, job: Job) -> None:
    """Everything Engine.sample would refuse, checked before the job can share a batch (ProtocolError 400)."""
    import torch

    from ddpm_engine.engine.samplers import step_table
    from ddpm_engine.engine.validation import check_sample_inputs, check_seed

    bg = job.background
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    try:
        engine.check_background(t(bg))
        rows = bg.shape[0] if job.x_init is None else job.x_init.shape[0]
        check_sample_inputs(t(bg), (rows, engine.c_out) + bg.shape[2:], t(job.mask), t(job.x_init))
        step_table(engine.schedule, job.sampler, job.timesteps, job.t_start, job.t_end, eta=job.eta)
        check_seed(job.seed)
    except ValueError as exc:
        raise ProtocolError(400, str(exc)) from None


def infer_response(result: np.ndarray, name: str, options: dict, seed: int) -> tuple[bytes, dict]:
    """(body, headers) for a result, JSON or with the binary extension as the request asked."""
    result = np.ascontiguousarray(result, dtype="<f4")
    out = {"name": OUTPUT, "datatype": "FP32", "shape": list(result.shape)}
    reply = {"model_name": name, "model_version": VERSION, "parameters": {"seed": seed}, "outputs": [out]}
    if options.get("id") is not None:
        reply["id"] = options["id"]
    if options.get("binary"):
        raw = result.tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps(reply).encode()
        return head + raw, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    out["data"] = result.ravel().tolist()
    return json.dumps(reply).encode(), {"content-type": "application/json"}
