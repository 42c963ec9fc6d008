"""The pipeline check: named values followed through a round, before anything runs.

:func:`check` walks each branch of a pipeline in order and keeps the set of values written so far. A
stage that reads a value nobody wrote before it, a second writer of a value, a client stage after the
reducers, a per-client value that no reducer consumes and nothing drops, groups that are never combined,
a branch that reads what a parallel branch writes: each raises a :class:`~flgraph.errors.PipelineError`
that names the stage, the value and the fix. The result, a :class:`RoundGraph`, is what the engines run.

Example:
    >>> from flgraph import stages as st
    >>> g = (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate()).check()
    >>> [type(s).__name__ for s in g.before], g.reduce.name, g.plain
    (['Select', 'Broadcast'], 'aggregate', True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PipelineError
from . import values as V
from .stage import ClientStage, ReduceStage, ServerStage, Stage

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["Branch", "Reduction", "RoundGraph", "check"]

_ONE_PER_ROUND = {"clients": "Select", "model": "Broadcast", "aggregate": "Aggregate"}


@dataclass(frozen=True)
class Reduction:
    """One per-client value's reduction: ``tiers[0]`` reduces the clients (per group when it has ``by``),
    each next tier combines the groups of the one before."""

    value: str
    tiers: tuple[ReduceStage, ...]

    @property
    def stage(self) -> ReduceStage:
        """The last tier: the one whose result the round uses."""
        return self.tiers[-1]


@dataclass(frozen=True)
class Branch:
    """One cohort's part of a round: server stages, client stages, reductions, server stages."""

    name: str
    before: tuple[ServerStage, ...]
    clients: tuple[ClientStage, ...]
    reductions: tuple[Reduction, ...]
    after: tuple[ServerStage, ...]
    broadcast: tuple[str, ...] = ()  # server values besides the params that the clients read

    @property
    def reduce(self) -> ReduceStage | None:
        """The stage that steps the model (the last tier over ``update``), else the first reduction's."""
        for r in self.reductions:
            if r.value == "update":
                return r.stage
        return self.reductions[0].stage if self.reductions else None

    @property
    def stages(self) -> tuple[Stage, ...]:
        tiers = tuple(t for r in self.reductions for t in r.tiers)
        return (*self.before, *self.clients, *tiers, *self.after)


@dataclass(frozen=True)
class RoundGraph:
    """A checked round: its branches (the first is the main one; they run side by side)."""

    branches: tuple[Branch, ...]

    @property
    def main(self) -> Branch:
        return self.branches[0]

    @property
    def before(self) -> tuple[ServerStage, ...]:
        return self.main.before

    @property
    def clients(self) -> tuple[ClientStage, ...]:
        return self.main.clients

    @property
    def reduce(self) -> ReduceStage | None:
        return self.main.reduce

    @property
    def after(self) -> tuple[ServerStage, ...]:
        return self.main.after

    @property
    def plain(self) -> bool:
        """One branch, one reducer of the update, no tiers, only the params broadcast: a chain (whatever
        features its stages ask of the transport)."""
        own = {s.feature for b in self.branches for s in b.stages}
        return not set(self.features()) - own

    def features(self) -> list[str]:
        """What this round needs beyond a chain, in words (engines and transports refuse what they lack)."""
        return list(self.feature_stages())

    def feature_stages(self) -> dict[str, list[str]]:
        """Each feature this round needs beyond a chain, with the stages (or branches) that need it."""
        out: dict[str, list[str]] = {}
        if len(self.branches) > 1:
            out["parallel branches"] = [f"branch {b.name!r}" for b in self.branches]
        for b in self.branches:
            if len(b.reductions) > 1 or any(r.value != "update" for r in b.reductions):
                out.setdefault("several per-client values", []).append(
                    f"{b.name}: " + ", ".join(f"{r.stage.name} of {r.value!r}" for r in b.reductions))
            for r in b.reductions:
                if len(r.tiers) > 1:
                    out.setdefault("tiers", []).append(" -> ".join(repr(t) for t in r.tiers))
            if b.broadcast:
                out.setdefault("server values broadcast besides the params", []).append(
                    f"Broadcast of {', '.join(repr(v) for v in b.broadcast)}")
            for s in b.stages:
                if s.feature is not None:
                    out.setdefault(s.feature, []).append(type(s).__name__)
        return out


