"""Rounds as graphs: named values checked before anything runs, fan-outs, parallel branches and tiers,
each run on a real Dask cluster and checked against figures computed here independently."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

import flgraph as fg
from flgraph import recipes
from flgraph import stages as st
from flgraph.context import ClientSet, ClientWork, RoundContext, Update
from flgraph.errors import ConfigError, PipelineError
from flgraph.graph import ClientStage, Pipeline, ServerStage


class ExtraTrain(ClientStage):
    """A client stage writing the update and a second per-client value ``h`` (like q-FFL's h_k)."""

    requires: ClassVar[frozenset[str]] = frozenset({"model"})
    provides: ClassVar[frozenset[str]] = frozenset({"update", "h"})

    def run(self, work: ClientWork) -> None:
        size = work.global_params.spec.size
        work.update = Update(work.client, 1, work.round - 1, np.zeros(size, np.float32))
        work.outputs["h"] = Update(work.client, 1, work.round - 1, np.array([float(work.client)], np.float32))


class ConstantUpdate(ClientStage):
    """Writes the update ``client id`` (every entry) with ``1 + id % 3`` samples: sums checkable by hand."""

    requires: ClassVar[frozenset[str]] = frozenset({"model"})
    provides: ClassVar[frozenset[str]] = frozenset({"update"})

    def run(self, work: ClientWork) -> None:
        size = work.global_params.spec.size
        work.update = Update(work.client, 1 + work.client % 3, work.round - 1,
                             np.full(size, float(work.client), np.float32))


class ReadsH(ServerStage):
    """A server step that reads the aggregate of ``h``."""

    def reads(self) -> frozenset[str]:
        return frozenset({"aggregate:h"})

    def run(self, ctx: RoundContext) -> None:
        ctx.metrics["h_mean"] = float(np.asarray(ctx.aggregates["h"][0])[0])


def _head() -> Pipeline:
    return st.Select(clients=4) >> st.Broadcast()


def _data(n: int = 16) -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=n, samples_per_client=16, num_features=6, num_classes=3,
                                            alpha=0.5, seed=1, test_samples=60)


def _run(pipeline, cluster, rounds=2, data=None, **kw):
    with fg.Run(pipeline, model=fg.models.mlp(6, [8], 3), data=data or _data(), seed=0, cluster=cluster,
                progress=False, dashboard=False, metrics_log=None, evaluate="never", **kw) as run:
        history = run.fit(rounds)
        return run.state.params.flat.copy(), history


# -- the check: each malformed graph, its named error ------------------------------------------------


def test_a_read_with_no_writer_upstream_names_the_value_and_the_fix():
    with pytest.raises(PipelineError) as ei:
        (_head() >> st.LocalTrain(correction="scaffold")
         >> {"update": st.Aggregate(), "control_delta": st.Aggregate(st.Mean())} >> st.ScaffoldControl())
    assert ei.value.message == ("stage 3 (LocalTrain) needs 'control' on the clients, but no stage before it "
                                "provides it")
    assert ei.value.fix.startswith("insert st.Broadcast('params', 'control') before LocalTrain")
    with pytest.raises(PipelineError) as ei:  # a server step reading an aggregate nobody reduces
        (_head() >> ExtraTrain() >> st.Aggregate() >> ReadsH())
    assert "needs the aggregate of 'h'" in ei.value.message
    assert "{'update': st.Aggregate(...), 'h': st.Aggregate(st.Mean())}" in ei.value.fix
    with pytest.raises(PipelineError, match="the server value 'control', which no stage of the round keeps"):
        (st.Select(clients=4) >> st.Broadcast("params", "control") >> st.LocalTrain() >> st.Aggregate()).check()


def test_a_per_client_value_no_reducer_consumes_is_refused_unless_dropped():
    p = _head() >> ExtraTrain() >> st.Aggregate()
    with pytest.raises(PipelineError) as ei:
        p.check()
    assert ei.value.message == "the per-client value 'h' that ExtraTrain writes is never reduced"
    assert "st.Discard('h')" in ei.value.fix
    assert (_head() >> ExtraTrain() >> st.Discard("h") >> st.Aggregate()).check().plain


def test_two_writers_of_one_value_are_refused():
    with pytest.raises(PipelineError, match=r"stage 4 \(LocalTrain\) writes a client update, which a stage before"):
        _head() >> st.LocalTrain() >> st.LocalTrain()
    with pytest.raises(PipelineError, match="ScaffoldControl and ScaffoldControl both keep the server value"):
        recipes.scaffold(clients=4) >> st.ScaffoldControl()
    with pytest.raises(PipelineError, match="reduces 'h' a second time"):
        _head() >> ExtraTrain() >> {"update": st.Aggregate(), "h": st.Aggregate(st.Mean())} >> {"h": st.Aggregate()}


