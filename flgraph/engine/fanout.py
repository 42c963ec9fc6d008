"""Several reducers in one client pass: fan-outs, parallel branches and tiers over the round's tree.

A round whose graph is more than a chain still runs as ONE client pass over one position space: the
cohorts of its branches one after the other (:func:`merge_cohorts`), each client running its branch's
client stages once. Its reducer is a :class:`RoundReducer`, which every transport handles like any
reducer (leaf, combine, finalize). Its partial holds one *slot* per (reducer, group): for each slot an
:class:`~flgraph.tree.Incremental` over the slot's own positions (a branch's clients, or a group's
clients in round order), so each reducer adds its clients along the fixed tree over exactly its clients:
the training branch of ``fedavg | evaluation`` gives the same bits as FedAvg alone, and every slot gives
the same bits with 1 or N workers and any chunking. The last tiers (groups of groups) run in the driver
(:func:`finish`), along a tree over the sorted group keys.

Example:
    >>> import numpy as np
    >>> from flgraph.context import ClientSet, Update
    >>> from flgraph.params import ParamSpec
    >>> from flgraph.stages import WeightedMean
    >>> spec = ParamSpec.from_arrays({"w": np.zeros(1, np.float32)})
    >>> r = RoundReducer((Consumer(0, "update", WeightedMean(), ()),))
    >>> cs = ClientSet(np.arange(3))
    >>> cs.layout = Layout.of(r.consumers, cs, {})
    >>> parts = [r.leaf_at(Update(c, 1, 0, np.array([c], np.float32)), spec, cs, c) for c in range(3)]
    >>> acc = r.combine(r.combine(parts[0], parts[1]), parts[2])
    >>> WeightedMean().finalize(r.finish(acc, cs.layout)[(0, ())], spec)[0].tolist()   # (0 + 1 + 2) / 3
    [1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import tree
from ..context import ClientSet, Devices, Update
from ..errors import ClientError, ConfigError
from ..graph import Reducer
from ..params import ParamSpec

__all__ = ["Consumer", "Layout", "RoundReducer", "combine_groups", "merge_cohorts"]

GroupKey = tuple[Any, ...]


@dataclass(frozen=True)
class Consumer:
    """One reducer of the round's client pass: branch, per-client value, reducer, and the client
    attributes its groups are keyed by (its tier's ``by`` and those of the tiers above it)."""

    branch: int
    value: str
    reducer: Reducer
    bys: tuple[str, ...]


@dataclass
class Layout:
    """Where each client of a round sits for each consumer: its slot (-1: not this consumer's branch), its
    place among the slot's clients, the slot sizes, and each slot's group key."""

    codes: list[np.ndarray]
    local: list[np.ndarray]
    sizes: list[np.ndarray]
    keys: list[list[GroupKey]]

    @staticmethod
    def of(consumers: Sequence[Consumer], clients: ClientSet, attributes: Mapping[str, np.ndarray]) -> Layout:
        """The layout of ``clients`` (``attributes``: each ``by`` attribute's value per position)."""
        n = len(clients)
        branch = clients.branch if clients.branch is not None else np.zeros(n, np.int64)
        codes, local, sizes, keys = [], [], [], []
        for c in consumers:
            inside = np.flatnonzero(branch == c.branch)
            if c.bys:
                per = [tuple(attributes[b][p] for b in c.bys) for p in inside.tolist()]
                uniq = sorted(set(per), key=_order)
                index = {k: i for i, k in enumerate(uniq)}
                code_in = np.fromiter((index[k] for k in per), np.int64, len(per))
            else:
                uniq, code_in = [()], np.zeros(len(inside), np.int64)
            code = np.full(n, -1, np.int64)
            code[inside] = code_in
            count = np.bincount(code_in, minlength=len(uniq))
            order = np.argsort(code_in, kind="stable")
            starts = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
            where = np.zeros(n, np.int64)
            where[inside[order]] = np.arange(len(inside)) - starts[code_in[order]]
            codes.append(code)
            local.append(where)
            sizes.append(count.astype(np.int64))
            keys.append(uniq)
        return Layout(codes, local, sizes, keys)


def _order(key: GroupKey) -> tuple[tuple[str, str], ...]:
    """Group keys sort by type name, then value: a deterministic order for mixed attribute types."""
    return tuple((type(v).__name__, f"{v:020d}" if isinstance(v, int | np.integer) else str(v)) for v in key)


class RoundReducer(Reducer):
    """The round's reducers as one: a partial maps (consumer, slot) to that slot's tree of partials."""

    def __init__(self, consumers: tuple[Consumer, ...]) -> None:
        self.consumers = consumers

    def leaf(self, update: Update, spec: ParamSpec) -> Any:
        raise ConfigError("a round with several reducers needs each client's position",
                          fix="run it on a transport that supports fan-outs (Dask)")

    def leaf_at(self, record: Update, spec: ParamSpec, clients: ClientSet, pos: int) -> dict[tuple[int, int], Any]:
        """The leaves of the client at ``pos`` (``record.extras`` holds its per-client values)."""
        lay: Layout | None = clients.layout
        if lay is None:  # a transport's warm-up client: it ran its stages to load the libraries; no round to add to
            return {}
        values = record.extras if record.extras is not None else {"update": record}
        out: dict[tuple[int, int], Any] = {}
        for k, c in enumerate(self.consumers):
            code = int(lay.codes[k][pos])
            if code < 0:
                continue
            u = values.get(c.value)
            if u is None:
                raise ClientError(f"no client stage wrote {c.value!r} for this client, which a reducer reads",
                                  client=record.client, stage="reduce", round=record.base_round + 1,
                                  fix=f"make the branch's client stages write {c.value!r}")
            inc = tree.Incremental(int(lay.sizes[k][code]), c.reducer.combine)
            inc.add(int(lay.local[k][pos]), c.reducer.leaf(u, spec))
            out[(k, code)] = inc
        return out

    def combine(self, left: Any, right: Any) -> Any:
        for key, inc in right.items():
            mine = left.get(key)
            if mine is None:
                left[key] = inc
                continue
            for node in sorted(inc.done):  # right's positions all follow left's within a slot
                mine.add_node(node, inc.done[node])
        return left

    def finalize(self, acc: Any, spec: ParamSpec) -> tuple[Any, float]:
        raise ConfigError("a round with several reducers is finished per reducer", fix="use RoundReducer.finish")

    def finish(self, acc: Any, layout: Layout) -> dict[tuple[int, GroupKey], Any]:
        """Each slot's partial (not finalized), keyed by (consumer, group key); empty slots left out."""
        out: dict[tuple[int, GroupKey], Any] = {}
        for (k, code), inc in (acc or {}).items():
            value = tree.assemble_partial(inc.n, inc.done, inc.combine)
            if value is not None:
                out[(k, layout.keys[k][code])] = value
        return out

    def __repr__(self) -> str:
        return "RoundReducer(" + ", ".join(f"{c.value}: {c.reducer!r}" for c in self.consumers) + ")"


def combine_groups(parts: Mapping[GroupKey, Any], reducers: Sequence[Reducer], spec: ParamSpec,
                   to_update: Callable[[Any, float], Update]) -> tuple[Any, Reducer]:
    """The tiers above the first: ``parts`` maps each first-tier group key (one value per ``by``) to its
    partial of ``reducers[0]``; each next reducer combines the groups sharing the rest of the key, along a
    tree over the sorted keys. Returns the last partial and the reducer that finalizes it."""
    holder = reducers[0]
    level: dict[GroupKey, Any] = dict(parts)
    for r in reducers[1:]:
        merge = r.merges(holder)
        parents: dict[GroupKey, list[tuple[GroupKey, Any]]] = {}
        for key in sorted(level, key=_order):
            parents.setdefault(key[1:], []).append((key, level[key]))
        new: dict[GroupKey, Any] = {}
        for parent, children in parents.items():
            if merge:
                leaves = [v for _, v in children]
                new[parent] = tree.evaluate(0, len(leaves), leaves.__getitem__, holder.combine)
            else:
                done = [holder.finalize(v, spec) for _, v in children]
                leaves = [r.leaf(to_update(d, w), spec) for d, w in done]
                new[parent] = tree.evaluate(0, len(leaves), leaves.__getitem__, r.combine)
        level = new
        holder = holder if merge else r
    if list(level) != [()]:
        raise ConfigError("the tiers did not combine every group into one result",
                          fix="give every tier but the last a by= attribute")
    return level[()], holder


def merge_cohorts(parts: Sequence[ClientSet]) -> ClientSet:
    """The round's clients: the branches' cohorts one after the other, with each position's branch.

    Per-client settings come from the main branch's cohort; the other branches' clients read them as
    absent (``work.setting(name, default)`` gives the default)."""
    if any(p.keep_first is not None for p in parts):
        raise ConfigError("over-selection (Select(over_select=...)) in a round with parallel branches",
                          fix="over-select in a round without parallel branches")
    ids = np.concatenate([p.ids for p in parts])
    branch = np.concatenate([np.full(len(p), b, np.int64) for b, p in enumerate(parts)])
    rest = len(ids) - len(parts[0])
    settings = {}
    for name, arr in parts[0].settings.items():
        settings[name] = np.concatenate([np.asarray(arr, object), np.full(rest, None, object)]) if rest else arr
    devices = parts[0].devices
    if devices is not None and rest:  # the other branches' clients are not simulated: no device, no cut-off
        def pad(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, np.full(rest, np.nan)])

        devices = Devices(pad(devices.speed), pad(devices.down_bps), pad(devices.up_bps), pad(devices.online_until),
                          None if devices.deadline is None else pad(devices.deadline),
                          None if devices.max_samples is None else pad(devices.max_samples))
    return ClientSet(ids, settings, None, branch=branch, devices=devices)
