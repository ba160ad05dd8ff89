"""bench_sample's plot labels the default engine by the build code's rule, not by what an older log says."""
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench_sample.py as a module (it imports bench_step from its own folder)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("bench_sample", BENCHMARKS / "bench_sample.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def rows(default_precision):
    """Sample rows as bench_sample.py logs them; the path labels carry the default of the code that ran them."""
    return [dict(kind="sample", path="seed loop (eager)", backend="torch", precision="fp32", default_engine=False),
            *(dict(kind="sample", path=f"engine openvino {p}" + (" (default)" if p == default_precision else ""),
                   backend="openvino", precision=p, default_engine=p == default_precision) for p in ("fp32", "bf16"))]


@pytest.mark.parametrize("bf16_isa, default", [(True, "bf16"), (False, "fp32")])
def test_the_default_label_follows_the_build_rule_for_the_runs_cpu(bench, bf16_isa, default):
    stale = rows("fp32")  # a log from before bf16 became OpenVINO's default on CPUs with native bf16
    labels = bench.plot_labels(stale, {"bf16_isa": bf16_isa})
    assert sorted(v for v in labels.values() if v.endswith("(default)")) == [f"engine openvino {default} (default)"]
    assert labels["seed loop (eager)"] == "seed loop (eager)"
