"""Reach a Dask cluster: an embedded LocalCluster (default), a ``distributed.Client``, or an address.

The embedded cluster starts one single-threaded worker *process* per core (per GPU on a CUDA machine: see
:func:`gpu_workers`). Dask's nanny would start them
with ``MALLOC_TRIM_THRESHOLD_=65536``, which turns off glibc's dynamic mmap threshold (every tensor-sized
allocation is then mmapped and unmapped, and small-model torch training such as W1's runs about 1.7x
slower); the embedded workers get :mod:`flgraph.local.malloc`'s settings instead (large blocks from the heap,
freed memory kept for the next round). Users who bring their own cluster get the same by setting them in
``distributed.nanny.pre-spawn-environ`` in the Dask config of the machines where the nannies start (see
the documentation's "Advanced: tuning" page, docs/advanced.md).

Example:
    >>> from flgraph.cluster import connect
    >>> handle = connect(None, workers=1)  # doctest: +SKIP
    >>> handle.close()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing
import os
import shlex
import sys
import threading
from dataclasses import dataclass
from typing import Any

import dask
from distributed import Client, LocalCluster

from .errors import ClusterError
from .local import malloc

__all__ = ["ClusterHandle", "connect", "cuda_devices", "embedded", "embedded_client", "gpu_workers", "worker_threads"]

log = logging.getLogger("flgraph")

WATCH_INTERVAL_S = 0.5
"""How often the watcher of a scheduler in another process looks at the client's connection."""


@dataclass
class ClusterHandle:
    """A connected Dask client and, for the embedded cluster, the cluster it owns.

    A scheduler in another process can be lost (its process killed, its machine gone). Dask's client then
    cancels every future at once and tries to reconnect for ``distributed.comm.timeouts.connect`` (30 s)
    while the round's retries wait on it; the run's data on the cluster is gone either way. So for a
    scheduler reached over the network, a watcher notices the lost connection (``lost``) within
    :data:`WATCH_INTERVAL_S` and closes a client flgraph made, which ends the waits at once.
    """

    client: Client
    cluster: LocalCluster | None
    owns_client: bool = True
    address: str = ""
    lost: bool = False
    _stop: threading.Event | None = None

    def watch(self) -> None:
        """Start noticing a lost scheduler (a daemon thread, until :meth:`close`)."""
        self.address = self.address or str(getattr(self.client.scheduler, "address", "") or "")
        self._stop = threading.Event()
        threading.Thread(target=self._watch, args=(self._stop,), name="flgraph-scheduler-watch", daemon=True).start()

    def scheduler_lost(self) -> bool:
        """Whether the connection to the scheduler was lost (asked now, and noticed by the watcher)."""
        self.lost = self.lost or (self._stop is not None and self.client.status == "connecting")
        return self.lost

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(WATCH_INTERVAL_S):
            if self.scheduler_lost():
                log.error("flgraph: lost the connection to the Dask scheduler at %s", self.address)
                if self.owns_client:
                    with contextlib.suppress(Exception):
                        self.client.close(timeout=5)
                return

    @property
    def dashboard_link(self) -> str:
        try:
            if self.cluster is not None:
                return str(self.cluster.dashboard_link)
            return str(self.client.dashboard_link)
        except Exception:
            return ""

    def workers(self) -> dict[str, int]:
        """Worker address -> number of threads."""
        return worker_threads(self.client)

    def close(self) -> None:
        """Close the client and the cluster if flgraph made them; a user's Client stays open."""
        if self._stop is not None:
            self._stop.set()
        if self.owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def worker_threads(client: Client) -> dict[str, int]:
    """Worker address -> number of threads, asked of the scheduler now.

    Not ``client.scheduler_info(n_workers=-1)``: it fetches into a cache and then returns the cache, and
    the client's periodic refresh (every 2 s, with no per-worker entries) can overwrite that cache in
    between, so it sometimes returns no workers on a cluster that has them."""
    scheduler = client.scheduler
    if scheduler is None:
        raise ClusterError("the Dask client is not connected to a scheduler",
                           fix="connect it first (`Client(address)`) or pass the scheduler's address")
    info = client.sync(scheduler.identity, n_workers=-1)["workers"]
    return {addr: int(w.get("nthreads", 1)) for addr, w in info.items()}


