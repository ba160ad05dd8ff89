"""Real VIIRS/OISST tiles against the synthetic generator's styles, window by window (issue 15, item 2).

    python benchmarks/data_stats.py ../shared/data [--tiles 40] [--size 300]

Prints a markdown table (one row per set: the real sst-cloud and sst-clear tiles, each synthetic style) and a JSON
line. Synthetic tiles are drawn at --size and measured on the same complete 32 px windows as the real ones.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import numpy as np

from ddpm_engine.models.data import STYLES, background_for, fill_oisst_land, load_real_tiles, synthetic_sst
from ddpm_engine.models.ocean_stats import ocean_stats, table_header
from ddpm_engine.models.real_data import clear_tile_days


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="the shared data folder (sst-cloud/ and sst-clear/)")
    p.add_argument("--tiles", type=int, default=40, help="synthetic tiles per style (default %(default)s)")
    p.add_argument("--size", type=int, default=300, help="synthetic tile size, px (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sets = {
        "real sst-cloud (trained on)": [(v, fill_oisst_land(o)) for _, v, o in load_real_tiles(f"{args.data}/sst-cloud")],
        "real sst-clear (scored)": [(v, o) for _, v, o in clear_tile_days(args.data)],
    }
    for name, style in STYLES.items():
        rng = np.random.default_rng(args.seed)
        truths = [synthetic_sst(rng, args.size, style) for _ in range(args.tiles)]
        sets[f"synthetic {name}, {args.size} px"] = [(t, background_for(t, rng, style)) for t in truths]
    stats = {name: ocean_stats(tiles) for name, tiles in sets.items()}
    print(table_header())
    for name, s in stats.items():
        print(s.row(name))
    print(json.dumps({name: asdict(s) for name, s in stats.items()}))


if __name__ == "__main__":
    main()