def test_a_cycle_and_a_read_across_parallel_branches_are_refused():
    with pytest.raises(PipelineError) as ei:  # ReadsH before the reducer of h
        Pipeline([st.Select(clients=4), st.Broadcast(), ExtraTrain(), {"update": st.Aggregate()}, ReadsH(),
                  {"h": st.Aggregate(st.Mean())}])
    assert ei.value.message == (
        "stage 5 (ReadsH) needs the aggregate of 'h', but no stage before it provides it (stage 6 (Aggregate) "
        "writes it after ReadsH: values flow forward through a round, so reading it here would make a cycle)")
    train = _head() >> ExtraTrain() >> {"update": st.Aggregate(), "h": st.Aggregate(st.Mean())}
    other = (ReadsH() >> st.Select(clients=2) >> st.Broadcast() >> st.ClientEvaluate()
             >> st.Aggregate(st.MetricsMean())).named("eval")
    with pytest.raises(PipelineError) as ei:
        (train | other).check()
    assert "which the parallel branch 'main' writes: branches run side by side" in ei.value.message


def test_a_client_stage_cannot_see_a_tier_and_groups_must_be_combined():
    with pytest.raises(PipelineError, match=r"stage 5 \(Compress\) is a client stage after the Aggregate stage"):
        _head() >> st.LocalTrain() >> st.Aggregate(by="site") >> st.Compress()
    with pytest.raises(PipelineError) as ei:
        (_head() >> st.LocalTrain() >> st.Aggregate(by="site")).check()
    assert ei.value.message == "the groups of 'update' (Aggregate(by='site')) are never combined"


def test_fan_out_and_branch_mistakes_are_named():
    with pytest.raises(PipelineError, match="reduces 'control_delta', which no client stage before it writes"):
        _head() >> st.LocalTrain() >> {"update": st.Aggregate(), "control_delta": st.Aggregate()}
    with pytest.raises(PipelineError, match="holds Evaluate, which is not a reduce stage"):
        _head() >> ExtraTrain() >> {"update": st.Aggregate(), "h": st.Evaluate()}
    with pytest.raises(PipelineError, match="ServerOpt steps the model, so it reduces 'update', not 'h'"):
        _head() >> ExtraTrain() >> {"update": st.Aggregate(), "h": st.ServerOpt()}
    with pytest.raises(PipelineError, match="come before any client stage"):
        _head() >> {"update": st.Aggregate()}
    a = recipes.fedavg(clients=4, evaluate_every=None)
    with pytest.raises(PipelineError, match="both step the model"):
        (a | recipes.fedavg(clients=3, evaluate_every=None)).check()
    with pytest.raises(PipelineError, match="two parallel branches are named 'x'"):
        (a.named("x") | a.named("x")).check()
    with pytest.raises(PipelineError, match="belongs to no branch"):
        (a | _evaluation(3)) >> st.Evaluate()


def test_graph_shapes_show_and_round_trip_through_the_spec():
    from flgraph.spec import describe, differences, rebuild

    p = recipes.scaffold(clients=4)
    lines = repr(p).splitlines()
    assert lines[3] == "  [reduce] update: aggregate; control_delta: aggregate"
    assert "{'update': Aggregate(" in lines[0]
    html = p._repr_html_()
    assert ">update</small>" in html and ">control_delta</small>" in html
    tiered = _head() >> st.LocalTrain() >> st.Aggregate(by="site") >> st.Aggregate(st.Median())
    assert repr(tiered).splitlines()[-1] == "  [reduce] update: aggregate by site -> aggregate"
    for q in (p, tiered, recipes.fedavg(clients=4) | _evaluation(3)):
        assert differences(describe(q), describe(rebuild(describe(q)))) == []
    assert differences(describe(p), describe(recipes.fedavg(clients=4)))[0].startswith("the graph's shape changed")


# -- running the shapes ------------------------------------------------------------------------------


def _evaluation(clients: int) -> Pipeline:
    return (st.Select(clients=clients) >> st.Broadcast() >> st.ClientEvaluate()
            >> st.Aggregate(st.MetricsMean())).named("eval")


