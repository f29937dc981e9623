"""Per-image tasks on a Dask cluster: the patch stage and prediction as one task per image.

``scheduler`` names the cluster. ``"local:N"`` starts a ``distributed.LocalCluster`` of N worker
processes with one thread each on this machine, closed when the map ends; an address such as
``tcp://host:8786`` connects to a running scheduler (started by dask-jobqueue on SLURM, by the Dask
Kubernetes operator, or by ``dask scheduler`` by hand). ``None`` means no cluster: the callers keep
their local path. Workers read the images from storage the client shares, or from fsspec URLs
(``s3://``, ``gs://``, ``https://``, ``file://``: sent as given, never made absolute or resolved, and
read with the workers' own fsspec configuration and credentials), write their outputs (part files, heat
maps) on shared storage, and send back small results; the client puts them in the images' order, so what
is written does not depend on which worker ran a task, or how often.

A task that raises is retried (``retries``), and a task whose worker dies is rescheduled by the
scheduler (up to its ``distributed.scheduler.allowed-failures``). An error of cytofuse's own (a bad
input: the same on every try) is sent back instead of retried. Either way the client raises an
error naming the image and the worker. Nothing here is imported before a scheduler is given.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cytofuse.errors import ConfigError, CytofuseError

if TYPE_CHECKING:
    from distributed import Client

SCHEMES = ("tcp", "tls", "ucx", "ws", "wss")  # Dask's network protocols
CONNECT_TIMEOUT_S = 10.0  # how long a scheduler address may take to answer
RETRIES = 2  # extra tries of a task that raised
_FORMS = "local:N (N >= 1 worker processes on this machine) or a scheduler address with its scheme, e.g. tcp://host:8786"


class TaskError(CytofuseError, RuntimeError):
    """A per-image task failed on the cluster; the message names the image and the worker."""


def check_scheduler(value: str | None, *, what: str = "--scheduler") -> str | None:
    """``value`` as a scheduler (``local:N`` or ``scheme://host[:port]``), or None; error naming ``what`` otherwise."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower().startswith("local"):
        found = re.fullmatch(r"local:(\d+)", text)
        if found is None or int(found.group(1)) < 1:
            raise ConfigError(f"{what} must be {_FORMS}, got {value!r}")
        return text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        raise ConfigError(f"{what} {value!r} is not an address ({exc}); it must be {_FORMS}") from None
    if parts.scheme in ("http", "https"):
        raise ConfigError(f"{what} {value!r} is a web address (the dashboard's?); give the scheduler's own address, "
                          f"e.g. tcp://{parts.hostname or 'host'}:8786")
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ConfigError(f"{what} must be {_FORMS}, got {value!r}")
    return text


@contextmanager
def cluster_client(scheduler: str, *, timeout: float | None = None) -> Iterator["Client"]:
    """A Dask client of ``scheduler``: a LocalCluster started here for ``local:N``, else a running scheduler's
    (waited for ``timeout`` seconds, default :data:`CONNECT_TIMEOUT_S`)."""
    import logging

    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError(f"--scheduler {scheduler!r} needs Dask: pip install 'cytofuse[distributed]'") from None
    scheduler = check_scheduler(scheduler)
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    if scheduler.startswith("local:"):
        n = int(scheduler.split(":")[1])
        # no dashboard, and the scheduler's HTTP server on a free port (not 8787, which another cluster may hold)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                          scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=logging.ERROR) as cluster, \
                Client(cluster, set_as_default=False) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=f"{timeout}s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"--scheduler {scheduler!r}: no Dask scheduler answered there within {timeout:g} s "
                          f"({type(exc).__name__}: {exc}); start one (`dask scheduler`) or check the address "
                          "and port") from None
    with client:
        yield client


@dataclass(frozen=True)
class Failure:
    """An input error of one task, sent back to the client instead of being retried."""

    image: str
    worker: str
    kind: str  # the name of the cytofuse.errors class
    message: str


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "<not a Dask worker>"


def run_task(fn: Callable, image: str, args: tuple) -> Any:
    """``fn(*args)`` on a worker: a cytofuse error comes back as a :class:`Failure`, any other error is
    raised again (and retried) as a :class:`TaskError` naming the image, the worker and the failing line."""
    import traceback

    try:
        return fn(*args)
    except CytofuseError as exc:
        return Failure(image, _worker_address(), type(exc).__name__, str(exc))
    except Exception as exc:  # noqa: BLE001 - any error, named with where it happened
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise TaskError(f"image {image} failed on worker {_worker_address()}: {type(exc).__name__}: {exc} "
                        f"(at {frame.filename}:{frame.lineno})") from None


def _raise_failure(failure: Failure) -> None:
    from cytofuse import errors

    kind = getattr(errors, failure.kind, CytofuseError)
    kind = kind if isinstance(kind, type) and issubclass(kind, CytofuseError) else CytofuseError
    raise kind(f"{failure.message} (image {failure.image}, on worker {failure.worker})")


def _task_error(future, image: str, retries: int) -> TaskError:
    """The error of a task that did not finish, naming its image and (where known) its worker."""
    if future.status == "cancelled":
        return TaskError(f"image {image}: the cluster cancelled its task (scheduler lost or shut down?)")
    exc = future.exception()
    if isinstance(exc, TaskError):
        return TaskError(f"{exc}; tried {retries + 1} times")
    return TaskError(f"image {image}: its task failed on the cluster: {type(exc).__name__}: {exc}")


def map_images(fn: Callable, calls: Sequence[tuple], *, images: Sequence[str], scheduler: str,
               description: str = "images", progress: bool = True, done: int = 0,
               retries: int = RETRIES) -> Iterator[tuple[int, Any]]:
    """``fn(*calls[i])`` as one Dask task per image on ``scheduler``; yield ``(i, result)`` as tasks finish.

    images: a name per call (its file), for the progress bar's count and for error messages.
    done: images finished before (a resumed stage), counted in the progress bar.
    ``fn`` and its arguments travel by Dask's protocol, so they must be importable on the workers
    (cytofuse installed there) and paths in them must be valid there (shared storage); image URLs
    (``cytofuse.io.readers.ImageURL``) travel unchanged."""
    from rich.progress import Progress

    if len(calls) != len(images):
        raise ValueError(f"map_images needs one image name per call, got {len(images)} names for {len(calls)} calls")
    if not calls:
        return
    token = uuid.uuid4().hex[:8]
    keys = [f"cytofuse-{description.replace(' ', '-')}-{token}-{i}" for i in range(len(calls))]
    position = {k: i for i, k in enumerate(keys)}
    with cluster_client(scheduler) as client, Progress(disable=not progress) as bar:
        from distributed import as_completed

        task = bar.add_task(f"{description} on {scheduler}", total=done + len(calls), completed=done)
        futures = client.map(run_task, [fn] * len(calls), list(images), list(calls), key=keys, pure=False,
                             retries=retries)
        pending = {f.key: f for f in futures}
        del futures
        try:
            with client.as_current():  # as_completed finds its client here, not in a global default
                finished = as_completed(list(pending.values()))
            for future in finished:
                i = position[future.key]
                if future.status != "finished":
                    raise _task_error(future, images[i], retries)
                result = future.result()
                del pending[future.key]
                future.release()  # the result leaves the worker's memory
                if isinstance(result, Failure):
                    _raise_failure(result)
                yield i, result
                bar.advance(task)
        finally:
            if pending:
                client.cancel(list(pending.values()))
