"""Glue between a :class:`~flgraph.run.Run` and its run directory: what is saved, and resume.

Example:
    >>> import flgraph as fg  # doctest: +SKIP
    >>> run = fg.resume("runs/exp.zarr")  # doctest: +SKIP
    >>> run.fit(rounds=run.remaining)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..observe.history import History
from ..params import ParamSpec
from ..spec import describe, differences, rebuild, unimportable
from .checkpoint import RunDirectory, Snapshot

if TYPE_CHECKING:
    from ..run import Run

__all__ = ["config_of", "create_directory", "load_blob_model", "resume", "snapshot_of"]

log = logging.getLogger("flgraph")


def _param_spec(spec: ParamSpec) -> list[list[Any]]:
    return [[e.name, list(e.shape), e.dtype] for e in spec.entries]


def config_of(pipeline: Any, seed: int, pspec: ParamSpec, options: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run's computation: the pipeline spec, the seed, the model layout, the options."""
    cfg = {"pipeline": describe(pipeline), "seed": int(seed), "params": _param_spec(pspec), "options": options}
    cfg["config_hash"] = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    return cfg


def create_directory(store: Any, run: Run, user_pipeline: Any, options: dict[str, Any],
                     meta: dict[str, Any] | None = None) -> RunDirectory:
    """A new run directory for ``run``: config (and ``meta``) in the attributes, model and dataset as blobs."""
    import torch

    cfg = config_of(user_pipeline, run.seed, run.state.params.spec, options)
    blobs: dict[str, bytes] = {}
    notes: dict[str, str] = {}
    buf = io.BytesIO()
    try:
        torch.save(run.adapter.template, buf)
        blobs["model"] = buf.getvalue()
    except Exception as e:
        notes["model"] = f"not saved ({type(e).__name__}: {e}); resume with model=..."
    try:
        blobs["dataset"] = pickle.dumps(run.data, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        notes["dataset"] = f"not saved ({type(e).__name__}: {e}); resume with data=..."
    missing = unimportable(cfg["pipeline"])
    if missing:
        notes["pipeline"] = "resume with pipeline=... (not importable: " + "; ".join(missing) + ")"
    _reuse_unstarted(store, cfg)
    return RunDirectory.create(store, meta={**cfg, **(meta or {}), "notes": notes}, blobs=blobs)


def _reuse_unstarted(store: Any, cfg: dict[str, Any]) -> None:
    """Make way for a new run at ``store`` if it holds a run stopped before its first snapshot committed
    with the same configuration: nothing of it can be lost (it saved no round), and running the same
    script again is what a user does. Another configuration there is refused: that directory is a
    different run, which :func:`resume` starts from round 0 with its saved configuration."""
    if not isinstance(store, str | os.PathLike) or not (Path(store).expanduser() / "zarr.json").exists():
        return
    try:
        old = RunDirectory.open(store)
    except CheckpointError:
        return  # not a run (RunDirectory.create says what it is)
    if old.snapshot_rounds(committed_only=False):
        return  # a run that got to write a snapshot: RunDirectory.create refuses it, and resume continues it
    meta = old.meta
    if meta.get("config_hash") != cfg["config_hash"]:
        what = [k for k in ("pipeline", "seed", "params", "options") if meta.get(k) != cfg[k]]
        raise CheckpointError(f"{store} holds a run that stopped before its first snapshot, with another "
                              f"configuration (its {', '.join(what) or 'configuration'} differ)",
                              fix="start that run from round 0 with flgraph.resume(path) (`flgraph resume PATH`), "
                                  "or choose a new path for this one (or delete the directory: it holds no "
                                  "snapshot)")
    log.warning("flgraph: %s holds this run's configuration and no snapshot (it was stopped before its first "
                "one); starting it afresh there", store)
    shutil.rmtree(Path(store).expanduser())


def snapshot_of(run: Run, target_round: int) -> Snapshot:
    """A snapshot of ``run``'s state now (params are never changed in place, so they are not copied).

    It carries the metrics rows the run directory does not hold yet (the rows of a write still in flight
    too: the directory skips those it holds by then), never the whole history."""
    states = {k: {kk: (v.copy() if isinstance(v, np.ndarray) else v) for kk, v in d.items()}
              for k, d in run.state.stage_states.items()}
    directory = run.checkpoint_directory
    first = min(directory.rows_written, len(run.history)) if directory is not None else 0
    return Snapshot(run.state.round, target_round, run.state.params.flat, states,
                    [dict(r) for r in run.history[first:]], {"pipeline": run._spec, "changes": run.changes},
                    first_row=first)


def _load_blob(directory: RunDirectory, name: str, what: str, load: Any, instead: str) -> Any:
    """Load blob ``name`` with ``load(bytes)``; clear errors when it is missing or cannot be imported."""
    data = directory.blob(name)
    if data is None:
        raise CheckpointError(f"the run directory holds no {what} (it could not be saved: "
                              f"{directory.meta.get('notes', {}).get(name, 'unknown reason')})",
                              fix=f"resume with {instead}")
    try:
        return load(data)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"the run's {what} cannot be loaded: {e}",
                              fix=f"install the module that defines it, or resume with {instead}") from e


