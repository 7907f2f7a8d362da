"""C library functions that Python's os module does not expose (sync_file_range, mallopt)."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable


def function(name: str, argtypes: list, restype=ctypes.c_int) -> Callable | None:
    """The C library's `name`, typed; None where there is no such function (not glibc/Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        found = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    found.argtypes = argtypes
    found.restype = restype
    return found
