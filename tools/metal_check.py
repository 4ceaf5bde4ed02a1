"""Check that kernel sources are valid Metal Shading Language 2.3 as Metal receives them.

    python tools/metal_check.py kernels examples     # every .metal file below; exit 1 on findings

Each finding is `file:line: error: [rule] message`; the rules are in docs/dialect.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pymetalnn.runtime.metal_check import check_file, metal_sources  # noqa: E402


def main(argv: list[str]) -> int:
    files = metal_sources(argv or ["kernels", "examples"])
    if not files:
        print("metal_check: no .metal files found", file=sys.stderr)
        return 2
    findings = [v for f in files for v in check_file(f)]
    for v in findings:
        print(v)
    print(f"metal_check: {len(files)} files, {len(findings)} findings", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
