"""The MSL 2.3 conformance check (pymetalnn/runtime/metal_check.py, tools/metal_check.py).

Every kernel source of the project passes; each rule fails its own test source at exactly the
lines marked `// expect: RULE` (tests/dialect/metal23/), naming the file and line."""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import pymetalnn.params as params
from pymetalnn.runtime.core import KERNEL_DIR
from pymetalnn.runtime.metal_check import (
    _preprocess,
    check_file,
    metal_sources,
    scan_kernels,
    struct_layouts,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULE_DIR = os.path.join(ROOT, "tests", "dialect", "metal23")
RULE_SOURCES = sorted(f for f in os.listdir(RULE_DIR) if f.endswith(".metal"))
RULES = {"restricted", "std", "version", "prelude", "derived-class", "lambda", "function-pointer",
         "recursion", "vla", "address-space", "half-literal", "program-scope", "threadgroup-size",
         "threadgroup-scope", "threadgroup-init", "threadgroup-memory"}


def _expected(path: str) -> set[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        return {(no, m.group(1)) for no, line in enumerate(f, 1)
                for m in [re.search(r"expect: ([a-z-]+)", line)] if m}


@pytest.mark.parametrize("name", RULE_SOURCES)
def test_rule_sources(name: str) -> None:
    path = os.path.join(RULE_DIR, name)
    found = check_file(path)
    assert {(v.line, v.rule) for v in found} == _expected(path), "\n".join(map(str, found))
    for v in found:
        assert os.path.samefile(v.file, path)
        assert str(v).startswith(f"{v.file}:{v.line}: error: [{v.rule}] ")


def test_every_rule_has_a_failing_source() -> None:
    seen = {rule for n in RULE_SOURCES for _, rule in _expected(os.path.join(RULE_DIR, n))}
    assert seen == RULES
    assert not _expected(os.path.join(RULE_DIR, "conformant.metal"))


KNOWN = os.path.join(ROOT, "tools", "metal_check_known.txt")


def _tool():
    spec = importlib.util.spec_from_file_location("metal_check_tool",
                                                  os.path.join(ROOT, "tools", "metal_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_project_kernels_conform() -> None:
    """Every kernel source conforms, but for the findings listed in tools/metal_check_known.txt
    (each of which must still occur: the list only shrinks)."""
    tool = _tool()
    known = tool.read_known(KNOWN)
    files = metal_sources([os.path.join(ROOT, "kernels"), os.path.join(ROOT, "examples")])
    assert len(files) >= 15
    found = [v for f in files for v in check_file(f)]
    unknown = [str(v) for v in found if not tool.is_known(v, known)]
    assert not unknown, "\n".join(unknown)
    used = {tool.is_known(v, known) for v in found} - {None}
    assert used == set(known), f"stale entries: {set(known) - used}"


def test_findings_in_included_files_name_that_file(tmp_path) -> None:
    (tmp_path / "helper.h").write_text("#pragma once\ninline float h(float x) {\n"
                                       "  return std::abs(x);\n}\n")
    (tmp_path / "k.metal").write_text('#include "helper.h"\nkernel void k(device float* x '
                                      "[[buffer(0)]], uint i [[thread_position_in_grid]]) "
                                      "{ x[i] = h(x[i]); }\n")
    (v,) = check_file(str(tmp_path / "k.metal"))
    assert (os.path.basename(v.file), v.line, v.rule) == ("helper.h", 3, "std")


def test_variant_defines_are_checked(tmp_path) -> None:
    src = tmp_path / "v.metal"
    src.write_text("kernel void k(device ACC_T* x [[buffer(0)]], uint i [[thread_position_in_grid]])"
                   " { x[i] = 0; }\n")
    assert check_file(str(src), {"ACC_T": "float"}) == []
    (v,) = check_file(str(src), {"ACC_T": "double"})
    assert (v.line, v.rule) == (1, "restricted")


def test_cli(tmp_path) -> None:
    tool = os.path.join(ROOT, "tools", "metal_check.py")
    ok = subprocess.run([sys.executable, tool, "--known", KNOWN, os.path.join(ROOT, "kernels"),
                         os.path.join(ROOT, "examples")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, tool, os.path.join(RULE_DIR, "recursion.metal")],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert re.search(r"recursion\.metal:5: error: \[recursion\]", bad.stdout), bad.stdout


def test_kernel_scan_reads_threadgroup_attributes() -> None:
    by_name = {k.name: k.max_threads for k in scan_kernels(os.path.join(KERNEL_DIR, "copy.metal"))}
    assert by_name["permute_fwd_float"] is None  # permute_gather declares none
    assert all(v is None or v % 32 == 0 for v in by_name.values())
    assert any(v for v in by_name.values())


def test_struct_layouts_match_the_python_mirrors() -> None:
    """The metal backend checks `constant T&` sizes with these layouts."""
    toks, _ = _preprocess(os.path.join(KERNEL_DIR, "params.h"), None, [KERNEL_DIR], True)
    layouts = struct_layouts(toks)
    mirrors = {n: c for n, c in vars(params).items()
               if isinstance(c, type) and issubclass(c, ctypes.Structure) and n in layouts}
    assert len(mirrors) >= 20
    for n, c in mirrors.items():
        assert layouts[n][0] == ctypes.sizeof(c), n


def test_struct_layouts_metal_rules(tmp_path) -> None:
    src = tmp_path / "s.metal"
    src.write_text("struct A { half h; float3 v; };\nstruct B { uchar c; A a[2]; short s; };\n"
                   "struct C { float2 f; vec<half, 4> g; int k[3]; };\n")
    toks, _ = _preprocess(str(src), None, [], True)
    lay = struct_layouts(toks)
    assert lay["A"] == (32, 16)  # float3: 16 bytes, 16-aligned
    assert lay["B"] == (96, 16)
    assert lay["C"] == (32, 8)
