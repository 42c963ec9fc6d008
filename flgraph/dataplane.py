"""A direct data path between the driver and the Dask workers on the same machine.

Dask moves a round's data with several messages through the scheduler: the params are scattered (the
scheduler is asked which workers run, the data goes to each worker, the scheduler is told where it is)
and each chunk's partial is gathered (the scheduler reports the task done, is asked where the result is,
then the worker is asked for it). On one machine these round trips are most of the framework's cost per
round (W1 on 2 workers: about 7 ms of a 140 ms round). With the data plane, Dask still schedules the
tasks (their keys, the dashboard, retries and worker deaths are Dask's), but:

* the driver *publishes* the round's params under a key; a chunk task *fetches* them from the driver
  when it starts (one request per worker process and round; later chunks on that worker reuse them);
* the chunk task *pushes* its partial back to the driver and returns ``None`` to Dask; the driver
  takes partials as they arrive.

It is one ZeroMQ ROUTER socket, served by a daemon thread of the driver, on an ``ipc://`` path inside a
directory only the driver's user can enter (mode 0700). Partials travel as pickles (protocol 5, the
arrays as separate zero-copy frames), as they would through Dask's own comms; the private directory keeps
other users out. It is used only when every worker runs on the driver's machine (the embedded cluster)
and the platform has ``ipc://`` sockets; :class:`~flgraph.transports.dask.DaskTransport` falls back to
Dask's scatter and gather otherwise, or when ``FLGRAPH_DATA_PLANE=0``.

Example:
    >>> import numpy as np
    >>> from flgraph.dataplane import DataPlane, fetch, push
    >>> plane = DataPlane()
    >>> plane.publish("params-r1", np.arange(4, dtype=np.float32))
    >>> plane.expect(["result-c0"])
    >>> fetch(plane.endpoint, "params-r1")        # what a chunk task does on a worker
    array([0., 1., 2., 3.], dtype=float32)
    >>> push(plane.endpoint, "result-c0", {"sum": 6.0})
    True
    >>> plane.take(["result-c0"], timeout=5.0)
    {'result-c0': {'sum': 6.0}}
    >>> plane.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np
import zmq

__all__ = ["DataPlane", "available", "fetch", "forget", "push"]

log = logging.getLogger("flgraph")

_GET, _PUT, _OK, _MISSING = b"get", b"put", b"ok", b"missing"
FETCH_TIMEOUT_S = 30.0  # a worker waits this long for the params before its task fails
PUSH_TIMEOUT_S = 10.0  # then the task returns its partial through Dask instead


def available() -> bool:
    """Whether this platform can run the data plane (``ipc://`` sockets, not switched off)."""
    if os.environ.get("FLGRAPH_DATA_PLANE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return sys.platform != "win32" and zmq.has("ipc")


class DataPlane:
    """The driver's end: published arrays out, pushed partials in (see the module docstring)."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="flgraph-plane-")  # mode 0700: only this user can connect
        self.endpoint = f"ipc://{self._dir}/plane"
        self._ctx = zmq.Context()
        self._published: dict[str, tuple[bytes, np.ndarray]] = {}
        self._expected: set[str] = set()
        self._arrived: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True, name="flgraph-plane")
        self._thread.start()
        if not started.wait(10.0) or self._error is not None:
            self.close()
            raise RuntimeError(f"the data plane did not start: {self._error}")

    # -- the driver's API -------------------------------------------------------------------------------
    def publish(self, key: str, array: np.ndarray) -> None:
        """Serve ``array`` (kept by reference: do not change it) to workers that fetch ``key``."""
        a = np.ascontiguousarray(array)
        header = f"{a.dtype.str}|{','.join(map(str, a.shape))}".encode()
        with self._cond:
            self._published[key] = (header, a)

    def retract(self, keys: Iterable[str]) -> None:
        """Stop serving ``keys``; forget the partials expected or arrived under them."""
        with self._cond:
            for k in keys:
                self._published.pop(k, None)
                self._expected.discard(k)
                self._arrived.pop(k, None)

    def expect(self, keys: Iterable[str]) -> None:
        """Accept pushes under ``keys`` (others, e.g. from a cancelled attempt, are dropped)."""
        with self._cond:
            self._expected.update(keys)

    def take(self, keys: Collection[str], timeout: float) -> dict[str, Any]:
        """The partials of ``keys`` that arrived, waiting up to ``timeout`` seconds for at least one."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                got = {k: self._arrived.pop(k) for k in keys if k in self._arrived}
                left = end - time.monotonic()
                if got or left <= 0 or self._stop.is_set():
                    return got
                self._cond.wait(left)

    def close(self) -> None:
        """Stop the serving thread and remove the socket's directory."""
        self._stop.set()
        forget(self.endpoint)  # this process's own worker-side socket, if it used one
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        with contextlib.suppress(Exception):
            self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- the serving thread -----------------------------------------------------------------------------
    def _serve(self, started: threading.Event) -> None:
        try:
            sock = self._ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            self._error = e
            started.set()
            return
        started.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart(copy=False)
                try:
                    self._handle(sock, frames)
                except Exception:  # a malformed message must not stop the plane
                    log.exception("data plane: dropped a malformed message")
        finally:
            sock.close(linger=0)

    def _handle(self, sock: zmq.Socket[Any], frames: list[zmq.Frame]) -> None:
        rid, op, key = frames[0], frames[1].bytes, frames[2].bytes.decode()
        if op == _GET:
            with self._cond:
                item = self._published.get(key)
            if item is None:
                sock.send_multipart([rid, _MISSING, key.encode()])
            else:
                sock.send_multipart([rid, _OK, key.encode(), item[0], item[1].data.cast("B")], copy=False)
        elif op == _PUT:
            with self._cond:
                if key not in self._expected:
                    return  # a late partial of an attempt that was given up: nobody waits for it
            value = pickle.loads(frames[3].buffer, buffers=[f.buffer for f in frames[4:]])
            with self._cond:
                if key in self._expected:
                    self._expected.discard(key)
                    self._arrived[key] = value
                    self._cond.notify_all()


# -- the worker's end -----------------------------------------------------------------------------------
# One DEALER socket per driver endpoint and process; a request (send, then its answer) holds the lock, so
# threads never read each other's answers. At most MAX_ENDPOINTS drivers are remembered (runs that ended
# without forget(), e.g. a driver that crashed, are closed oldest first).
MAX_ENDPOINTS = 4
_lock = threading.Lock()
_socks: dict[str, zmq.Socket[Any]] = {}
_cache: dict[str, tuple[str, np.ndarray]] = {}  # endpoint -> (key, array): the latest params, per process


def _socket(endpoint: str) -> zmq.Socket[Any]:
    """The endpoint's socket (call with ``_lock`` held)."""
    sock = _socks.pop(endpoint, None)
    if sock is None:
        while len(_socks) >= MAX_ENDPOINTS:
            _close(next(iter(_socks)))
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, int(PUSH_TIMEOUT_S * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(PUSH_TIMEOUT_S * 1000))
        sock.connect(endpoint)
    _socks[endpoint] = sock  # most recently used last
    return sock


def _close(endpoint: str) -> None:
    sock = _socks.pop(endpoint, None)
    _cache.pop(endpoint, None)
    if sock is not None:
        sock.close()


def forget(endpoint: str) -> None:
    """Close this process's socket to ``endpoint`` and drop its cached params (at the end of a run)."""
    with _lock:
        _close(endpoint)


def fetch(endpoint: str, key: str, timeout: float = FETCH_TIMEOUT_S) -> np.ndarray:
    """The array the driver published under ``key``, fetched once per process and key (the chunks on
    this worker share it, as they share Dask's copy: do not change it in place)."""
    with _lock:
        hit = _cache.get(endpoint)
        if hit is not None and hit[0] == key:
            return hit[1]
        sock = _socket(endpoint)
        sock.send_multipart([_GET, key.encode()])
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                raise TimeoutError(f"the driver did not send {key!r} within {timeout:.0f} s (data plane "
                                   f"{endpoint}); is the driver process alive?")
            frames = sock.recv_multipart(copy=False)
            if frames[1].bytes != key.encode():
                continue  # the late answer to an earlier request that timed out
            if frames[0].bytes == _MISSING:
                raise LookupError(f"the driver no longer serves {key!r}: the round was given up")
            dtype, shape = frames[2].bytes.decode().split("|")
            dims = tuple(int(d) for d in shape.split(",") if d)
            array = np.frombuffer(frames[3].buffer, dtype=np.dtype(dtype)).reshape(dims)
            _cache[endpoint] = (key, array)
            return array


def push(endpoint: str, key: str, value: Any) -> bool:
    """Send ``value`` to the driver under ``key``; False when it could not be sent in time."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    try:
        with _lock:
            _socket(endpoint).send_multipart([_PUT, key.encode(), head, *(b.raw() for b in buffers)], copy=False)
    except zmq.Again:
        return False
    return True
