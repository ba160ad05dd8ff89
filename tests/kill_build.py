"""Build the stand-in net into an engine directory and SIGKILL this process right after one named call returns.

    python kill_build.py TARGET MODULE ATTR [--no-exchange]

MODULE ATTR: the call to die after, e.g. `build export_onnx` (ddpm_engine.export.build.export_onnx), `engine_dir
_exchange`, or `os rename` (the first os.rename of the process). --no-exchange: run commit_staging's fallback for
systems without renameat2. Used by test_export_build.py; not collected (no test_ prefix), ships nothing.
"""
import importlib
import os
import signal
import sys

import torch

from export_standin import TinyUNet, single_thread

MODULES = {"build": "ddpm_engine.export.build", "engine_dir": "ddpm_engine.export.engine_dir", "os": "os"}


def die_after(module, name):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(module, name, wrapper)


def main(target, module, attr, *flags):
    from ddpm_engine.export import build

    engine_dir = importlib.import_module(MODULES["engine_dir"])
    if "--no-exchange" in flags:
        engine_dir._exchange = lambda a, b: False
    die_after(importlib.import_module(MODULES[module]), attr)
    torch.manual_seed(1)  # other weights than the engine already there: every stage runs, nothing is reused
    with single_thread():
        build(TinyUNet().eval(), target, backend="openvino", batch=(1, 1, 2), size=((16, 16), (16, 16), (24, 24)),
              verify=False)
    sys.exit(f"the build finished: {module}.{attr} was never called")


if __name__ == "__main__":
    main(*sys.argv[1:])