def test_an_evaluation_branch_runs_its_own_cohort_in_the_same_round(client2):
    data = _data(20)
    train = recipes.fedavg(clients=4, epochs=1, batch_size=8, evaluate_every=None)
    alone, _ = _run(train, client2, data=data)
    both = train | _evaluation(6)
    params, history = _run(both, client2, data=data)
    assert np.array_equal(params, alone), "the evaluation branch changed training's bits"
    evaluated = both.stages[4]
    assert type(evaluated).__name__ == "Select" and evaluated.tag != both.stages[0].tag
    for rnd, row in enumerate(history, 1):
        ctx = [RoundContext(rnd, 0, None, data, None, False) for _ in range(2)]  # type: ignore[arg-type]
        for c, sel in zip(ctx, (both.stages[0], evaluated)):
            c.tag = sel.tag
            sel.run(c)
        train_ids, eval_ids = (set(c.clients.ids.tolist()) for c in ctx)
        assert train_ids != eval_ids, "the cohorts are drawn from the same stream"
        assert row["eval/clients_done"] == 6 and row["clients_done"] == 4
        assert row["eval/samples"] == sum(data.num_samples(c) for c in eval_ids)
        assert 0 <= row["eval/accuracy"] <= 1 and row["eval/loss"] > 0
        assert row["eval/clients_selected"] == 6


def _fixed(ids):
    def sampler(rnd, population, count, rng):
        return np.array(ids)
    return sampler


def test_tiers_weighted_mean_per_site_then_across_sites_equals_the_flat_mean(client2):
    data = _data(8).with_attributes(site=lambda ids: ids % 4)
    ids = [0, 4, 1, 5, 2, 6, 3, 7]  # each site's two clients side by side: the sites are nodes of the tree
    flat = st.Select(clients=8, sampler=_fixed(ids)) >> st.Broadcast() >> st.LocalTrain(batch_size=4) >> st.Aggregate()
    tiered = (st.Select(clients=8, sampler=_fixed(ids)) >> st.Broadcast() >> st.LocalTrain(batch_size=4)
              >> st.Aggregate(st.WeightedMean(), by="site") >> st.Aggregate(st.WeightedMean()))
    a, _ = _run(flat, client2, data=data)
    b, _ = _run(tiered, client2, data=data)
    assert np.array_equal(a, b)
    ids = [3, 0, 6, 1, 7, 2, 5, 4]  # sites scattered: the same sum, added in another order
    a, _ = _run(flat.stages[0].__class__(clients=8, sampler=_fixed(ids)) >> flat.stages[1].__class__()
                >> st.LocalTrain(batch_size=4) >> st.Aggregate(), client2, data=data)
    b, _ = _run(st.Select(clients=8, sampler=_fixed(ids)) >> st.Broadcast() >> st.LocalTrain(batch_size=4)
                >> st.Aggregate(st.WeightedMean(), by="site") >> st.Aggregate(st.WeightedMean()), client2, data=data)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_tiers_median_across_sites_from_an_attribute_and_from_a_setting(client1, client2):
    data = _data(12).with_attributes(site=lambda ids: ids % 3)
    ids = [0, 1, 2, 3, 4, 5, 7, 9, 10]
    tiered = (st.Select(clients=9, sampler=_fixed(ids)) >> st.Broadcast() >> ConstantUpdate()
              >> st.Aggregate(st.WeightedMean(), by="site") >> st.Aggregate(st.Median()))
    start = fg.models.mlp(6, [8], 3)
    got, _ = _run(tiered, client2, rounds=1, data=data)
    means = []
    for site in range(3):
        members = [c for c in ids if c % 3 == site]
        w = np.array([1 + c % 3 for c in members], float)
        means.append(float(np.dot(w, members) / w.sum()))
    want = fg.models.adapter.ModelAdapter.from_module(start).initial_params().flat + np.float32(np.median(means))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    one, _ = _run(tiered, client1, rounds=1, data=data)
    assert np.array_equal(one, got), "tiers are bit-identical on one or two workers"

    def by_gateway(rnd, population, count, rng):  # the groups come with the round's clients (a gateway's id)
        return ClientSet(np.array(ids), {"gateway": np.array([c % 3 for c in ids])})

    gw = (st.Select(clients=9, sampler=by_gateway) >> st.Broadcast() >> ConstantUpdate()
          >> st.Aggregate(st.WeightedMean(), by="gateway") >> st.Aggregate(st.Median()))
    via_setting, _ = _run(gw, client2, rounds=1, data=_data(12))
    assert np.array_equal(via_setting, got)
    with pytest.raises(ConfigError, match="the clients have no attribute 'region'"):
        _run(_head() >> ConstantUpdate() >> st.Aggregate(by="region") >> st.Aggregate(), client2, data=_data(12))


