"""Process settings applied at import: glibc's allocator thresholds (``cytofuse.runtime.tune_malloc``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from cytofuse import runtime
from cytofuse.runtime import MMAP_THRESHOLD, OPT_OUT, TRIM_THRESHOLD, USER_VARIABLES, tune_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
ALLOC_MIB, LARGE_MIB, REPEATS = 48, 96, 5  # below and above the 64 MiB mmap threshold

# Allocate, touch and free a 48 MiB block (then a 96 MiB one) with the C library itself, after
# importing cytofuse; print the tuning status and the minor page faults of the repeats after the first.
_PROBE = f"""
import ctypes, dataclasses, json, resource
import cytofuse
from cytofuse.runtime import tune_malloc
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def faults(mib):
    n = mib << 20
    def once():
        block = libc.malloc(n)
        ctypes.memset(block, 1, n)
        libc.free(block)
    once()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range({REPEATS}):
        once()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"status": dataclasses.asdict(tune_malloc()), "again": tune_malloc() is tune_malloc(),
                  "faults": faults({ALLOC_MIB}), "large_faults": faults({LARGE_MIB})}}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in (OPT_OUT, "GLIBC_TUNABLES", *USER_VARIABLES)}
    proc = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_tune_malloc_is_idempotent():
    first = tune_malloc()  # cytofuse's import already called it
    assert tune_malloc() is first
    assert isinstance(first.applied, bool) and first.reason


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt is only called on glibc")
def test_import_raises_the_thresholds_and_repeated_blocks_below_64_mib_stop_faulting():
    tuned, default = _probe(), _probe(**{OPT_OUT: "0"})
    assert tuned["status"] == {"applied": True, "reason": "glibc mmap and trim thresholds raised",
                               "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    assert tuned["again"] is True
    pages = REPEATS * (ALLOC_MIB << 20) // 4096
    assert tuned["faults"] < pages // 100  # the freed block is reused, not unmapped and faulted in again
    assert default["faults"] >= REPEATS * ALLOC_MIB // 2  # at least one fault per 2 MiB page, even with huge pages
    # above the threshold blocks are unmapped on free as by default: the heap keeps no holes that size
    assert tuned["large_faults"] >= REPEATS * LARGE_MIB // 2


@pytest.mark.parametrize(("env", "reason"), [
    ({OPT_OUT: "0"}, "CYTOFUSE_MALLOPT=0 turns it off"),
    ({OPT_OUT: "off"}, "CYTOFUSE_MALLOPT=off turns it off"),
    ({"MALLOC_TRIM_THRESHOLD_": "4096"}, "MALLOC_TRIM_THRESHOLD_ set in the environment; the user's setting is kept"),
    ({"MALLOC_MMAP_THRESHOLD_": "4096"}, "MALLOC_MMAP_THRESHOLD_ set in the environment; the user's setting is kept"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096"}, "glibc.malloc.trim_threshold set in the environment"),
])
def test_opt_out_and_the_users_own_settings_leave_malloc_alone(env, reason):
    status = _probe(**env)["status"]
    assert status["applied"] is False and status["mmap_threshold"] is None and status["trim_threshold"] is None
    assert status["reason"].startswith(reason)


class _FakeLibc:
    """A glibc stand-in whose mallopt refuses mmap thresholds above 32 MiB (as older glibc does)."""

    def __init__(self, *_args) -> None:
        self.calls: list[tuple[int, int]] = []
        self.gnu_get_libc_version = lambda: b"2.17"

        def mallopt(param: int, value: int) -> int:
            self.calls.append((param, value))
            return int(not (param == runtime.M_MMAP_THRESHOLD and value > 32 << 20))
        self.mallopt = mallopt


def test_refused_threshold_falls_back_and_other_platforms_are_left_alone(monkeypatch):
    for name in (OPT_OUT, "GLIBC_TUNABLES", *USER_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_status", None)
    monkeypatch.setattr(runtime.ctypes, "CDLL", _FakeLibc)
    status = tune_malloc()
    assert status == runtime.MallocTuning(True, "glibc mmap and trim thresholds raised", 32 << 20, TRIM_THRESHOLD)

    def no_libc(*_args):
        raise OSError("no C library handle")
    monkeypatch.setattr(runtime, "_status", None)
    monkeypatch.setattr(runtime.ctypes, "CDLL", no_libc)
    assert tune_malloc() == runtime.MallocTuning(False, "not glibc: nothing to tune")
