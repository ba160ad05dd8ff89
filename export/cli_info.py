"""`ddpm-engine info DIR`: the engine manifest in a readable form (or raw JSON), optionally checked."""
from __future__ import annotations

import json

from .quality_gate import summary


def register(subparsers) -> None:
    """Add the `info` subcommand."""
    p = subparsers.add_parser("info", help="show what an engine directory holds (engine.json)",
                              description="Print an engine directory's manifest: model, I/O, profile, precision, "
                              "artefacts with their verification errors, library versions and GPU.")
    p.add_argument("directory", metavar="DIR", help="engine directory written by `ddpm-engine build`")
    p.add_argument("--json", action="store_true", help="print engine.json as is")
    p.add_argument("--check", metavar="BACKEND", default=None,
                   help="also check that BACKEND's artefact is intact and loadable on this machine")
    p.set_defaults(func=run)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_manifest(m: dict, directory=None) -> str:
    """Human-readable multi-line summary of a manifest."""
    from pathlib import Path

    lines = []
    model = m["model"]
    lines.append(f"engine       {directory or ''}  (format {m['format']} v{m['format_version']}, built {m.get('created')})")
    lines.append(f"backend      {m['backend']}    precision {m['precision']}")
    lines.append(f"model        {model['arch']} {json.dumps(model.get('config', {}), sort_keys=True)}")
    lines.append(f"             {model.get('parameters', '?')} parameters, weights sha256 {model['weights_sha256'][:16]}..., "
                 f"source {model.get('source')}")
    for kind in ("inputs", "outputs"):
        for t in m["io"][kind]:
            lines.append(f"{kind[:-1]:<12} {t['name']:<9} {t['dtype']:<9} [{', '.join(str(d) for d in t['shape'])}]")
    p = m["profile"]
    lines.append(f"profile      batch {p['batch']['min']}:{p['batch']['opt']}:{p['batch']['max']}   size "
                 + ":".join(f"{p['height'][k]}x{p['width'][k]}" for k in ("min", "opt", "max"))
                 + ("" if p.get("dynamic_hw", True) else "   (static H/W)"))
    lines.append("artefacts")
    for name, e in m["artefacts"].items():
        size = 0
        if directory is not None:
            size = sum((Path(directory) / f).stat().st_size for f in e.get("files", {}) if (Path(directory) / f).is_file())
        lib = e.get("library") or {}
        extra = []
        if e.get("inference_precision_hint"):
            extra.append(f"hint {e['inference_precision_hint']}")
        if lib.get("version"):
            extra.append(f"{lib['name']} {lib['version']}")
        if e.get("gpu"):
            extra.append(f"GPU {e['gpu'].get('name')} (sm {e['gpu'].get('compute_capability')})")
        lines.append(f"  {name:<12} {e.get('path', ''):<22} {e.get('precision', ''):<5} {_mb(size):>10}  {', '.join(extra)}")
        v = e.get("verification")
        if v:
            w = v["worst"]
            lines.append(f"  {'':<12} verified ({v['runtime']}): max abs error {v['max_abs_err']:.3g}, worst at batch "
                         f"{w['batch']} {w['height']}x{w['width']}, tolerance {v['tolerance']:g}")
        simp = e.get("simplified")
        if simp:
            lines.append(f"  {'':<12} onnxslim: {simp['nodes_before']} -> {simp['nodes_after']} nodes, ONNX Runtime "
                         f"{simp['ort_ms_before']} -> {simp['ort_ms_after']} ms: {'kept' if simp['kept'] else 'not kept'}")
        if e.get("note"):
            lines.append(f"  {'':<12} note: {e['note']}")
        if e.get("quality_gate"):
            lines.append(f"  {'':<12} quality gate {summary(e['quality_gate'])}")
    choice = m.get("precision_choice")
    if choice:
        shape = choice["shape"]
        gates = choice.get("gate", {})
        timed = ", ".join(f"{p} {ms:.1f} ms" + ("" if p not in gates else " (gate passed)" if gates[p]["passed"]
                                                 else " (gate refused)") for p, ms in choice["timings_ms"].items())
        lines.append(f"auto         chose {choice['chosen']}: {timed} per call at batch {shape['batch']} "
                     f"{shape['height']}x{shape['width']} (median of {choice['rounds']}, load {choice['loadavg_1min']})")
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    lines.append(f"libraries    {libs}")
    gpu = m.get("gpu") or {}
    lines.append(f"gpu          {gpu.get('name') or 'none (CPU build)'}"
                 + (f", compute capability {gpu['compute_capability']}" if gpu.get("compute_capability") else ""))
    stages = m.get("build", {}).get("stages") or []
    if stages:
        lines.append("build stages " + ", ".join(f"{s['stage']} {s['seconds']:.2f} s" for s in stages))
    lines.append(f"cache key    {m['cache_key'][:16]}...")
    return "\n".join(lines)


def run(args) -> int:
    """Print the manifest; with --check, verify the backend's artefact too."""
    from .engine_dir import check_engine_dir
    from .manifest import read_manifest

    manifest = read_manifest(args.directory)
    if args.check:
        check_engine_dir(args.directory, args.check)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(format_manifest(manifest, args.directory))
        if args.check:
            print(f"check        {args.check}: artefact intact and loadable here")
    return 0
