"""A round's client stages on the wire as plain data, rebuilt on the device from what its owner allows.

The driver describes the client segment with flgraph's pipeline spec (:mod:`flgraph.spec`): one entry per
stage, ``{"class": "module:QualName", "settings": {...}, "tag": int}``, where a setting is plain data, a
nested object of the same form (an optimizer factory, a codec) or a callable named by its import path
(``{"callable": "my_pkg.train:step"}``). No code travels: the device imports every path itself, and only
paths it allows: the built-in ones (:data:`BUILTIN`: the stages an agent runs and their helpers) and those
matching its owner's patterns (``flgraph edge --allow-code 'my_pkg.*'``, ``Agent(allow=[...])``). A path
outside both is refused on the device (:func:`build`) and, when the agent announced its patterns at
``join``, already by the driver before the round starts (:func:`disallowed`).

Example:
    >>> from flgraph import stages as st
    >>> entries = describe([st.LocalTrain(lr=0.1, freeze=["head"]), st.Compress("int8")])
    >>> [e["class"] for e in entries], entries[0]["settings"]["freeze"]
    (['flgraph.stages.train:LocalTrain', 'flgraph.stages.compress:Compress'], ['head'])
    >>> stages = build(entries, allow=())
    >>> stages[0].freeze, type(stages[1].codec).__name__, stages[0].tag == entries[0]["tag"]
    (('head',), 'Int8', True)
    >>> code_paths(describe([st.LocalTrain(train_fn=len)]))
    ['builtins:len']
    >>> build(describe([st.LocalTrain(train_fn=len)]), allow=())
    Traceback (most recent call last):
    ...
    flgraph.errors.ConfigError: the task names code 'builtins:len', which this device does not allow ...
      fix: ...
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flgraph.errors import ConfigError
from flgraph.spec import describe as describe_spec
from flgraph.spec import rebuild_value

__all__ = ["AGENT_STAGES", "BUILTIN", "EVAL_STAGES", "allowed", "build", "check_agents", "code_paths", "describe",
           "disallowed", "refusals"]

#: The client stages an agent runs as a Dask worker does (by class path).
AGENT_STAGES = frozenset({"flgraph.stages.train:LocalTrain", "flgraph.stages.compress:Compress"})

#: The evaluation stages whose client work (``client(work)``, through ``map_clients``) agents run.
EVAL_STAGES = frozenset({"flgraph.stages.evaluate_clients:FederatedEvaluate",
                         "flgraph.stages.evaluate_clients:PersonalizedEvaluate"})

#: Paths every agent resolves without its owner's say: the stages above and the plain-data helpers they take.
BUILTIN = AGENT_STAGES | EVAL_STAGES | frozenset({
    "flgraph.stages.train:SGD",
    *(f"flgraph.stages.compress:{c}" for c in ("LZ4", "Float16", "BFloat16", "Int8", "TopK")),
    *(f"torch.nn.functional:{f}" for f in ("cross_entropy", "nll_loss", "mse_loss")),
})

# Why a client stage that is not in AGENT_STAGES does not run on an agent (the refusal names it).
_WHY = {
    "Byzantine": "it draws its attackers from the whole population, which a device does not hold (a "
                 "simulation stage: run robustness experiments on Dask)",
    "ClientEvaluate": "its branch's evaluation runs on Dask only",
}


def describe(stages: Sequence[Any]) -> list[dict[str, Any]]:
    """The wire entries of ``stages`` (their pipeline-spec entries, each with the stage's seed ``tag``)."""
    return [{**entry, "tag": int(stage.tag)} for stage, entry in zip(stages, describe_spec(list(stages)))]


def refusals(stages: Sequence[Any]) -> list[str]:
    """Why the client stages ``stages`` cannot run on an agent exactly as on a Dask worker ([] when they can)."""
    out: list[str] = []
    for stage, entry in zip(stages, describe(stages)):
        name = type(stage).__name__
        if entry.get("class") not in AGENT_STAGES:
            out.append(f"{name}: {_WHY.get(name, 'a client stage agents do not run')}")
            continue
        for where in _unimportable(entry["settings"], name):
            out.append(f"{where}: code travels by import path only, and this one has none (a lambda or a "
                       "function defined inside another)")
        bad = _not_finite(entry["settings"], name)
        out += [f"{where}: not a finite number" for where in bad]
        if getattr(stage, "correction", None):
            out.append(f"{name}(correction={stage.correction!r}): SCAFFOLD keeps per-client state in the "
                       "run's client-state store, which edge devices cannot reach")
        if getattr(stage, "error_feedback", False):
            out.append(f"{name}(error_feedback=True): the residual is per-client state in the run's "
                       "client-state store, which edge devices cannot reach")
    return out


def _unimportable(v: Any, where: str) -> list[str]:
    if isinstance(v, dict):
        if "unimportable" in v:
            return [f"{where} = {v['unimportable']}"]
        return [w for k, x in v.items() for w in _unimportable(x, f"{where}.{k}")]
    if isinstance(v, list):
        return [w for i, x in enumerate(v) for w in _unimportable(x, f"{where}[{i}]")]
    return []


def _not_finite(v: Any, where: str) -> list[str]:
    if isinstance(v, float) and not math.isfinite(v):
        return [where]
    if isinstance(v, dict):
        return [w for k, x in v.items() for w in _not_finite(x, f"{where}.{k}")]
    if isinstance(v, list):
        return [w for i, x in enumerate(v) for w in _not_finite(x, f"{where}[{i}]")]
    return []


def code_paths(entries: Any) -> list[str]:
    """Every import path the entries name that is not built in (the code the device must allow), in order."""
    out: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for key in ("class", "callable", "call"):
                path = v.get(key)
                if isinstance(path, str) and path not in BUILTIN and path not in out:
                    out.append(path)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(entries)
    return out


def allowed(path: str, patterns: Iterable[str]) -> bool:
    """Whether ``path`` (``module:qualname``) is built in or matches a pattern; patterns match the dotted
    name (``my_pkg.train.step``) with shell wildcards (``my_pkg.*``) or name it exactly.

    Example:
        >>> allowed("my_pkg.train:step", ["my_pkg.*"]), allowed("os:system", ["my_pkg.*"])
        (True, False)
    """
    if path in BUILTIN:
        return True
    dotted = path.replace(":", ".")
    return any(fnmatch.fnmatchcase(dotted, p) or fnmatch.fnmatchcase(path, p) for p in patterns)


def disallowed(entries: Any, patterns: Iterable[str]) -> list[str]:
    """The entries' code paths that ``patterns`` do not allow."""
    pats = list(patterns)
    return [p for p in code_paths(entries) if not allowed(p, pats)]


def build(entries: Sequence[Any], allow: Iterable[str], kinds: frozenset[str] = AGENT_STAGES) -> list[Any]:
    """The client stages ``entries`` describe, with their tags; refuses any path ``allow`` does not cover,
    and any stage not in ``kinds`` (:data:`EVAL_STAGES` for an evaluate task)."""
    pats = list(allow)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("class"), str)
                                                for e in entries):
        raise ConfigError("the task's stages are not a list of {class, settings, tag} maps",
                          fix="the gateway must send the client segment as transports/PROTOCOL.md says")
    for entry in entries:
        if entry["class"] not in kinds:
            raise ConfigError(f"the task asks for the stage {entry['class']!r}, which this agent does not run "
                              "here", fix="run that stage on Dask; agents run " + ", ".join(sorted(kinds)))
    bad = disallowed(entries, pats)
    if bad:
        shown = ", ".join(pats) if pats else "nothing beyond the built-in stages"
        raise ConfigError(f"the task names code {bad[0]!r}, which this device does not allow (it allows "
                          f"{shown})", fix=f"the device's owner, having checked that code, starts the agent with "
                                           f"--allow-code {bad[0].split(':')[0].split('.')[0]}.* (Agent(allow=...)); "
                                           "or drop it from the pipeline")
    stages = []
    for entry in entries:
        stage = rebuild_value(entry)
        stage.tag = int(entry.get("tag", 0))
        stages.append(stage)
    return stages