QUIET = {
    "distributed.worker.profile.interval": "100ms",
    "distributed.admin.tick.interval": "200ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
}
"""The embedded cluster's background work, slowed down from distributed's defaults (profile samples every
10 ms, event-loop ticks every 20 ms, system monitor every 0.5 s, memory monitor every 0.1 s). On a machine
whose cores all train, every wake-up in a worker, a nanny or the scheduler takes a core from a client's
training; at distributed's defaults they take 10-15% of the client work of a W1 round on 2 cores.
The dashboard keeps every page; the Profile page gets 10 samples a second instead of 100."""


def cuda_devices() -> int:
    """How many CUDA devices this machine's workers may use: 0 without torch or without CUDA.

    Asked through torch only when torch is installed; ``torch.cuda.device_count`` reads the driver and
    creates no CUDA context, so the worker processes started afterwards are free to use the devices."""
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def gpu_workers(gpus: int, workers: int | None) -> list[dict[str, Any]]:
    """The embedded workers' Dask options on a machine with ``gpus`` CUDA devices (none without GPUs).

    By default one worker process per GPU, each seeing only its own device (``CUDA_VISIBLE_DEVICES``, so
    ``LocalTrain(device="cuda")`` trains on it as ``cuda:0``) and offering the Dask worker resource
    ``{"GPU": 1}``. An explicit ``workers`` count spreads the workers over the devices in turn; two
    workers then share a device, so none offers a whole GPU as a resource.

    Example:
        >>> gpu_workers(0, None)
        []
        >>> gpu_workers(2, None)
        [{'env': {'CUDA_VISIBLE_DEVICES': '0'}, 'resources': {'GPU': 1}},
         {'env': {'CUDA_VISIBLE_DEVICES': '1'}, 'resources': {'GPU': 1}}]
        >>> [w["env"]["CUDA_VISIBLE_DEVICES"] for w in gpu_workers(2, 3)], gpu_workers(2, 3)[0].get("resources")
        (['0', '1', '0'], None)
    """
    if gpus <= 0:
        return []
    n = workers or gpus
    whole = n <= gpus  # each worker has a device of its own
    return [{"env": {"CUDA_VISIBLE_DEVICES": str(i % gpus)}, **({"resources": {"GPU": 1}} if whole else {})}
            for i in range(n)]


def embedded(workers: int | None = None, *, gpus: int | None = None) -> LocalCluster:
    """Start the embedded cluster: ``workers`` single-threaded worker processes (default: one per core, or
    one per GPU on a machine with CUDA devices: see :func:`gpu_workers`).

    ``gpus`` is the number of CUDA devices (default: :func:`cuda_devices`). Its dashboard listens on a free
    port of 127.0.0.1 (``cluster.dashboard_link``); background monitoring runs at the slower rates of
    :data:`QUIET`. The scheduler listens on 127.0.0.1 (TCP, for the worker processes) and in-process
    (``inproc://``, for :func:`embedded_client`). Bring your own ``LocalCluster`` for other settings."""
    if multiprocessing.parent_process() is not None and sys.modules["__main__"].__name__ == "__mp_main__":
        raise ClusterError(_MAIN_GUARD, fix=_MAIN_GUARD_FIX)
    per_gpu = gpu_workers(cuda_devices() if gpus is None else gpus, workers)
    n = len(per_gpu) or workers or max(1, min(os.cpu_count() or 1, 8))
    try:
        environ = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in malloc.child_environ().items()}
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None, **environ,
                              **QUIET}):
            cluster = LocalCluster(n_workers=0 if per_gpu else n, threads_per_worker=1, processes=True,
                                   dashboard_address=":0",
                                   silence_logs=logging.ERROR, host="127.0.0.1",
                                   scheduler_kwargs={"protocol": ["tcp://", "inproc://"],
                                                     "host": ["127.0.0.1", None], "port": [0, None]})
            if per_gpu:
                try:  # each worker its own options (its device), then started as LocalCluster starts them
                    spec = cluster.new_spec
                    for i, options in enumerate(per_gpu):
                        cluster.worker_spec[i] = {"cls": spec["cls"], "options": {**spec["options"], **options}}
                    cluster.scale(n)
                    cluster.wait_for_workers(n, timeout=120)
                except BaseException:
                    cluster.close()
                    raise
            return cluster
    except RuntimeError as e:
        raise ClusterError(f"the embedded Dask cluster's worker processes failed to start ({e})",
                           fix=_MAIN_GUARD_FIX) from e


