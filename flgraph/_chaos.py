"""A fault hook for the chaos tests (tests/test_chaos.py, bench/chaos.py); not part of flgraph's API.

A crash test must hit a phase of a run (a snapshot being written, a client state being written, the
cluster starting...) every time, not when a timer happens to fall there. The code of those phases calls
:func:`point` with the phase's name. It does nothing unless the process was started with

    FLGRAPH_CHAOS=PHASE:COUNT[:TARGET]   FLGRAPH_CHAOS_FIRED=/path/to/a/marker/file

and then SIGKILLs, the COUNT-th time this process reaches PHASE, the process TARGET names: ``self``
(default), ``parent`` (a worker's nanny) or a process id (a ``dask scheduler``). The marker file is
created just before the kill and disarms the hook in every process that sees it, so a worker restarted by
its nanny, or a resumed driver with the same environment, is not killed again.

The environment is read once, at import: unset, :func:`point` is a function that returns at once.

Example:
    >>> from flgraph import _chaos
    >>> _chaos.point("snapshot-write")  # unarmed: nothing happens
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

__all__ = ["point"]


def _noop(phase: str) -> None:
    """The hook when FLGRAPH_CHAOS is not set."""


def _armed(spec: str, fired: str) -> tuple[str, int, str]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or not fired:
        raise RuntimeError(f"FLGRAPH_CHAOS={spec!r}: expected PHASE:COUNT[:self|parent|PID] and FLGRAPH_CHAOS_FIRED")
    return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "self"


def _make_point(spec: str, fired: str) -> Callable[[str], None]:
    phase, count, target = _armed(spec, fired)
    seen = [0]

    def point(reached: str) -> None:
        if reached != phase:
            return
        seen[0] += 1
        if seen[0] != count:
            return
        try:
            os.close(os.open(fired, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # only the first process fires
        except FileExistsError:
            return
        pid = os.getpid() if target == "self" else os.getppid() if target == "parent" else int(target)
        os.kill(pid, signal.SIGKILL)
        if pid == os.getpid():
            signal.pause()  # the kill is delivered before this returns; never go on past the point

    return point


_SPEC = os.environ.get("FLGRAPH_CHAOS")
_FIRED = os.environ.get("FLGRAPH_CHAOS_FIRED", "")
point: Callable[[str], None] = _noop if not _SPEC or os.path.exists(_FIRED) else _make_point(_SPEC, _FIRED)
"""``point(phase)``: the hook (see the module's docstring)."""
