"""Small socket helpers shared by the gateway and the agent.

Example:
    >>> import zmq
    >>> from flgraph.transports.zmq.sockets import readable
    >>> ctx = zmq.Context()
    >>> a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    >>> _ = a.bind("inproc://readable-doc"); _ = b.connect("inproc://readable-doc")
    >>> readable(a)
    False
    >>> b.send(b"x"); readable(a)
    True
    >>> _ = a.recv(); a.close(0); b.close(0); ctx.term()
"""

from __future__ import annotations

from typing import Any, cast

import zmq

__all__ = ["readable"]

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: flag enums cost a Python call per operation


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message can be received now without blocking.

    ``ZMQ_EVENTS`` is one C call; ``Socket.poll(0)`` builds a Poller, and a non-blocking receive on an
    empty socket raises ``zmq.Again``: each costs microseconds on a path taken per message."""
    return bool(cast(int, sock.get(_EVENTS)) & _POLLIN)
