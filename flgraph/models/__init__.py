"""Small reference models. Any ``torch.nn.Module`` works with flgraph; these are conveniences.

Example:
    >>> import flgraph as fg
    >>> m = fg.models.mlp(784, [200, 200], 10, seed=0)
    >>> sum(p.numel() for p in m.parameters())
    199210
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import BoundModel, ModelAdapter

__all__ = ["BoundModel", "ModelAdapter", "cnn", "mlp"]


def mlp(in_features: int, hidden: list[int], out_features: int, *, seed: int | None = 0) -> nn.Sequential:
    """A ReLU multi-layer perceptron (McMahan et al.'s "2NN" is ``mlp(784, [200, 200], 10)``).

    ``seed`` seeds torch before the layers are built (``None`` leaves torch's RNG alone).
    """
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def cnn(num_classes: int = 10, *, channels: int = 1, side: int = 28, seed: int | None = 0) -> nn.Sequential:
    """McMahan et al.'s CNN: conv5x5(32)-pool-conv5x5(64)-pool-fc512-fc, for ``side x side`` images.

    Example:
        >>> import flgraph as fg, torch
        >>> fg.models.cnn()(torch.zeros(2, 784)).shape
        torch.Size([2, 10])
    """
    if seed is not None:
        torch.manual_seed(seed)
    flat = 64 * (((side - 4) // 2 - 4) // 2) ** 2
    return nn.Sequential(
        nn.Unflatten(1, (channels, side, side)),
        nn.Conv2d(channels, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, num_classes),
    )
