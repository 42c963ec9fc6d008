"""Edge devices over ZeroMQ: a gateway next to the driver, agents on the devices (``flgraph edge``).

* :mod:`.wire` -- the message format (msgpack envelope + raw/lz4 tensor frames), limits, ``ProtocolError``;
  :mod:`.parts` -- large messages in ``part`` messages (liveness during slow transfers); :mod:`.encoded` --
  a codec's payload as an upload;
* :mod:`.gateway` -- the ROUTER side: registry, heartbeats, liveness, tasks, deadlines, checks;
* :mod:`.agent` -- the DEALER side: join, heartbeat, run the task function, reconnect with back-off;
* :mod:`.transport` -- ``ZmqTransport`` (``fg.Run(..., transport=...)``, both engines), :mod:`.edge_async` -- its
  handles for the asynchronous engine, :mod:`.mixed` -- ``MixedTransport`` (Dask and edge clients in one round);
* :mod:`.keys` -- CURVE key pairs and allow-lists; :mod:`.tasks` -- ready-made task functions;
* :mod:`.segment` -- the round's client stages as plain data, rebuilt on the device from its allow-list;
  :mod:`.capabilities` -- what an agent that runs no segment would leave out.

The protocol is specified in ``transports/PROTOCOL.md``.

Example:
    >>> from flgraph.transports.zmq import PROTOCOL_VERSION, Limits
    >>> PROTOCOL_VERSION, Limits().max_tensors
    (1, 4)
"""

from .agent import Agent, EdgeResult, EdgeTask, load_task
from .gateway import AgentInfo, EncodedParams, Gateway
from .keys import allowed_keys, load_public, load_secret, make_keypair
from .mixed import MixedTransport
from .tasks import LocalTrainTask
from .transport import ZmqTransport
from .wire import PROTOCOL_VERSION, Limits, Message, ProtocolError, decode, encode

__all__ = [
    "PROTOCOL_VERSION",
    "Agent",
    "AgentInfo",
    "EdgeResult",
    "EdgeTask",
    "EncodedParams",
    "Gateway",
    "Limits",
    "LocalTrainTask",
    "Message",
    "MixedTransport",
    "ProtocolError",
    "ZmqTransport",
    "allowed_keys",
    "decode",
    "encode",
    "load_public",
    "load_secret",
    "load_task",
    "make_keypair",
]
