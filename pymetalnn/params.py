"""Python mirrors of the parameter structs in kernels/params.h, one ctypes.Structure per struct.

A kernel takes its struct as `constant XParams& p [[buffer(i)]]`; the host fills the mirror and
passes it. Fields are 4 bytes (uint32, int32, float32) so every backend agrees on the layout;
`parse_header` reads params.h so tests can check each mirror field by field.
"""
from __future__ import annotations

import ctypes
import os
import re

from .runtime.core import KERNEL_DIR

U32, I32, F32 = ctypes.c_uint32, ctypes.c_int32, ctypes.c_float
C_TYPES = {"uint": U32, "int": I32, "float": F32}


class Params(ctypes.Structure):
    """Base of every mirror; `Params.registry` maps struct name -> class."""

    registry: dict[str, type[Params]] = {}

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        Params.registry[cls.__name__] = cls

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in self._fields_)
        return f"{type(self).__name__}({fields})"


def parse_header(path: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """struct name -> [(type, field), ...] as declared in kernels/params.h."""
    path = path or os.path.join(KERNEL_DIR, "params.h")
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"//[^\n]*|/\*.*?\*/", "", f.read(), flags=re.S)
    out: dict[str, list[tuple[str, str]]] = {}
    for m in re.finditer(r"struct\s+(\w+)\s*\{(.*?)\}\s*;", text, re.S):
        fields = []
        for decl in m.group(2).split(";"):
            decl = decl.strip()
            if not decl:
                continue
            ty, *names = decl.replace(",", " ").split()
            fields.extend((ty, n) for n in names)
        out[m.group(1)] = fields
    return out


# ---- conv / gemm --------------------------------------------------------------------------

# ---- other CNN ops ------------------------------------------------------------------------

# ---- recurrent and optimizers -------------------------------------------------------------
