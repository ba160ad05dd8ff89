"""The `ddpm-engine` command line: one subcommand per job, each registered by the component that owns it."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import EngineError

# Modules that each define `register(subparsers)`; the subparser sets `func(args) -> int`.
COMMAND_MODULES: tuple[str, ...] = ("ddpm_engine.export.cli_build", "ddpm_engine.engine.cli_sample",
                                    "ddpm_engine.export.cli_info", "ddpm_engine.models.train", "ddpm_engine.models.evaluate",
                                    "ddpm_engine.serve.cli_serve")

USER_ERRORS = (EngineError, ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="ddpm-engine",
        description="Deployment-optimised inference engine for DDPM diffusion models: compile a trained "
        "U-Net (ONNX -> TensorRT / OpenVINO / ONNX Runtime), then sample with a fused step kernel.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes give one `error:` line and exit code 2, no traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"ddpm-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddpm-engine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
