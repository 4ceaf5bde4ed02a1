"""Exceptions of the runtime. Each names where the problem is: a `.metal` file and line, or the
argument of a dispatch."""
from __future__ import annotations

import os


class MSLError(ValueError):
    """Source outside the supported MSL dialect (see docs/dialect.md), found by the front end."""

    def __init__(self, file: str, line: int, message: str):
        self.file = file
        self.line = line
        self.message = message
        super().__init__(f"{os.path.basename(file)}:{line}: error: {message}")


class CompileError(RuntimeError):
    """The backend compiler (NVRTC, the C++ compiler, Metal) rejected translated source. The log
    names the original `.metal` file and line through #line directives."""


class DispatchError(ValueError):
    """A kernel call that cannot run: wrong arguments or grid size. Raised before dispatch."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says why."""
