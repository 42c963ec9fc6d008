"""Run the client segment of a round for a range of clients and reduce it to partials.

This is what a Dask chunk task (or, later, an edge agent) executes: for each client position of a tree
node, the client stages in order, then the reducer's ``leaf``; leaves are combined along the round's fixed
tree (:mod:`flgraph.tree`), so a chunk returns one :class:`Partial` per node it covers, never a list of
updates: memory stays O(model), not O(clients x model).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from . import tree
from .context import ClientSet, ClientWork
from .errors import ClientError, FlgraphError
from .graph import ClientStage, Reducer
from .params import Params, ParamSpec

__all__ = ["Bundle", "Partial", "combine_partials", "map_chunk", "run_clients"]

log = logging.getLogger("flgraph")
OnError = Literal["raise", "drop"]


@dataclass
class Bundle:
    """Everything a client needs that does not change between rounds (shipped once per run)."""

    stages: tuple[ClientStage, ...]
    reducer: Reducer
    dataset: Any
    model_source: Any
    spec: ParamSpec
    seed: int


@dataclass
class Partial:
    """The reduction of some clients: the reducer's value, metric sums, and the failures."""

    value: Any
    sums: dict[str, float] = field(default_factory=dict)
    failures: list[tuple[int, str]] = field(default_factory=list)


def combine_partials(reducer: Reducer, left: Partial, right: Partial) -> Partial:
    """Combine two partials (left is reused)."""
    if left.value is None:
        left.value = right.value
    elif right.value is not None:
        left.value = reducer.combine(left.value, right.value)
    for k, v in right.sums.items():
        left.sums[k] = left.sums.get(k, 0.0) + v
    left.failures += right.failures
    return left


def _as_client_error(e: BaseException, client: int, stage: ClientStage, rnd: int) -> ClientError:
    if isinstance(e, ClientError):
        return e
    if isinstance(e, FlgraphError):
        return ClientError(e.message, client=client, stage=type(stage).__name__, round=rnd, fix=e.fix)
    return ClientError(f"{type(e).__name__}: {e}", client=client, stage=type(stage).__name__, round=rnd)


def run_clients(bundle: Bundle, global_flat: np.ndarray, rnd: int, clients: ClientSet,
                nodes: Sequence[tuple[int, int]], on_error: OnError = "raise",
                ) -> list[tuple[tuple[int, int], Partial]]:
    """Run the client stages for every position in ``nodes`` and reduce each node to a Partial.

    ``on_error="raise"`` re-raises the first client failure as a ClientError; ``"drop"`` records it.
    """
    gp = Params(bundle.spec, global_flat)
    reducer = bundle.reducer

    def leaf(pos: int) -> Partial:
        cid = int(clients.ids[pos])
        work = ClientWork(rnd, cid, pos, bundle.seed, gp, bundle.dataset, clients, bundle.model_source)
        sums: dict[str, float] = {}
        stage = bundle.stages[0]
        try:
            for stage in bundle.stages:
                work.tag = stage.tag
                t0 = time.perf_counter()
                stage.run(work)
                sums[f"time_{stage.name}"] = time.perf_counter() - t0
            update = work.update
            if update is None:
                raise ClientError("no client stage produced an update", client=cid,
                                  stage=type(stage).__name__, round=rnd, fix="put LocalTrain in the pipeline")
            up = float(update.upload_nbytes)
            sums.update(clients_done=1.0, samples=float(update.num_samples), bytes_up=up,
                        bytes_up_raw=float(update.raw_nbytes or up))
            value = reducer.leaf(update, bundle.spec)  # may consume the update's buffers
        except Exception as e:
            err = _as_client_error(e, cid, stage, rnd)
            if on_error == "raise":
                raise err from (None if e is err else e)
            log.warning("dropped: %s", err)
            return Partial(None, {"clients_failed": 1.0}, [(cid, str(err))])
        n = float(update.num_samples)
        for k, v in update.metrics.items():
            sums[f"wsum_{k}"] = float(v) * n
        return Partial(value, sums)

    def combine(a: Partial, b: Partial) -> Partial:
        return combine_partials(reducer, a, b)

    return [((lo, hi), tree.evaluate(lo, hi, leaf, combine)) for lo, hi in nodes]


def map_chunk(bundle: Bundle, global_flat: np.ndarray, rnd: int, clients: ClientSet, a: int, b: int,
              fn: Callable[[ClientWork], Any]) -> list[Any]:
    """``fn(work)`` for the clients at positions ``a:b`` (client work outside the round's segment)."""
    gp = Params(bundle.spec, global_flat)
    out = []
    for pos in range(a, b):
        cid = int(clients.ids[pos])
        work = ClientWork(rnd, cid, pos, bundle.seed, gp, bundle.dataset, clients, bundle.model_source)
        try:
            out.append(fn(work))
        except ClientError:
            raise
        except Exception as e:
            raise ClientError(f"{type(e).__name__}: {e}", client=cid, stage=getattr(fn, "__qualname__", "fn"),
                              round=rnd) from e
    return out
