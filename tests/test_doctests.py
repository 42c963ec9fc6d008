"""Every docstring example of the public API runs (imported by package name, as a user imports it)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import flgraph

SKIP = {"flgraph.cli"}  # its example is run by test_cli


def modules() -> list[str]:
    names = ["flgraph"]
    for pkg in ("flgraph", "flgraph.graph", "flgraph.engine", "flgraph.store", "flgraph.observe", "flgraph.local",
                "flgraph.stages", "flgraph.transports", "flgraph.transports.zmq", "flgraph.recipes",
                "flgraph.models", "flgraph.sim", "flgraph.secure",
                "flgraph.data"):
        mod = importlib.import_module(pkg)
        names.append(pkg)
        names += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(mod.__path__)]
    return sorted(set(names) - SKIP)


@pytest.mark.parametrize("name", modules())
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_public_api_exists():
    for name in ("Run", "Pipeline", "Params", "ParamSpec", "History", "FlgraphError"):
        assert hasattr(flgraph, name)
    from flgraph import recipes, stages
    for name in ("Select", "Broadcast", "LocalTrain", "Compress", "Aggregate", "Evaluate", "WeightedMean"):
        assert hasattr(stages, name)
    assert callable(recipes.fedavg)
    assert hasattr(flgraph.data, "synthetic_classification") and hasattr(flgraph.data, "FederatedDataset")
