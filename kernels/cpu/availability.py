"""Whether the engine may use the native CPU library: it is switched on, it builds and loads, and every kernel
agrees with its torch reference on a small case.

Asked when an attention backend is chosen (``auto`` resolved, or ``cpu`` checked): building the library and its
self-check happen once per process (they are properties of the machine); the ``GLMSERVE_NATIVE_CPU`` switch is read
every time it is asked. Sits above native.py and the kernel modules, which never import it.
"""
from __future__ import annotations

import ctypes
import functools
import logging

from glmserve.kernels.cpu import attention, fused_ops, native

logger = logging.getLogger(__name__)


def checked_library() -> ctypes.CDLL | None:
    """The process's library (``native.library``) where it builds and passes every self-check, else None (the
    reason is logged). Ignores the switch: ask ``native_cpu_available`` first."""
    return _self_checked(native.library())


@functools.lru_cache(maxsize=4)
def _self_checked(lib: ctypes.CDLL | None) -> ctypes.CDLL | None:
    """``lib`` if every kernel of it agrees with its torch reference (checked once per loaded library)."""
    if lib is None:
        return None
    if not (attention.self_check(lib) and fused_ops.self_check(lib)):
        logger.warning("native CPU kernels disagree with the torch reference: staying in torch")
        return None
    return lib


def native_cpu_available() -> bool:
    """``GLMSERVE_NATIVE_CPU`` is not 0 (read now) and the checked library is there (built on first call)."""
    return native.native_enabled() and checked_library() is not None
