"""`python -m pymetalnn.bench --quick` on one small family writes a JSON report with every
field present and the timings set."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pymetalnn
from pymetalnn import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_families():
    fams = bench.families()
    assert "runtime" in fams and "conv" in fams


def test_normalize():
    r = bench.normalize("conv", {"op": "conv2d", "shape": "1x2", "ms": 2.0, "torch_ms": 4.0,
                                 "GFLOP/s": 10.0, "ratio": 2.0, "backend": "cpu"})
    assert r["time_s"] == 0.002 and r["peer_time_s"] == 0.004 and r["ratio"] == 2.0
    assert r["unit"] == "GFLOP/s" and set(bench.FIELDS) <= set(r)


def test_bench_quick_runtime(tmp_path):
    if pymetalnn.availability().get("cpu"):
        pytest.skip("cpu backend unavailable")
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, "-m", "pymetalnn.bench", "--backend", "cpu", "--quick",
                        "--only", "runtime", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[1/1] runtime" in p.stdout
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["quick"] is True and data["meta"]["backend"] == "cpu"
    assert data["rows"]
    for r in data["rows"]:
        assert set(bench.FIELDS) <= set(r)
        assert r["family"] == "runtime" and r["kernel"] and r["variant"]
        assert r["time_s"] is not None and r["time_s"] > 0
    assert (out / "bench.md").read_text().startswith("# pymetalnn kernel benchmarks")
