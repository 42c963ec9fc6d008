"""SCAFFOLD's control variates (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, Algorithm 1 with option II).

Client side (``LocalTrain(correction="scaffold")``), with the server control ``c`` broadcast and the
client's own control ``c_i`` kept in per-client state (zero the first time)::

    y <- y - lr (g(y) - c_i + c)                      each local step
    c_i+ <- c_i - c + (x - y) / (K lr)                K: the local steps done (option II)
    writes  update = y - x,  control_delta = c_i+ - c_i

Server side: ``Aggregate(Mean(), server_lr=lr_g)`` over ``update`` steps the model
``x <- x + lr_g * mean(update)``; :class:`ScaffoldControl` after the ``control_delta`` reducer steps
``c <- c + |S| / N * mean(control_delta)`` (N: the clients in the population).

Example:
    >>> from flgraph import stages as st
    >>> sorted(st.LocalTrain(correction="scaffold").writes()), sorted(st.ScaffoldControl().reads())
    (['control_delta', 'update'], ['aggregate:control_delta'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from flgraph.context import ClientWork, RoundContext, Update
from flgraph.errors import ConfigError
from flgraph.graph import ServerStage
from flgraph.params import Params, ParamSpec

__all__ = ["ClientControl", "ScaffoldControl"]

CORRECTIONS = ("scaffold",)


def check_options(correction: str, *, train_fn: Any, optimizer: Any, freeze: Any) -> None:
    """Refuse, when LocalTrain is built, what SCAFFOLD's client step cannot honour."""
    if correction not in CORRECTIONS:
        raise ConfigError(f"LocalTrain(correction={correction!r})", fix=f"use one of {list(CORRECTIONS)}")
    if train_fn is not None:
        raise ConfigError("LocalTrain(correction='scaffold', train_fn=...): the correction is applied by the "
                          "built-in training loop, which a train_fn replaces", fix="drop train_fn")
    if optimizer is not None and float(getattr(optimizer, "momentum", 0.0) or 0.0) != 0.0:
        raise ConfigError("LocalTrain(correction='scaffold', optimizer=SGD(momentum=...)): option II's control "
                          "update (x - y) / (K lr) assumes plain SGD steps", fix="use plain SGD (lr=...)")
    if optimizer is not None and type(optimizer).__name__ != "SGD":
        raise ConfigError("LocalTrain(correction='scaffold', optimizer=...): SCAFFOLD's control update assumes "
                          "plain SGD steps", fix="drop optimizer= and give lr=")
    if freeze:
        raise ConfigError("LocalTrain(correction='scaffold', freeze=...): a frozen parameter would still get a "
                          "control variate", fix="train every parameter with SCAFFOLD")


def client_reads(base: frozenset[str], correction: str | None) -> frozenset[str]:
    return base | {"on-clients:control"} if correction else base


def client_writes(base: frozenset[str], correction: str | None) -> frozenset[str]:
    return base | {"control_delta"} if correction else base


def client_fields(spec: ParamSpec) -> dict[str, tuple[str, int]]:
    """The client control variate ``c_i``: one model-sized array per client, in per-client state."""
    return {"control": (spec.carrier, spec.size)}


@dataclass
class ClientControl:
    """One client's SCAFFOLD step: the controls it started from and the gradient corrections."""

    server: np.ndarray
    client: np.ndarray
    corrections: Sequence[torch.Tensor]

    @staticmethod
    def start(work: ClientWork, model: torch.nn.Module) -> ClientControl:
        """Read ``c`` (broadcast) and ``c_i`` (per-client state); the correction ``c - c_i`` per parameter."""
        spec = work.global_params.spec
        if "control" not in work.values:
            raise ConfigError("LocalTrain(correction='scaffold') needs the server control on the clients",
                              fix="broadcast it: st.Broadcast('params', 'control')")
        c = np.asarray(work.values["control"])
        saved = work.load_state("control")
        ci = np.zeros(spec.size, spec.carrier) if saved is None else np.asarray(saved)
        diff = c - ci
        corrections = []
        for name, p in model.named_parameters():
            e = spec.entry(name)
            corrections.append(torch.from_numpy(diff[e.offset : e.offset + e.size]).view(e.shape).to(p.device))
        return ClientControl(c, ci, corrections)

    def finish(self, work: ClientWork, delta: np.ndarray, steps: int, lr: float, n: int) -> None:
        """Option II: ``c_i+ = c_i - c - delta / (K lr)``; keep it, and write ``control_delta = c_i+ - c_i``."""
        if steps > 0:
            new = self.client - self.server - delta / np.asarray(steps * lr, delta.dtype)
        else:
            new = self.client.copy()
        new = new.astype(delta.dtype, copy=False)
        work.save_state("control", new)
        work.outputs["control_delta"] = Update(work.client, n, work.round - 1, new - self.client)


class ScaffoldControl(ServerStage):
    """The server control variate: ``c <- c + |S| / N * mean(control_delta)``; keeps ``control``.

    Put it after the reducer of ``control_delta`` (``st.Aggregate(st.Mean())``); broadcast ``control`` with
    ``st.Broadcast("params", "control")`` for the clients' correction.
    """

    keeps: ClassVar[frozenset[str]] = frozenset({"control"})

    def reads(self) -> frozenset[str]:
        return frozenset({"aggregate:control_delta"})

    def writes(self) -> frozenset[str]:
        return frozenset({"control"})

    def init_state(self, params: Params) -> dict[str, Any]:
        return {"control": np.zeros(params.spec.size, params.spec.carrier)}

    def run(self, ctx: RoundContext) -> None:
        if not ctx.state:
            ctx.state.update(self.init_state(ctx.params))
        got = ctx.aggregates.get("control_delta")
        if got is None:  # no client's control change was counted this round: c stays
            return
        mean, count = got
        c = ctx.state["control"]
        step = np.asarray(count / ctx.dataset.num_clients, c.dtype)
        ctx.state["control"] = (c + step * np.asarray(mean, c.dtype)).astype(c.dtype, copy=False)
        ctx.metrics["control_norm"] = float(np.linalg.norm(ctx.state["control"]))
