"""A pipeline as plain JSON: enough to rebuild it without the user's script, and to name differences.

Each stage is ``{"class": "module:QualName", "settings": {...}}``; a setting is a JSON value, a list, a
nested object of the same form (a reducer, a codec), or a callable recorded by its import path
``{"callable": "module:qualname"}``. A callable that cannot be imported again (a lambda, a function
defined inside another) is recorded as ``{"unimportable": "<repr>"}``: such a pipeline is resumed by
passing it again (``flgraph.resume(path, pipeline=...)``).

Convention: a stage's :meth:`~flgraph.graph.Stage.settings` are its constructor's keyword arguments. A
marker a decorator sets on a callable (e.g. :func:`flgraph.stages.pure_sampler`) is not recorded: it comes
back with the callable when its import path is imported again.

Example:
    >>> from flgraph import stages as st
    >>> from flgraph.spec import describe, rebuild, differences
    >>> p = st.Select(clients=5) >> st.Broadcast() >> st.LocalTrain(lr=0.1) >> st.Aggregate()
    >>> spec = describe(p)
    >>> spec[2]["class"], spec[2]["settings"]["lr"]
    ('flgraph.stages.train:LocalTrain', 0.1)
    >>> differences(spec, describe(rebuild(spec)))
    []
    >>> differences(spec, describe(st.Select(clients=5) >> st.Broadcast() >> st.LocalTrain(lr=0.2) >> st.Aggregate()))
    ['stage 3 (LocalTrain).lr: 0.1 -> 0.2']
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["describe", "differences", "import_path", "load_path", "rebuild", "rebuild_value", "unimportable"]

JSON = Any

# settings a stage no longer takes, which specs written before still hold: dropped when rebuilding and
# comparing, since what they said now travels another way (a sampler's purity: @pure_sampler on the sampler;
# without it the choice is made at its round, the same choice)
_RETIRED: dict[str, tuple[str, ...]] = {"flgraph.stages.select:Select": ("sampler_is_pure",)}


def _settings(v: dict[str, Any]) -> dict[str, Any]:
    retired = _RETIRED.get(v.get("class", ""), ())
    return {k: x for k, x in v["settings"].items() if k not in retired}


def import_path(obj: Any) -> str | None:
    """``module:qualname`` if ``obj`` can be imported again by that path, else None."""
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    if not mod or not qual or "<" in qual or mod == "__main__":
        return None
    try:
        return f"{mod}:{qual}" if load_path(f"{mod}:{qual}") is obj else None
    except Exception:
        return None


def load_path(path: str) -> Any:
    """Import ``module:qualname``; a ConfigError that says what to install if it cannot be imported."""
    mod_name, _, qual = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {path!r}, which the run uses: {e}",
                          fix=f"install or put on PYTHONPATH the module {mod_name!r}, or pass the object "
                              "again when resuming") from e
    return obj


def _value(v: Any) -> JSON:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list | tuple):
        return [_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _value(x) for k, x in v.items()}
    if hasattr(v, "flgraph_spec") and not isinstance(v, type):  # built by a factory call: record the call
        path, kwargs = v.flgraph_spec()
        if path is not None:
            return {"call": path, "kwargs": {k: _value(x) for k, x in kwargs.items()}}
        return {"unimportable": repr(v)}
    if isinstance(v, type) or inspect.isfunction(v) or inspect.isbuiltin(v) or inspect.ismethod(v):
        path = import_path(v)
        return {"callable": path} if path else {"unimportable": repr(v)}
    if hasattr(v, "settings") or hasattr(v, "__dict__"):
        return _object(v)
    return {"unimportable": repr(v)}


def _object(obj: Any) -> JSON:
    cls = type(obj)
    path = import_path(cls)
    if path is None:
        return {"unimportable": repr(obj)}
    settings = obj.settings() if hasattr(obj, "settings") else {
        k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return {"class": path, "settings": {k: _value(v) for k, v in settings.items()}}


def describe(pipeline: Any) -> list[JSON]:
    """The JSON spec of ``pipeline``: one entry per stage; a graph that is more than a chain ends with one
    more entry, ``{"graph": ...}``, its shape (branches, fan-outs) in terms of the stages' positions."""
    out = [_object(s) for s in pipeline]
    branches = getattr(pipeline, "branches", None)
    steps = getattr(pipeline, "steps", ())
    if branches is None and not any(isinstance(st, dict) for st in steps):
        return out
    at = iter(range(len(out)))

    def shape(p: Any) -> JSON:
        items: list[JSON] = []
        for st in p.steps:
            if isinstance(st, dict):
                items.append({"fan": {v: [next(at) for _ in sub.stages] for v, sub in st.items()}})
            else:
                items.append(next(at))
        return {"name": p.name, "steps": items}

    return [*out, {"graph": {"branches": [shape(b) for b in (branches or (pipeline,))]}}]