def check(pipeline: Pipeline, final: bool) -> RoundGraph:
    """Check ``pipeline`` (``final``: as a whole round; else as a fragment that may get stages in front)."""
    parts = pipeline.branches or (pipeline,)
    writers = [_declared_writes(p) for p in parts]
    branches, offset = [], 0
    names: set[str] = set()
    for i, part in enumerate(parts):
        name = _branch_name(part, i)
        if name in names:
            raise PipelineError(f"two parallel branches are named {name!r}",
                                fix="name each branch once, e.g. pipeline.named('eval')")
        names.add(name)
        elsewhere = {v: _branch_name(parts[j], j) for j, w in enumerate(writers) if j != i for v in w}
        branches.append(_Walk(part.steps, name, offset, final, elsewhere).run())
        offset += len(part.stages)
    if len(branches) > 1:
        _check_across(branches)
    return RoundGraph(tuple(branches))


def _branch_name(p: Pipeline, i: int) -> str:
    return p.name or ("main" if i == 0 else f"branch{i + 1}")


def _declared_writes(p: Pipeline) -> set[str]:
    out = {v for v, (_, s) in _writers(p.steps, 0).items() if v not in s.reads()} | {v for s in p.stages
                                                                                       for v in s.keeps}
    return out - {"clients", "model"}  # each branch has its own cohort and broadcast


def _writers(steps: Sequence[Any], offset: int) -> dict[str, tuple[int, Stage]]:
    """Each value the steps write -> the first stage that writes it (its number, counted from ``offset``);
    a fan-out's reducers write the aggregates of the values they are keyed by."""
    out: dict[str, tuple[int, Stage]] = {}
    at = offset
    for st in steps:
        for value, sub in (st.items() if isinstance(st, Mapping) else [(None, st)]):
            for s in (sub.stages if value is not None else [sub]):
                at += 1
                made = {V.aggregate_of(value), V.groups_of(value)} if value is not None else s.writes()
                for v in made:
                    out.setdefault(v, (at, s))
    return out


def _check_across(branches: Sequence[Branch]) -> None:
    stepped = [b.name for b in branches if any(r.value == "update" for r in b.reductions)]
    if len(stepped) > 1:
        raise PipelineError(f"branches {stepped[0]!r} and {stepped[1]!r} both step the model",
                            fix="one branch trains; the others evaluate (e.g. st.ClientEvaluate() >> "
                                "st.Aggregate(st.MetricsMean()))")
    kept: dict[str, str] = {}
    for b in branches:
        for s in b.stages:
            for v in s.keeps:
                if v in kept:
                    raise PipelineError(f"branches {kept[v]!r} and {b.name!r} both keep the server value {v!r}",
                                        fix="keep it in one branch")
                kept[v] = b.name


