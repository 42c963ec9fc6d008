"""Unit tests for flgraph.graph: stage composition, the pipeline check, reprs and stage tags."""

from __future__ import annotations

from typing import ClassVar

import pytest

from flgraph import stages as st
from flgraph.context import ClientWork, RoundContext
from flgraph.errors import FlgraphError, PipelineError
from flgraph.graph import ClientStage, Pipeline, ServerStage, Stage
from flgraph.rng import stage_tag


def _canonical() -> Pipeline:
    return st.Select(clients=5) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate(st.WeightedMean())


class Clip(ClientStage):
    """A user-defined client stage that needs an update and clips it."""

    requires: ClassVar[frozenset[str]] = frozenset({"update"})

    def __init__(self, norm: float = 1.0) -> None:
        self.norm = norm

    def run(self, work: ClientWork) -> None:
        pass


class Schedule(ServerStage):
    """A user-defined server stage providing a new capability."""

    provides: ClassVar[frozenset[str]] = frozenset({"schedule"})

    def run(self, ctx: RoundContext) -> None:
        ctx.metrics["scheduled"] = True


class ScheduledTrain(ClientStage):
    requires: ClassVar[frozenset[str]] = frozenset({"model", "schedule"})
    provides: ClassVar[frozenset[str]] = frozenset({"update"})

    def run(self, work: ClientWork) -> None:
        pass


class StopRule(ServerStage):
    requires: ClassVar[frozenset[str]] = frozenset({"aggregate"})

    def run(self, ctx: RoundContext) -> None:
        pass


# --------------------------------------------------------------------------- composition


def test_canonical_pipeline_composes_and_splits_into_segments():
    p = (st.Select(clients=10) >> st.Broadcast() >> st.LocalTrain() >> st.Compress("lz4")
         >> st.Aggregate(st.WeightedMean()) >> st.Evaluate(every=2))
    assert [type(s).__name__ for s in p] == ["Select", "Broadcast", "LocalTrain", "Compress", "Aggregate",
                                             "Evaluate"]
    assert [s.name for s in p.stages] == ["select", "broadcast", "local-train", "compress", "aggregate",
                                          "evaluate"]
    assert [s.kind for s in p] == ["server", "server", "client", "client", "reduce", "server"]
    assert len(p) == 6
    seg = p.check()
    assert [type(s).__name__ for s in seg.before] == ["Select", "Broadcast"]
    assert [type(s).__name__ for s in seg.clients] == ["LocalTrain", "Compress"]
    assert type(seg.reduce).__name__ == "Aggregate"
    assert [type(s).__name__ for s in seg.after] == ["Evaluate"]
    assert p.segments == seg


def test_pipelines_compose_with_pipelines():
    head = st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate()
    tail = st.Evaluate(every=2) >> Schedule()
    p = head >> tail
    assert [s.name for s in p] == ["select", "broadcast", "local-train", "aggregate", "evaluate", "schedule"]
    assert [type(s).__name__ for s in p.check().after] == ["Evaluate", "Schedule"]
    # composing never mutates the operands
    assert len(head) == 4 and len(tail) == 2


def test_a_fragment_assumes_its_first_stage_needs_come_from_upstream():
    # ``a >> (b >> c)`` builds ``b >> c`` first: a fragment may start with a stage that needs upstream
    # capabilities, but what follows is still checked against them, and check() assumes nothing
    tail = Pipeline([st.LocalTrain(), st.Aggregate()])
    with pytest.raises(PipelineError, match=r"stage 1 \(LocalTrain\) needs the global model"):
        tail.check()
    with pytest.raises(PipelineError, match=r"stage 2 \(LocalTrain\) needs the global model"):
        Pipeline([st.Compress(), st.LocalTrain()])
    head = st.Select(clients=3) >> st.Broadcast()
    assert len(head >> tail) == 4 and len((head >> tail).check().clients) == 1
    with pytest.raises(PipelineError, match=r"stage 2 \(LocalTrain\) needs the global model"):
        st.Select(clients=3) >> tail