def test_a_second_per_client_value_is_reduced_next_to_the_update(client2):
    p = _head() >> ExtraTrain() >> {"update": st.Aggregate(), "h": st.Aggregate(st.Mean())} >> ReadsH()
    sampler = _fixed([3, 5, 8, 10])
    p.stages[0].sampler = sampler
    _, history = _run(p, client2, rounds=1)
    assert history[-1]["h_mean"] == pytest.approx(np.mean([3, 5, 8, 10]))


def test_transports_and_engines_refuse_graphs_they_cannot_run():
    class EdgeLike:  # a transport that declares no graph features, as the ZeroMQ transports do
        def start(self, bundle, flat):
            raise AssertionError("never started")

    with pytest.raises(ConfigError, match=r"EdgeLike cannot run this round: it has several per-client values "
                                          r"\(main: aggregate of 'update', aggregate of 'control_delta'\); server "
                                          r"values broadcast besides the params \(Broadcast of 'control'\)"):
        fg.Run(recipes.scaffold(clients=4), model=fg.models.mlp(6, [8], 3), data=_data(), transport=EdgeLike(),
               progress=False, dashboard=False, metrics_log=None)
    from flgraph.transports.zmq import ZmqTransport

    # one update per agent: no fan-outs, no branches; secure aggregation's phases run on the agents
    assert ZmqTransport.supports == frozenset({"tiers", "secure aggregation"})
    fedbuff_fan = (_head() >> ExtraTrain() >> {"update": st.BufferedAggregate(buffer=2), "h": st.Aggregate()})
    with pytest.raises(PipelineError, match="the asynchronous engine steps the model from one buffered reducer"):
        fg.Run(fedbuff_fan, model=fg.models.mlp(6, [8], 3), data=_data(), progress=False, dashboard=False,
               metrics_log=None)


@pytest.mark.parametrize(("stage", "named"), [
    (st.Byzantine(0.2), r"Byzantine: it draws its attackers from the whole population"),
    (st.LocalTrain(train_fn=lambda m, d, c: 0.0), r"LocalTrain.train_fn = .*code travels by import path only"),
])
def test_edge_agents_refuse_client_stages_they_would_not_run(stage, named):
    """Agents run the client segment as a Dask worker does (tests/test_edge_segment.py); what they cannot
    run is refused when the transport starts, never dropped on the device (no agent needed: the refusal
    comes first)."""
    from flgraph.transports.zmq import ZmqTransport

    p = st.Select(clients=2) >> st.Broadcast()
    for s in ((st.LocalTrain(),) if isinstance(stage, st.Byzantine) else ()) + (stage,):
        p = p >> s
    t = ZmqTransport("tcp://127.0.0.1:0")
    with fg.Run(p >> st.Aggregate(), model=fg.models.mlp(6, [8], 3), data=_data(), transport=t, progress=False,
                dashboard=False, metrics_log=None, evaluate="never") as run, pytest.raises(
                ConfigError, match="edge agents cannot run the pipeline's client stages as a Dask worker does: "
                                   + named):
        run.fit(1)
    t.close()


def test_a_graph_with_branches_and_tiers_resumes_exactly(client2, tmp_path):
    data = _data(20).with_attributes(site=lambda ids: ids % 3)

    def pipeline():
        train = (st.Select(clients=6) >> st.Broadcast() >> st.LocalTrain(batch_size=8)
                 >> st.Aggregate(st.WeightedMean(), by="site") >> st.Aggregate(st.Median()))
        return train | _evaluation(5)

    whole, history = _run(pipeline(), client2, rounds=3, data=data)
    path = tmp_path / "run.zarr"
    with fg.Run(pipeline(), model=fg.models.mlp(6, [8], 3), data=data, seed=0, cluster=client2, progress=False,
                dashboard=False, evaluate="never", checkpoint=str(path)) as run:
        run.fit(2)
    resumed = fg.resume(str(path), cluster=client2, data=data, progress=False, dashboard=False)
    with resumed:
        assert resumed.state.round == 2 and repr(resumed.pipeline) == repr(pipeline())
        rows = resumed.fit(1)
        assert np.array_equal(resumed.state.params.flat, whole)
        assert rows[-1]["eval/accuracy"] == history[-1]["eval/accuracy"]
