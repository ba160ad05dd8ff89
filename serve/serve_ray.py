"""Ray Serve deployment of the same engine and protocol: replicas scale out over GPUs and nodes.

Each replica loads the engine directory (a path every node can read) and answers the Open Inference Protocol
(`oip`, the same code as the uvicorn service). With step-level batching (the default) each replica runs the
service's own `scheduler.StepScheduler`: requests join its running batch between U-Net steps. With request-level
batching it is Ray Serve's `@serve.batch`, sized in images (`batch_size_fn`), each batch split into groups of
equal sampling settings that run with per-request seeds (`batcher.run_group`). Either way a result never depends
on what it was batched with. Ray's proxy bounds the queue (`max_queued_requests`: 503 beyond it) and the request
time (`request_timeout_s`).
"""
from __future__ import annotations

import asyncio
import os
import time

from . import oip
from .batcher import run_group, split_groups
from .scheduler import StepScheduler


def _rows(jobs) -> int:
    return sum(job.rows for job in jobs)


def make_deployment(max_batch: int, batch_window_ms: float, batching: str = "step", step_rows: int | None = None):
    """The deployment class, its batching parameters fixed (decorators take them at definition time)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    def error(status: int, message: str) -> Response:
        return JSONResponse({"error": message}, status_code=status)

    class EngineDeployment:
        def __init__(self, directory: str, name: str, backend: str | None = None, threads: int | None = None,
                     max_body_bytes: int = 64 << 20, max_timesteps: int = 1000):
            from ddpm_engine.engine.api import load

            self.engine = load(directory, backend=backend, threads=threads)
            oip.check_servable(self.engine)
            self.name, self.max_body_bytes, self.max_timesteps = name, max_body_bytes, max_timesteps
            self.max_batch = min(max_batch, self.engine.max_batch)
            self.infer_batch.set_max_batch_size(self.max_batch)
            # Ray admits at most max_ongoing_requests (2 * max_batch) at once: the scheduler's queue never fills.
            self.scheduler = (StepScheduler(self.engine, max_queue=2 * max_batch, max_batch=self.max_batch,
                                            step_rows=step_rows) if batching == "step" else None)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_window_ms / 1e3, batch_size_fn=_rows)
        async def infer_batch(self, jobs: list) -> list:
            """Ray hands over up to max_batch images; equal settings share one engine call."""
            results = {}

            def run():
                for group in split_groups(jobs, self.max_batch):
                    for job, result in zip(group, run_group(self.engine, group)):
                        results[id(job)] = result

            await asyncio.to_thread(run)
            return [("ok", results[id(j)]) if not isinstance(results[id(j)], BaseException)
                    else ("error", results[id(j)]) for j in jobs]

        async def __call__(self, request: Request) -> Response:
            parts = request.url.path.rstrip("/").split("/")[1:]  # v2 / models / NAME [/versions/V] [/ready|infer]
            if parts == ["v2"]:
                return JSONResponse(oip.server_metadata())
            if parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
                return JSONResponse({parts[-1]: True})
            if len(parts) < 3 or parts[:2] != ["v2", "models"]:
                return error(404, f"{request.method} {request.url.path}: Not Found")
            name, rest = parts[2], parts[3:]
            if name != self.name:
                return error(404, f"unknown model {name!r}; this server serves {self.name!r}")
            if rest[:1] == ["versions"]:
                if rest[1:2] != [oip.VERSION]:
                    return error(404, f"model {name!r} has no version {rest[1:2]}; versions: [{oip.VERSION!r}]")
                rest = rest[2:]
            if rest == [] and request.method == "GET":
                return JSONResponse(oip.model_metadata(self.engine, self.name))
            if rest == ["ready"] and request.method == "GET":
                return JSONResponse({"name": self.name, "ready": True})
            if rest != ["infer"] or request.method != "POST":
                return error(404 if rest not in ([], ["ready"], ["infer"]) else 405,
                             f"{request.method} {request.url.path}: not supported")
            return await self._infer(request)

        async def _infer(self, request: Request) -> Response:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return error(413, f"request body of {length} bytes exceeds the limit of {self.max_body_bytes}")
            body = await request.body()
            if len(body) > self.max_body_bytes:
                return error(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
            try:
                job, options = oip.parse_infer(body, request.headers.get(oip.HEADER_LENGTH), self.engine,
                                               self.max_timesteps)
            except oip.ProtocolError as exc:
                return error(exc.status, exc.message)
            if self.scheduler is not None:
                try:
                    # Cancelled with the request (client gone): the scheduler frees its slot at the next step.
                    outcome = ("ok", await asyncio.wrap_future(self.scheduler.submit(job)))
                except Exception as exc:  # noqa: BLE001 - this request's 400/500, as in the request-level path
                    outcome = ("error", exc)
            elif job.rows > self.max_batch:  # larger than a Ray batch: one call of its own (split by Engine.sample)
                outcome = await asyncio.to_thread(lambda: run_group(self.engine, [job])[0])
                outcome = ("error", outcome) if isinstance(outcome, BaseException) else ("ok", outcome)
            else:
                outcome = await self.infer_batch(job)
            kind, value = outcome
            if kind == "error":
                status = 400 if isinstance(value, ValueError) else 500
                return error(status, str(value) if status == 400 else
                             f"sampling failed: {type(value).__name__}: {value}")
            body, headers = oip.infer_response(value, self.name, options, job.seed)
            return Response(body, headers=headers)

    return EngineDeployment


def start(directory, host: str = "127.0.0.1", port: int = 8000, name: str = "model", backend: str | None = None,
          threads: int | None = None, replicas: int = 1, max_queue: int = 64, max_batch: int | None = None,
          batch_window_ms: float = 5.0, timeout_s: float = 60.0, max_body_bytes: int = 64 << 20,
          max_timesteps: int = 1000, num_cpus: int | None = None, batching: str = "step",
          step_rows: int | None = None):
    """Start (or join, with RAY_ADDRESS) a Ray cluster and run the deployment; returns its DeploymentHandle.

    Local clusters bind to 127.0.0.1 with no dashboard; usage reporting is off (RAY_USAGE_STATS_ENABLED=0).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from ddpm_engine.export import read_manifest

    manifest = read_manifest(directory)
    built_max = int(manifest["profile"]["batch"]["max"])
    max_batch = min(max_batch or built_max, built_max)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": timeout_s})
    gpus = 1 if manifest["backend"] == "tensorrt" else 0
    deployment = serve.deployment(
        make_deployment(max_batch, batch_window_ms, batching, step_rows), name=name, num_replicas=replicas,
        max_ongoing_requests=2 * max_batch, max_queued_requests=max_queue,
        ray_actor_options={"num_cpus": 1 if threads is None else threads, "num_gpus": gpus})
    app = deployment.bind(str(os.path.abspath(directory)), name, backend, threads, max_body_bytes, max_timesteps)
    return serve.run(app, name=name, route_prefix="/")


def stop() -> None:
    """Shut Serve and the local Ray cluster down."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def serve_ray(directory, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """`ddpm-engine serve --ray`: run until SIGINT/SIGTERM, then shut Serve and Ray down."""
    import json
    import signal

    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("--ray needs Ray Serve: pip install 'ddpm-engine[ray]'") from None
    stopping = []
    try:
        start(directory, host=host, port=port, **kwargs)
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))  # after ray.init, which sets its own
        print(json.dumps({"serving": kwargs.get("name"), "url": f"http://{host}:{port}/v2/models/{kwargs.get('name')}",
                          "ray": True, "replicas": kwargs.get("replicas", 1)}), flush=True)
        while not stopping:
            time.sleep(0.2)
    finally:
        stop()
