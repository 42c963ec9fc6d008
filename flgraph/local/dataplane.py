"""A direct data path between the driver and the Dask workers on the same machine.

Dask moves a round's data with several messages through the scheduler: the params are scattered (the
scheduler is asked which workers run, the data goes to each worker, the scheduler is told where it is) and
each chunk's partial is gathered (the scheduler reports the task done, is asked where the result is, then
the worker is asked for it). On one machine these round trips are most of the framework's cost per round
(``bench/`` measures it). With the data plane, Dask still schedules the tasks (their keys, the dashboard,
retries and worker deaths are Dask's), but:

* the driver *publishes* the round's params under a key; a chunk task *fetches* them from the driver
  when it starts (one request per worker process and round; later chunks on that worker reuse them);
* the chunk task *pushes* its partial back to the driver and returns ``None`` to Dask; the driver
  takes partials as they arrive;
* while a round runs, the driver can already submit the next round's chunk tasks: each *waits* on the
  plane for its job (the params and its clients), which the driver *offers* as soon as the next round's
  clients are chosen, or *withdraws* when no such round comes. Dask's submit-to-start then overlaps
  the current round instead of following it.

It is one ZeroMQ ROUTER socket, served by a daemon thread of the driver, on an ``ipc://`` path inside a
directory only the driver's user can enter (mode 0700). Partials travel as pickles (protocol 5, the
arrays as separate zero-copy frames), as they would through Dask's own comms; the private directory keeps
other users out. It is used only when every worker runs on the driver's machine (the embedded cluster)
and the platform has ``ipc://`` sockets; :class:`~flgraph.transports.dask.DaskTransport` falls back to
Dask's scatter and gather otherwise, or when ``FLGRAPH_DATA_PLANE=0``.

Example:
    >>> import numpy as np
    >>> from flgraph.local.dataplane import DataPlane, fetch, push
    >>> plane = DataPlane()
    >>> plane.publish("params-r1", np.arange(4, dtype=np.float32))
    >>> plane.expect(["result-c0"])
    >>> fetch(plane.endpoint, "params-r1")        # what a chunk task does on a worker
    array([0., 1., 2., 3.], dtype=float32)
    >>> push(plane.endpoint, "result-c0", {"sum": 6.0})
    True
    >>> plane.take(["result-c0"], timeout=5.0)
    {'result-c0': {'sum': 6.0}}
    >>> plane.offer("next-r2", np.ones(2, np.float32), [("chunk 0 of round 2",)])
    >>> wait(plane.endpoint, "next-r2", 0)          # a task submitted ahead, on a worker
    (array([1., 1.], dtype=float32), ('chunk 0 of round 2',))
    >>> plane.withdraw("next-r3")                   # no round 3 after all: its waiting tasks get None
    >>> wait(plane.endpoint, "next-r3", 0) is None
    True
    >>> plane.close()
"""

from __future__ import annotations

import collections
import contextlib
import logging
import pickle
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import numpy as np
import zmq

from . import switched_on

__all__ = ["DataPlane", "available", "fetch", "forget", "push", "wait"]

log = logging.getLogger("flgraph")

_GET, _PUT, _OK, _MISSING = b"get", b"put", b"ok", b"missing"
_WAIT, _NONE = b"wait", b"none"
FETCH_TIMEOUT_S = 30.0  # a worker waits this long for the params before its task fails
PUSH_TIMEOUT_S = 10.0  # then the task returns its partial through Dask instead
WAIT_TIMEOUT_S = 300.0  # a task submitted ahead gives up after this long without its job
CLOSED_KEEP = 64  # offers withdrawn or retracted, remembered so that a late waiter is told at once


def available() -> bool:
    """Whether this platform can run the data plane (``ipc://`` sockets, not switched off)."""
    if not switched_on("FLGRAPH_DATA_PLANE"):
        return False
    return sys.platform != "win32" and zmq.has("ipc")


