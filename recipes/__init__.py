"""Recipes (importable as ``flgraph.recipes``): functions returning pipelines with a paper's defaults.

Each recipe derives from :func:`fedavg` by swapping or inserting stages (:mod:`flgraph.recipes.compose`).

Example:
    >>> from flgraph.recipes import fedavg, fedprox
    >>> len(fedavg(clients=10)), len(fedprox(clients=10, stragglers=0.5))
    (5, 6)
"""

from .ditto import ditto
from .dp_fedavg import dp_fedavg
from .fedadagrad import fedadagrad
from .fedadam import fedadam
from .fedavg import fedavg
from .fedavg_secagg import fedavg_secagg
from .fedavgm import fedavgm
from .fedbabu import fedbabu
from .fedbuff import fedbuff
from .fednova import fednova
from .fedprox import fedprox
from .fedyogi import fedyogi
from .oort import oort
from .qffl import qffl
from .robust import robust_fedavg
from .scaffold import scaffold

__all__ = ["ditto", "dp_fedavg", "fedadagrad", "fedadam", "fedavg", "fedavg_secagg", "fedavgm", "fedbabu", "fedbuff",
           "fednova", "fedprox", "fedyogi", "oort", "qffl", "robust_fedavg", "scaffold"]