def check_agents(agents: Mapping[int, Any], ids: Iterable[int], entries: Any, legacy: Sequence[str]) -> None:
    """Refuse, before any task goes out, a round that a connected agent (``agents``: client id -> the
    gateway's AgentInfo) of the clients ``ids`` would not run as a Dask worker does: it runs no client
    segment and the segment holds more than LocalTrain's plain settings (``legacy``: what it would leave
    out), or the segment names code its owner does not allow (announced at join as ``caps.allow``)."""
    for cid in ids:
        info = agents.get(int(cid))
        if info is None:
            continue
        if not info.caps.get("segment"):
            if legacy:
                raise ConfigError(f"client {cid}'s agent does not run client segments (it did not announce "
                                  "caps.segment), so it would leave out " + "; ".join(legacy),
                                  fix="run flgraph's LocalTrainTask on the device (or a task function that "
                                      "runs task.stages and sets runs_segment = True)")
            continue
        patterns = [p for p in str(info.caps.get("allow", "")).split(",") if p]
        bad = disallowed(entries, patterns)
        if bad:
            raise ConfigError(f"the pipeline's client stages name code {bad[0]!r}, which client {cid}'s agent "
                              f"does not allow (it allows {patterns or 'no code beyond the built-in stages'})",
                              fix=f"its owner restarts it with --allow-code for that path (e.g. "
                                  f"{bad[0].split(':')[0].split('.')[0]}.*) after checking the code, or the "
                                  "pipeline drops it")