class _Walk:
    """One branch's steps, in order."""

    def __init__(self, steps: Sequence[Any], name: str, offset: int, final: bool, elsewhere: dict[str, str]):
        self.steps, self.name, self.index, self.final, self.elsewhere = steps, name, offset, final, elsewhere
        stages = [s for st in steps for s in (_fan_stages(st) if isinstance(st, Mapping) else [st])]
        self.later = _writers(steps, offset)  # value -> the first stage (number, stage) that writes it
        kept: dict[str, Stage] = {}
        for s in stages:
            for v in sorted(s.keeps):
                if v in kept:
                    raise PipelineError(f"{type(kept[v]).__name__} and {type(s).__name__} both keep the server "
                                        f"value {v!r}", fix="keep it in one stage: remove one of the two")
                kept[v] = s
        self.have: set[str] = {"params"} | set(kept)
        if not final and stages:
            self.have |= stages[0].reads()
        self.before: list[ServerStage] = []
        self.clients: list[ClientStage] = []
        self.reductions: list[Reduction] = []
        self.after: list[ServerStage] = []
        self.per_client: dict[str, str] = {}  # per-client value -> the client stage that wrote it
        self.consumed: set[str] = set()
        self.broadcast: list[str] = []

    def run(self) -> Branch:
        for step in self.steps:
            if isinstance(step, Mapping):
                self._fan_out(step)
            else:
                self._stage(step)
        if self.final:
            self._complete()
        return Branch(self.name, tuple(self.before), tuple(self.clients), tuple(self.reductions), tuple(self.after),
                      tuple(self.broadcast))

    # -- one stage -----------------------------------------------------------------------------------
    def _stage(self, s: Stage, fan_value: str | None = None) -> None:
        self.index += 1
        where = f"stage {self.index} ({type(s).__name__})"
        reads, writes = s.reads(), s.writes()
        if not self.final:  # a server value kept by a stage not composed yet is checked with the whole round
            reads = reads - s.reads_kept()
        if isinstance(s, ReduceStage):
            reads, writes = self._reduce_values(s, fan_value)
        self._need(where, s, reads)
        if isinstance(s, ClientStage) and self.reductions:
            raise PipelineError(f"{where} is a client stage after the Aggregate stage",
                                fix="a round has one client segment: put client stages before Aggregate")
        if isinstance(s, ServerStage) and self.clients and not self.reductions:
            raise PipelineError(f"{where} is a server stage between client stages and the Aggregate stage",
                                fix="server stages run before the client stages or after Aggregate")
        if not isinstance(s, ClientStage | ReduceStage | ServerStage):
            raise PipelineError(f"{where} is neither a server, a client nor a reduce stage",
                                fix="subclass flgraph.ServerStage, flgraph.ClientStage or flgraph.ReduceStage")
        for v in sorted((writes - reads) & self.have - s.keeps - {"params"}):
            if v in _ONE_PER_ROUND:
                raise PipelineError(f"{where} provides {v!r} a second time (a round has one {_ONE_PER_ROUND[v]})",
                                    fix=f"remove one of the two {type(s).__name__} stages")
            if not isinstance(s, ReduceStage):
                raise PipelineError(f"{where} writes {V.describe(v)}, which a stage before it writes already",
                                    fix="remove one of the two writers (a stage that reads a value and writes "
                                        "it again transforms it, which is allowed)")
        if isinstance(s, ClientStage):
            self.clients.append(s)
            for v in writes:
                self.per_client.setdefault(v, type(s).__name__)
            self.consumed |= s.drops()
        elif isinstance(s, ServerStage):
            (self.after if self.reductions else self.before).append(s)
            self.broadcast += [v.partition(":")[2] for v in sorted(writes) if v.startswith("on-clients:")]
        self.have |= writes

    def _need(self, where: str, s: Stage, reads: frozenset[str]) -> None:
        for need in sorted(reads - self.have):
            if need in self.elsewhere:
                raise PipelineError(
                    f"{where} reads {V.describe(need)}, which the parallel branch {self.elsewhere[need]!r} writes: "
                    "branches run side by side and cannot read each other's values",
                    fix=f"write {V.describe(need)} in branch {self.name!r} too, or move {type(s).__name__} "
                        f"into branch {self.elsewhere[need]!r}")
            example = {
                "model": "Select(...) >> Broadcast() >> LocalTrain(...)",
                "clients": "Select(clients=10) >> Broadcast() >> ...",
                "update": "... >> Broadcast() >> LocalTrain(...) >> Aggregate(...)",
            }.get(need)
            what = V.describe(need)
            fix = f"insert {V.provider(need)} before {type(s).__name__}"
            if need in s.reads_kept():
                what = f"the server value {need!r}, which no stage of the round keeps"
                fix = (f"add the stage that keeps {need!r} (e.g. st.ScaffoldControl() for 'control'), or drop it "
                       f"from {type(s).__name__}")
            if need.startswith("aggregate:"):
                value = need.partition(":")[2]
                fix = (f"reduce '{value}' before {type(s).__name__}: ... >> {{'update': st.Aggregate(...), "
                       f"'{value}': st.Aggregate(st.Mean())}} >> {type(s).__name__}(...)")
            cycle = ""
            if need in self.later and self.later[need][0] > self.index:
                i, w = self.later[need]
                cycle = (f" (stage {i} ({type(w).__name__}) writes it after {type(s).__name__}: values flow forward "
                         "through a round, so reading it here would make a cycle)")
            raise PipelineError(f"{where} needs {what}, but no stage before it provides it{cycle}",
                                fix=fix + (f", e.g. {example}" if example else ""))

    # -- reducers ------------------------------------------------------------------------------------
    def _reduce_values(self, s: ReduceStage, fan_value: str | None) -> tuple[frozenset[str], frozenset[str]]:
        """What reduce stage ``s`` reads and writes where it stands, and its place among the reductions."""
        last = self.reductions[-1] if self.reductions else None
        if fan_value is None and last is not None and last.stage.by is not None:
            value = last.value  # the next tier: combines the groups of the one before
            reads = frozenset({V.groups_of(value)})
            self.reductions[-1] = Reduction(value, (*last.tiers, s))
        else:
            value = fan_value or self._chain_value()
            if value != "update" and not s.any_value:
                raise PipelineError(f"{type(s).__name__} steps the model, so it reduces 'update', not {value!r}",
                                    fix=f"reduce {value!r} with st.Aggregate(...)")
            reads = frozenset({value})
            if value in self.consumed and value in self.per_client:
                raise PipelineError(f"stage {self.index} ({type(s).__name__}) provides 'aggregate' a second time "
                                    f"(a round has one Aggregate)" if value == "update" else
                                    f"stage {self.index} ({type(s).__name__}) reduces {value!r} a second time",
                                    fix=f"remove one of the two {type(s).__name__} stages")
            self.consumed.add(value)
            self.reductions.append(Reduction(value, (s,)))
        writes = frozenset({V.groups_of(value) if s.by is not None else V.aggregate_of(value)})
        return reads, writes

    def _chain_value(self) -> str:
        """The per-client value a reduce stage in a plain chain reduces: the update, else the only one left."""
        if "update" in self.per_client or not self.per_client:
            return "update"
        left = [v for v in self.per_client if v not in self.consumed]
        if len(left) == 1:
            return left[0]
        raise PipelineError(f"stage {self.index} (reduce) follows client stages that write {sorted(left)}: "
                            "which one does it reduce?",
                            fix="name each: ... >> {" + ", ".join(f"'{v}': st.Aggregate(...)" for v in left) + "}")

    def _fan_out(self, fan: Mapping[str, Any]) -> None:
        if not self.clients:
            raise PipelineError(f"the reducers of {sorted(fan)} come before any client stage",
                                fix="put them after the client stages: ... >> st.LocalTrain(...) >> {...}")
        for value, sub in fan.items():
            if value not in self.per_client:
                raise PipelineError(
                    f"the fan-out reduces {value!r}, which no client stage before it writes "
                    f"(they write {sorted(self.per_client)})",
                    fix="key the fan-out by the per-client values the client stages write")
            stages = list(sub.steps) if hasattr(sub, "steps") else [sub]
            for k, s in enumerate(stages):
                if not isinstance(s, ReduceStage):
                    raise PipelineError(f"the fan-out's entry {value!r} holds {type(s).__name__}, which is not a "
                                        "reduce stage", fix="only reducers go in a fan-out; put server stages "
                                                            "after it: ... >> {...} >> st.MyStep()")
                self._stage(s, fan_value=value if k == 0 else None)

    def _complete(self) -> None:
        if not self.clients:
            raise PipelineError("the pipeline has no client stage, so no client ever trains",
                                fix="add st.Broadcast() >> st.LocalTrain(...) after Select")
        if not self.reductions:
            raise PipelineError("nothing aggregates the client updates",
                                fix="end the client stages with st.Aggregate(st.WeightedMean())")
        for r in self.reductions:
            if r.stage.by is not None:
                raise PipelineError(
                    f"the groups of {r.value!r} (Aggregate(by={r.stage.by!r})) are never combined",
                    fix="add the tier above it: ... >> st.Aggregate(st.WeightedMean(), by=...) >> "
                        "st.Aggregate(st.WeightedMean())")
        for v, writer in self.per_client.items():
            if v not in self.consumed:
                raise PipelineError(
                    f"the per-client value {v!r} that {writer} writes is never reduced",
                    fix=f"reduce it next to the update: ... >> {{'update': st.Aggregate(...), '{v}': "
                        f"st.Aggregate(st.Mean())}}, or drop it with st.Discard({v!r}) after {writer}")


def _fan_stages(fan: Mapping[str, Any]) -> list[Stage]:
    return [s for sub in fan.values() for s in (sub.stages if hasattr(sub, "stages") else [sub])]
