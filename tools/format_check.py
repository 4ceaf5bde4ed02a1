"""Check the C-family sources (.metal, .h, .cpp, .cu) against .clang-format.

Usage: python tools/format_check.py [--all] [FILE ...]

The files in FORMATTED must equal clang-format's output (exit status 1 otherwise, with the diff).
Every other tracked source is only reported with how many of its lines clang-format would change
(--all lists them): the sources predate the config, and reformatting a kernel wholesale would bury
its history under whitespace and collide with work in progress, so a file joins FORMATTED in the
change that reformats it on its own. Named FILEs are checked as if they were in FORMATTED.
clang-format comes from PATH, e.g. the PyPI wheel (`pip install clang-format`).
"""
from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTENSIONS = (".metal", ".h", ".cpp", ".cu")
# sources that match .clang-format exactly and must keep doing so
FORMATTED = [
    "kernels/instantiate.h",
    "kernels/dev/gemm_tiles.metal",
    "tests/dialect/kernels/dialect_helpers.h",
    "tools/prelude_tests/prelude_xk.cu",
    "tools/prelude_tests/real_rt.h",
]


def tracked_sources() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return sorted(f for f in out.stdout.splitlines() if f.endswith(EXTENSIONS))


def formatted(exe: str, path: str) -> tuple[list[str], list[str]]:
    """(the file's lines, clang-format's lines); .metal is formatted as C++ (its superset here)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    r = subprocess.run([exe, "--style=file", f"--assume-filename={os.path.join(ROOT, path)}.cpp"],
                       input=text, capture_output=True, text=True, check=True)
    return text.splitlines(keepends=True), r.stdout.splitlines(keepends=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="report every tracked source")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    exe = shutil.which("clang-format")
    if exe is None:
        print("format check: clang-format not found (pip install clang-format)")
        return 1
    strict = list(dict.fromkeys(FORMATTED + a.files))
    others = [f for f in tracked_sources() if f not in strict] if a.all else []
    bad = 0
    for path in strict + others:
        have, want = formatted(exe, path)
        if have == want:
            continue
        changed = sum(1 for d in difflib.ndiff(have, want) if d.startswith("- "))
        if path in strict:
            bad += 1
            print(f"{path}: not formatted ({changed} lines differ):")
            sys.stdout.writelines(difflib.unified_diff(have, want, path, path + " (clang-format)"))
        else:
            print(f"{path}: {changed} lines differ (reported only)")
    print(f"format check: {len(strict)} formatted sources, {bad} not formatted")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
