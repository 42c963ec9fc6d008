"""What a run keeps on disk: the run directory and its snapshots, how a run is saved and resumed, and
the clients' own state between their rounds.

* :mod:`flgraph.store.checkpoint` — the run directory (zarr), snapshots committed atomically, the
  schedule (:class:`~flgraph.store.checkpoint.Checkpoints`);
* :mod:`flgraph.store.persist` — a Run to and from its directory (:func:`flgraph.resume`);
* :mod:`flgraph.store.client_state` — per-client state, one versioned slot per client, on disk.

Example:
    >>> from flgraph.store import Checkpoints
    >>> Checkpoints("runs/exp.zarr", every=5).every
    5
"""

from .checkpoint import Checkpoints

__all__ = ["Checkpoints"]
