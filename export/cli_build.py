"""`ddpm-engine build MODEL -o DIR ...`: compile a model into an engine directory, one line per stage."""
from __future__ import annotations

import argparse
import sys
import time


def register(subparsers) -> None:
    """Add the `build` subcommand."""
    p = subparsers.add_parser(
        "build", help="compile a model into an engine directory (ONNX + TensorRT plan / OpenVINO IR)",
        description="Export a noise-prediction U-Net to ONNX, verify it against PyTorch, convert its precision and "
        "build the backend artefact, into an engine directory (engine.json + files). An unchanged rebuild is a cache "
        "hit and returns at once; a failed or interrupted build leaves the previous engine untouched.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="bundled preset (e.g. sst-small), checkpoint directory, CARE-SST .pth, a diffusers pipeline "
                   "directory (model_index.json, unet/ UNet2DModel, scheduler/ DDPM or DDIM; needs diffusers), or "
                   "an engine directory (rebuild from its kept weights); omit with --arch")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="engine directory to write")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime", "openvino", "torch"],
                   help="auto: tensorrt with TensorRT + an NVIDIA GPU, else openvino on x86 CPUs, else onnxruntime")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "int8"],
                   help="compute precision; fp16/bf16 graphs keep norms, softmax and reductions in fp32. int8 "
                   "(openvino, CARE-SST models): NNCF post-training quantisation calibrated on the sampler's own "
                   "U-Net inputs, kept only if the quality gate passes. auto: for openvino the fastest of fp32, bf16 "
                   "(native only) and int8 that passes the gate, timed at the profile's opt shape; else fp32")
    p.add_argument("--gate-tolerance", type=float, default=0.01, metavar="REL",
                   help="int8/auto: largest relative difference of the gate's cloud RMSE from the fp32 engine's")
    p.add_argument("--io-precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of sample/timestep/eps for reduced-precision graphs (fp32 or the --precision)")
    p.add_argument("--batch", default="1:1:8", metavar="MIN:OPT:MAX", help="batch profile (or a single N)")
    p.add_argument("--size", default=None, metavar="HxW[:HxW:HxW]",
                   help="image size profile: one size, or MIN:OPT:MAX sizes (OPT is the traced/tuned size); default "
                   "32x32:300x300:320x320, or a diffusers U-Net's sample_size")
    p.add_argument("--arch", metavar="ARCH[:k=v,...]",
                   help="build an untrained model of this architecture instead of MODEL, e.g. care-sst:dim=16,embed_dim=64 "
                   "(for benchmarks at the real size without weights)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --arch")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (bf16 graphs are raised to 22)")
    p.add_argument("--static-hw", action="store_true", help="export H and W static at the OPT size")
    p.add_argument("--no-verify", action="store_true", help="skip the comparisons against PyTorch")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |eps - eps_torch| / max(1, max|eps_torch|) accepted (default: 1e-4 fp32, 2e-2 fp16, 1e-1 bf16)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder_optimization_level (0..5)")
    p.add_argument("--workspace", type=float, default=4.0, metavar="GiB", help="TensorRT workspace limit")
    p.add_argument("--refit", choices=["identical", "refit"], default=None,
                   help="refittable TensorRT engine: refit (REFIT: load new weights of the same architecture "
                   "without a rebuild) or identical (REFIT_IDENTICAL: refit only with the build's own weights, e.g. "
                   "into a weight-stripped plan; keeps every optimisation)")
    p.add_argument("--tf32", action="store_true",
                   help="TensorRT: run fp32 layers in TF32 (faster on Ampere and newer; verified at tolerance 1e-2 "
                   "instead of fp32's 1e-4); without it an fp32 plan is fp32")
    p.add_argument("--simplify", action="store_true",
                   help="simplify the ONNX graph with onnxslim; kept only if it removes nodes and ONNX Runtime is not "
                   "slower on it (the numbers go into engine.json)")
    p.add_argument("--force", action="store_true", help="rebuild everything, ignoring the cache")
    p.set_defaults(func=run)


def _arch_model(spec: str, seed: int):
    import torch

    from ddpm_engine.models import build_model

    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--arch options must be key=value, got {item!r}")
        try:
            kwargs[key.strip()] = int(value)
        except ValueError:
            try:
                kwargs[key.strip()] = float(value)
            except ValueError:
                kwargs[key.strip()] = value
    torch.manual_seed(seed)
    try:
        return build_model(name, **kwargs).eval()
    except TypeError as exc:
        raise ValueError(f"--arch {spec}: {exc}") from None


def run(args) -> int:
    """Build and print one line per stage with its time, then a summary."""
    from .build import build
    from .quality_gate import GateSettings, summary

    if args.arch and args.model:
        raise ValueError("give MODEL or --arch, not both")
    if not args.arch and not args.model:
        raise ValueError("MODEL is required (a preset name, checkpoint directory, .pth or engine directory), or --arch")
    model = _arch_model(args.arch, args.seed) if args.arch else args.model
    t0 = time.perf_counter()

    def progress(stage: str, event: str, info: dict) -> None:
        if event == "start":
            print(f"  {stage} ...", flush=True)
        elif event in ("done", "reused"):
            extra = " (reused from the previous build)" if event == "reused" else ""
            print(f"  {stage}: {info['seconds']:.2f} s{extra}", flush=True)
        else:
            print(f"  {stage}", flush=True)

    print(f"ddpm-engine build: {args.model or args.arch} -> {args.output}", flush=True)
    result = build(model, args.output, backend=args.backend, precision=args.precision, batch=args.batch,
                   size=args.size, io_precision=args.io_precision if args.precision != "fp32" else "fp32",
                   opset=args.opset, dynamic_hw=not args.static_hw, verify=not args.no_verify,
                   tolerance=args.tolerance, builder_optimization_level=args.opt_level,
                   workspace_bytes=int(args.workspace * (1 << 30)), refit=args.refit, tf32=args.tf32, force=args.force,
                   simplify=args.simplify, progress=progress, gate=GateSettings(tolerance=args.gate_tolerance))
    m = result.manifest
    print(f"{'cache hit' if result.cached else 'built'}: {result.directory} backend={m['backend']} "
          f"precision={m['precision']} in {time.perf_counter() - t0:.2f} s", flush=True)
    for name, entry in m["artefacts"].items():
        v = entry.get("verification")
        if v:
            print(f"  {name}: max abs error vs PyTorch {v['max_abs_err']:.3g} (tolerance {v['tolerance']:g}, "
                  f"{v['runtime']})")
    ov = m["artefacts"].get("openvino")
    if ov and ov.get("quality_gate"):
        print(f"  quality gate {summary(ov['quality_gate'])}")
    if ov and ov["precision"] != "fp32" and not ov["native"]:
        print(f"  note: this CPU has no native {ov['precision']} (AVX-512 BF16 or AMX), so OpenVINO runs this engine in "
              f"fp32 here; it runs {ov['precision']} on CPUs that have it")
    sys.stdout.flush()
    return 0
