"""Exceptions of the runtime. Each names where the problem is: a `.metal` file and line, or the
argument of a dispatch."""
from __future__ import annotations

import os
from typing import Callable


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


class ArgumentTypeError(DispatchError, TypeError):
    """A kernel argument of the wrong type (e.g. a float for an integral parameter)."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says why."""


def unavailable_reason(check: Callable[[], object]) -> str | None:
    """A backend's probe: None when `check()` runs, else the BackendUnavailable reason it raised."""
    try:
        check()
    except BackendUnavailable as e:
        return str(e)
    return None


class AsyncError(RuntimeError):
    """Queued work failed: a kernel launch, a completion callback or a copy. Raised at the first
    read or wait of anything that depends on the failed work (and at `synchronize()`, which waits
    for everything); `kernel` names the kernel that failed (None for a callback or a copy)."""

    def __init__(self, message: str, kernel: str | None = None):
        self.kernel = kernel
        super().__init__(message)


class ValidationError(AsyncError):
    """An out-of-bounds access or a divergent barrier found by validation mode
    (PYMETALNN_VALIDATE=1, cpu backend); the message names the kernel, the `.metal` file and line,
    the argument, the index and the size."""
