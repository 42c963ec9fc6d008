"""Code that edge tests name by import path: a device allows it (``--allow-code edge_code.*``) and imports it
itself; Dask workers get it by reference. Not a test module."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def signed_step(model, data, ctx):
    """A custom training function: one epoch of sign-SGD (each parameter moves by lr * sign(grad)), in the
    run's seeded batch order."""
    x, y = torch.as_tensor(data.x), torch.as_tensor(data.y)
    order = torch.from_numpy(ctx.rng.permutation(len(y)))
    total, steps = 0.0, 0
    for i in range(0, len(y), ctx.batch_size):
        idx = order[i : i + ctx.batch_size]
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-ctx.lr)
        total += float(loss.detach())
        steps += 1
    return {"loss": total / max(steps, 1), "steps": float(steps)}