class DataPlane:
    """The driver's end: published arrays out, pushed partials in (see the module docstring)."""

    def __init__(self) -> None:
        # mode 0700: only this user can connect; the round's other files (work sharing's claims) go here too
        self.directory = tempfile.mkdtemp(prefix="flgraph-plane-")
        self.endpoint = f"ipc://{self.directory}/plane"
        self._ctx = zmq.Context()
        self._published: dict[str, tuple[bytes, np.ndarray]] = {}
        self._offers: dict[str, tuple[bytes, np.ndarray, list[bytes]]] = {}
        self._waiters: dict[str, list[tuple[bytes, int]]] = {}
        self._closed: collections.deque[str] = collections.deque(maxlen=CLOSED_KEEP)
        self._answered = 0  # passes of the serving thread over the waiters (offer() waits for the next)
        self._expected: set[str] = set()
        self._arrived: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._wake_addr = f"inproc://flgraph-plane-wake-{id(self):x}"
        self._wake_lock = threading.Lock()
        self._wake: zmq.Socket[Any] | None = None
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

    def offer(self, key: str, array: np.ndarray, jobs: Sequence[Any], settle_s: float = 0.005) -> None:
        """Give the tasks waiting on ``key`` (see :func:`wait`) the params ``array`` and job ``jobs[i]``
        each (task ``i``); later waiters get theirs at once. ``array`` is kept by reference.

        Returns once the serving thread has answered the tasks already waiting (at most ``settle_s``
        seconds): a caller that goes on with pure-Python work would otherwise hold the GIL that thread
        needs, for up to the interpreter's 5 ms switch interval.
        """
        a = np.ascontiguousarray(array)
        header = f"{a.dtype.str}|{','.join(map(str, a.shape))}".encode()
        packed = [pickle.dumps(j, protocol=5) for j in jobs]
        with self._cond:
            self._offers[key] = (header, a, packed)
            seen = self._answered
        self._kick()
        with self._cond:
            self._cond.wait_for(lambda: self._answered != seen or self._stop.is_set(), timeout=settle_s)

    def withdraw(self, key: str) -> None:
        """No job will come under ``key``: its waiting tasks, and later ones, get ``None``."""
        with self._cond:
            self._offers.pop(key, None)
            if key not in self._closed:
                self._closed.append(key)
        self._kick()

    def retract(self, keys: Iterable[str]) -> None:
        """Stop serving ``keys`` (published arrays or offers); forget the partials expected or arrived
        under them."""
        with self._cond:
            for k in keys:
                self._published.pop(k, None)
                self._expected.discard(k)
                self._arrived.pop(k, None)
                if self._offers.pop(k, None) is not None and k not in self._closed:
                    self._closed.append(k)
        self._kick()

    def _kick(self) -> None:
        """Wake the serving thread: it answers the waiters of new offers and withdrawals."""
        with self._wake_lock:
            if self._stop.is_set():
                return
            if self._wake is None:
                self._wake = self._ctx.socket(zmq.PAIR)
                self._wake.setsockopt(zmq.LINGER, 0)
                self._wake.connect(self._wake_addr)
            self._wake.send(b"", zmq.NOBLOCK)

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
        with self._wake_lock:
            if self._wake is not None:
                self._wake.close(linger=0)
                self._wake = None
        with contextlib.suppress(Exception):
            self._ctx.term()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- the serving thread -----------------------------------------------------------------------------
    def _serve(self, started: threading.Event) -> None:
        try:
            sock = self._ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self.endpoint)
            wake = self._ctx.socket(zmq.PAIR)
            wake.setsockopt(zmq.LINGER, 0)
            wake.bind(self._wake_addr)
        except zmq.ZMQError as e:
            self._error = e
            started.set()
            return
        started.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                if wake in ready:
                    while wake.poll(0):
                        wake.recv()
                    self._answer_waiters(sock)
                if sock not in ready:
                    continue
                while sock.poll(0):
                    frames = sock.recv_multipart(copy=False)
                    try:
                        self._handle(sock, frames)
                    except Exception:  # a malformed message must not stop the plane
                        log.exception("data plane: dropped a malformed message")
        finally:
            sock.close(linger=0)
            wake.close(linger=0)

    def _job_frames(self, key: str, index: int) -> list[Any] | None:
        """The answer to waiter ``index`` of ``key``: its job, ``none``, or None while nothing is decided
        (call with ``_cond`` held)."""
        offer = self._offers.get(key)
        if offer is not None:
            header, array, jobs = offer
            if 0 <= index < len(jobs):
                return [_OK, key.encode(), header, array.data.cast("B"), jobs[index]]
            return [_NONE, key.encode()]
        if key in self._closed:
            return [_NONE, key.encode()]
        return None

    def _answer_waiters(self, sock: zmq.Socket[Any]) -> None:
        with self._cond:
            answers = []
            for key in list(self._waiters):
                waiting = self._waiters[key]
                for rid, index in waiting:
                    frames = self._job_frames(key, index)
                    if frames is None:
                        break
                    answers.append([rid, *frames])
                else:
                    del self._waiters[key]
        for frames in answers:
            sock.send_multipart(frames, copy=False)
        with self._cond:
            self._answered += 1
            self._cond.notify_all()

    def _handle(self, sock: zmq.Socket[Any], frames: list[zmq.Frame]) -> None:
        rid, op, key = frames[0], frames[1].bytes, frames[2].bytes.decode()
        if op == _GET:
            with self._cond:
                item = self._published.get(key)
            if item is None:
                sock.send_multipart([rid, _MISSING, key.encode()])
            else:
                sock.send_multipart([rid, _OK, key.encode(), item[0], item[1].data.cast("B")], copy=False)
        elif op == _WAIT:
            index = int(frames[3].bytes)
            with self._cond:
                answer = self._job_frames(key, index)
                if answer is None:
                    self._waiters.setdefault(key, []).append((rid.bytes, index))
                    return
            sock.send_multipart([rid, *answer], copy=False)
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


def wait(endpoint: str, key: str, index: int, timeout: float = WAIT_TIMEOUT_S,
         give_up: Callable[[], bool] | None = None) -> tuple[np.ndarray, Any] | None:
    """Wait for the job the driver offers under ``key`` to task ``index``: ``(params, job)``, or None when
    the driver withdrew the offer, after ``timeout`` seconds, or as soon as ``give_up()`` (asked every
    50 ms) is true. Uses a socket of its own, so a waiting task never holds up the pushes and fetches of
    other tasks in the same process."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart([_WAIT, key.encode(), str(index).encode()])
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return None
            if not sock.poll(int(min(left, 0.05) * 1000) + 1):
                if give_up is not None and give_up():
                    return None
                continue
            frames = sock.recv_multipart(copy=False)
            if frames[0].bytes != _OK:
                return None
            dtype, shape = frames[2].bytes.decode().split("|")
            dims = tuple(int(d) for d in shape.split(",") if d)
            array = np.frombuffer(frames[3].buffer, dtype=np.dtype(dtype)).reshape(dims)
            return array, pickle.loads(frames[4].buffer)
    finally:
        sock.close(linger=0)


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