def test_partial_pipelines_are_allowed_until_check():
    p = st.Select(clients=3) >> st.Broadcast()
    assert len(p) == 2
    with pytest.raises(PipelineError):
        p.check()


# --------------------------------------------------------------------------- PipelineError cases


def test_local_train_without_broadcast():
    with pytest.raises(PipelineError) as ei:
        st.Select(clients=10) >> st.LocalTrain() >> st.Aggregate(st.WeightedMean())
    e = ei.value
    assert e.message == ("stage 2 (LocalTrain) needs the global model on the clients, "
                         "but no stage before it provides it")
    assert e.fix is not None and e.fix.startswith("insert st.Broadcast() before LocalTrain")
    assert "Select(...) >> Broadcast() >> LocalTrain(...)" in e.fix
    assert isinstance(e, FlgraphError)
    assert str(e) == f"{e.message}\n  fix: {e.fix}"


def test_broadcast_without_select():
    fragment = st.Broadcast() >> st.LocalTrain()  # may still get a Select in front of it
    with pytest.raises(PipelineError, match=r"stage 1 \(Broadcast\) needs the round's clients") as ei:
        fragment.check()
    assert "st.Select(clients=...)" in ei.value.fix


@pytest.mark.parametrize(
    "build",
    [
        lambda: st.Select(clients=3) >> st.Broadcast() >> st.Aggregate(st.WeightedMean()),
        lambda: st.Aggregate(st.WeightedMean()) >> st.Select(clients=3),
    ],
    ids=["after-broadcast", "first"],
)
def test_aggregate_before_any_client_stage(build):
    with pytest.raises(PipelineError, match=r"\(Aggregate\) needs a client update") as ei:
        build().check()
    assert ei.value.fix.startswith("insert st.LocalTrain(...) before Aggregate")


def test_compress_before_local_train():
    with pytest.raises(PipelineError, match=r"stage 3 \(Compress\) needs a client update") as ei:
        st.Select(clients=3) >> st.Broadcast() >> st.Compress() >> st.LocalTrain()
    assert "LocalTrain" in ei.value.fix


def test_two_selects():
    with pytest.raises(PipelineError) as ei:
        st.Select(clients=3) >> st.Select(clients=4)
    assert ei.value.message == "stage 2 (Select) provides 'clients' a second time (a round has one Select)"
    assert ei.value.fix == "remove one of the two Select stages"


def test_two_broadcasts():
    with pytest.raises(PipelineError) as ei:
        st.Select(clients=3) >> st.Broadcast() >> st.Broadcast()
    assert ei.value.message == "stage 3 (Broadcast) provides 'model' a second time (a round has one Broadcast)"
    assert ei.value.fix == "remove one of the two Broadcast stages"


def test_two_aggregates():
    with pytest.raises(PipelineError) as ei:
        _canonical() >> st.Aggregate(st.WeightedMean())
    assert ei.value.message == ("stage 5 (Aggregate) provides 'aggregate' a second time "
                                "(a round has one Aggregate)")
    assert ei.value.fix == "remove one of the two Aggregate stages"


@pytest.mark.parametrize("late", [lambda: st.Compress(), lambda: st.LocalTrain(), lambda: Clip()],
                         ids=["compress", "local-train", "user"])
def test_client_stage_after_aggregate(late):
    stage = late()
    with pytest.raises(PipelineError) as ei:
        _canonical() >> stage
    name = type(stage).__name__
    assert ei.value.message == f"stage 5 ({name}) is a client stage after the Aggregate stage"
    assert "before Aggregate" in ei.value.fix


def test_client_stage_after_aggregate_and_a_server_stage():
    with pytest.raises(PipelineError, match=r"stage 6 \(Compress\) is a client stage after the Aggregate"):
        _canonical() >> st.Evaluate() >> st.Compress()


def test_server_stage_between_client_stages_and_aggregate():
    with pytest.raises(PipelineError) as ei:
        st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain() >> st.Evaluate() >> st.Aggregate()
    assert ei.value.message == ("stage 4 (Evaluate) is a server stage between client stages and the "
                                "Aggregate stage")
    assert ei.value.fix == "server stages run before the client stages or after Aggregate"


