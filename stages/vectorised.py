"""Vectorised local training: a block of clients trained at once with ``torch.func``
(``LocalTrain(clients_at_once=B)``).

Each client keeps its own parameters (a leading block dimension), its own data, its own seeded batch order
(the same batches, in the same order, as :class:`~flgraph.stages.LocalTrain`'s sequential loop) and its own
number of steps. One step of the block is one ``vmap(grad(...))`` call over ``functional_call``: clients'
data of different sizes are padded to the block's largest batch, and a mask keeps padded samples out of
each client's mean loss; a client that has done its steps stays where it is while the others go on. SGD
(with momentum) and FedProx's proximal term are applied to the whole block at once. The results equal the
sequential loop's up to floating-point reordering (about 1e-6 relative).

What it cannot vectorise it says (:func:`why_not`), and ``LocalTrain`` trains those clients one by one.

Example:
    >>> import torch
    >>> from flgraph import stages as st
    >>> from flgraph.stages.vectorised import why_not
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> why_not(st.LocalTrain(clients_at_once=64), mlp) is None
    True
    >>> print(why_not(st.LocalTrain(clients_at_once=64), torch.nn.Sequential(torch.nn.BatchNorm1d(4))))
    ... # doctest: +NORMALIZE_WHITESPACE
    the model has buffers (['0.running_mean', '0.running_var', '0.num_batches_tracked']: e.g. BatchNorm's
    running statistics), which one step of a block cannot keep per client
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from flgraph.context import ClientWork, Update
from flgraph.data import ClientData
from flgraph.errors import ClientError
from flgraph.local.buffers import POOL
from flgraph.params import all_finite
from flgraph.rng import stream

from .split import heldout

if TYPE_CHECKING:
    from .train import LocalTrain

__all__ = ["batch_plan", "train_block", "why_not"]


def why_not(stage: LocalTrain, model: torch.nn.Module) -> str | None:
    """Why ``stage`` cannot train ``model`` vectorised, or None when it can."""
    from .train import SGD

    if stage.train_fn is not None:
        return "a custom train_fn replaces the built-in training loop"
    if stage.loss is not None:
        return ("a custom loss= (the vectorised loop masks padded samples out of a per-sample "
                "cross-entropy)")
    if stage.optimizer is not None and not isinstance(stage.optimizer, SGD):
        return f"the optimizer {stage.optimizer!r} is not flgraph's SGD(lr, momentum) factory"
    if getattr(stage, "correction", None):
        return f"correction={stage.correction!r}"
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        return (f"the model has buffers ({buffers[:3]}: e.g. BatchNorm's running statistics), which one step "
                "of a block cannot keep per client")
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"the model has dropout ({name or type(m).__name__}), random per client"
    params = list(model.parameters())
    if len(params) != len(list(model.named_parameters(remove_duplicate=False))):
        return "the model shares (ties) parameters between modules"
    if len({p.dtype for p in params}) > 1 or not params[0].is_floating_point():
        return "the model's parameters are not all of one floating-point dtype"
    return None


def batch_plan(work: ClientWork, n: int, stage: LocalTrain) -> list[np.ndarray]:
    """The client's batches (indices into its data), in order: exactly those of the sequential loop
    (epoch ``e`` is the ``e``-th permutation of the client's stream; ``steps``; the device's sample budget).
    """
    steps = work.setting("steps", stage.steps)
    epochs = int(work.setting("epochs", stage.epochs))
    rng = stream(work.seed, work.tag, work.round, work.client)
    budget = work.sample_budget()
    limit = steps if steps is not None else math.inf
    out: list[np.ndarray] = []
    processed, epoch = 0, 0
    while len(out) < limit and (steps is not None or epoch < epochs):
        perm = rng.permutation(n)
        for i in range(0, n, stage.batch_size):
            if len(out) >= limit:
                break
            idx = perm[i : i + stage.batch_size]
            if processed + len(idx) > budget:
                limit = len(out)
                break
            out.append(idx)
            processed += len(idx)
        epoch += 1
    return out


class _Model:
    """The stage's model on one device, and the round's global params there (kept between blocks)."""

    def __init__(self, template: torch.nn.Module, device: torch.device) -> None:
        self.module = copy.deepcopy(template).to(device)
        self.device = device
        self._flat: np.ndarray | None = None
        self.globals: dict[str, torch.Tensor] = {}

    def load(self, work: ClientWork) -> dict[str, torch.Tensor]:
        flat = work.global_params.flat
        # Compared by value, not by identity: a worker may refill the same buffer with the next round's
        # params. One pass over the params per block, against a transfer to the device per client.
        if self._flat is None or self._flat.shape != flat.shape or not np.array_equal(self._flat, flat):
            spec = work.global_params.spec
            self.globals = {e.name: torch.from_numpy(np.array(flat[e.offset : e.offset + e.size]))
                            .reshape(e.shape).to(self.device) for e in spec.entries}
            self._flat = np.array(flat)
        return self.globals


def train_block(stage: LocalTrain, works: Sequence[ClientWork]) -> list[BaseException | None]:
    """Train ``works``' clients at once; set each one's ``update``. Returns each client's error (or None)."""
    from .train import SGD, frozen_names

    device = torch.device(stage.train_device())
    cache: dict[str, _Model] = stage.__dict__.setdefault("_vectorised_models", {})
    vm = cache.get(str(device))
    if vm is None:
        vm = cache[str(device)] = _Model(works[0].model_source.template, device)
    glob = vm.load(works[0])
    spec = works[0].global_params.spec
    names = [e.name for e in spec.entries]
    frozen = set(frozen_names(names, stage.freeze)) if stage.freeze else set()
    opt = stage.optimizer if isinstance(stage.optimizer, SGD) else SGD(stage.lr)
    errors: list[BaseException | None] = [None] * len(works)

    # Each client's data and batch plan (the same batches as the sequential loop).
    rows: list[int] = []
    xs, ys, plans = [], [], []
    for i, work in enumerate(works):
        data = work.data
        if stage.holdout > 0:
            keep = ~heldout(work.seed, work.client, len(data.y), stage.holdout)
            data = ClientData(data.x[keep], data.y[keep])
        if len(data.y) == 0:
            errors[i] = ClientError("the client has no samples", client=work.client, stage="LocalTrain",
                                    round=work.round, fix="remove empty clients from the dataset, or pass "
                                    "on_client_error='drop' to Run to skip them")
            continue
        rows.append(i)
        xs.append(np.asarray(data.x))
        ys.append(np.asarray(data.y))
        plans.append(batch_plan(work, len(data.y), stage))
    if not rows:
        return errors
    c = len(rows)
    t_max = max(len(p) for p in plans)
    b_max = max((len(b) for p in plans for b in p), default=1)
    n_max = max(len(y) for y in ys)
    x_pad = np.zeros((c, n_max, *xs[0].shape[1:]), dtype=xs[0].dtype)
    y_pad = np.zeros((c, n_max, *ys[0].shape[1:]), dtype=ys[0].dtype)
    idx = np.zeros((t_max, c, b_max), dtype=np.int64)
    mask = np.zeros((t_max, c, b_max), dtype=np.float32)
    steps = np.array([len(p) for p in plans])
    for j in range(c):
        x_pad[j, : len(ys[j])] = xs[j]
        y_pad[j, : len(ys[j])] = ys[j]
        for t, b in enumerate(plans[j]):
            idx[t, j, : len(b)] = b
            mask[t, j, : len(b)] = 1.0
    # The clients' data go to the device once; each step gathers its batches there (memory: the data, not
    # the data times the steps).
    xd, yd = torch.from_numpy(x_pad).to(device), torch.from_numpy(y_pad).to(device)
    at = torch.arange(c, device=device)[:, None]
    ix = torch.from_numpy(idx).to(device)
    mb = torch.from_numpy(mask).to(device=device, dtype=glob[names[0]].dtype)
    active = torch.from_numpy(np.arange(t_max)[:, None] < steps[None, :]).to(device)

    fixed = {n: glob[n] for n in names if n in frozen}
    params = {n: glob[n].expand(c, *glob[n].shape).clone() for n in names if n not in frozen}
    module = vm.module

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, {**p, **fixed}, (x,))
        per = F.cross_entropy(out, y, reduction="none")
        return (per * m).sum() / m.sum().clamp_min(1.0)

    step = vmap(grad_and_value(loss_one))
    bufs: dict[str, torch.Tensor] = {}
    losses = torch.zeros(t_max, c, dtype=torch.float64, device=device)
    for t in range(t_max):
        grads, lv = step(params, xd[at, ix[t]], yd[at, ix[t]], mb[t])
        losses[t] = lv.detach().double()
        every = bool((steps > t).all())  # on the host: no device sync per step
        for n, g in grads.items():
            p = params[n]
            if stage.mu > 0:  # FedProx: the gradient of mu/2 ||w - w_global||^2
                g = g + stage.mu * (p - glob[n])
            if opt.momentum:  # a client past its last step keeps its params, so its buffer may run on
                g = g if t == 0 else opt.momentum * bufs[n] + g
                bufs[n] = g
            new = p - opt.lr * g
            params[n] = new if every else torch.where(_along(active[t], new), new, p)
    samples = [sum(len(b) for b in p) for p in plans]
    return _finish(works, rows, params, glob, losses, active, steps, samples, errors, ys)