def load_blob_model(directory: RunDirectory) -> Any:
    """The model template saved in the run directory."""
    import torch

    return _load_blob(directory, "model", "model", lambda b: torch.load(io.BytesIO(b), weights_only=False),
                      "model=<a module of the same architecture>")


def _load_dataset(directory: RunDirectory) -> Any:
    return _load_blob(directory, "dataset", "dataset handle", pickle.loads, "data=<the same FederatedDataset>")


def _allowed(line: str, allow: Sequence[str]) -> bool:
    # "stage 3 (LocalTrain).lr: 0.05 -> 0.01" is allowed by "LocalTrain.lr" or "lr"
    path = line.split(":", 1)[0]
    if "(" in path:
        path = path.split("(", 1)[1].replace(")", "")
    return any(path == a or path.endswith("." + a) for a in allow)


def resume(
    store: Any,
    *,
    pipeline: Any = None,
    model: Any = None,
    data: Any = None,
    allow_changes: Sequence[str] = (),
    **run_options: Any,
) -> Run:
    """Continue the run saved at ``store`` from its last intact snapshot (from round 0, with the saved
    configuration, if it stopped before its first snapshot committed).

    Everything not passed is rebuilt from the run directory: the pipeline from its spec (built-in stages
    and importable callables), the model and the dataset from their saved copies. A ``pipeline`` that
    differs from the saved one is refused with the list of differences, unless each difference is
    named in ``allow_changes`` (e.g. ``["LocalTrain.lr"]``). ``run_options`` go to :class:`~flgraph.Run`
    (``cluster=``, ``workers=``, ``progress=``...). ``run.remaining`` is the number of rounds left to
    reach the target of the interrupted ``fit``.
    """
    from ..run import Run

    directory = RunDirectory.open(store)
    meta = directory.meta
    snap: Snapshot | None = None
    skipped: list[str] = []
    if directory.snapshot_rounds():
        snap, damaged = directory.latest(rows=History.default_window)  # older rows are read back when asked
        skipped = [f"skipped a damaged snapshot: {note}" for note in damaged]
    else:  # stopped before its first snapshot committed: start from round 0 with the saved configuration
        skipped = ["no snapshot was committed before the run stopped: starting from round 0"]
    saved = (snap.extra.get("pipeline") if snap is not None else None) or meta["pipeline"]
    changes = list(snap.extra.get("changes", [])) if snap is not None else []
    if pipeline is None:
        pipeline = rebuild(saved)
    else:
        diffs = differences(saved, describe(pipeline))
        refused = [d for d in diffs if not _allowed(d, allow_changes)]
        if refused:
            raise ConfigError("the pipeline differs from the run's:\n    " + "\n    ".join(refused),
                              fix="resume with the same pipeline, or name what may change: "
                                  "allow_changes=[" + ", ".join(repr(d.split(":")[0].split("(")[-1].replace(")", ""))
                                                                for d in refused) + "]")
        changes += [f"round {snap.round if snap is not None else 0}: {d}" for d in diffs]
    if model is None:
        model = load_blob_model(directory)
    if data is None:
        data = _load_dataset(directory)
    opts = dict(meta.get("options", {}))
    seed = run_options.pop("seed", meta["seed"])
    if seed != meta["seed"]:
        raise ConfigError(f"the run's seed is {meta['seed']}, not {seed}",
                          fix="resume with the run's seed (a different seed is a different run)")
    for k in ("chunk_size", "on_client_error", "evaluate"):
        run_options.setdefault(k, opts.get(k))
    run = Run(pipeline, model=model, data=data, seed=seed, _resume=(directory, snap), **run_options)
    expected = [tuple(x) for x in meta["params"]]
    got = [(e.name, list(e.shape), e.dtype) for e in run.state.params.spec.entries]
    if [tuple(x) for x in got] != expected:
        raise ConfigError("the model's tensors differ from the run's "
                          f"({len(got)} tensors now, {len(expected)} in the run)",
                          fix="resume with a model of the same architecture")
    run.changes = changes
    run.resume_notes = skipped
    if snap is None:
        run.target_round = int(meta.get("first_target_round", 0))
    return run
