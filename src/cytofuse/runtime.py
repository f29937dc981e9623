"""Process settings that cytofuse applies once, when it is imported.

:func:`tune_malloc` keeps glibc's allocator from handing mid-sized blocks (training batches,
the smaller activations) back to the operating system after each use. By default glibc
serves blocks above a threshold (which grows with use up to 32 MiB) with fresh ``mmap``
pages and unmaps them on ``free``, and trims the heap top as soon as 128 KiB are free;
every such block is then faulted in (and zeroed by the kernel) again page by page. On CPU
training at 400 px that was a third of the run time in the kernel.

The mmap threshold is fixed at 64 MiB, not higher, because of memory: blocks served from the
heap leave holes that later blocks of other sizes do not fit, and the heap grows with them.
Measured with ``benchmarks/bench_alloc.py`` (smallcnn, 400 px, batch 32 = 59 MiB per input
batch, 2-3 timed steps; 2-core machine shared with other jobs, 2026-11-29) against glibc's
defaults (peak RSS 3621 MiB, system time 0.71-0.81 of user time), two runs for most rows:

======================  ================  =========================================
thresholds              system time       peak RSS growth
======================  ================  =========================================
mmap 1 GiB, trim 1 GiB  0.19-0.41x        +1.7 to +3.4 GiB (+48-93 %), grows per step
mmap 256 MiB            0.27x             +1.5 GiB (+41 %)
mmap 128 MiB            0.72x             +1.0 GiB (+27 %)
mmap 64 MiB (this)      0.76-0.79x        +0.2 to +0.3 GiB (+6-9 %, 3.6-5.6 batches)
1 GiB + malloc_trim(0)  0.39x             +1.4 GiB (+39 %): the holes open within a step
  after every step
======================  ================  =========================================

So only blocks below 64 MiB are kept for reuse: the peak grows by a few input batches, and
the system time at 400 px falls by about a fifth (more at sizes whose blocks are all below
64 MiB). A user who prefers speed to memory sets ``MALLOC_MMAP_THRESHOLD_=1073741824`` and
``MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment.

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
MMAP_THRESHOLD = 64 << 20  # above it blocks are mmapped and unmapped again: see the module docstring
TRIM_THRESHOLD = 1 << 30
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
    """Fix glibc's mmap threshold at 64 MiB and raise its trim threshold to 1 GiB for this process, once; later calls
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
    mmap = next((value for value in (MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD) if libc.mallopt(M_MMAP_THRESHOLD, value) == 1), None)
    trim = TRIM_THRESHOLD if libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 else None
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
