"""Simulate: devices, a virtual clock, deadlines and cut-offs for the round's clients (server stage).

Placed after ``Select``, it gives each chosen client its device (speed, bandwidths, availability) for
the round; after the client stages ran, it advances the run's virtual clock by the round's simulated
duration and reports ``sim_round_time``, ``sim_time`` and the dropouts.

* A client's simulated duration: download (params bytes / its down bandwidth) + compute (samples it
  trained on / its speed) + upload (its real, compressed update bytes / its up bandwidth).
* ``deadline``: clients that would finish later are dropped (counted in ``clients_dropped``). With
  ``cutoff=True`` a client instead stops local work in time to make the deadline and sends what it has
  (the processor-specific cut-off of the Flower paper); a client that cannot even download and upload in
  time is dropped.
* Availability: a client that is offline at the round's start is replaced by none (it is dropped), one
  that goes offline before finishing is dropped.
* The round ends when the last kept client finishes, or at the deadline if some client missed it.

Example:
    >>> import numpy as np
    >>> from flgraph import stages as st
    >>> from flgraph.sim import DevicePopulation
    >>> sim = st.Simulate(DevicePopulation.lognormal(range(100), seed=0), deadline=60.0, cutoff=True)
    >>> sim.name
    'simulate'
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from flgraph.context import Devices, RoundContext
from flgraph.engine.clients import Partial
from flgraph.errors import ConfigError
from flgraph.graph import ServerStage
from flgraph.params import Params
from flgraph.sim import DevicePopulation

__all__ = ["Simulate"]


class Simulate(ServerStage):
    """Simulated devices and a virtual clock for the round (place it right after Select)."""

    requires: ClassVar[frozenset[str]] = frozenset({"clients"})
    provides: ClassVar[frozenset[str]] = frozenset({"devices"})

    def __init__(self, devices: DevicePopulation, *, deadline: float | None = None, cutoff: bool = False,
                 epochs: int = 1) -> None:
        if not isinstance(devices, DevicePopulation):
            raise ConfigError(f"Simulate needs a DevicePopulation, got {type(devices).__name__}",
                              fix="e.g. flgraph.sim.DevicePopulation.lognormal(data.client_ids, seed=0)")
        if deadline is not None and deadline <= 0:
            raise ConfigError(f"Simulate(deadline={deadline}): must be > 0 seconds")
        if cutoff and deadline is None:
            raise ConfigError("Simulate(cutoff=True) needs a deadline", fix="pass deadline=SECONDS")
        self.devices = devices
        self.deadline = deadline
        self.cutoff = cutoff
        self.epochs = epochs

    def prepare(self, dataset: Any, model_source: Any) -> None:
        missing = [int(c) for c in dataset.client_ids[:100_000] if int(c) not in self.devices.profiles]
        if missing:
            raise ConfigError(f"{len(missing)} clients have no device profile, e.g. {missing[:5]}",
                              fix="build the DevicePopulation from the dataset's client_ids")

    def init_state(self, params: Params) -> dict[str, Any]:
        return {"time": 0.0}

    def clock(self, state: dict[str, Any]) -> float:
        """The virtual time (seconds) at the start of the round, from this stage's state."""
        return float(state.get("time", 0.0))

    def run(self, ctx: RoundContext) -> None:
        assert ctx.clients is not None
        now = float(ctx.state.get("time", 0.0))
        ids = ctx.clients.ids
        prof = [self.devices.profile(int(c)) for c in ids]
        dev = Devices(np.array([p.speed for p in prof]), np.array([p.down_bps for p in prof]),
                      np.array([p.up_bps for p in prof]), np.array([p.online_until(now) - now for p in prof]))
        if self.deadline is not None:
            dev.deadline = np.full(len(ids), float(self.deadline))
            if self.cutoff:
                raw = float(ctx.params.nbytes)
                budget = np.array([(self.deadline - raw / p.down_bps - raw / p.up_bps) * p.speed for p in prof])
                dev.max_samples = np.maximum(np.floor(budget), 0.0)
        ctx.clients.devices = dev
        ctx.metrics["sim_round_start"] = now

    def after_clients(self, ctx: RoundContext, root: Partial) -> None:
        """Advance the virtual clock by the round's simulated duration."""
        now = float(ctx.state.get("time", 0.0))
        last = root.maxes.get("finish", 0.0)
        missed = any("deadline" in why for _, why in root.dropped)
        duration = float(self.deadline) if (missed and self.deadline is not None) else last
        if not math.isfinite(duration):
            duration = 0.0
        ctx.state["time"] = now + duration
        ctx.metrics["sim_round_time"] = duration
        ctx.metrics["sim_time"] = now + duration
