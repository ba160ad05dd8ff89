"""Engine.sample on the torch CUDA backend with CUDA graphs on and off, time-boxed: what the Runner's graphs buy.

    python benchmarks/bench_graphs.py                        # sst-small, B = 1 and 8, 300x300, 50 steps, 60 s in all
    python benchmarks/bench_graphs.py --batch 1 --seconds 20

Masked DDPM sampling (the CARE-SST workload) with the fast path: in-kernel Philox noise, the Triton step. Each
(batch, graphs) pair gets an equal share of --seconds after one untimed warm-up call (allocation, compilation,
graph capture). Prints a table, then one JSON line per row (prefix "JSON ").
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ddpm_engine.engine import Engine  # noqa: E402
from ddpm_engine.engine.backends import TorchBackend  # noqa: E402
from ddpm_engine.engine.runner import Runner  # noqa: E402
from ddpm_engine.export.onnx_export import model_channels  # noqa: E402
from ddpm_engine.models import load_model  # noqa: E402


def make_engine(model, cuda_graphs: bool, max_batch: int) -> Engine:
    """An Engine on the torch CUDA backend straight from the module (no engine directory, no ONNX export)."""
    c_in, c_out = model_channels(model)
    runner = Runner(TorchBackend(model, "cuda"), c_out=c_out, c_in=c_in, cuda_graphs=cuda_graphs)
    return Engine(runner, c_in=c_in, c_out=c_out, max_batch=max_batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sst-small", help="bundled preset (default sst-small)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--size", type=int, default=300, help="tile size (default 300, CARE-SST's)")
    p.add_argument("--steps", type=int, default=50, help="timesteps per sample (default 50)")
    p.add_argument("--seconds", type=float, default=60.0, help="timing budget for all rows together (default 60)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_graphs.py needs an NVIDIA GPU with CUDA (CUDA graphs exist only there); none is visible",
              file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batch.split(",")]
    model = load_model(args.model)
    engines = {graphs: make_engine(model, graphs, max(batches)) for graphs in (True, False)}
    where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"# {where}; {args.model}, {args.size}x{args.size}, {args.steps} steps, masked DDPM, seed path")
    header = f"{'batch':>5} {'graphs':>6} {'runs':>5} {'s/sample':>9} {'ms/step':>8} {'images/s':>9} {'graph gain':>10}"
    print(header)
    print("-" * len(header))
    share = args.seconds / (2 * len(batches))
    rows = []
    for b in batches:
        g = torch.Generator().manual_seed(b)
        bg = torch.rand(b, 1, args.size, args.size, generator=g) * 2 - 1
        x_init = torch.rand(b, 1, args.size, args.size, generator=g) * 2 - 1
        mask = (torch.rand(1, 1, args.size, args.size, generator=g) > 0.3).float()
        off_s = None
        for graphs in (False, True):
            engine = engines[graphs]
            run = lambda: engine.sample(bg, mask=mask, x_init=x_init, timesteps=args.steps, seed=1)  # noqa: E731
            run()  # warm-up: buffers, Triton compilation, graph capture
            times, end = [], time.perf_counter() + share
            while len(times) < 2 or time.perf_counter() < end:
                t0 = time.perf_counter()
                run()  # returns a CPU tensor: the call includes its one device sync
                times.append(time.perf_counter() - t0)
            s = statistics.median(times)
            off_s = s if not graphs else off_s
            row = dict(where=where, model=args.model, batch=b, size=args.size, steps=args.steps, cuda_graphs=graphs,
                       runs=len(times), seconds=round(s, 5), ms_per_step=round(1e3 * s / args.steps, 4),
                       images_per_s=round(b / s, 2), graph_speedup=round(off_s / s, 3) if graphs else None)
            rows.append(row)
            gain = f"{row['graph_speedup']:.2f}x" if graphs else "-"
            print(f"{b:>5} {'on' if graphs else 'off':>6} {len(times):>5} {s:>9.4f} {row['ms_per_step']:>8.3f} "
                  f"{row['images_per_s']:>9.2f} {gain:>10}")
    for row in rows:
        print("JSON " + json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
