"""Recipes (importable as ``flgraph.recipes``): functions returning pipelines with a paper's defaults.

Example:
    >>> from flgraph.recipes import fedavg
    >>> len(fedavg(clients=10))
    5
"""

from .fedavg import fedavg
from .fedbuff import fedbuff

__all__ = ["fedavg", "fedbuff"]
