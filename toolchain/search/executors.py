"""Where independent pieces of work run: in this process (:class:`LocalExecutor`) or on Ray (:class:`RayExecutor`).

Two shapes of work, each with one ordered API whatever the executor:

* ``executor.pool(fn)`` -> a :class:`LocalPool` / :class:`RayPool` whose ``map(items)`` yields ``(fn(item), seconds)``
  for every item, **in the order of the items** (on Ray: :class:`ray.util.ActorPool`), as soon as that item's result
  is there. On Ray, ``workers`` actors each receive one copy of ``fn`` (put into the object store once, so a
  super-network of 90 MB travels once per worker, not once per call) and keep it for every later call; each actor
  runs torch with ``cpus_per_worker`` threads.
  The search uses it: ``fn`` is the pure ``evaluate(subnet)``; caching, budgets and the history stay with the caller.
* ``executor.run(fn, items, resources=...)`` -> ``[fn(item) for item in items]``, each item a one-off task; on Ray a
  task may ask for custom resources (e.g. ``{"target:arm64": 1}``, to run on the node that *is* that device). Profiling
  several targets uses it.

An ``fn`` may define ``cached(item)``: a result the driver can give without real work (``None`` otherwise); a
:class:`RayPool` answers such items on the driver instead of sending them to a worker (and starts no actor at all
when every item is answered that way).

Ray is optional (``pip install 'nasprune[ray]'``): :func:`make_executor` names that command when it is missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
RAY_INSTALL_HINT = "pip install 'nasprune[ray]'"


class ExecutorError(RuntimeError):
    """An executor that cannot be set up as asked (Ray missing, unreachable cluster, bad option)."""


def _timed(fn: Callable, item) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(item)
    return result, time.perf_counter() - t0


def _cached(fn, item):
    lookup = getattr(fn, "cached", None)
    return lookup(item) if callable(lookup) else None


# ---------------------------------------------------------------------------------------------------- local
class _Closes:
    """``with`` support: ``close()`` on leaving the block."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalPool(_Closes):
    """Calls ``fn`` in this process, one item after the other (lazily: the next item runs when it is asked for)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def map(self, items: Iterable) -> Iterator[tuple[Any, float]]:
        for item in items:
            yield _timed(self.fn, item)


class LocalExecutor(_Closes):
    """Everything in this process, in order: the default, and the reference a :class:`RayExecutor` must match."""

    name = "local"

    def __init__(self):
        self.workers = 1

    def pool(self, fn: Callable) -> LocalPool:
        return LocalPool(fn)

    def run(self, fn: Callable, items: Sequence, resources: Sequence[dict | None] | None = None,
            exclusive: Sequence[bool] | None = None) -> list:
        return [fn(item) for item in items]

    def describe(self) -> str:
        return "local (this process)"


# ------------------------------------------------------------------------------------------------------ ray
def import_ray():
    """``ray``, or an :class:`ExecutorError` that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed ({e}); install it with: "
                            f"{RAY_INSTALL_HINT}") from None
    return ray


class _Holder:
    """A Ray actor's state: one copy of ``fn`` (deserialised once, in the actor), called for each item."""

    def __init__(self, fn, threads: int):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import torch

            torch.set_num_threads(max(1, int(threads)))
        except ImportError:  # pragma: no cover - fn does not need torch
            pass
        self.fn = fn

    def call(self, item):
        return _timed(self.fn, item)

    def pid(self) -> int:
        return os.getpid()


_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_saved_cluster_mode = None  # (the variable, Ray's constant) as they were before start_local_ray


