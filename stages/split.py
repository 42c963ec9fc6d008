"""A deterministic per-client held-out split, shared by the stages that train and those that evaluate.

``heldout(seed, client, n, fraction)`` marks ``ceil(fraction * n)`` of a client's ``n`` samples as held out
(never fewer than one when ``fraction > 0`` and ``n >= 2``, never all of them). The choice depends on the run
seed and the client only (stream ``(seed, HOLDOUT_TAG, client)``), not on the round or the stage, so
``LocalTrain(holdout=f)`` trains on exactly the samples that ``FederatedEvaluate(holdout=f)`` and
``PersonalizedEvaluate(holdout=f)`` do not evaluate on.

Example:
    >>> from flgraph.stages.split import heldout
    >>> mask = heldout(seed=0, client=3, n=10, fraction=0.2)
    >>> int(mask.sum()), bool((mask == heldout(0, 3, 10, 0.2)).all())
    (2, True)
"""

from __future__ import annotations

import math

import numpy as np

from flgraph.errors import ConfigError
from flgraph.rng import stage_tag, stream

__all__ = ["HOLDOUT_TAG", "check_fraction", "heldout"]

HOLDOUT_TAG = stage_tag("holdout")


def check_fraction(owner: str, fraction: float) -> None:
    """Refuse a held-out fraction outside [0, 1)."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"{owner}(holdout={fraction}): hold out a fraction in [0, 1) of each client's data",
                          fix="e.g. holdout=0.2 keeps 20% of each client's samples for evaluation")


def heldout(seed: int, client: int, n: int, fraction: float) -> np.ndarray:
    """Boolean mask of the held-out samples among a client's ``n`` samples."""
    mask = np.zeros(n, bool)
    if fraction <= 0 or n < 2:
        return mask
    k = min(n - 1, max(1, math.ceil(fraction * n)))
    mask[stream(seed, HOLDOUT_TAG, client).permutation(n)[:k]] = True
    return mask
