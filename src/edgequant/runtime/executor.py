"""Where independent work units run: in this process, in local worker processes, or on Ray.

A unit is ``fn(shared, item)``: ``fn`` a module-level function, ``shared`` and ``item``
picklable values (model bytes, sample index ranges, plans, cached arrays). ``shared`` travels
once per worker (a process pool's initializer, Ray's object store), the items one by one.
Results come back in the order of the items, so every back end gives the same bytes as long
as the units are pure — which is the contract of every caller (calibration shards, layerwise
trials, candidate scoring)::

    with executor.pool(shared) as pool:
        results = pool.map(fn, items)

``InProcess`` is the default and runs the units one after the other here; ``LocalProcesses(n)``
starts ``n`` spawned processes (``--workers N``); ``RayCluster(address)`` sends the units to
a Ray cluster (``--ray ADDRESS``; the ``edgequant[ray]`` extra; every node needs the same
edgequant installed).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from edgequant.errors import ConfigError, EdgequantError

log = logging.getLogger(__name__)

Unit = Callable[[Any, Any], Any]


class Pool(Protocol):
    def map(self, fn: Unit, items: Sequence[Any]) -> list[Any]: ...


class Executor(Protocol):
    """Runs work units; ``workers`` says how many at once (how callers shard their work)."""

    @property
    def workers(self) -> int: ...

    def pool(self, shared: Any) -> contextlib.AbstractContextManager[Pool]: ...


class _Here:
    def __init__(self, shared: Any):
        self.shared = shared

    def map(self, fn: Unit, items: Sequence[Any]) -> list[Any]:
        return [fn(self.shared, item) for item in items]


class InProcess:
    """Every unit here, one after the other."""

    workers = 1

    @contextlib.contextmanager
    def pool(self, shared: Any) -> Iterator[Pool]:
        yield _Here(shared)


_SHARED: Any = None  # a worker process's copy of the pool's shared value


def _install(shared: Any) -> None:
    global _SHARED
    _SHARED = shared


def _call(job: tuple[Unit, Any]) -> Any:
    fn, item = job
    return fn(_SHARED, item)


class _Processes:
    def __init__(self, pool: ProcessPoolExecutor):
        self._pool = pool

    def map(self, fn: Unit, items: Sequence[Any]) -> list[Any]:
        try:
            return list(self._pool.map(_call, [(fn, item) for item in items]))
        except BrokenProcessPool:
            raise EdgequantError(
                "worker processes died before finishing (spawned workers import the main module: in a "
                "script, call edgequant under `if __name__ == \"__main__\":`; or out of memory)") from None


class LocalProcesses:
    """``workers`` spawned worker processes on this machine (spawned, not forked: onnxruntime's
    threads do not survive a fork)."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ConfigError(f"workers must be ≥ 1, got {workers}")
        self.workers = workers

    @contextlib.contextmanager
    def pool(self, shared: Any) -> Iterator[Pool]:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_install,
                                 initargs=(shared,)) as pool:
            yield _Processes(pool)


def _ray_call(fn: Unit, shared: Any, item: Any) -> Any:
    return fn(shared, item)


class _RayPool:
    def __init__(self, ray: Any, shared_ref: Any):
        self._ray, self._ref = ray, shared_ref
        self._remote = ray.remote(_ray_call)

    def map(self, fn: Unit, items: Sequence[Any]) -> list[Any]:
        return self._ray.get([self._remote.remote(fn, self._ref, item) for item in items])


class RayCluster:
    """Units as Ray tasks on the cluster at ``address`` (``host:port`` or ``ray://host:port``).
    ``workers`` is the cluster's CPU count when connected (how callers shard their work)."""

    def __init__(self, address: str):
        self.address = address
        self._workers: int | None = None

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray needs Ray: pip install 'edgequant[ray]'") from None
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise EdgequantError(f"cannot connect to the Ray cluster at {self.address}: {first}") from None
        return ray

    @property
    def workers(self) -> int:
        if self._workers is None:
            self._workers = max(1, int(self._ray().cluster_resources().get("CPU", 1)))
        return self._workers

    @contextlib.contextmanager
    def pool(self, shared: Any) -> Iterator[Pool]:
        ray = self._ray()
        ref = ray.put(shared)
        try:
            yield _RayPool(ray, ref)
        finally:
            del ref


def executor_for(workers: int = 1, ray_address: str | None = None) -> Executor:
    """The back end the options ask for: Ray, local processes, or this process."""
    if ray_address:
        return RayCluster(ray_address)
    if workers > 1:
        return LocalProcesses(workers)
    return InProcess()


def shards(count: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges splitting ``count`` items into at most ``parts`` near-equal
    contiguous shards whose starts are multiples of ``align`` (a batch size)."""
    blocks = -(-count // align) if count else 0
    parts = max(1, min(parts, blocks))
    out = []
    for k in range(parts):
        lo, hi = blocks * k // parts * align, min(count, blocks * (k + 1) // parts * align)
        if hi > lo:
            out.append((lo, hi))
    return out or [(0, 0)]
