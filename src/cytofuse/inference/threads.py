"""Threads of prediction: the model threads that run whole batches side by side, and the priority of
the background threads (heat-map writer, overlay, read-ahead) beside them."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor


def default_workers() -> int:
    """Model threads by default: as many as torch would use for one forward (one per core)."""
    import torch

    return max(1, torch.get_num_threads())


@contextlib.contextmanager
def single_threaded_ops(enabled: bool = True) -> Iterator[None]:
    """torch's intra-op thread count set to 1 inside the block (process-wide), restored after."""
    import torch

    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(before)


def in_order(fn: Callable[[int], object], items: Sequence[int], workers: int) -> Iterator:
    """``fn(item)`` for every item, run by ``workers`` threads (0: in the calling thread), yielded
    in the items' order. At most ``2 * workers`` calls are under way or waiting to be taken."""
    if workers <= 0:
        yield from (fn(i) for i in items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cytofuse-model")
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for job in pending:
            job.cancel()
        pool.shutdown(wait=True)


# When the model splits each operation over OpenMP threads (workers=0), the background threads
# (heat-map writer, overlay, read-ahead) run at a lower priority: on a few cores an equal-priority
# thread preempts one OpenMP thread and every parallel region then waits for it (measured on 2
# cores: 0.3 s of writing slowed a 1.9 s forward to 3.6 s; at nice 19 the forward kept its speed).
# With single-threaded batches side by side nothing waits on a preempted thread, and a low-priority
# writer would only starve until the last batch: background threads keep the normal priority.
WRITER_NICE = int(os.environ.get("CYTOFUSE_WRITER_NICE", "19"))


def background_nice(workers: int) -> int:
    return WRITER_NICE if workers == 0 else 0


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value (Linux threads have their own); elsewhere a no-op."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        pass
