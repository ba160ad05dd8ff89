"""Where a command's time goes: the engine's one-off load and compiles, apart from its steady-state steps."""
from __future__ import annotations

import time


class Stopwatch:
    """Wall time of a block, less the compiles (new buffer-set shapes) an engine's Runner did inside it.

    engine: a loaded Engine; anything without a Runner (an eager nn.Module) compiles nothing here.
    """

    def __init__(self, engine=None):
        self._runner = getattr(engine, "runner", None)
        self.seconds = self.compile_seconds = 0.0  # steady state, and the compiles it excludes
        self.compiles = self.cache_hits = 0

    def _counters(self) -> tuple[float, int, int]:
        runner = self._runner
        if runner is None:
            return 0.0, 0, 0
        # Only the OpenVINO backend caches compiled models across runs (and counts the ones it loaded from there).
        return runner.compile_seconds, runner.compiles, getattr(runner.backend, "cache_hits", 0)

    def __enter__(self) -> Stopwatch:
        self._before = self._counters()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        total = time.perf_counter() - self._start
        self.compile_seconds, self.compiles, self.cache_hits = (a - b for a, b in zip(self._counters(), self._before))
        self.seconds = total - self.compile_seconds

    def as_dict(self) -> dict:
        """The figures for a JSON summary."""
        return {"seconds": self.seconds, "compile_seconds": self.compile_seconds, "shapes_compiled": self.compiles,
                "cache_hits": self.cache_hits}


def one_off(engine, figures: dict, load_seconds: float | None = None) -> str:
    """'load 1.6 s, compile 1.0 s for 1 shape(s) (1 from the compiled-model cache)': what a run paid once.

    figures: a Stopwatch's as_dict() for that engine (None: an eager model, which compiles nothing).
    """
    parts = [] if load_seconds is None else [f"load {load_seconds:.1f} s"]
    if engine is not None:
        cached = (f" ({figures['cache_hits']} from the compiled-model cache)"
                  if getattr(engine.runner.backend, "cache_dir", None) else "")
        parts.append(f"compile {figures['compile_seconds']:.1f} s for {figures['shapes_compiled']} shape(s){cached}")
    return ", ".join(parts)