def embedded_client(cluster: LocalCluster) -> Client:
    """A client of ``cluster`` (one that :func:`embedded` started) that talks to its scheduler in-process.

    The scheduler lives in this process; a client reaching it over TCP pays a socket write, a wake-up and
    a read on both ends for every message (tasks submitted, results reported, futures released), all on
    the event loop that also serves the workers. Over ``inproc://`` on the cluster's own loop a message is
    a queue entry, with no socket and no wake-up on either end: a few milliseconds of the driver's CPU a
    W1 round, on the cores that train. Scatter and gather still go straight to the workers
    (``direct_to_workers``). A cluster without an in-process listener gets a TCP client.
    """
    scheduler = getattr(cluster, "scheduler", None)
    listeners = getattr(scheduler, "listeners", [])
    inproc = [lst.contact_address for lst in listeners if lst.contact_address.startswith("inproc://")]
    if inproc:
        return Client(inproc[0], loop=cluster.loop, set_as_default=False, direct_to_workers=True)
    return Client(cluster, set_as_default=False, direct_to_workers=True)


_MAIN_GUARD_FIX = ("if you run a script, put the code that starts the run under "
                   "`if __name__ == \"__main__\":` (each worker process imports the script again); "
                   "otherwise see the worker errors logged above")
_MAIN_GUARD = ("this process is a Dask worker importing the user's script, and the script starts a run at "
               "import time")


def connect(cluster: Any = None, *, workers: int | None = None, timeout: float = 30.0) -> ClusterHandle:
    """A :class:`ClusterHandle` for ``cluster``: None (embedded), a Client, a cluster object, or an address."""
    if cluster is None:
        local = embedded(workers)
        # scatter and gather straight to and from the workers (all on 127.0.0.1), not through the scheduler:
        # the round's data then never passes through the scheduler's event loop, which this process shares
        try:
            return ClusterHandle(embedded_client(local), local)
        except BaseException:
            local.close()
            raise
    if isinstance(cluster, Client):
        handle = ClusterHandle(cluster, None, owns_client=False)
        handle.watch()
        return handle
    if isinstance(cluster, str):
        try:
            client = Client(cluster, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"could not reach the Dask scheduler at {cluster!r}: {e}",
                               fix="start it with `dask scheduler` and pass its tcp://HOST:PORT address") from e
        handle = ClusterHandle(client, None, address=cluster)
        handle.watch()
        if workers:
            try:
                client.wait_for_workers(workers, timeout=timeout)
            except BaseException:
                handle.close()
                raise
        return handle
    if hasattr(cluster, "scheduler_address"):
        handle = ClusterHandle(Client(cluster, set_as_default=False), None)
        handle.watch()
        return handle
    raise ClusterError(f"cannot use {type(cluster).__name__} as a cluster",
                       fix="pass None, a distributed.Client, a cluster object, or a scheduler address")


def scheduler_lost(address: str | None, under_way: str, directory: Any, workers: int | None) -> ClusterError:
    """The error of a run whose scheduler was lost: what was saved in its run directory (``directory``, a
    :class:`~flgraph.store.checkpoint.RunDirectory` or None) and the exact command that continues it."""
    address = address or "tcp://HOST:PORT"
    if directory is None:
        return ClusterError(f"the Dask scheduler at {address} was lost ({under_way}); nothing was saved: the "
                            "run writes no checkpoints", fix="start the scheduler and its workers again and run "
                            "again; pass checkpoint=PATH to make a run resumable")
    rounds = directory.snapshot_rounds()
    root = getattr(directory.group.store, "root", None)
    where = str(root) if root is not None else "its run directory"
    saved = (f"round {rounds[-1]} is saved in {where}" if rounds else
             f"no round was saved yet in {where}, which holds the run's configuration (resume starts it "
             "from round 0)")
    more = f" --workers {workers}" if workers else ""
    command = f"flgraph resume {shlex.quote(where)} --scheduler {address}{more}"
    return ClusterError(f"the Dask scheduler at {address} was lost ({under_way}); {saved}",
                        fix=f"start a scheduler and its workers, then continue with `{command}` "
                            f"(in Python: flgraph.resume({where!r}, cluster={address!r}))")
