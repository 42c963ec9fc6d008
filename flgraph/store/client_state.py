"""Per-client state of client stages (e.g. error feedback's residual): kept on disk, versioned, resumable.

A client stage that keeps something from one participation of a client to the next declares it with
``client_fields(spec)`` (name -> (dtype, size)) and, in ``run(work)``, calls ``work.load_state(name)``
and ``work.save_state(name, value)``. Such state is O(clients x model): it never lives in the driver's
memory. It is stored in a zarr v3 group on a path every worker can reach (inside the run directory
when the run checkpoints to a local path), one chunk per (client, slot), uncompressed.

**Versions, and why resume is exact.** A client never overwrites the version the run depends on: each
participation writes a new *slot* (of a few per client), chosen by the driver, and only once the round
completes does the driver's table (client row -> slot, round written) point at it. The table is part of
the stage states, so every snapshot holds its own table; the slots that the retained snapshots point at
are never handed out for writing. A failed or interrupted round, a retried task, a resume from the
previous snapshot: each reads exactly the version its table names. A clients' slot also records the
round it was written in, and a read checks it (so a store that lost data, or is not the run's, is
refused with a clear error instead of training on the wrong state).

Example:
    >>> import tempfile, numpy as np
    >>> store = ClientStateStore(tempfile.mkdtemp(), num_clients=4, slots=3)
    >>> store.ensure("stage-1", "residual", "float32", 5)
    >>> store.write("stage-1", "residual", row=2, slot=1, rnd=7, value=np.arange(5, dtype=np.float32))
    >>> store.read("stage-1", "residual", row=2, slot=1, rnd=7).tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0]
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .. import _chaos
from ..context import ClientSet
from ..errors import CheckpointError, ClientError, ConfigError

__all__ = ["ClientStatePlace", "ClientStateStore", "ClientStateTable", "ClientStateView", "stateful_stages"]

# ClientSet settings that carry, per client, where its state is read from and written to
READ_SLOT, READ_ROUND, WRITE_SLOT, ROW = "_state_read_slot", "_state_read_round", "_state_write_slot", "_state_row"


def _key(tag: int) -> str:
    return f"stage-{tag:08x}"


class ClientStateStore:
    """The on-disk store: for each stage and field, values ``(clients, slots, size)`` and the round each
    slot was written in, ``(clients, slots)`` (-1: never / being written). Picklable (workers open it).

    Both are ordinary zarr v3 arrays (readable with ``zarr.open_array``), uncompressed, one chunk per
    (client, slot). Reads and writes of a chunk go straight to its file: zarr's own path costs 3-5 ms per
    800 KB chunk here against 0.2-0.4 ms for the file, and a chunk of an uncompressed array with the
    ``bytes`` codec is by the zarr v3 spec just the values' little-endian bytes. ``ensure`` checks that
    the arrays have exactly that layout. A write removes the slot's round stamp, overwrites the values,
    then writes the new stamp atomically (aside, then renamed): a torn write is never read as valid.
    """

    def __init__(self, root: str | os.PathLike[str], num_clients: int, slots: int) -> None:
        self.root = str(Path(root).expanduser())
        self.num_clients = int(num_clients)
        self.slots = int(slots)
        self._dtypes: dict[tuple[str, str], tuple[np.dtype[Any], int]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "num_clients": self.num_clients, "slots": self.slots}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["num_clients"], state["slots"])  # type: ignore[misc]

    def ensure(self, key: str, name: str, dtype: str, size: int) -> None:
        """Create the arrays of one field (driver side, before the first round); check existing ones."""
        path = f"{self.root}/{key}/{name}"
        want = (self.num_clients, self.slots, int(size))
        try:
            existing: Any = zarr.open_array(path, mode="r")
        except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
            existing = None
        except Exception as e:
            raise CheckpointError(f"cannot open the client state at {path}: {e}",
                                  fix="give the run a writable client_state path") from e
        if existing is None:
            try:
                group = zarr.open_group(self.root, mode="a").require_group(key)
                existing = group.create_array(name, shape=want, chunks=(1, 1, max(1, int(size))), dtype=dtype,
                                              fill_value=0, compressors=None)
                group.create_array(f"{name}.round", shape=want[:2], chunks=(1, 1), dtype="int64", fill_value=-1,
                                   compressors=None)
            except OSError as e:
                raise CheckpointError(f"cannot create the client state at {path}: {e}",
                                      fix="give the run a writable client_state path with room for "
                                          f"{self.num_clients} x {self.slots} x {size} values") from e
        if tuple(existing.shape) != want or str(existing.dtype) != np.dtype(dtype).name:
            raise CheckpointError(f"the client state at {path} holds {existing.dtype}{list(existing.shape)}, "
                                  f"this run needs {np.dtype(dtype).name}{list(want)}",
                                  fix="use a new path for this run's client state")
        for a in (existing, zarr.open_array(f"{path}.round", mode="r")):
            md: Any = a.metadata
            if (md.encode_chunk_key((3, 1, 0)[: a.ndim]) != "c/3/1/0"[: 2 * a.ndim + 1]
                    or [type(c).__name__ for c in md.codecs] != ["BytesCodec"]
                    or str(getattr(md.codecs[0].endian, "value", md.codecs[0].endian)) != "little"):
                raise CheckpointError(f"the client state array {a.path or path} is not laid out as flgraph writes it "
                                      "(default chunk keys, uncompressed little-endian bytes)",
                                      fix="use a new path for this run's client state")

    def _paths(self, key: str, name: str, row: int, slot: int) -> tuple[Path, Path]:
        base = Path(self.root, key)
        return base / name / "c" / str(row) / str(slot) / "0", base / f"{name}.round" / "c" / str(row) / str(slot)

    def _layout(self, key: str, name: str) -> tuple[np.dtype[Any], int]:
        with self._lock:
            got = self._dtypes.get((key, name))
            if got is None:
                try:
                    a = zarr.open_array(f"{self.root}/{key}/{name}", mode="r")
                except Exception as e:
                    raise ConfigError(f"the run's client state {self.root}/{key}/{name} cannot be opened here: {e}",
                                      fix="every worker must reach the client_state path (a shared file system "
                                          "for a multi-machine cluster)") from e
                got = (np.dtype(a.dtype).newbyteorder("<"), int(a.shape[2]))
                self._dtypes[(key, name)] = got
        return got

    def read(self, key: str, name: str, *, row: int, slot: int, rnd: int) -> np.ndarray:
        """The version written in round ``rnd`` into ``slot`` of client ``row``; checked."""
        dtype, size = self._layout(key, name)
        values, marker = self._paths(key, name, row, slot)
        try:
            got = int(np.frombuffer(marker.read_bytes(), "<i8")[0])
        except (FileNotFoundError, IndexError):
            got = -1
        if got != rnd:
            raise CheckpointError(f"the client state {key}/{name} of client row {row} should hold round {rnd}'s "
                                  f"version in slot {slot}, and holds {'nothing' if got < 0 else f'round {got}'}",
                                  fix="the client-state store was changed or lost outside the run; resume "
                                      "with the store the run wrote (see the run directory's attributes)")
        out = np.fromfile(values, dtype=dtype)
        if out.size != size:
            raise CheckpointError(f"the client state {key}/{name} of client row {row}, slot {slot} holds {out.size} "
                                  f"values, expected {size}", fix="the store is damaged: resume from a copy")
        return out.astype(dtype.newbyteorder("="), copy=False)

    def write(self, key: str, name: str, *, row: int, slot: int, rnd: int, value: np.ndarray) -> None:
        """Write a new version: mark the slot invalid, write the values, then stamp the round."""
        dtype, size = self._layout(key, name)
        arr = np.ascontiguousarray(value, dtype=dtype).reshape(-1)
        if arr.size != size:
            raise ConfigError(f"client state {name!r} must hold {size} values, got {arr.size}")
        values, marker = self._paths(key, name, row, slot)
        marker.unlink(missing_ok=True)  # from here until the new stamp, the slot reads as "nothing"
        _overwrite(values, arr.view(np.uint8).data)
        _chaos.point("client-state-write")
        _replace(marker, np.array([rnd], "<i8").tobytes())


def _open_for_write(path: Path, mode: str) -> Any:
    try:
        return open(path, mode)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb" if mode == "r+b" else mode)


def _overwrite(path: Path, data: memoryview) -> None:
    """Write the values in place (reusing the file's pages: a fresh 800 KB file per write costs 3x more);
    the slot's stamp was removed first, so a torn write is never read."""
    with _open_for_write(path, "r+b") as f:
        f.write(data)
        f.truncate()


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` atomically: a crash leaves the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with _open_for_write(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ClientStatePlace:
    """Where a run keeps its per-client state: ``path``, slots per client, and whether it is temporary."""

    path: str
    slots: int
    temporary: bool = False
    recorded: str = ""  # how the run directory names it: relative to the directory when inside it

    def meta(self) -> dict[str, Any]:
        """The run directory's attributes that let a resume find the store again."""
        return {"client_state": {"path": self.recorded or self.path, "slots": self.slots}}

    @classmethod
    def choose(cls, given: str | os.PathLike[str] | None, checkpoint: Any, resume: Any,
               keep_last: int) -> ClientStatePlace:
        """The place for a run: ``given``; else the one a resumed run recorded; else ``client-state`` inside
        a local run directory; else a temporary directory (no checkpoint)."""
        slots = keep_last + 3  # the current version, one per protected snapshot (+1 in flight), a free one
        if resume is not None:
            rec = resume.meta.get("client_state")
            root = _local_root(resume.group.store)
            if rec is None:
                raise CheckpointError("the run directory records no client-state store, and the pipeline keeps "
                                      "per-client state", fix="resume with the run's own pipeline")
            path = str(given) if given is not None else (
                rec["path"] if Path(rec["path"]).is_absolute() or root is None else str(Path(root) / rec["path"]))
            if not Path(path).exists() and not resume.snapshot_rounds():
                Path(path).mkdir(parents=True)  # stopped before its first snapshot: the run starts from round 0
            if not Path(path).exists():
                raise CheckpointError(f"the run's client-state store {path} does not exist",
                                      fix="resume where that path is reachable, or pass client_state= with its "
                                          "new location")
            return cls(path, int(rec["slots"]), recorded=rec["path"])
        if given is not None:
            return cls(str(Path(given).expanduser().resolve()), slots)
        if checkpoint is None:
            return cls(tempfile.mkdtemp(prefix="flgraph-client-state-"), slots, temporary=True)
        root = (str(Path(checkpoint).expanduser().resolve()) if isinstance(checkpoint, str | os.PathLike)
                else _local_root(checkpoint))
        if root is None:
            raise ConfigError(f"the pipeline keeps per-client state and the checkpoint store {checkpoint!r} is not a "
                              "local directory", fix="pass client_state=PATH (a directory every worker reaches)")
        return cls(str(Path(root) / "client-state"), slots, recorded="client-state")


def _local_root(store: Any) -> str | None:
    root = getattr(store, "root", None)
    return str(root) if root is not None and type(store).__name__ == "LocalStore" else None


def stateful_stages(stages: Iterable[Any], spec: Any) -> list[tuple[int, dict[str, tuple[str, int]]]]:
    """(tag, fields) of each client stage that keeps per-client state."""
    out = []
    for s in stages:
        got = s.client_fields(spec)
        if got:
            out.append((int(s.tag), dict(got)))
    return out


class ClientStateTable:
    """The driver's side: which slot of each client holds its current state, and which slots are free.

    The table holds the clients that have state only, so it costs O(clients with state), not O(registered
    clients): ``state_rows`` (their rows in the dataset's ``client_ids``, sorted), and for each of them
    ``state_slot`` and ``state_round``. It is kept in the stage state of the run's first stateful client
    stage under the key given to :meth:`prepare`, so snapshots save it (three arrays). A table of the older
    dense layout (one entry per client, -1 for none) is read as the same table. ``protect(rnd, table)``
    records a snapshot's table: its slots are not written while the snapshot is retained (``retained(rounds)``
    forgets the others).

    Example:
        >>> import tempfile, numpy as np
        >>> table = ClientStateTable(ClientStateStore(tempfile.mkdtemp(), 5, slots=3), np.arange(5), [])
        >>> t = table.initial()
        >>> cs = table.prepare(ClientSet(np.array([3, 1])), t, 1)
        >>> t = ClientStateTable.commit(cs, np.array([0]), t, 1)   # only client 3 counted
        >>> t["state_rows"].tolist(), ClientStateTable.lookup(t, np.arange(5))[0].tolist()
        ([3], [-1, -1, -1, 0, -1])
    """

    def __init__(self, store: ClientStateStore, client_ids: np.ndarray,
                 stages: list[tuple[int, dict[str, tuple[str, int]]]]) -> None:
        self.store = store
        self.client_ids = np.asarray(client_ids, dtype=np.int64)
        self.stages = stages
        self._protected: dict[int, dict[str, np.ndarray]] = {}
        for tag, fields in stages:
            for name, (dtype, size) in fields.items():
                store.ensure(_key(tag), name, dtype, size)

    @staticmethod
    def initial() -> dict[str, np.ndarray]:
        """An empty table: no client has state yet."""
        return {"state_rows": np.empty(0, np.int64), "state_slot": np.empty(0, np.int8),
                "state_round": np.empty(0, np.int64)}

    @staticmethod
    def entries(table: dict[str, Any]) -> dict[str, np.ndarray]:
        """The table's rows with state, their slots and rounds (a dense table of older snapshots converted)."""
        slot = np.asarray(table["state_slot"])
        if "state_rows" in table:
            return {"state_rows": np.asarray(table["state_rows"], np.int64), "state_slot": slot,
                    "state_round": np.asarray(table["state_round"], np.int64)}
        rows = np.flatnonzero(slot >= 0)
        return {"state_rows": rows.astype(np.int64), "state_slot": slot[rows],
                "state_round": np.asarray(table["state_round"], np.int64)[rows]}

    @staticmethod
    def lookup(table: dict[str, Any], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The slot and round of each of ``rows`` (-1 and -1 for a client without state)."""
        t = ClientStateTable.entries(table)
        have = t["state_rows"]
        rows = np.asarray(rows, np.int64)
        at = np.minimum(np.searchsorted(have, rows), max(len(have) - 1, 0))
        found = (have[at] == rows) if len(have) else np.zeros(len(rows), bool)
        slot = np.where(found, t["state_slot"][at] if len(have) else -1, -1).astype(np.int64)
        rnd = np.where(found, t["state_round"][at] if len(have) else -1, -1).astype(np.int64)
        return slot, rnd

    def protect(self, rnd: int, table: dict[str, Any]) -> None:
        """A snapshot of round ``rnd`` holds ``table``: keep its slots until :meth:`retained` drops it."""
        self._protected[int(rnd)] = {k: np.array(v, copy=True) for k, v in self.entries(table).items()}

    def retained(self, rounds: Iterable[int]) -> None:
        """Only the snapshots of ``rounds`` (and the newest protected one) still need their slots; of those,
        the newest ``slots - 2`` keep them (older milestones of ``keep_every`` keep params, not client state:
        resuming from one is refused by the check on read)."""
        keep = set(int(r) for r in rounds)
        newest = max(self._protected, default=None)
        live = sorted(r for r in self._protected if r in keep or r == newest)[-(self.store.slots - 2):]
        self._protected = {r: self._protected[r] for r in live}

    def prepare(self, clients: ClientSet, table: dict[str, Any], rnd: int) -> ClientSet:
        """The round's ClientSet with each client's row, read slot and round, and a free write slot."""
        rows = np.searchsorted(self.client_ids, clients.ids)
        rows = np.minimum(rows, len(self.client_ids) - 1)
        unknown = self.client_ids[rows] != clients.ids
        if unknown.any():
            cid = int(clients.ids[np.flatnonzero(unknown)[0]])
            raise ClientError(f"client {cid} is not in the dataset", client=cid, stage="Select", round=rnd,
                              fix="select clients from data.client_ids")
        slot, read_round = self.lookup(table, rows)
        used = np.zeros(len(rows), np.int64)
        for s in (slot, *(self.lookup(t, rows)[0] for t in self._protected.values())):
            used |= np.where(s >= 0, np.left_shift(1, np.maximum(s, 0)), 0)
        free = np.full(len(rows), -1, np.int64)
        for k in reversed(range(self.store.slots)):
            free = np.where((used >> k) & 1 == 0, k, free)
        if (free < 0).any():
            raise CheckpointError(f"every one of the {self.store.slots} client-state slots of a client is held by "
                                  "a retained snapshot", fix="keep fewer snapshots (keep_last) for this run")
        return clients.with_settings(**{ROW: rows, READ_SLOT: slot, READ_ROUND: read_round, WRITE_SLOT: free})

    @staticmethod
    def commit(clients: ClientSet, done: np.ndarray, table: dict[str, Any], rnd: int) -> dict[str, Any]:
        """A new table where the clients at positions ``done`` (their updates counted) point at this round's
        versions; the others keep theirs."""
        old = ClientStateTable.entries(table)
        rows = np.asarray(clients.settings[ROW][done], np.int64)
        stay = ~np.isin(old["state_rows"], rows)
        all_rows = np.concatenate([old["state_rows"][stay], rows])
        order = np.argsort(all_rows, kind="stable")
        slot = np.concatenate([old["state_slot"][stay], clients.settings[WRITE_SLOT][done].astype(np.int8)])
        rounds = np.concatenate([old["state_round"][stay], np.full(len(rows), rnd, np.int64)])
        return {**table, "state_rows": all_rows[order], "state_slot": slot[order].astype(np.int8),
                "state_round": rounds[order]}


class ClientStateView:
    """What ``work.load_state`` / ``work.save_state`` use for one client in one round (worker side)."""

    def __init__(self, store: ClientStateStore, clients: ClientSet, position: int, rnd: int) -> None:
        self.store = store
        self.rnd = rnd
        st = clients.settings
        self.row = int(st[ROW][position])
        self.read_slot = int(st[READ_SLOT][position])
        self.read_round = int(st[READ_ROUND][position])
        self.write_slot = int(st[WRITE_SLOT][position])
        self._saved: set[tuple[int, str]] = set()

    def load(self, tag: int, name: str) -> np.ndarray | None:
        if self.read_slot < 0:
            return None
        return self.store.read(_key(tag), name, row=self.row, slot=self.read_slot, rnd=self.read_round)

    def save(self, tag: int, name: str, value: np.ndarray) -> None:
        self.store.write(_key(tag), name, row=self.row, slot=self.write_slot, rnd=self.rnd, value=value)
        self._saved.add((tag, name))

    def finish(self, stages: list[tuple[int, dict[str, tuple[str, int]]]]) -> None:
        """After the client's stages: a field no stage saved this round carries its old version forward
        (the table points every field of a counted client at this round's slot)."""
        for tag, fields in stages:
            for name, (dtype, size) in fields.items():
                if (tag, name) in self._saved:
                    continue
                old = self.load(tag, name)
                self.save(tag, name, old if old is not None else np.zeros(size, dtype))
