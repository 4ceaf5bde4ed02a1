"""Check that kernel sources are valid Metal Shading Language 2.3 as Metal receives them.

    python tools/metal_check.py kernels examples     # every .metal file below; exit 1 on findings
    python tools/metal_check.py --known tools/metal_check_known.txt kernels examples

Each finding is `file:line: error: [rule] message`; the rules are in docs/dialect.md. With
--known, findings listed there (`rule name`, name quoted in the message) are printed as known
and do not fail the check, while an entry that matches nothing does (the list only shrinks).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pymetalnn.runtime.metal_check import Violation, check_file, metal_sources  # noqa: E402


def read_known(path: str) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].split()
            if line:
                out.append((line[0], line[1]))
    return out


def is_known(v: Violation, known: list[tuple[str, str]]) -> tuple[str, str] | None:
    for rule, name in known:
        if v.rule == rule and f"'{name}'" in v.message:
            return rule, name
    return None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", default=["kernels", "examples"])
    ap.add_argument("--known", help="file of known findings (rule name per line)")
    args = ap.parse_args(argv)
    files = metal_sources(args.paths)
    if not files:
        print("metal_check: no .metal files found", file=sys.stderr)
        return 2
    known = read_known(args.known) if args.known else []
    used: set[tuple[str, str]] = set()
    errors = 0
    for f in files:
        for v in check_file(f):
            k = is_known(v, known)
            if k:
                used.add(k)
                print(f"{v} (known: {args.known})")
            else:
                errors += 1
                print(v)
    stale = [k for k in known if k not in used]
    for rule, name in stale:
        print(f"{args.known}: '{rule} {name}' matches no finding any more: remove it")
    print(f"metal_check: {len(files)} files, {errors} findings, {len(used)} known", file=sys.stderr)
    return 1 if errors or stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