def start_local_ray(num_cpus: int | None = None, resources: dict | None = None):
    """Start a private one-node Ray instance that listens on 127.0.0.1 only; returns ``ray``.

    Ray binds its servers to the machine's outward address unless it runs in single-node mode: this sets that mode
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` for the processes it starts, and the same constant in this process),
    so nothing of the instance is reachable from, or talks to, another machine. :func:`stop_local_ray` undoes it.
    """
    global _saved_cluster_mode
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves this machine
    ray = import_ray()
    if _saved_cluster_mode is None:
        _saved_cluster_mode = (os.environ.get(_CLUSTER_ENV), None)
    os.environ[_CLUSTER_ENV] = "0"
    # Ray has no public switch for this: ray.init resolves a loopback node address to the outward one unless the
    # single-node mode is on, and Ray reads that mode from the variable only once, when it is first imported
    # (ray._private.ray_constants.ENABLE_RAY_CLUSTER; see ray-project/ray#26293). The variable covers the processes
    # Ray starts; this process has imported Ray already, so the private constant is set here too.
    try:
        from ray._private import ray_constants

        if _saved_cluster_mode[1] is None:
            _saved_cluster_mode = (_saved_cluster_mode[0], ray_constants.ENABLE_RAY_CLUSTER)
        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # another Ray: it may then also listen on the machine's address
        log.warning("could not put Ray %s in single-node mode; it may listen beyond 127.0.0.1", ray.__version__)
    ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, configure_logging=False)
    return ray


def stop_local_ray() -> None:
    """Shut Ray down and restore the cluster mode :func:`start_local_ray` changed."""
    global _saved_cluster_mode
    ray = import_ray()
    ray.shutdown()
    if _saved_cluster_mode is not None:
        env, flag = _saved_cluster_mode
        if env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = env
        if flag is not None:
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = flag
        _saved_cluster_mode = None


def _run_task(fn, item):
    return fn(item)


class RayPool(_Closes):
    """``workers`` Ray actors, each holding one copy of ``fn``, behind a :class:`ray.util.ActorPool`, whose ``map``
    keeps the order of the items.

    Actors are started on the first item a worker must compute (and stay for later calls); :meth:`close` ends them.
    """

    def __init__(self, ray, fn: Callable, workers: int, cpus_per_worker: float):
        self._ray, self.fn, self.workers, self.cpus_per_worker = ray, fn, int(workers), cpus_per_worker
        self._actors: list = []
        self._pool = None

    def _start(self):
        if not self._actors:
            from ray.util import ActorPool

            ray = self._ray
            ref = ray.put(self.fn)  # serialised once; every actor fetches the same object
            threads = max(1, int(round(self.cpus_per_worker)))
            actor = ray.remote(_Holder).options(num_cpus=self.cpus_per_worker)
            self._actors = [actor.remote(ref, threads) for _ in range(self.workers)]
            self._pool = ActorPool(self._actors)
        return self._pool

    @property
    def pids(self) -> list[int]:
        """Process ids of the actors (starts them)."""
        self._start()
        return self._ray.get([a.pid.remote() for a in self._actors])

    def map(self, items: Iterable) -> Iterator[tuple[Any, float]]:
        """``(fn(item), seconds)`` per item, in order; an actor takes the next item when its result has been read."""
        items = list(items)
        hits = [_cached(self.fn, item) for item in items]
        todo = [item for item, hit in zip(items, hits) if hit is None]
        pool = self._start() if todo else None
        results = pool.map(lambda actor, item: actor.call.remote(item), todo) if todo else iter(())
        try:
            for hit in hits:
                if hit is not None:
                    yield hit, 0.0
                else:
                    with _task_errors(self._ray):
                        result = next(results)
                    yield result
        finally:
            if pool is not None and pool.has_next():  # an error or an abandoned iteration: stop what still runs
                self.close()  # (killing the actors; fresh ones start next time)

    def close(self) -> None:
        for a in self._actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
        self._pool = None


@contextlib.contextmanager
def _task_errors(ray):
    """Re-raise a Ray task's own exception (not Ray's wrapper) where it can."""
    try:
        yield
    except ray.exceptions.RayTaskError as e:
        raise e.as_instanceof_cause() from None


def _get(ray, ref):
    """``ray.get``, re-raising a task's own exception."""
    with _task_errors(ray):
        return ray.get(ref)


