"""The OpenVINO bf16 engine's error from the fp32 seed loop, over seeds: the spread the parity test's bound rests on.

    python benchmarks/bench_bf16_spread.py --seeds 12

The workload of tests/test_engine_parity.py (bundled sst-small, two synthetic 32x32 tiles), run with the test's
tiles and with a new pair of tiles per seed, measured two ways:
  loop: 50 masked DDPM steps, parity noise from torch.Generator().manual_seed(seed); max |engine - reference_sample|
        and its rms on the [-1, 1] scale;
  call: one U-Net call on x_init diffused to t = CALL_T with that seed's noise; rms(engine eps - torch eps) relative
        to rms(torch eps).
Prints each run for OpenVINO bf16 and fp32, their min / median / max, the CPU's OpenVINO capabilities and the load
average, then one JSON line (prefix "JSON ").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ddpm_engine.engine import CosineSchedule, build, load, reference_sample  # noqa: E402
from ddpm_engine.engine.schedule import diffuse  # noqa: E402
from ddpm_engine.models import load_model  # noqa: E402
from ddpm_engine.models.data import synthetic_tile  # noqa: E402

SIZE, BATCH, T = 32, 2, 50
TEST_TILES_SEED = 7  # tests/test_engine_parity.py's workload
CALL_T = (0.3, 0.7)  # one time per row; below t ~ 0.1 eps is nearly unpredictable and its relative error doubles


def workload(tiles_seed: int):
    rng = np.random.default_rng(tiles_seed)
    tiles = [synthetic_tile(rng, SIZE) for _ in range(BATCH)]
    return [torch.stack([getattr(t, f) for t in tiles]) for f in ("background", "mask", "x_init")]


def loop_errors(engine, model, bg, mask, x_init, seed: int) -> tuple[float, float]:
    """(max, rms) of |engine - reference_sample| with the same parity noise."""
    run = dict(mask=mask, x_init=x_init, timesteps=T, generator=torch.Generator().manual_seed(seed))
    ref = reference_sample(model, bg, (BATCH, 1, SIZE, SIZE), **run)
    run["generator"] = torch.Generator().manual_seed(seed)
    diff = engine.sample(bg, **run) - ref
    return diff.abs().max().item(), diff.pow(2).mean().sqrt().item()


@torch.no_grad()
def call_error(engine, model, bg, x_init, seed: int) -> float:
    """rms(engine eps - torch eps) / rms(torch eps) for one U-Net call on x_init diffused to CALL_T."""
    t = torch.tensor(CALL_T)
    x = diffuse(x_init, t, torch.randn(x_init.shape, generator=torch.Generator().manual_seed(seed)), CosineSchedule())
    sample = torch.cat([x, bg], 1)
    ref = model(sample, t)
    return ((engine.runner.predict_eps(sample, t) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=12, help="noise seeds 0..N-1 (default %(default)s)")
    p.add_argument("--what", nargs="+", choices=("loop", "call"), default=["loop", "call"],
                   help="what to measure (default: both; the loop takes ~15 s per seed and tile pair on 2 cores)")
    args = p.parse_args()
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    model = load_model("sst-small")
    profile = dict(batch=(1, 2, 4), size=((16, 16), (SIZE, SIZE), (64, 64)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for precision in ("bf16", "fp32"):
            build(model, Path(tmp) / precision, backend="openvino", precision=precision, **profile)
            engines[precision] = load(Path(tmp) / precision)
        for seed in range(args.seeds):
            for tiles in ("test", "new"):
                bg, mask, x_init = workload(TEST_TILES_SEED if tiles == "test" else 1000 + seed)
                row = {"seed": seed, "tiles": tiles}
                for precision, engine in engines.items():
                    if "loop" in args.what:
                        row[f"{precision}_max"], row[f"{precision}_rms"] = loop_errors(engine, model, bg, mask, x_init,
                                                                                       seed)
                    if "call" in args.what:
                        row[f"{precision}_call"] = call_error(engine, model, bg, x_init, seed)
                print(f"seed {seed:2d} {tiles:4s} tiles: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()
                                                                     if k not in ("seed", "tiles")), flush=True)
                rows.append(row)
    summary = {k: spread([r[k] for r in rows]) for k in rows[0] if k not in ("seed", "tiles")}
    for k, s in summary.items():
        print(f"{k}: min {s['min']:.4g}, median {s['median']:.4g}, max {s['max']:.4g} over {len(rows)} runs")
    print(f"CPU {caps}, load average {os.getloadavg()}")
    print("JSON " + json.dumps({"summary": summary, "rows": rows, "caps": caps, "load": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
