"""Checkpoints: a run directory is a zarr v3 group; a snapshot is visible only once it is complete.

Layout::

    RUN.zarr/                      attrs: flgraph version, format version, pipeline spec, seed,
                                          config hash, run options (written once, at creation)
      blobs/model, blobs/dataset   the model template (torch.save) and the dataset handle (pickle)
      metrics/table                an append-only float64 table: one row a round, one column a numeric
                                   metric (names in its attributes), NaN where a round has no value
      metrics/other, other_end     the other values of each row (lists, strings) as JSON: bytes, and the
                                   end offset of each row's bytes (format 2; format 1 kept them in every
                                   snapshot's attributes, which grew with the run)
      snapshots/r000012/           params, state/<stage>/<name> arrays; attrs: round, checksum, ...
                                   and, written LAST, ``committed: true`` (the commit)

A snapshot carries the metrics rows since the previous one, which are appended to the metrics tables
before its commit; the committed ``history_len`` says how many rows are valid, so rows past it (from a
crash) are overwritten by the next snapshot. The driver keeps only recent rows in memory and reads older
ones back with :meth:`RunDirectory.read_rows`.

A snapshot is written array by array, then committed by writing its attributes with
``committed: true`` and a CRC32 checksum of everything it holds (one atomic file replace on a local
store). A crash at any instant leaves either a committed snapshot or an uncommitted one that
:meth:`RunDirectory.latest` ignores. A snapshot whose data no longer matches its checksum is skipped
with a warning, and the previous one is used.

Example:
    >>> import numpy as np, zarr
    >>> from flgraph.store.checkpoint import RunDirectory, Snapshot
    >>> rd = RunDirectory.create(zarr.storage.MemoryStore(), meta={"seed": 0}, blobs={})
    >>> rd.write(Snapshot(round=1, target_round=5, params=np.ones(3, np.float32), states={}, rows=[{"round": 1}]))
    >>> snap, skipped = rd.latest()
    >>> snap.round, snap.params.tolist(), skipped
    (1, [1.0, 1.0, 1.0], [])
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
import zarr.storage

from .. import _chaos
from ..errors import CheckpointError
from .metrics_table import MetricsTable, json_default
from .schedule import CheckpointPolicy, Checkpoints

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointPolicy", "Checkpoints", "RunDirectory", "Snapshot"]

log = logging.getLogger("flgraph")

FORMAT = "flgraph-run"
FORMAT_VERSION = 2
_CHUNK = 8 * 2**20  # elements per params chunk (32 MiB of float32)


@dataclass
class Snapshot:
    """Everything a round changes: params, stage states, the round counter, the metrics history.

    ``rows`` are the run's metrics rows from index ``first_row`` on (to write: at least those the run
    directory does not hold yet; read back: the newest ones asked for, or all).
    """

    round: int
    target_round: int
    params: np.ndarray
    states: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    first_row: int = 0

    @property
    def history_len(self) -> int:
        """Rows in the run's history at this snapshot."""
        return self.first_row + len(self.rows)


def _crc(crc: int, a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data, crc)




