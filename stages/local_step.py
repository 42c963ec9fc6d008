"""The parts of LocalTrain's step that are not the stage: the default SGD step, client data as tensors, and
seeding torch per client.

Example:
    >>> import torch
    >>> from flgraph.stages.local_step import PlainSGD
    >>> layer = torch.nn.Linear(2, 1)
    >>> before = layer.weight.detach().clone()
    >>> layer(torch.ones(1, 2)).sum().backward()
    >>> PlainSGD(list(layer.parameters()), lr=0.5).step()
    >>> torch.equal(layer.weight.detach(), before - 0.5 * layer.weight.grad)
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["PlainSGD", "as_tensor", "seed_torch"]


def as_tensor(a: Any, device: torch.device) -> torch.Tensor:
    """``torch.as_tensor(a, device=device)``; a numpy array on cpu is shared through ``from_numpy``, which
    skips as_tensor's argument parsing (a client's data is wrapped at every round)."""
    if device.type == "cpu" and type(a) is np.ndarray and a.flags.writeable:
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=device)


class PlainSGD:
    """``torch.optim.SGD(params, lr=lr)`` (no momentum, no weight decay) for LocalTrain's default on cpu.

    On cpu torch's SGD takes its single-tensor path, ``param.add_(grad, alpha=-lr)`` for each parameter with
    a gradient, and so does this step, so the result is bit-identical; what it leaves out is the optimizer
    object's per-call machinery (hooks, profiler records, parameter groups, state), which costs more than
    the arithmetic of a small model's step, where cross-device clients spend their time.
    """

    __slots__ = ("lr", "params")

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params, self.lr = params, lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)


def seed_torch(device: torch.device, seed: int) -> None:
    """Seed torch's generator for ``device`` only (dropout, random augmentations in the user's model).

    ``torch.manual_seed`` would also queue a lazy seeding of every CUDA device and record a Python
    traceback for it, which costs about 0.1-0.8 ms per client; this costs about 1 microsecond.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
