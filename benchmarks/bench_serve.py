"""Serving under open-loop load: request-level against step-level batching (iteration-level, Orca) on one engine.

    python benchmarks/bench_serve.py ENGINE_DIR                       # 0.8 req/s, 40 requests, 20/50/100 steps
    python benchmarks/bench_serve.py ENGINE_DIR --rate 1.5 --count 100 --max-seconds 300 --plot serve.png

Arrivals are a Poisson process (exponential gaps, --rate per second, a fixed --seed), at most --count requests and
none after --max-seconds; each request asks for one of --classes step counts (uniformly), with its own background
tile and seed. The same arrival schedule is replayed against `ddpm-engine serve --batching request` (whole
requests with equal settings share one sampling call) and `--batching step` (requests join and leave the running
batch between U-Net steps, shortest remaining work first, at most the measured step rows per step), each a server
process of its own on loopback. A mode `step:N` serves with `--step-rows N` instead of the measured rows. Open loop: a request is sent at its
arrival time whatever the earlier ones are doing, so latency (arrival to reply) includes all queueing.

Reported per mode: per class the count, p50 / p99 / max latency; overall throughput (replies per second and
request-steps per second, over first arrival to last reply); refusals (503) and errors. Then the ratio of the
20-step class's p99 (request / step), and the step rows each step server measured (its /metrics). Prints a
table and one line "JSON {...}"; --plot writes latency CDFs.
Never collected by pytest.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

MODES = ("request", "step")


def start_server(engine_dir: str, mode: str, threads: int, max_batch: int | None, timeout_s: float):
    """`ddpm-engine serve --batching MODE` on a free loopback port, once ready: (base URL, process)."""
    batching, _, step_rows = mode.partition(":")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ddpm_engine.engine.cli", "serve", engine_dir, "--port", str(port), "--name",
           "bench", "--batching", batching, "--threads", str(threads), "--max-queue", "1000", "--timeout-s",
           str(timeout_s), "--log-level", "warning"] + (["--max-batch", str(max_batch)] if max_batch else []) + (
        ["--step-rows", step_rows] if step_rows else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    json.loads(proc.stdout.readline())  # the "serving" line
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/v2/models/bench/ready").status_code == 200:
                return base, proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"server ({mode}) did not become ready: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)


def schedule(rate: float, count: int, max_seconds: float, classes: list[int], seed: int):
    """[(arrival second, steps)] of a Poisson process: at most `count`, none after max_seconds."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, count))
    steps = rng.choice(classes, count)
    return [(float(t), int(k)) for t, k in zip(arrivals, steps) if t <= max_seconds]


def body(size: tuple[int, int], steps: int, seed: int) -> dict:
    tile = np.random.default_rng(seed).uniform(-1, 1, (1, 1, *size)).astype(np.float32)
    return {"inputs": [{"name": "background", "shape": list(tile.shape), "datatype": "FP32",
                        "data": tile.ravel().tolist()}],
            "parameters": {"timesteps": steps, "seed": seed, "sampler": "ddpm"}}


def run_mode(base: str, plan, size, timeout_s: float) -> list[dict]:
    """Replay the arrival plan open loop; per request: steps, latency (s, arrival to reply), status, reply time."""
    bodies = [body(size, steps, k) for k, (_, steps) in enumerate(plan)]

    def call(k, start):
        arrival = start + plan[k][0]
        try:
            r = httpx.post(base + "/v2/models/bench/infer", json=bodies[k], timeout=timeout_s)
            status = r.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        done = time.perf_counter()
        return {"steps": plan[k][1], "latency": done - arrival, "status": status, "done": done - start}

    with concurrent.futures.ThreadPoolExecutor(len(plan)) as pool:
        start, futures = time.perf_counter(), []
        for k, (at, _) in enumerate(plan):
            time.sleep(max(0.0, start + at - time.perf_counter()))
            futures.append(pool.submit(call, k, start))
        return [f.result() for f in futures]


def step_rows(base: str) -> dict:
    """{size: rows per step} from a step server's ddpm_engine_step_rows gauge (empty for request batching)."""
    text = httpx.get(base + "/metrics").text
    return {m[0]: int(float(m[1])) for m in re.findall(r'^ddpm_engine_step_rows{size="([^"]+)"} (\S+)$', text, re.M)}


def summarise(results: list[dict], plan, classes: list[int]) -> dict:
    ok = [r for r in results if r["status"] == 200]
    span = max(r["done"] for r in ok) - plan[0][0] if ok else float("nan")
    out = {"replies": len(ok), "refused": sum(r["status"] == 503 for r in results),
           "errors": sum(r["status"] not in (200, 503) for r in results),
           "throughput_rps": len(ok) / span, "request_steps_per_s": sum(r["steps"] for r in ok) / span, "classes": {}}
    for c in classes:
        lat = np.array([r["latency"] for r in ok if r["steps"] == c])
        out["classes"][c] = {"n": int(lat.size), **({k: float(np.percentile(lat, q)) for k, q in
                                                     (("p50", 50), ("p99", 99), ("max", 100))} if lat.size else {})}
    return out