def _storage_hint(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == 28:
        return "the disk is full: free space (older runs, milestones) and resume; the previous snapshot is intact"
    if isinstance(e, PermissionError):
        return "the run directory is not writable: fix its permissions or choose another path"
    return "check the storage; the previous snapshot is intact"


class RunDirectory(MetricsTable):
    """A run directory (a zarr v3 group) holding snapshots of one run."""

    format_version = FORMAT_VERSION

    def __init__(self, group: zarr.Group, rows_written: int = 0) -> None:
        self.group: Any = group  # zarr's typed JSON attributes are used as plain dicts here
        self.rows_written = rows_written  # metrics rows already in the table (and committed)
        # round -> committed?, for every snapshot group; read from the store once, then kept up to date by
        # write and prune (a writer is the directory's only writer), so a snapshot costs few store calls
        self._known: dict[int, bool] | None = None
        # the driver (retained_rounds) and the writer's thread (write) may both be first to ask: the table is
        # read from the store once, under this lock, and never while a write of this directory is under way
        self._known_lock = threading.Lock()
        self._table: Any = None  # the metrics table, opened once
        # the driver reads rows back (read_rows) while the writer's thread appends them: one at a time
        self._rows_lock = threading.Lock()
        # format 1: the other values of every row, by round, from the snapshot read (rows_other)
        self._legacy_other: dict[str, dict[str, Any]] = {}

    def _snapshots(self) -> dict[int, bool]:
        with self._known_lock:
            if self._known is None:
                known = dict.fromkeys(self.snapshot_rounds(committed_only=False), False)
                known.update(dict.fromkeys(self.snapshot_rounds(), True))
                self._known = known
            return self._known

    # -- opening ---------------------------------------------------------------------------------------
    @staticmethod
    def _store(store: Any) -> Any:
        return str(Path(store).expanduser()) if isinstance(store, str | os.PathLike) else store

    @classmethod
    def create(cls, store: Any, *, meta: dict[str, Any], blobs: dict[str, bytes]) -> RunDirectory:
        """Create a new run directory at ``store`` (a path or a zarr store); refuses to overwrite a run."""
        target = cls._store(store)
        if isinstance(target, str):
            p = Path(target)
            if p.exists() and any(p.iterdir()):
                if (p / "zarr.json").exists() and _is_run(p):
                    raise CheckpointError(f"{target} already holds an flgraph run",
                                          fix="continue it with flgraph.resume(path) (`flgraph resume PATH`), "
                                              "or choose a new path")
                if not interrupted_creation(p):
                    raise CheckpointError(f"{target} exists and is not empty", fix="choose a new path for the run")
                log.warning("flgraph: %s holds a run directory whose creation was interrupted (no run in it yet); "
                            "creating it again", target)
                shutil.rmtree(p)
            try:
                p.mkdir(parents=True, exist_ok=True)
                probe = p / ".flgraph-write-test"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise CheckpointError(f"cannot create the run directory {target}: {e}",
                                      fix="choose a writable path for checkpoint=") from e
        try:
            g: Any = zarr.open_group(target, mode="w")
            for name, data in blobs.items():
                a = g.create_array(f"blobs/{name}", shape=(len(data),), dtype="uint8",
                                   chunks=(max(1, min(len(data), 64 * 2**20)),))
                a[:] = np.frombuffer(data, np.uint8)
            g.create_group("snapshots")
            g.create_group("metrics")
            from .. import __version__

            g.attrs.update({"flgraph_format": FORMAT, "format_version": FORMAT_VERSION,
                            "flgraph_version": __version__, "created": time.time(), **meta})
        except OSError as e:
            raise CheckpointError(f"cannot write the run directory {target}: {e}", fix=_storage_hint(e)) from e
        return cls(g)

    @classmethod
    def open(cls, store: Any, *, mode: Literal["r", "r+"] = "r+") -> RunDirectory:
        """Open an existing run directory; clear errors for a non-run or a newer format."""
        target = cls._store(store)
        if isinstance(target, str) and not Path(target).exists():
            raise CheckpointError(f"{target} does not exist", fix="pass the path of a run directory (RUN.zarr)")
        if isinstance(target, str) and interrupted_creation(Path(target)):
            raise CheckpointError(f"{target} holds no run: the run was stopped while it created this directory",
                                  fix="start the run again with the same checkpoint= path (the directory is "
                                      "created anew), or delete it")
        try:
            g = zarr.open_group(target, mode=mode)
            attrs: dict[str, Any] = dict(g.attrs.asdict())
        except Exception as e:
            raise CheckpointError(f"{target} is not an flgraph run directory (not a zarr group: {e})",
                                  fix="pass the path given as checkpoint= to the run") from e
        if attrs.get("flgraph_format") != FORMAT:
            raise CheckpointError(f"{target} is not an flgraph run directory (it has no flgraph run attributes)",
                                  fix="pass the path given as checkpoint= to the run")
        if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                f"{target} was written by a newer flgraph ({attrs.get('flgraph_version')}, checkpoint format "
                f"{attrs.get('format_version')}); this flgraph reads format {FORMAT_VERSION}",
                fix="upgrade flgraph to resume this run")
        return cls(g)

    @property
    def meta(self) -> dict[str, Any]:
        return self.group.attrs.asdict()

    def blob(self, name: str) -> bytes | None:
        try:
            return bytes(np.asarray(self.group[f"blobs/{name}"][:]).tobytes())
        except KeyError:
            return None

    # -- writing ---------------------------------------------------------------------------------------
    def write(self, snap: Snapshot) -> None:
        """Write and commit ``snap``; the commit (attributes with the checksum) is written last."""
        name = f"r{snap.round:08d}"
        snaps = self.group["snapshots"]
        known = self._snapshots()
        try:
            if snap.round in known:
                del snaps[name]  # an uncommitted leftover of a crash, or an older attempt at this round
                del known[snap.round]
            g = snaps.create_group(name)
            known[snap.round] = False
            crc = 0
            flat = np.ascontiguousarray(snap.params)
            # floats barely compress (about 7%): store them raw, which is much cheaper to write and read
            a = g.create_array("params", shape=flat.shape, dtype=flat.dtype, chunks=(max(1, min(flat.size, _CHUNK)),),
                               compressors=None)
            a[:] = flat
            crc = _crc(crc, flat)
            scalars: dict[str, dict[str, Any]] = {}
            for key in sorted(snap.states):
                for k in sorted(snap.states[key]):
                    v = snap.states[key][k]
                    if isinstance(v, np.ndarray):
                        arr = np.ascontiguousarray(v)
                        s = g.create_array(f"state/{key}/{k}", shape=arr.shape, dtype=arr.dtype,
                                           chunks=tuple(max(1, d) for d in arr.shape) if arr.ndim else None)
                        s[...] = arr
                        crc = _crc(crc, arr)
                    else:
                        scalars.setdefault(key, {})[k] = v
            total = snap.history_len
            start = min(self.rows_written, total)
            if start < snap.first_row:
                raise CheckpointError(f"the snapshot of round {snap.round} carries metrics rows from {snap.first_row} "
                                      f"on, and the run directory holds {start} rows: rows would be missing",
                                      fix="this is a bug in flgraph: please report it")
            with self._rows_lock:
                self._append_metrics(snap.rows[start - snap.first_row:], start, total)
            commit = {"round": snap.round, "target_round": snap.target_round, "history_len": total,
                      "scalars": scalars, "rows_other": {}, "extra": snap.extra, "written": time.time()}
            body = json.dumps(commit, sort_keys=True, default=json_default)
            _chaos.point("snapshot-write")
            g.attrs.update({**json.loads(body), "checksum": zlib.crc32(body.encode(), crc), "committed": True})
            self.rows_written = total
            known[snap.round] = True
        except OSError as e:
            raise CheckpointError(f"writing the snapshot of round {snap.round} failed: {e}",
                                  fix=_storage_hint(e)) from e

    def snapshot_rounds(self, committed_only: bool = True) -> list[int]:
        snaps = self.group["snapshots"]
        out = []
        for name in self._snapshot_names():
            if not (name.startswith("r") and name[1:].isdigit()):
                continue  # not a snapshot of ours
            try:
                ok = snaps[name].attrs.get("committed") is True
            except Exception:
                ok = False
            if ok or not committed_only:
                out.append(int(name[1:]))
        return sorted(out)

    def _snapshot_names(self) -> list[str]:
        """The groups under ``snapshots/``. In a local directory they are the folders holding a group's
        metadata, listed from the file system: zarr's own listing warns about every file a write in progress
        leaves there for a moment (its ``*.partial`` temporary files), and a run may be inspected while it
        writes."""
        root = getattr(self.group.store, "root", None)
        if root is None:
            return list(self.group["snapshots"].group_keys())
        folder = Path(root) / self.group.path / "snapshots"
        try:
            return [p.name for p in folder.iterdir() if (p / "zarr.json").is_file()]
        except FileNotFoundError:
            return []

    def retained_rounds(self) -> tuple[int, ...]:
        """Rounds of the snapshots in the directory now, committed or being written (any thread)."""
        return tuple(self._snapshots())

    def read(self, rnd: int, *, rows: int | None = None) -> Snapshot:
        """Read and verify the snapshot of round ``rnd``; CheckpointError if it is damaged.

        ``rows``: how many of the newest metrics rows to read (None: all of them); the snapshot's
        ``first_row`` says where they start."""
        name = f"r{rnd:08d}"
        try:
            g = self.group[f"snapshots/{name}"]
            attrs: dict[str, Any] = dict(g.attrs.asdict())
            if attrs.get("committed") is not True:
                raise CheckpointError(f"snapshot {name} was never committed")
            params = np.asarray(g["params"][:])
            crc = _crc(0, params)
            states: dict[str, dict[str, Any]] = {}
            scalars = attrs.get("scalars", {})
            state_group = g.get("state", None)
            keys = sorted(set(scalars) | (set(state_group.group_keys()) if state_group is not None else set()))
            for key in keys:
                states[key] = {}
                if state_group is not None and key in state_group:
                    sg = state_group[key]
                    for k in sorted(sg.array_keys()):
                        arr = np.asarray(sg[k][...])
                        crc = _crc(crc, arr)
                        states[key][k] = arr
                states[key].update(scalars.get(key, {}))
            body = {k: attrs[k] for k in ("round", "target_round", "history_len", "scalars", "rows_other",
                                          "extra", "written")}
            want = zlib.crc32(json.dumps(body, sort_keys=True).encode(), crc)
            if want != attrs.get("checksum"):
                raise CheckpointError(f"snapshot {name} is damaged (checksum mismatch)")
            n = int(attrs["history_len"])
            first = 0 if rows is None else max(0, n - rows)
            with self._rows_lock:
                self._legacy_other.update(attrs.get("rows_other", {}))
                got = self._read_rows(first, n)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"snapshot {name} is damaged or incomplete: {type(e).__name__}: {e}") from e
        return Snapshot(int(attrs["round"]), int(attrs["target_round"]), params, states, got,
                        dict(attrs.get("extra", {})), first_row=first)

    def read_rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Metrics rows ``start .. stop - 1`` of the run (saved rows: ``stop <= rows_written``).

        Example:
            >>> import numpy as np, zarr
            >>> rd = RunDirectory.create(zarr.storage.MemoryStore(), meta={}, blobs={})
            >>> rows = [{"round": r, "loss": r / 4, "arrivals": [r]} for r in (1, 2, 3)]
            >>> rd.write(Snapshot(3, 3, np.ones(1, np.float32), {}, rows))
            >>> rd.read_rows(1, 3)
            [{'round': 2, 'loss': 0.5, 'arrivals': [2]}, {'round': 3, 'loss': 0.75, 'arrivals': [3]}]
        """
        with self._rows_lock:
            return self._read_rows(start, stop)

    def latest(self, *, rows: int | None = None) -> tuple[Snapshot, list[str]]:
        """The newest intact snapshot (with its ``rows`` newest metrics rows, None: all), and a line for
        each newer one that was skipped (damaged)."""
        skipped: list[str] = []
        for rnd in reversed(self.snapshot_rounds()):
            try:
                snap = self.read(rnd, rows=rows)
                self.rows_written = snap.history_len  # rows past these (from a lost snapshot) get rewritten
                return snap, skipped
            except CheckpointError as e:
                skipped.append(str(e))
                log.warning("%s; falling back to the previous snapshot", e)
        raise CheckpointError("the run directory holds no intact snapshot" +
                              (f" ({'; '.join(skipped)})" if skipped else ""),
                              fix="nothing can be resumed from this directory: start the run again with a new "
                                  "checkpoint= path (or delete this directory first)")

    def note_target(self, target_round: int) -> None:
        """Record the target of a ``fit`` that starts before any snapshot is committed, so that a run stopped
        before its first snapshot resumes from round 0 toward the same target (see :func:`resume`)."""
        try:
            self.group.attrs.update({"first_target_round": int(target_round)})
        except OSError as e:
            raise CheckpointError(f"cannot write the run directory: {e}", fix=_storage_hint(e)) from e

    # -- retention -------------------------------------------------------------------------------------
    def prune(self, policy: CheckpointPolicy) -> list[int]:
        """Delete committed snapshots the policy does not keep, and uncommitted leftovers older than the newest."""
        snaps = self.group["snapshots"]
        known = self._snapshots()
        committed = sorted(r for r, ok in known.items() if ok)
        keep = policy.keep(committed)
        newest = max(committed) if committed else 0
        dropped = []
        for rnd in sorted(known):
            if rnd in keep or (rnd not in committed and rnd > newest):
                continue
            _chaos.point("snapshot-prune")
            del snaps[f"r{rnd:08d}"]
            del known[rnd]
            dropped.append(rnd)
        return dropped

    def sizes(self) -> dict[int, int]:
        """Bytes stored per snapshot round (local directories only; 0 elsewhere)."""
        root = getattr(self.group.store, "root", None)
        out = {}
        for rnd in self.snapshot_rounds(committed_only=False):
            if root is None:
                out[rnd] = 0
                continue
            d = Path(root) / "snapshots" / f"r{rnd:08d}"
            out[rnd] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        return out


_CREATED_PARTS = {"zarr.json", "blobs", "snapshots", "metrics", "client-state"}


def interrupted_creation(p: Path) -> bool:
    """Whether ``p`` is a run directory whose creation was stopped: a zarr group without attributes (they
    are written last) holding the blobs :meth:`RunDirectory.create` writes first, and nothing else of its own."""
    try:
        names = {c.name for c in p.iterdir()}
        attrs = json.loads((p / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return {"zarr.json", "blobs"} <= names <= _CREATED_PARTS and not attrs


def _is_run(p: Path) -> bool:
    try:
        return json.loads((p / "zarr.json").read_text()).get("attributes", {}).get("flgraph_format") == FORMAT
    except Exception:
        return False
