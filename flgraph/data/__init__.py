"""Federated data: client populations loaded one client at a time.

Example:
    >>> import numpy as np
    >>> from flgraph.data import FederatedDataset, iid
    >>> ds = FederatedDataset.from_arrays(np.zeros((20, 3)), np.zeros(20, np.int64), iid(20, 4, seed=0))
    >>> ds.num_clients, ds.num_samples(0)
    (4, 5)
"""

from flgraph.data.dataset import ArrayDataset, ClientData, FederatedDataset, FunctionDataset
from flgraph.data.fedprox_synthetic import fedprox_synthetic
from flgraph.data.partition import Partition, by_key, dirichlet, iid, shards
from flgraph.data.synthetic import synthetic_classification
from flgraph.data.zarr_store import ZarrDataset

__all__ = [
    "ArrayDataset",
    "ClientData",
    "FederatedDataset",
    "FunctionDataset",
    "Partition",
    "ZarrDataset",
    "by_key",
    "dirichlet",
    "fedprox_synthetic",
    "iid",
    "shards",
    "synthetic_classification",
]
