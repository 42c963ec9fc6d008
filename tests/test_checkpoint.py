"""Checkpoints to zarr and exact resume: bit-identical continuation, fallback, full disk, bad directories."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage

import flgraph as fg
from flgraph import stages as st
from flgraph.store.checkpoint import FORMAT_VERSION, RunDirectory, Snapshot

D, K = 8, 3


def data() -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=40, samples_per_client=16, num_features=D, num_classes=K,
                                            seed=4, test_samples=60)


def pipeline(lr: float = 0.1) -> fg.Pipeline:
    return fg.recipes.fedavg(clients=5, batch_size=8, lr=lr, evaluate_every=2)


def make_run(client, path=None, **kw) -> fg.Run:
    return fg.Run(kw.pop("pipeline", pipeline()), model=fg.models.mlp(D, [16], K, seed=0), data=data(), seed=9,
                  cluster=client, progress=False, checkpoint=path, **kw)


@pytest.fixture(scope="module")
def reference(client1):
    """Params after 2, 3 and 5 rounds of a run that never stopped (no checkpoint)."""
    out = {}
    with make_run(client1) as run:
        for r in (2, 1, 2):
            run.fit(rounds=r)
            out[run.round] = run.params.flat
        out["history"] = [dict(r) for r in run.history]
    return out


def test_resume_continues_bit_for_bit(client1, tmp_path, reference):
    path = tmp_path / "run.zarr"
    with make_run(client1, path) as run:
        run.fit(rounds=3)
    resumed = fg.resume(path, cluster=client1, progress=False)
    assert resumed.round == 3 and resumed.remaining == 0
    assert np.array_equal(resumed.params.flat, reference[3])
    assert [r["round"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[1]["accuracy"] == reference["history"][1]["accuracy"]
    assert resumed.history[0]["clients_done"] == 5 and isinstance(resumed.history[0]["clients_done"], int)
    resumed.fit(rounds=2)
    assert np.array_equal(resumed.params.flat, reference[5])
    resumed.close()
    assert RunDirectory.open(path).snapshot_rounds() == [3, 4, 5]  # keep_last=3 by default


def test_in_memory_store(client1, reference):
    store = zarr.storage.MemoryStore()
    with make_run(client1, store) as run:
        run.fit(rounds=2)
    with fg.resume(store, cluster=client1, progress=False) as resumed:
        resumed.fit(rounds=3)
        assert np.array_equal(resumed.params.flat, reference[5])


def _params_file(path: Path, rnd: int) -> Path:
    files = sorted((path / "snapshots" / f"r{rnd:08d}" / "params" / "c").rglob("*"))
    return next(f for f in files if f.is_file())


def test_damaged_newest_snapshot_falls_back(client1, tmp_path, reference):
    path = tmp_path / "run.zarr"
    with make_run(client1, path) as run:
        run.fit(rounds=3)
    f = _params_file(path, 3)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    resumed = fg.resume(path, cluster=client1, progress=False)
    assert resumed.round == 2 and np.array_equal(resumed.params.flat, reference[2])
    assert len(resumed.resume_notes) == 1 and "r00000003" in resumed.resume_notes[0]
    assert resumed.remaining == 1  # the interrupted fit's target was round 3
    resumed.fit(rounds=3)
    assert np.array_equal(resumed.params.flat, reference[5])
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4, 5]
    resumed.close()


def test_uncommitted_snapshot_is_invisible(client1, tmp_path):
    path = tmp_path / "run.zarr"
    with make_run(client1, path) as run:
        run.fit(rounds=2)
    meta = path / "snapshots" / "r00000002" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["committed"]
    meta.write_text(json.dumps(doc))
    assert RunDirectory.open(path).snapshot_rounds() == [1]
    assert fg.resume(path, cluster=client1, progress=False).round == 1


class FullDisk(zarr.storage.LocalStore):
    """A size-limited store: writes fail with ENOSPC once ``budget`` bytes are spent (a full disk)."""

    budget = 10**9

    async def set(self, key, value):  # type: ignore[override]
        FullDisk.budget -= len(value)
        if FullDisk.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device", key)
        await super().set(key, value)


def test_full_disk_during_a_write_loses_nothing(client1, tmp_path, reference):
    path = tmp_path / "run.zarr"
    FullDisk.budget = 10**9
    run = make_run(client1, FullDisk(str(path)))
    run.fit(rounds=2)
    FullDisk.budget = 300  # the next snapshot runs out of space part-way
    with pytest.raises(fg.CheckpointError) as e:
        run.fit(rounds=1)
    assert "round 3" in str(e.value) and "No space left" in str(e.value) and "free space" in e.value.fix
    assert run.round == 3  # training state in memory is intact
    assert RunDirectory.open(path).snapshot_rounds() == [1, 2]  # the previous snapshot is still the newest
    FullDisk.budget = 10**9  # space freed: the run goes on and checkpoints again
    run.fit(rounds=2)
    run.close()
    with fg.resume(path, cluster=client1, progress=False) as resumed:
        assert resumed.round == 5 and np.array_equal(resumed.params.flat, reference[5])


def test_cadence_and_retention(client1, tmp_path):
    path = tmp_path / "run.zarr"
    with make_run(client1, fg.Checkpoints(path, every=3, keep_last=2, keep_every=3)) as run:
        run.fit(rounds=7)
        assert run.checkpoint_directory is not None
    assert RunDirectory.open(path).snapshot_rounds() == [3, 6, 7]  # every 3rd + the last; milestones kept


def test_changed_pipeline_is_refused_unless_allowed(client1, tmp_path):
    path = tmp_path / "run.zarr"
    with make_run(client1, path) as run:
        run.fit(rounds=1)
    with pytest.raises(fg.ConfigError) as e:
        fg.resume(path, pipeline=pipeline(lr=0.01), cluster=client1, progress=False)
    assert "stage 3 (LocalTrain).lr: 0.1 -> 0.01" in str(e.value) and "LocalTrain.lr" in e.value.fix
    with fg.resume(path, pipeline=pipeline(lr=0.01), allow_changes=["LocalTrain.lr"], cluster=client1,
                   progress=False) as resumed:
        resumed.fit(rounds=1)
        assert resumed.changes == ["round 1: stage 3 (LocalTrain).lr: 0.1 -> 0.01"]
    with pytest.raises(fg.ConfigError, match="seed"):
        fg.resume(path, seed=1, cluster=client1, progress=False)
    with pytest.raises(fg.ConfigError, match="tensors differ"):
        fg.resume(path, model=fg.models.mlp(D, [32], K), cluster=client1, progress=False)


def test_unimportable_pipeline_needs_to_be_passed(client1, tmp_path):
    path = tmp_path / "run.zarr"
    p = st.Select(clients=3, sampler=lambda r, pop, n, rng: pop[:n]) >> st.Broadcast() >> st.LocalTrain() \
        >> st.Aggregate()
    with make_run(client1, path, pipeline=p) as run:
        run.fit(rounds=1)
    with pytest.raises(fg.ConfigError, match="cannot be imported again") as e:
        fg.resume(path, cluster=client1, progress=False)
    assert "pipeline=" in e.value.fix


def test_bad_directories(tmp_path):
    with pytest.raises(fg.CheckpointError, match="does not exist"):
        fg.resume(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("x")
    with pytest.raises(fg.CheckpointError, match="not an flgraph run directory"):
        fg.resume(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(fg.CheckpointError, match="not an flgraph run directory"):
        fg.resume(tmp_path / "other.zarr")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(fg.CheckpointError, match="cannot create the run directory"):
        make_run(None, tmp_path / "afile" / "run.zarr")


def test_newer_format_and_existing_run_refused(client1, tmp_path):
    path = tmp_path / "run.zarr"
    with make_run(client1, path) as run:
        run.fit(rounds=1)
    with pytest.raises(fg.CheckpointError, match="already holds an flgraph run") as e:
        make_run(client1, path)
    assert "resume" in e.value.fix
    newer = tmp_path / "newer.zarr"
    shutil.copytree(path, newer)
    doc = json.loads((newer / "zarr.json").read_text())
    doc["attributes"]["format_version"] = FORMAT_VERSION + 1
    (newer / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(fg.CheckpointError, match="newer flgraph") as e:
        fg.resume(newer)
    assert "upgrade" in e.value.fix


def test_missing_arrays_fall_back(client1, tmp_path):
    path = tmp_path / "run.zarr"
    with make_run(client1, path) as run:
        run.fit(rounds=2)
    shutil.rmtree(path / "snapshots" / "r00000002" / "params")
    snap, skipped = RunDirectory.open(path).latest()
    assert snap.round == 1 and "damaged or incomplete" in skipped[0]
    shutil.rmtree(path / "snapshots" / "r00000001" / "params")
    with pytest.raises(fg.CheckpointError, match="no intact snapshot"):
        RunDirectory.open(path).latest()


def test_unsaved_dataset_must_be_passed_at_resume(client1, tmp_path):
    path = tmp_path / "run.zarr"
    ds = fg.data.FederatedDataset.from_function(lambda k: (np.ones((8, D), np.float32), np.zeros(8, np.int64)),
                                                num_clients=10)  # a lambda: the handle cannot be pickled
    p = fg.recipes.fedavg(clients=5, batch_size=8, lr=0.1, evaluate_every=None)  # no test split to evaluate on
    with fg.Run(p, model=fg.models.mlp(D, [16], K, seed=0), data=ds, seed=9, cluster=client1,
                progress=False, evaluate="never", checkpoint=path) as run:
        run.fit(rounds=1)
        expected = run.params.flat
    assert "dataset" in RunDirectory.open(path).meta["notes"]
    with pytest.raises(fg.CheckpointError, match="holds no dataset handle") as e:
        fg.resume(path, cluster=client1, progress=False)
    assert "data=" in e.value.fix
    with fg.resume(path, data=ds, cluster=client1, progress=False) as resumed:
        assert resumed.round == 1 and np.array_equal(resumed.params.flat, expected)


def _snap(r: int, rows: list) -> Snapshot:
    rows.append({"round": r, "loss": 1.0 / r})
    return Snapshot(r, 10, np.full(100, r, np.float32), {"00-aggregate": {"m": np.full(3, r, np.float64)}}, list(rows))


@pytest.mark.filterwarnings("error::zarr.errors.ZarrUserWarning")
def test_a_write_in_progress_next_to_the_snapshots_is_skipped_quietly(tmp_path):
    """What another process's write leaves in snapshots/ for a moment (zarr's ``*.partial`` temporary files,
    a folder whose group metadata is not written yet) is not a snapshot, and listing it warns of nothing:
    `flgraph inspect` may look at a run while it writes."""
    rows: list = []
    d = RunDirectory.create(str(tmp_path / "run.zarr"), meta={"seed": 0}, blobs={})
    d.write(_snap(1, rows))
    snaps = tmp_path / "run.zarr" / "snapshots"
    (snaps / "zarr.0123456789abcdef.partial").write_bytes(b"{")
    (snaps / "r00000002").mkdir()  # a group being created: no zarr.json yet
    zarr.open_group(str(snaps / "rogue"), mode="w")  # a group that is not one of ours
    again = RunDirectory.open(str(tmp_path / "run.zarr"))
    assert again.snapshot_rounds() == [1]
    assert again.snapshot_rounds(committed_only=False) == [1]
    assert again.retained_rounds() == (1,)


@pytest.mark.filterwarnings("error::zarr.errors.ZarrUserWarning")
def test_the_driver_and_the_writer_asking_first_at_once_agree(tmp_path):
    """The driver (retained_rounds, after each submit) and the writer's thread (write) may both be first to
    ask which snapshots exist: the table is read once, never while a write is under way (before, the
    driver's listing could run into the write: zarr warned about the write's temporary files, here an error
    in the thread), and the round just written is known as committed whoever came first."""
    import threading

    rows: list = []
    path = str(tmp_path / "run.zarr")
    d = RunDirectory.create(path, meta={"seed": 0}, blobs={})
    d.write(_snap(1, rows))
    errors: list = []
    for r in range(2, 32):
        fresh = RunDirectory.open(path)  # nothing read yet, as after a resume
        start = threading.Barrier(2)
        seen: list = []

        def write(r: int = r, fresh: RunDirectory = fresh, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                fresh.write(_snap(r, rows))
            except Exception as e:
                errors.append(e)

        def ask(fresh: RunDirectory = fresh, start: threading.Barrier = start, seen: list = seen) -> None:
            start.wait()
            try:
                seen.append(fresh.retained_rounds())
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=write), threading.Thread(target=ask)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert set(seen[0]) <= set(range(1, r + 1))
        assert sorted(fresh.retained_rounds()) == list(range(1, r + 1))
        assert fresh._snapshots() == dict.fromkeys(range(1, r + 1), True)  # every one of them committed
        assert RunDirectory.open(path).snapshot_rounds() == list(range(1, r + 1))


def test_checkpoints_group_the_schedule_and_refuse_what_cannot_be(client1, tmp_path):
    with pytest.raises(fg.CheckpointError, match=r"Checkpoints\(every=None, minutes=None\) would never write"):
        fg.Checkpoints(tmp_path / "x.zarr", every=None)
    with pytest.raises(fg.CheckpointError, match=r"Checkpoints\(keep_last=0\)"):
        fg.Checkpoints(tmp_path / "x.zarr", keep_last=0)
    with pytest.raises(fg.ConfigError, match=r"Checkpoints\(\) has no path"):
        make_run(client1, fg.Checkpoints(every=2))
    path = tmp_path / "run.zarr"
    with make_run(client1, fg.Checkpoints(str(path), every=2)) as run:
        run.fit(3)
    assert RunDirectory.open(str(path)).snapshot_rounds() == [2, 3]
    with pytest.raises(fg.ConfigError, match="continues in its own run directory"):
        fg.resume(str(path), cluster=client1, progress=False, checkpoint=fg.Checkpoints(str(tmp_path / "other")))
    with fg.resume(str(path), cluster=client1, progress=False, checkpoint=fg.Checkpoints(every=5)) as run:
        run.fit(3)
    assert RunDirectory.open(str(path)).snapshot_rounds() == [3, 5, 6]


def test_a_long_run_keeps_a_window_of_rows_in_memory_and_resumes_with_all_of_them(client1, tmp_path, reference,
                                                                                     monkeypatch):
    """With a run directory, rows older than the history's window leave memory once saved and are read back
    from the metrics table; a resumed run sees the whole history and continues bit for bit."""
    def results(rows: list[dict]) -> list[dict]:  # what the computation decides (timings differ by run)
        return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "round_time"} for r in rows]

    monkeypatch.setattr(fg.History, "default_window", 2)
    path = tmp_path / "run.zarr"
    with make_run(client1, path, metrics_log=None) as run:
        run.fit(rounds=3)
        assert len(run.history.recent) <= 2 and len(run.history) == 3
        assert results(run.history.rows) == results(reference["history"][:3])
        assert results([run.history[0]]) == results(reference["history"][:1])  # read back from the run directory
    with fg.resume(path, cluster=client1, progress=False) as resumed:
        assert len(resumed.history.recent) == 2 and [r["round"] for r in resumed.history] == [1, 2, 3]
        resumed.fit(rounds=2)
        assert np.array_equal(resumed.params.flat, reference[5])
        assert results(resumed.history.rows) == results(reference["history"])
