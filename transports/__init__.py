"""Where clients live (importable as ``flgraph.transports``): ``dask`` (default) runs client stages as
Dask tasks on chunks of clients.

Example:
    >>> from flgraph.transports import DaskTransport
    >>> DaskTransport.__name__
    'DaskTransport'
"""

from .dask import DaskTransport

__all__ = ["DaskTransport"]

from .zmq import MixedTransport, ZmqTransport  # edge devices over ZeroMQ (transports/zmq)

__all__ += ["MixedTransport", "ZmqTransport"]
