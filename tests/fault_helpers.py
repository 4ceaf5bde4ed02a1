"""Shared by the fault tests (test_faults.py, test_kernel_cache.py): a kernel source written to a
file, and the smallest kernel with integral and float value arguments."""
from __future__ import annotations

from pathlib import Path


def write_kernel(tmp_path: Path, name: str, body: str) -> tuple[str, int]:
    """A .metal file holding `body`; returns its path and the line of the `// <-` marker."""
    text = "#include <metal_stdlib>\nusing namespace metal;\n" + body
    path = tmp_path / f"{name}.metal"
    path.write_text(text)
    marks = [i + 1 for i, ln in enumerate(text.splitlines()) if "// <-" in ln]
    return str(path), (marks[0] if marks else 0)


ZERO = """
kernel void fill(device float* x [[buffer(0)]], constant uint& n [[buffer(1)]],
                 constant float& v [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    if (i < n) x[i] = v;
}
"""
