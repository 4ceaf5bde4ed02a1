"""`python -m pymetalnn`: which backends run here, and why the others do not."""
from __future__ import annotations

import os

from . import __version__
from .runtime import availability


def main() -> int:
    print(f"pymetalnn {__version__}")
    avail = availability()
    for name, reason in avail.items():
        print(f"  {name:6s} {'available' if reason is None else 'unavailable: ' + reason}")
    env = os.environ.get("PYMETALNN_BACKEND")
    default = env or next((n for n, r in avail.items() if r is None), None)
    print(f"default backend: {default}" + (" (from PYMETALNN_BACKEND)" if env else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