def plot(all_results: dict, classes: list[int], path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, results in all_results.items():
        for c, colour in zip(classes, ("C0", "C1", "C2", "C3")):
            lat = np.sort([r["latency"] for r in results if r["status"] == 200 and r["steps"] == c])
            if lat.size:
                ax.step(lat, np.arange(1, lat.size + 1) / lat.size, where="post", color=colour,
                        linestyle="--" if mode == "request" else "-" if mode == "step" else ":",
                        label=f"{mode}, {c} steps")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decade labels only: minor ones overlap
    ax.set_xlabel("latency, arrival to reply (s)")
    ax.set_ylabel("fraction of requests")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", help="engine directory (ddpm-engine build)")
    p.add_argument("--size", type=int, default=None, help="square tile size (default: the engine's smallest)")
    p.add_argument("--rate", type=float, default=0.8, help="mean arrivals per second (Poisson)")
    p.add_argument("--count", type=int, default=40, help="most requests per mode")
    p.add_argument("--max-seconds", type=float, default=120.0, help="no arrivals after this many seconds")
    p.add_argument("--classes", default="20,50,100", help="step counts of the request classes")
    p.add_argument("--modes", default=",".join(MODES),
                   help="batching modes to compare, in this order: request, step, step:N (N step rows)")
    p.add_argument("--threads", type=int, default=1, help="the server's backend threads")
    p.add_argument("--max-batch", type=int, default=None, help="slots / batch rows (default: the engine's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    p.add_argument("--plot", default=None, help="write latency CDFs to this PNG")
    args = p.parse_args(argv)
    from ddpm_engine.export import read_manifest

    manifest = read_manifest(args.engine)
    profile = manifest["profile"]
    size = (args.size, args.size) if args.size else (profile["height"]["min"], profile["width"]["min"])
    classes = [int(c) for c in args.classes.split(",")]
    modes = args.modes.split(",")
    if not all(m in MODES or re.fullmatch(r"step:[1-9][0-9]*", m) for m in modes):
        p.error(f"--modes must be drawn from {list(MODES)} and step:N")
    plan = schedule(args.rate, args.count, args.max_seconds, classes, args.seed)
    timeout_s = 4 * args.max_seconds
    print(f"engine {args.engine} ({manifest['backend']}), tiles {size[0]}x{size[1]}, {len(plan)} requests at "
          f"{args.rate:g}/s, classes {classes} steps, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    all_results, summary = {}, {}
    for mode in modes:
        base, proc = start_server(args.engine, mode, args.threads, args.max_batch, timeout_s)
        try:
            all_results[mode] = run_mode(base, plan, size, timeout_s)
            measured = step_rows(base)
        finally:
            proc.terminate()
            proc.wait(60)
        set_rows = mode.partition(":")[2]  # step:N serves with --step-rows N: nothing measured
        summary[mode] = summarise(all_results[mode], plan, classes) | {"step_rows": measured or set_rows or None}

    print(f"\n{'mode':8} {'class':>6} {'n':>4} {'p50 s':>8} {'p99 s':>8} {'max s':>8}")
    for mode, s in summary.items():
        for c, row in s["classes"].items():
            print(f"{mode:8} {c:>6} {row['n']:>4} " + " ".join(f"{row.get(k, float('nan')):8.2f}"
                                                              for k in ("p50", "p99", "max")))
    print(f"\n{'mode':8} {'replies':>7} {'503':>4} {'errors':>6} {'req/s':>7} {'req-steps/s':>11}  step rows")
    for mode, s in summary.items():
        print(f"{mode:8} {s['replies']:>7} {s['refused']:>4} {s['errors']:>6} {s['throughput_rps']:7.3f} "
              f"{s['request_steps_per_s']:11.1f}  {s['step_rows'] or '-'}")
    result = {"engine": str(args.engine), "size": list(size), "rate": args.rate, "requests": len(plan),
              "classes": classes, "load_average": os.getloadavg()[0], "modes": summary}
    if set(MODES) <= set(summary) and summary["step"]["classes"][classes[0]].get("p99"):
        ratio = summary["request"]["classes"][classes[0]]["p99"] / summary["step"]["classes"][classes[0]]["p99"]
        result[f"p99_ratio_{classes[0]}_request_over_step"] = ratio
        print(f"\np99 of the {classes[0]}-step class, request / step batching: {ratio:.2f}x")
    if args.plot:
        plot(all_results, classes, args.plot)
    print("JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