@pytest.mark.parametrize("thing", ["select", 3, None, print])
def test_non_stage_object(thing):
    with pytest.raises(PipelineError) as ei:
        st.Select(clients=3) >> thing
    assert ei.value.message == f"{thing!r} is not a stage"
    assert ">>" in ei.value.fix
    with pytest.raises(PipelineError, match="is not a stage"):
        Pipeline([thing])


def test_stage_class_instead_of_instance():
    with pytest.raises(PipelineError, match="is not a stage"):
        st.Select(clients=3) >> st.Broadcast  # forgot the ()


class _Odd(Stage):
    """A direct Stage subclass: neither server, client nor reduce."""


def test_stage_of_no_kind_is_refused():
    with pytest.raises(PipelineError, match=r"stage 1 \(_Odd\) is neither a server, a client nor a reduce stage"):
        Pipeline([_Odd()])


def test_stage_of_no_kind_error_says_what_to_do():
    with pytest.raises(PipelineError) as ei:
        Pipeline([_Odd()])
    assert "ServerStage" in ei.value.fix


def test_check_without_client_stage():
    p = st.Select(clients=3) >> st.Broadcast()
    with pytest.raises(PipelineError) as ei:
        p.check()
    assert ei.value.message == "the pipeline has no client stage, so no client ever trains"
    assert ei.value.fix == "add st.Broadcast() >> st.LocalTrain(...) after Select"


def test_check_without_aggregate():
    p = st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain() >> st.Compress()
    with pytest.raises(PipelineError) as ei:
        p.check()
    assert ei.value.message == "nothing aggregates the client updates"
    assert ei.value.fix == "end the client stages with st.Aggregate(st.WeightedMean())"


def test_check_of_an_empty_pipeline():
    with pytest.raises(PipelineError, match="no client stage"):
        Pipeline([]).check()


# --------------------------------------------------------------------------- user-defined stages


def test_user_stages_with_their_own_capabilities_compose():
    p = (st.Select(clients=3) >> Schedule() >> st.Broadcast() >> ScheduledTrain() >> Clip(0.5)
         >> st.Aggregate() >> StopRule())
    seg = p.check()
    assert [type(s).__name__ for s in seg.before] == ["Select", "Schedule", "Broadcast"]
    assert [type(s).__name__ for s in seg.clients] == ["ScheduledTrain", "Clip"]
    assert [type(s).__name__ for s in seg.after] == ["StopRule"]
    assert [s.name for s in p] == ["select", "schedule", "broadcast", "scheduled-train", "clip", "aggregate",
                                   "stop-rule"]
    assert repr(p.stages[4]) == "Clip(norm=0.5)"


def test_user_capability_missing_names_it():
    with pytest.raises(PipelineError) as ei:
        st.Select(clients=3) >> st.Broadcast() >> ScheduledTrain()
    assert ei.value.message == "stage 3 (ScheduledTrain) needs 'schedule', but no stage before it provides it"
    assert ei.value.fix == "insert a stage that provides it before ScheduledTrain"


def test_user_capability_provided_after_is_too_late():
    with pytest.raises(PipelineError, match=r"stage 3 \(ScheduledTrain\) needs 'schedule'"):
        st.Select(clients=3) >> st.Broadcast() >> ScheduledTrain() >> Schedule()


def test_user_server_stage_requiring_aggregate_must_come_after_it():
    with pytest.raises(PipelineError, match=r"stage 1 \(StopRule\) needs 'aggregate'"):
        (StopRule() >> st.Select(clients=3)).check()


def test_abstract_stages_cannot_be_instantiated_without_run():
    class NoRun(ClientStage):
        pass

    with pytest.raises(TypeError):
        NoRun()  # type: ignore[abstract]


# --------------------------------------------------------------------------- repr / html