def unimportable(spec: JSON, where: str = "") -> list[str]:
    """Places in ``spec`` that cannot be rebuilt from import paths."""
    out: list[str] = []
    if isinstance(spec, dict):
        if "unimportable" in spec:
            out.append(f"{where or 'value'} = {spec['unimportable']}")
        for k, v in spec.items():
            out += unimportable(v, f"{where}.{k}" if where else k)
    elif isinstance(spec, list):
        for i, v in enumerate(spec):
            out += unimportable(v, f"{where}[{i}]")
    return out


def _build(v: JSON) -> Any:
    if isinstance(v, list):
        return [_build(x) for x in v]
    if isinstance(v, dict):
        if "callable" in v:
            return load_path(v["callable"])
        if "call" in v:
            return load_path(v["call"])(**{k: _build(x) for k, x in v["kwargs"].items()})
        if "unimportable" in v:
            raise ConfigError(f"the run used {v['unimportable']}, which cannot be imported again",
                              fix="resume with the same object passed again: flgraph.resume(path, pipeline=...)")
        if "class" in v:
            cls = load_path(v["class"])
            kwargs = {k: _build(x) for k, x in _settings(v).items()}
            try:
                return cls(**kwargs)
            except TypeError as e:
                raise ConfigError(f"cannot rebuild {v['class']} from its saved settings: {e}",
                                  fix="make the stage's settings() its constructor's keyword arguments, or "
                                      "resume with pipeline=...") from e
        return {k: _build(x) for k, x in v.items()}
    return v


def rebuild_value(entry: JSON) -> Any:
    """The object (a stage, a codec, a callable) that one entry of a spec describes, imported and built.

    Example:
        >>> rebuild_value({"class": "flgraph.stages.train:SGD", "settings": {"lr": 0.1, "momentum": 0.9}})
        SGD(lr=0.1, momentum=0.9)
    """
    return _build(entry)


def rebuild(spec: list[JSON]) -> Any:
    """The pipeline described by ``spec``."""
    from .graph import Pipeline

    entries, graph = _split(spec)
    stages = [_build(s) for s in entries]
    if graph is None:
        return Pipeline(stages)

    def branch(b: JSON) -> Pipeline:
        steps: list[Any] = []
        for item in b["steps"]:
            if isinstance(item, dict):
                # in the stages' order, not the (sorted) order of the saved JSON object: a stage's state is
                # keyed by its position, so a reordered fan-out would not find its state on resume
                fan = sorted(item["fan"].items(), key=lambda kv: min(kv[1], default=0))
                steps.append({v: Pipeline([stages[i] for i in idx]) for v, idx in fan})
            else:
                steps.append(stages[item])
        return Pipeline(steps, name=b.get("name"))

    parts = [branch(b) for b in graph["branches"]]
    return parts[0] if len(parts) == 1 else Pipeline(branches=tuple(parts))


def _split(spec: list[JSON]) -> tuple[list[JSON], JSON | None]:
    """The stage entries and the graph's shape (None for a chain)."""
    if spec and isinstance(spec[-1], dict) and "graph" in spec[-1]:
        return spec[:-1], spec[-1]["graph"]
    return spec, None


def _label(i: int, s: JSON) -> str:
    cls = s.get("class", "?").rsplit(":", 1)[-1] if isinstance(s, dict) else "?"
    return f"stage {i + 1} ({cls})"


def _diff(a: JSON, b: JSON, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict) and "settings" in a and "settings" in b \
            and a.get("class") == b.get("class"):
        sa, sb = _settings(a), _settings(b)
        for k in sorted(set(sa) | set(sb)):
            _diff(sa.get(k), sb.get(k), f"{where}.{k}", out)
    elif a != b:
        out.append(f"{where}: {_short(a)} -> {_short(b)}")


def _short(v: JSON) -> str:
    if isinstance(v, dict) and "class" in v:
        return v["class"].rsplit(":", 1)[-1] + "(...)"
    if isinstance(v, dict) and "callable" in v:
        return str(v["callable"])
    return repr(v)


def differences(old: list[JSON], new: list[JSON]) -> list[str]:
    """Human-readable differences between two pipeline specs, e.g. ``stage 3 (LocalTrain).lr: 0.05 -> 0.01``."""
    out: list[str] = []
    (old, old_graph), (new, new_graph) = _split(old), _split(new)
    if old_graph != new_graph:
        out.append("the graph's shape changed (its branches or fan-outs)")
    if len(old) != len(new):
        out.append(f"the pipeline has {len(new)} stages, the run had {len(old)}: "
                   + " >> ".join(_label(i, s).split("(")[1].rstrip(")") for i, s in enumerate(new)))
        return out
    for i, (a, b) in enumerate(zip(old, new)):
        if a.get("class") != b.get("class"):
            out.append(f"{_label(i, a)} is now {_label(i, b).split(' ', 2)[2]}")
        else:
            _diff(a, b, _label(i, a), out)
    return out
