"""Process settings that cytofuse applies once, when it is imported.

:func:`tune_malloc` keeps glibc's allocator from handing large blocks (training batches,
activations) back to the operating system after each use. By default glibc serves blocks
above a threshold with fresh ``mmap`` pages and unmaps them on ``free``, and trims the heap
top as soon as 128 KiB are free; every batch is then faulted in again page by page. On CPU
training at 400 px that was a third of the run time in the kernel (56.6 s wall, 35 s system
before; 35.4 s and 5 s with both thresholds at 1 GiB). The peak memory grows by at most
the blocks kept for reuse.

Environment: ``CYTOFUSE_MALLOPT=0`` turns it off; a ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` (or the same ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``) set by
the user is left in charge. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from dataclasses import dataclass

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30
FALLBACK_MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: older glibc refuses more
OPT_OUT = "CYTOFUSE_MALLOPT"
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


@dataclass(frozen=True)
class MallocTuning:
    """What :func:`tune_malloc` did: whether the thresholds are set, why (not), and to what (bytes)."""

    applied: bool
    reason: str
    mmap_threshold: int | None = None
    trim_threshold: int | None = None


_status: MallocTuning | None = None


def tune_malloc() -> MallocTuning:
    """Raise glibc's mmap and trim thresholds to 1 GiB for this process, once; later calls
    return the first call's status (the environment is read on the first call only)."""
    global _status
    if _status is None:
        _status = _skip_reason() or _apply()
    return _status


def _skip_reason() -> MallocTuning | None:
    if os.environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        return MallocTuning(False, f"{OPT_OUT}={os.environ[OPT_OUT]} turns it off")
    user = [name for name in USER_VARIABLES if name in os.environ]
    user += [name for name in USER_TUNABLES if name in os.environ.get("GLIBC_TUNABLES", "")]
    if user:
        return MallocTuning(False, f"{', '.join(user)} set in the environment; the user's setting is kept")
    return None


def _apply() -> MallocTuning:
    libc = _glibc()
    if libc is None:
        return MallocTuning(False, "not glibc: nothing to tune")
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap = next((value for value in (THRESHOLD, FALLBACK_MMAP_THRESHOLD) if libc.mallopt(M_MMAP_THRESHOLD, value) == 1), None)
    trim = THRESHOLD if libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1 else None
    if mmap is None or trim is None:
        return MallocTuning(False, f"mallopt refused: M_MMAP_THRESHOLD set to {mmap}, M_TRIM_THRESHOLD to {trim}", mmap, trim)
    return MallocTuning(True, "glibc mmap and trim thresholds raised", mmap, trim)


def _glibc() -> ctypes.CDLL | None:
    """The C library of this process when it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``)."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows has no process-wide C library handle
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), so autocast speeds it up."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
