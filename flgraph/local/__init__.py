"""The embedded cluster's accelerator: faster round paths for Dask workers on the driver's machine.

:class:`~flgraph.transports.dask.DaskTransport` holds the round protocol (params once per round, one task
per chunk, the fixed reduction tree, retries). When every worker runs on this machine, as the embedded
cluster's do, it hands the rounds to :class:`~flgraph.local.rounds.LocalAccelerator`, which keeps that
protocol and moves the data and the waiting out of the scheduler's way:

* :mod:`~flgraph.local.dataplane`: params and partials travel over one private ZeroMQ ``ipc://`` socket
  between the driver and the workers, not through scatter and gather;
* :mod:`~flgraph.local.sharing`: the default chunks share their clients, so a round's chunks end together;
* :mod:`~flgraph.local.rounds` and :mod:`~flgraph.local.tasks`: the next round's chunk tasks are submitted
  while a round runs and wait on their workers for their jobs;
* :mod:`~flgraph.local.malloc`, :mod:`~flgraph.local.heap`, :mod:`~flgraph.local.buffers`: memory tuning
  (glibc keeps freed model-sized blocks, the garbage collector skips the long-lived heap, per-process
  buffer reuse).

None of this changes a result: params are bit-identical with the accelerator on or off. It has no knobs in
the public API; these environment variables are the advanced switches, all on by default (``0``,
``false``, ``no`` or ``off`` turns one off):

============================  ===========================================================================
``FLGRAPH_DATA_PLANE``        the data plane, and with it the whole accelerator (workers then use Dask's
                              scatter and gather, as on a remote cluster)
``FLGRAPH_SHARE_WORK``        work sharing between the default chunks (a ``chunk_size`` given to ``Run``
                              keeps its chunks as they are in any case)
``FLGRAPH_TUNE_MALLOC``       glibc's allocator settings in the driver and the embedded cluster's workers
============================  ===========================================================================

Example:
    >>> from flgraph.local import switched_on
    >>> switched_on("FLGRAPH_SOME_SWITCH_NOBODY_SET")
    True
"""

from __future__ import annotations

import os

__all__ = ["switched_on"]

SWITCHES = ("FLGRAPH_DATA_PLANE", "FLGRAPH_SHARE_WORK", "FLGRAPH_TUNE_MALLOC")


def switched_on(name: str) -> bool:
    """Whether the switch ``name`` (one of :data:`SWITCHES`) is on: unset or anything but 0/false/no/off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")