def _along(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flags.reshape(-1, *([1] * (like.dim() - 1)))


def _finish(works: Sequence[ClientWork], rows: list[int], params: dict[str, torch.Tensor],
            glob: dict[str, torch.Tensor], losses: torch.Tensor, active: torch.Tensor, steps: np.ndarray,
            samples: list[int], errors: list[BaseException | None], ys: list[np.ndarray]) -> list[BaseException | None]:
    """Each client's delta, checks and metrics, as the sequential loop makes them."""
    spec = works[0].global_params.spec
    c = len(rows)
    deltas = np.zeros((c, spec.size), dtype=spec.carrier)
    for e in spec.entries:
        if e.name in params:
            deltas[:, e.offset : e.offset + e.size] = (params[e.name] - glob[e.name]).reshape(c, -1).cpu().numpy()
    loss_rows = losses.where(active, 0.0).cpu().numpy()
    bad_loss = ~np.isfinite(loss_rows).all(axis=0)
    for j, i in enumerate(rows):
        work = works[i]
        if bad_loss[j]:
            first = int(np.argmin(np.isfinite(loss_rows[:, j])))
            errors[i] = ClientError(f"step {first + 1} gave a non-finite loss ({loss_rows[first, j]})",
                                    client=work.client, stage="LocalTrain", round=work.round,
                                    fix="lower the learning rate, clip gradients, or check the client's data "
                                        "for NaN/inf")
            continue
        delta = POOL.take(spec.size, spec.carrier)
        np.copyto(delta, deltas[j])
        if not all_finite(delta):
            bad = int((~np.isfinite(delta)).sum())
            errors[i] = ClientError(f"the update holds {bad} non-finite values (NaN or inf)", client=work.client,
                                    stage="LocalTrain", round=work.round,
                                    fix="lower the learning rate or clip gradients; check the client's data")
            continue
        done = int(steps[j])
        metrics = {"loss": float(loss_rows[:done, j].sum()) / max(done, 1), "steps": float(done),
                   "samples_processed": float(samples[j]), "vectorised": 1.0}
        work.update = Update(work.client, len(ys[j]), work.round - 1, delta, metrics)
    return errors
