"""Build the stand-in net into an engine directory and SIGKILL this process right after one named call returns.

    python kill_build.py TARGET MODULE ATTR [--no-exchange]

MODULE ATTR: the call to die after, e.g. `build export_onnx` (ddpm_engine.export.build.export_onnx), `staging
_exchange`, or `os rename` (the first os.rename of the process). --no-exchange: run commit_staging's fallback for
systems without renameat2. Used by test_export_build.py; not collected (no test_ prefix), ships nothing.
"""
import importlib
import os
import signal
import sys

import torch

from export_standin import TinyUNet, single_thread

MODULES = {"build": "ddpm_engine.export.build", "staging": "ddpm_engine.export.staging", "os": "os"}


def die_after(module, name):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(module, name, wrapper)


def main(target, module, attr, *flags):
    from ddpm_engine.export import build

    staging = importlib.import_module(MODULES["staging"])
    if "--no-exchange" in flags:
        staging._exchange = lambda a, b: False
    die_after(importlib.import_module(MODULES[module]), attr)
    torch.manual_seed(1)  # other weights than the engine already there: every stage runs, nothing is reused
    with single_thread():
        build(TinyUNet().eval(), target, backend="openvino", precision="fp32", batch=(1, 1, 2),
              size=((16, 16), (16, 16), (24, 24)), verify=False)
    sys.exit(f"the build finished: {module}.{attr} was never called")


if __name__ == "__main__":
    main(*sys.argv[1:])
