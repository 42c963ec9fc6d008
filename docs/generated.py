"""Write the site's generated pages before each build: the API reference (docs/api/), one page per
recipe (docs/recipes/) and the tutorials (docs/tutorials/, the notebooks as the tests leave them).

Each comes from the code itself, so a new stage, recipe or notebook is on the site the moment it exists;
nobody has to remember to list it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import shutil
from pathlib import Path

#: The packages in the reference, each with what a reader goes there for.
PACKAGES: dict[str, str] = {
    "flgraph": "The run, its history, params, errors, checkpoints' public handle: what a script imports first.",
    "flgraph.stages": "The stage library: one module per family.",
    "flgraph.recipes": "Recipes: functions returning a paper's round as a graph.",
    "flgraph.graph": "Stages, named values, composition and the graph check: what a custom stage subclasses.",
    "flgraph.data": "Federated datasets, partitioners and stores.",
    "flgraph.models": "The model adapter.",
    "flgraph.sim": "Simulated devices.",
    "flgraph.secure": "Secure aggregation's protocol (SecAgg+): keys, Shamir shares, neighbour graph, masks.",
    "flgraph.store": "The run directory: snapshots, per-client state, metrics table.",
    "flgraph.observe": "History, metrics file, progress, dashboard page and plots.",
    "flgraph.transports": "Where clients live: the Dask transport and the transport contract.",
    "flgraph.transports.zmq": "Edge devices over ZeroMQ: gateway, agent, wire format, keys.",
    "flgraph.engine": "The round engines and the contracts between engine, transports and stages.",
}
#: Modules documented elsewhere (the CLI has its own page).
SKIP = {"flgraph.cli"}


def modules(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    subs = [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
            if not m.ispkg and not m.name.startswith("_")]
    return [m for m in sorted(subs) if m not in SKIP]


def write_api(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = ["# API reference", "", "Generated from the docstrings; every example in them runs in the tests.", "",
             "```{toctree}", ":maxdepth: 1", ""]
    for package, about in PACKAGES.items():
        index.append(package)
        lines = [f"# {package}", "", about, "", "```{eval-rst}", f".. automodule:: {package}",
                 "   :no-members:", ""]
        for mod in modules(package):
            lines += [f".. automodule:: {mod}", ""]
        lines.append("```")
        text = "\n".join(lines) + "\n"
        _page(out / f"{package}.md", text)
    index.append("```")
    (out / "index.md").write_text("\n".join(index) + "\n")


def _page(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # unchanged pages keep Sphinx's cache valid
        path.write_text(text)


def write_recipes(out: Path) -> None:
    """One page per recipe: its paper and pseudo-code (the module docstring), then the code itself."""
    import flgraph.recipes as recipes

    out.mkdir(parents=True, exist_ok=True)
    names = sorted(recipes.__all__)
    index = ["# Recipes", "",
             "Each recipe is a small function returning a round's graph with its paper's defaults; its page gives",
             "the paper, its pseudo-code line by line with the stage that does each line, and the function itself.",
             "Run any of them as `fg.Run(fg.recipes.NAME(clients=...), model=..., data=...)`.", "",
             "| recipe | what it is |", "| --- | --- |"]
    for name in names:
        fn = getattr(recipes, name)
        module = inspect.getmodule(fn)
        assert module is not None
        doc = inspect.getdoc(module) or ""
        summary = doc.split("\n\n")[0].replace("\n", " ").rstrip(":")
        index.append(f"| [`{name}`]({name}.md) | {summary} |")
        source = Path(inspect.getsourcefile(fn) or "")
        root = Path(__file__).resolve().parent.parent
        lines = [f"# {name}", "", "```{eval-rst}", f".. automodule:: {module.__name__}", "   :no-members:",
                 "   :no-index:", "", f".. autofunction:: {module.__name__}.{name}", "   :no-index:", "```", "",
                 "## The graph", "", f"```{{literalinclude}} /../{source.relative_to(root)}",
                 f":pyobject: {name}", ":language: python", "```", ""]
        _page(out / f"{name}.md", "\n".join(lines))
    index += ["", "```{toctree}", ":hidden:", "", *names, "```", ""]
    _page(out / "index.md", "\n".join(index))


def write_tutorials(out: Path, notebooks: Path) -> None:
    """The notebooks, copied with the outputs they were saved with (the test suite executes them)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for nb in sorted(notebooks.glob("*.ipynb")):
        target = out / nb.name
        if not target.exists() or target.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, target)
        cells = json.loads(nb.read_text())["cells"]
        title = next((line.lstrip("# ").strip() for c in cells if c["cell_type"] == "markdown"
                      for line in "".join(c["source"]).splitlines() if line.startswith("# ")), nb.stem)
        entries.append((nb.stem, title))
    for stale in out.glob("*.ipynb"):
        if not (notebooks / stale.name).exists():
            stale.unlink()
    lines = ["# Tutorials", "", "The notebooks of `notebooks/`, with their plots. The test suite runs each from top",
             "to bottom, so none goes stale.", "", "```{toctree}", ":maxdepth: 1", ""]
    lines += [stem for stem, _ in entries] + ["```", ""]
    _page(out / "index.md", "\n".join(lines))


def write(docs: Path) -> None:
    write_api(docs / "api")
    write_recipes(docs / "recipes")
    write_tutorials(docs / "tutorials", docs.parent / "notebooks")