class RayExecutor(_Closes):
    """Work on a Ray cluster: an existing one (``address``, e.g. ``ray://head:10001`` or ``auto``), the instance this
    process is already connected to, or a new local instance on 127.0.0.1 (stopped again by :meth:`close`).

    ``workers``: actors of a :meth:`pool` (default: the cluster's CPUs / ``cpus_per_worker``).
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, cpus_per_worker: float = 1.0,
                 num_cpus: int | None = None):
        ray = import_ray()
        self._ray = ray
        self._owns = False
        if workers is not None and int(workers) < 1:
            raise ExecutorError(f"--workers must be at least 1, got {workers}")
        if not cpus_per_worker > 0:
            raise ExecutorError(f"cpus per worker must be positive, got {cpus_per_worker}")
        if not ray.is_initialized():
            try:
                if address:
                    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                             configure_logging=False)
                else:  # a private instance on the loopback interface
                    start_local_ray(num_cpus=num_cpus)
            except ExecutorError:
                raise
            except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ...
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ExecutorError(f"cannot connect to {where}: {type(e).__name__}: {e}") from None
            self._owns = True
        self.address = address
        self.cpus_per_worker = float(cpus_per_worker)
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self.workers = int(workers) if workers is not None else max(1, int(cpus // self.cpus_per_worker))
        if self.workers * self.cpus_per_worker > cpus:
            log.warning("%d workers x %g CPUs ask for more than the cluster's %g CPUs: some wait for others",
                        self.workers, self.cpus_per_worker, cpus)

    @property
    def local(self) -> bool:
        """True when the cluster is this machine alone (one node)."""
        return len([n for n in self._ray.nodes() if n.get("Alive")]) <= 1

    def describe(self) -> str:
        cpus = self._ray.cluster_resources().get("CPU", 0)
        nodes = len([n for n in self._ray.nodes() if n.get("Alive")])
        return (f"ray ({'cluster at ' + self.address if self.address else 'local instance'}: {nodes} node(s), "
                f"{cpus:g} CPUs; {self.workers} worker(s) x {self.cpus_per_worker:g} CPU)")

    def pool(self, fn: Callable) -> RayPool:
        return RayPool(self._ray, fn, self.workers, self.cpus_per_worker)

    def resources(self) -> dict[str, float]:
        return dict(self._ray.cluster_resources())

    def run(self, fn: Callable, items: Sequence, resources: Sequence[dict | None] | None = None,
            exclusive: Sequence[bool] | None = None) -> list:
        """``[fn(item) for item in items]`` as Ray tasks. ``resources[i]``: custom resources item ``i`` asks for (its
        task runs on a node that offers them; tasks on different nodes run at the same time). Items with
        ``exclusive[i]`` run one after another on the driver's node, each after the previous one finished, so
        that they do not share its cores."""
        ray = self._ray
        items = list(items)
        resources = list(resources) if resources is not None else [None] * len(items)
        exclusive = list(exclusive) if exclusive is not None else [False] * len(items)
        task = ray.remote(_run_task)
        refs: dict[int, Any] = {}
        for i, item in enumerate(items):
            if not exclusive[i]:
                refs[i] = task.options(num_cpus=0, resources=resources[i] or {}).remote(fn, item)
        results: dict[int, Any] = {}
        if any(exclusive):
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
            for i, item in enumerate(items):
                if exclusive[i]:
                    results[i] = _get(ray, task.options(num_cpus=0, scheduling_strategy=here).remote(fn, item))
        for i, ref in refs.items():
            results[i] = _get(ray, ref)
        return [results[i] for i in range(len(items))]

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            stop_local_ray()
        self._owns = False


# -------------------------------------------------------------------------------------------------- factory
def check_executor(name: str | None = "local", workers: int | None = None, address: str | None = None) -> str:
    """The executor's name, after the checks that need no cluster (known name, Ray installed, workers >= 1): a
    command fails on them at once, not after hours of training."""
    name = (name or "local").lower()
    if address and name == "local":
        name = "ray"
    if name not in EXECUTORS:
        raise ExecutorError(f"unknown executor '{name}'; choose one of: {', '.join(EXECUTORS)}")
    if workers is not None and int(workers) < 1:
        raise ExecutorError(f"--workers must be at least 1, got {workers}")
    if name == "local" and workers not in (None, 1):
        raise ExecutorError("--workers needs --executor ray (the local executor runs everything in this process)")
    if name == "ray":
        import_ray()
    return name


def make_executor(name: str | None = "local", workers: int | None = None, address: str | None = None,
                  cpus_per_worker: float = 1.0):
    """``local`` (default) or ``ray``; ``workers`` and ``address`` are for Ray (``address`` implies ``ray``)."""
    if check_executor(name, workers, address) == "local":
        return LocalExecutor()
    return RayExecutor(workers=workers, address=address, cpus_per_worker=cpus_per_worker)