def test_repr_shows_the_stages_and_segments():
    p = (st.Select(clients=5) >> st.Broadcast() >> st.LocalTrain() >> st.Compress("fp16")
         >> st.Aggregate(st.WeightedMean()) >> st.Evaluate(every=3))
    lines = repr(p).splitlines()
    assert lines[0].startswith("Pipeline: Select(clients=5, fraction=None, sampler=None, weighting='uniform', "
                               "over_select=1.0) >> Broadcast() >> "
                               "LocalTrain(epochs=1, ")
    assert " >> Compress(codec=Float16()) >> Aggregate(reducer=WeightedMean(" in lines[0]
    assert lines[0].endswith(" >> Evaluate(every=3, batch_size=1024, device='cpu')")
    assert lines[1:] == [
        "  [server, before] select -> broadcast",
        "  [client] local-train -> compress",
        "  [reduce] aggregate",
        "  [server, after] evaluate",
    ]
    assert str(p) == repr(p)


def test_repr_of_a_fragment_omits_empty_segments():
    assert repr(st.Select(clients=2) >> st.Broadcast()).splitlines()[1:] == ["  [server, before] select -> broadcast"]


def test_stage_repr_shortens_long_values_and_names_callables():
    def my_sampler(rnd, population, count, rng):
        return population[:count]

    r = repr(st.Select(clients=2, sampler=my_sampler))
    assert "sampler=test_stage_repr_shortens_long_values_and_names_callables.<locals>.my_sampler" in r
    long = Clip(norm=list(range(100)))  # type: ignore[arg-type]
    shown = repr(long)[len("Clip(norm="):-1]
    assert len(shown) == 40 and shown.endswith("...")


def test_html_repr_contains_each_stage():
    p = (st.Select(clients=5) >> st.Broadcast() >> st.LocalTrain() >> Clip()
         >> st.Aggregate(st.WeightedMean()) >> st.Evaluate())
    h = p._repr_html_()
    assert h.startswith("<div>") and h.endswith("</div>")
    for s in p:
        assert f"<b>{type(s).__name__}</b><br><small>{s.kind}</small>" in h
    assert h.count("&rarr;") == len(p) - 1
    # the stage repr is in the tooltip, HTML-escaped
    assert 'title="Select(clients=5, fraction=None, sampler=None, weighting=&#x27;uniform&#x27;, over_select=1.0)"' in h
    assert "device=&#x27;cpu&#x27;" in h and "device='cpu'" not in h
    for kind in ("server", "client", "reduce"):
        assert f">{kind}</span>" in h


# --------------------------------------------------------------------------- tags


def test_stage_tags_are_set_from_class_and_occurrence():
    p = _canonical()
    for s in p:
        assert s.tag == stage_tag(type(s).__name__, 0)
    assert len({s.tag for s in p}) == len(p)
    assert all(0 <= s.tag < 2**31 for s in p)


def test_stage_tags_are_stable_across_builds_and_insertions():
    a = _canonical()
    b = (st.Select(clients=5) >> st.Broadcast() >> st.LocalTrain() >> st.Compress()
         >> st.Aggregate(st.WeightedMean()) >> st.Evaluate())
    tags_a = {type(s).__name__: s.tag for s in a}
    tags_b = {type(s).__name__: s.tag for s in b}
    for name, tag in tags_a.items():
        assert tags_b[name] == tag, f"inserting stages shifted {name}'s stream"


def test_two_stages_of_one_class_get_distinct_stable_tags():
    c1, c2 = Clip(1.0), Clip(2.0)
    p = st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain() >> c1 >> c2 >> st.Aggregate()
    assert c1.tag == stage_tag("Clip", 0)
    assert c2.tag == stage_tag("Clip", 1)
    assert c1.tag != c2.tag
    q = st.Select(clients=3) >> st.Broadcast() >> st.LocalTrain() >> Clip(1.0) >> Clip(2.0) >> st.Aggregate()
    assert [s.tag for s in q] == [s.tag for s in p]


def test_stage_tag_values():
    assert stage_tag("Select") == stage_tag("Select", 0)
    assert stage_tag("Select", 0) != stage_tag("Select", 1)
    assert stage_tag("Select") != stage_tag("Broadcast")
    import zlib

    assert stage_tag("LocalTrain", 2) == zlib.crc32(b"LocalTrain:2") & 0x7FFFFFFF
