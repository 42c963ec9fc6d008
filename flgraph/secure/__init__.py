"""Secure aggregation (SecAgg+): the protocol in small modules, the stages in :mod:`flgraph.stages.secagg`.

* :mod:`~flgraph.secure.shamir`: Shamir secret sharing over a prime field;
* :mod:`~flgraph.secure.neighbours`: the random k-regular neighbour graph;
* :mod:`~flgraph.secure.masks`: masks from a cryptographic stream, clipping and quantisation into ``Z_M``;
* :mod:`~flgraph.secure.keys`: key agreement, derivation and encryption (from :mod:`cryptography`);
* :mod:`~flgraph.secure.ring`: where a simulated client's secrets wait between phases, sealed;
* :mod:`~flgraph.secure.client` and :mod:`~flgraph.secure.protocol`: the client's and the server's phases.

Example:
    >>> from flgraph.secure import SecAggConfig
    >>> SecAggConfig(neighbours=8).check_round(50)
    (8, 5)
"""

from .config import Dropouts, SecAggConfig
from .protocol import DropoutError, SecureRound

__all__ = ["DropoutError", "Dropouts", "SecAggConfig", "SecureRound"]
