"""Per-dispatch cost and driver memory of the asynchronous engine's draw with ``available=``, and of one
Oort selection, for a 10,000 and a 1,000,000 client population (the driver only; no training).

The async draw is the engine's own ``AsyncEngine._draw`` (64 clients in flight, devices with on/off periods
made lazily): the exact path checks every free client (what populations up to 100,000 use), the sparse one
checks candidates in seeded random order (above 100,000); the exact path over 1,000,000 is not run (it
makes every device's profile at each dispatch, 100 times the 10,000 figure). Oort's round is
``OortSelect.run`` + ``OortFeedback.run`` (with and without estimated durations) after a first round
(the population arrays below 100,000, the explored clients above). Peak memory is tracemalloc's over the
measured calls, on top of what existed before (the dataset's ids, caches).

    .venv/bin/python bench/async_scale.py
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import numpy as np

import flgraph as fg
from flgraph import stages as st
from flgraph.context import RoundContext
from flgraph.engine.asynchronous import AsyncEngine, _Flight
from flgraph.params import Params, ParamSpec
from flgraph.sim import DevicePopulation

IN_FLIGHT, AT = 64, 40_000.0


def _data(n: int) -> Any:
    return fg.data.FederatedDataset.from_function(lambda k: (np.zeros((1, 2)), np.zeros(1)), n,
                                                  num_samples=lambda k: 1 + (k * 7919) % 50)


def _measure(fn: Any, calls: int) -> tuple[float, float]:
    fn(0)  # warm
    tracemalloc.start()
    t0 = time.perf_counter()
    for i in range(1, calls + 1):
        fn(i)
    per = (time.perf_counter() - t0) / calls
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return per, peak


def async_dispatch(n: int, sparse: bool) -> tuple[float, float]:
    data = _data(n)
    devices = DevicePopulation.lognormal(n, seed=3, mean_on=3600.0, mean_off=1800.0)
    p = (st.Select(clients=IN_FLIGHT, available=devices) >> st.Simulate(devices) >> st.Broadcast()
         >> st.LocalTrain() >> st.BufferedAggregate(8))
    engine = AsyncEngine(p.check(), seed=0, dataset=data, model_source=None)
    engine._exact_up_to = 0 if sparse else n  # the path the engine takes above / below 100,000 clients
    for i, c in enumerate(np.random.default_rng(1).choice(n, IN_FLIGHT, replace=False)):
        engine.flights[i] = _Flight(i, int(c), 0, AT, AT)
    return _measure(lambda i: engine._draw(None, 1_000 + i, AT), 5 if not sparse else 200)


def oort_round(n: int, devices: bool = False) -> tuple[float, float]:
    data = _data(n)
    select = st.OortSelect(clients=1_000, devices=DevicePopulation.lognormal(n, seed=3) if devices else None)
    feedback = st.OortFeedback()
    params = Params(ParamSpec.from_shapes([("w", (2,), "float32")]), np.zeros(2, np.float32))
    state: dict[str, Any] = {}
    kept = feedback.init_state(params)
    rs = np.random.default_rng(0)

    def one(rnd: int) -> None:
        ctx = RoundContext(rnd + 1, 7, params, data, None, False)
        ctx.values, ctx.state = kept, state
        select.run(ctx)
        fb = RoundContext(rnd + 1, 7, params, data, None, False)
        fb.state = kept
        chosen = ctx.clients.ids[:1_000]
        fb.aggregates = {"utility": (np.column_stack([chosen, rs.gamma(2.0, 30.0, 1_000),
                                                      rs.lognormal(3.0, 1.0, 1_000)]), 1_000.0)}
        feedback.run(fb)

    t0 = time.perf_counter()
    one(0)  # the first round makes the per-population caches (sizes, estimates, their orders)
    print(f"  (Oort's first round over {n:,}{' with devices=' if devices else ''}: "
          f"{time.perf_counter() - t0:.1f} s, reading every client's size{' and device' if devices else ''})")
    return _measure(one, 5)


def main() -> None:
    print(f"{'what':<44}{'population':>12}{'ms':>10}{'peak KB':>10}")
    for n, sparse in ((10_000, False), (10_000, True), (1_000_000, True)):
        per, peak = async_dispatch(n, sparse)
        name = f"async dispatch, available=, {'sparse' if sparse else 'exact'} draw"
        print(f"{name:<44}{n:>12,}{per * 1e3:>10.3f}{peak / 1024:>10.0f}")
    for n, devices in ((10_000, False), (1_000_000, False), (10_000, True), (1_000_000, True)):
        per, peak = oort_round(n, devices)
        name = f"Oort round, 1,000 a round{', devices=' if devices else ''}"
        print(f"{name:<44}{n:>12,}{per * 1e3:>10.3f}{peak / 1024:>10.0f}")


if __name__ == "__main__":
    main()
