"""`ddpm-engine serve`: the Open Inference Protocol over HTTP (uvicorn), or a Ray Serve deployment (--ray)."""
from __future__ import annotations

import argparse

from ddpm_engine.engine.backends import BACKENDS


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def register(subparsers) -> None:
    """Add the `serve` subcommand."""
    p = subparsers.add_parser(
        "serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="serve an engine over HTTP (KServe v2 / Open Inference Protocol)",
        description="Serve an engine directory over HTTP with the Open Inference Protocol (KServe v2 REST, binary "
        "tensor extension): POST /v2/models/NAME/infer with inputs background [B, C_bg, H, W], optional mask and "
        "x_init, and parameters timesteps, sampler, seed, t_start, t_end, eta (others are refused with a 400; "
        "tritonclient's timeout and priority are ignored). Requests share U-Net calls step by step (any settings, "
        "same image size), or whole requests with the same settings share one sampling call (--batching request); "
        "each result equals a direct Engine.sample with the request's own seed. Stop with "
        "Ctrl-C / SIGTERM: queued requests are finished (or rejected after --timeout-s); a drained SIGTERM exits 0.")
    p.add_argument("engine", metavar="DIR", help="engine directory written by `ddpm-engine build`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--name", help="model name in the URLs (default: the engine directory's name)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="backend to run (default: the engine's own)")
    p.add_argument("--threads", type=_positive(int), default=None, help="CPU threads for the backend")
    p.add_argument("--max-queue", type=_positive(int), default=64,
                   help="requests allowed to wait; beyond it the service answers 503 with Retry-After")
    p.add_argument("--max-batch", type=_positive(int), default=None,
                   help="most images per engine call (default and cap: the engine's built maximum batch)")
    p.add_argument("--batching", choices=("step", "request"), default="step",
                   help="step: requests join and leave the running batch between U-Net steps (iteration-level "
                   "batching); request: whole requests with equal settings share one sampling call")
    p.add_argument("--step-rows", type=_positive(int), default=None,
                   help="with --batching step: most images per U-Net step (default: measured at each image size's "
                   "first request, the most whose cost per image is within 2 %% of the cheapest); each step runs "
                   "the requests with the least arrival + steps left, so short requests overtake long ones")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="with --batching request: how long the oldest waiting request waits for others to share "
                   "its batch")
    p.add_argument("--timeout-s", type=_positive(float), default=60.0,
                   help="per-request deadline (504 after it); also the drain time at shutdown")
    p.add_argument("--read-timeout-s", type=_positive(float), default=10.0,
                   help="time a client gets to send its request body (408 after it), and an idle connection to send a "
                   "request (closed after it)")
    p.add_argument("--max-body-mb", type=_positive(float), default=64.0, help="largest request body (413 above)")
    p.add_argument("--max-timesteps", type=_positive(int), default=1000, help="largest timesteps a request may ask")
    p.add_argument("--ray", action="store_true", help="serve with Ray Serve instead (needs ddpm-engine[ray])")
    p.add_argument("--replicas", type=_positive(int), default=1, help="Ray Serve replicas (with --ray)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from pathlib import Path

    from ddpm_engine.export import read_manifest

    read_manifest(args.engine)  # refuse a missing or damaged engine with one line, before importing servers
    name = args.name or Path(args.engine).resolve().name
    common = dict(max_queue=args.max_queue, max_batch=args.max_batch, step_rows=args.step_rows,
                  batch_window_ms=args.batch_window_ms,
                  timeout_s=args.timeout_s, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                  max_timesteps=args.max_timesteps)
    if args.ray:
        from .serve_ray import serve_ray

        serve_ray(args.engine, host=args.host, port=args.port, name=name, backend=args.backend,
                  threads=args.threads, replicas=args.replicas, batching=args.batching, **common)
        return 0
    if args.replicas != 1:
        raise ValueError("--replicas needs --ray (one HTTP process serves one engine)")
    try:
        from .serve_http import serve
    except ImportError as exc:
        raise ValueError(f"serving needs the serve extra: pip install 'ddpm-engine[serve]' ({exc})") from None
    serve(args.engine, host=args.host, port=args.port, name=name, backend=args.backend, threads=args.threads,
          log_level=args.log_level, read_timeout_s=args.read_timeout_s, drain_timeout_s=args.timeout_s,
          batching=args.batching, **common)
    return 0
