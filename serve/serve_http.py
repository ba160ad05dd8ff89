"""The HTTP service: Open Inference Protocol (KServe v2 REST) on Starlette + uvicorn, with step-level batching
(scheduler.StepScheduler, the default) or whole-request batching (batcher.Batcher).

Endpoints: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/1][/ready], /metrics
(Prometheus text), POST /v2/models/{name}[/versions/1]/infer. Every refusal is JSON `{"error": "..."}` with a
4xx/5xx status naming the problem; a full queue answers 503 with Retry-After instead of growing.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import oip
from .batcher import Batcher, QueueFull, RequestTimeout, ShuttingDown
from .scheduler import StepScheduler

BATCHING = ("step", "request")  # requests join the batch between steps | whole requests share one sampling call

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Service:
    """One engine behind the protocol: the batcher, the metrics and the Starlette app (`.app`)."""

    def __init__(self, engine, name: str, max_queue: int = 64, max_batch: int | None = None,
                 batch_window_ms: float = 5.0, timeout_s: float = 60.0, max_body_bytes: int = 64 << 20,
                 read_timeout_s: float = 10.0, max_timesteps: int = 1000, drain_timeout_s: float = 30.0,
                 batching: str = "step", step_rows: int | None = None):
        oip.check_servable(engine)
        self.engine, self.name, self.timeout_s = engine, name, timeout_s
        self.max_body_bytes, self.read_timeout_s, self.max_timesteps = max_body_bytes, read_timeout_s, max_timesteps
        self.drain_timeout_s, self.draining, self._closer = drain_timeout_s, False, None
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ddpm_engine_requests", "Infer requests by HTTP status", ["code"], registry=r)
        self.latency = Histogram("ddpm_engine_request_seconds", "Infer latency (body read to response)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_seconds = Histogram("ddpm_engine_batch_seconds", "Duration of one engine call (one step with "
                                       "step-level batching)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        if batching == "step":
            self.batcher = StepScheduler(engine, max_queue=max_queue, max_batch=max_batch, step_rows=step_rows,
                                         on_batch=self._on_batch)
        elif batching == "request":
            if step_rows is not None:
                raise ValueError("step rows apply to step-level batching (--batching step), not --batching request")
            self.batcher = Batcher(engine, max_queue=max_queue, max_batch=max_batch,
                                   window_s=batch_window_ms / 1e3, on_batch=self._on_batch)
        else:
            raise ValueError(f"unknown batching {batching!r}; must be one of {list(BATCHING)}")
        buckets = tuple(float(b) for b in range(1, self.batcher.max_batch + 1))
        self.batch_rows = Histogram("ddpm_engine_batch_rows", "Rows (images) per engine call", buckets=buckets,
                                    registry=r)
        Gauge("ddpm_engine_queue_depth", "Requests waiting for the engine", registry=r).set_function(
            lambda: self.batcher.depth)
        self.step_rows = Gauge("ddpm_engine_step_rows", "Most images per U-Net step, measured per image size "
                               "(step-level batching)", ["size"], registry=r)
        self.inflight = Gauge("ddpm_engine_inflight_requests", "Infer requests being handled", registry=r)
        model = [Route("/v2/models/{model}" + v + p, f, methods=[m])
                 for v in ("", "/versions/{version}")
                 for p, f, m in (("", self.model_metadata, "GET"), ("/ready", self.model_ready, "GET"),
                                 ("/infer", self.infer, "POST"), ("/generate_stream", self.generate_stream, "POST"))]
        routes = [Route("/v2", self.server_metadata), Route("/v2/health/live", self.live),
                  Route("/v2/health/ready", self.ready), Route("/metrics", self.metrics), *model]
        self.app = Starlette(routes=routes, lifespan=self._lifespan,
                             exception_handlers={HTTPException: self._http_error})
        self.app.state.service = self

    def _on_batch(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)
        for (h, w), (step_rows, _) in getattr(self.batcher, "measured", {}).items():
            self.step_rows.labels(size=f"{h}x{w}").set(step_rows)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        yield
        self.begin_shutdown()
        await asyncio.to_thread(self._closer.join)

    def begin_shutdown(self) -> None:
        """Stop taking work (readiness and new infers: 503); queued requests run for up to drain_timeout_s,
        then whatever is still queued is answered 503. Call on SIGTERM, before the server stops."""
        self.draining = True
        if self._closer is None:
            self._closer = threading.Thread(target=self.batcher.close, args=(self.drain_timeout_s,),
                                            name="ddpm-engine-drain", daemon=True)
            self._closer.start()

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    # -- health and metadata ---------------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(oip.server_metadata())

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ok = not (self.draining or self.batcher.closed)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def _check_model(self, request: Request) -> Response | None:
        model, version = request.path_params["model"], request.path_params.get("version", oip.VERSION)
        if model != self.name:
            return error(404, f"unknown model {model!r}; this server serves {self.name!r}")
        if version != oip.VERSION:
            return error(404, f"model {model!r} has no version {version!r}; versions: [{oip.VERSION!r}]")
        return None

    async def model_metadata(self, request: Request) -> Response:
        return self._check_model(request) or JSONResponse(oip.model_metadata(self.engine, self.name))

    async def model_ready(self, request: Request) -> Response:
        ok = not (self.draining or self.batcher.closed)
        return self._check_model(request) or JSONResponse({"name": self.name, "ready": ok},
                                                          status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # -- infer -----------------------------------------------------------------------------------

    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise oip.ProtocolError(413 if length.isdigit() else 400,
                                    f"request body of {length} bytes exceeds the limit of {self.max_body_bytes}"
                                    if length.isdigit() else f"bad Content-Length {length!r}")
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise oip.ProtocolError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.read_timeout_s)
        except asyncio.TimeoutError:
            raise oip.ProtocolError(408, f"request body not received within {self.read_timeout_s:g} s") from None
        return b"".join(chunks)

    async def _wait(self, request: Request, future, timeout: float):
        """The job's result, or None when the client went away; cancels the job on disconnect or timeout."""
        result = asyncio.wrap_future(future)

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({result, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not result.done():
                result.cancel()  # timed out, client gone or server cancelling: a job not started is dropped
        if result in done:
            return result.result()
        if watch in done:
            return None
        raise RequestTimeout(f"no result within the {self.timeout_s:g} s timeout")

    async def infer(self, request: Request) -> Response:
        start = time.perf_counter()
        self.inflight.inc()
        try:
            response = await self._infer(request)
        finally:
            self.inflight.dec()
        self.requests.labels(str(response.status_code)).inc()
        if response.status_code == 200:
            self.latency.observe(time.perf_counter() - start)
        return response

    async def _infer(self, request: Request) -> Response:
        bad = self._check_model(request)
        if bad is not None:
            return bad
        if self.draining or self.batcher.closed:
            return error(503, "the service is shutting down", {"Retry-After": "5"})
        deadline = time.monotonic() + self.timeout_s
        try:
            body = await self._read_body(request)
            header_length = request.headers.get(oip.HEADER_LENGTH)
            if request.headers.get("content-encoding", "identity") != "identity":
                raise oip.ProtocolError(415, f"Content-Encoding {request.headers['content-encoding']!r} is not "
                                             "supported; send the body uncompressed")
            parse = lambda: oip.parse_infer(body, header_length, self.engine, self.max_timesteps)  # noqa: E731
            job, options = parse() if len(body) < 1 << 20 else await asyncio.to_thread(parse)
            job.deadline = deadline
            future = self.batcher.submit(job)
            result = await self._wait(request, future, deadline - time.monotonic())
        except (oip.ProtocolError, QueueFull, ShuttingDown, ValueError) as exc:
            return refusal(exc)
        except RequestTimeout as exc:
            return error(504, str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed engine call is this request's 500, not the server's
            return error(500, f"sampling failed: {type(exc).__name__}: {exc}")
        if result is None:
            return Response(status_code=499)  # the client is gone; nothing will read this
        reply = lambda: oip.infer_response(result, self.name, options, job.seed)  # noqa: E731
        body, headers = reply() if result.size < 1 << 16 else await asyncio.to_thread(reply)  # big JSON: off the loop
        return Response(body, headers=headers)

    async def generate_stream(self, request: Request) -> Response:
        """Server-sent events: the x0 preview every `preview_every` steps, then the sample (step-level batching)."""
        bad = self._check_model(request)
        if bad is not None:
            return bad
        if self.draining or self.batcher.closed:
            return error(503, "the service is shutting down", {"Retry-After": "5"})
        if not isinstance(self.batcher, StepScheduler):
            return error(400, "previews need step-level batching; this server runs --batching request")
        deadline, loop, previews = time.monotonic() + self.timeout_s, asyncio.get_running_loop(), asyncio.Queue()
        try:
            body = await self._read_body(request)
            job, options = oip.parse_generate(body, self.engine, self.max_timesteps)
            job.deadline = deadline
            job.on_preview = lambda step, x0: loop.call_soon_threadsafe(previews.put_nowait, (step, x0))
            future = self.batcher.submit(job)
        except (oip.ProtocolError, QueueFull, ShuttingDown, ValueError) as exc:
            return refusal(exc)
        self.requests.labels("200").inc()
        event = lambda step, output, array: oip.stream_event(  # noqa: E731
            self.name, options, step, job.timesteps, output, array)

        async def events():
            result = asyncio.wrap_future(future)
            try:
                while True:
                    preview = asyncio.ensure_future(previews.get())
                    done, _ = await asyncio.wait({preview, result}, timeout=max(0.0, deadline - time.monotonic()),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if preview in done:
                        step, x0 = preview.result()
                        yield event(step, "x0_preview", x0)
                        continue
                    preview.cancel()
                    while not previews.empty():  # previews queued before the result was set
                        step, x0 = previews.get_nowait()
                        yield event(step, "x0_preview", x0)
                    if result in done and not result.cancelled() and result.exception() is None:
                        yield event(job.timesteps, oip.OUTPUT, result.result())
                    else:
                        failure = (result.exception() if result in done and not result.cancelled()
                                   else f"no result within the {self.timeout_s:g} s timeout")
                        yield b"data: " + json.dumps({"error": str(failure)}).encode() + b"\n\n"
                    return
            finally:
                if not future.done():
                    future.cancel()  # the client went away: its slot is freed at the next step

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def refusal(exc: Exception) -> Response:
    """The response to a request refused before it ran: the protocol's status, 503 with Retry-After when the
    queue is full or the service stopping, 400 for inputs the engine refuses (ValueError)."""
    if isinstance(exc, oip.ProtocolError):
        return error(exc.status, exc.message, exc.headers)
    if isinstance(exc, QueueFull):
        return error(503, f"server busy: {exc}", {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, ShuttingDown):
        return error(503, str(exc), {"Retry-After": "5"})
    return error(400, str(exc))


def model_name(directory) -> str:
    """The default served name: the engine directory's name."""
    from pathlib import Path

    return Path(directory).resolve().name


def _request_head_deadline(seconds: float):
    """uvicorn's HTTP protocol, closing a connection that sends no complete request head within `seconds` of
    opening or of its last response: uvicorn itself waits forever for a first request, so idle or slow sockets
    would pile up for as long as their clients keep them open."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # uvicorn without httptools speaks h11
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class Protocol(base):
        _head_deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc):
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self):
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(seconds, self._head_overdue)

        def _head_overdue(self):
            self._head_deadline = None
            if self.cycle is None or self.cycle.response_complete:  # no request is being read or answered
                self.timeout_keep_alive_handler()  # uvicorn's own close of an idle connection

    return Protocol


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """The uvicorn server for a service: SIGTERM/SIGINT drain it (a drained SIGTERM exits 0), idle connections
    time out after read_timeout_s, and overload is the queue's JSON 503 with Retry-After.

    No limit_concurrency: uvicorn counts idle connections against it and answers everything beyond it, health
    checks included, with a bare text 503 without Retry-After, so a few idle sockets could lock everyone out.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.begin_shutdown()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                # uvicorn re-raises a caught signal after its shutdown (status 143); a drained stop is a success.
                self._captured_signals.remove(sig)

    config = uvicorn.Config(service.app, host=host, port=port, log_level=log_level, lifespan="on",
                            http=_request_head_deadline(service.read_timeout_s),
                            timeout_graceful_shutdown=int(max(service.timeout_s, service.drain_timeout_s)) + 5)
    return Server(config)


def serve(directory, host: str = "127.0.0.1", port: int = 8000, name: str | None = None, backend: str | None = None,
          threads: int | None = None, log_level: str = "info", batching: str = "step", **service_kwargs) -> None:
    """Load an engine directory and serve it until SIGINT/SIGTERM (then drain: finish or reject the queue)."""
    from ddpm_engine.engine.api import load

    engine = load(directory, backend=backend, threads=threads)
    service = Service(engine, name or model_name(directory), batching=batching, **service_kwargs)
    server = make_server(service, host, port, log_level)
    print(json.dumps({"serving": service.name, "url": f"http://{host}:{port}/v2/models/{service.name}",
                      "backend": engine.backend, "max_batch": service.batcher.max_batch, "batching": batching}),
          flush=True)
    server.run()
