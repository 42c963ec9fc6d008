"""Chaos: real processes (the driver, a worker, the nanny, the `dask scheduler`) SIGKILLed at chosen phases
of a run, the run resumed (or left to go on), and its end compared bit for bit with a never-killed run.

The kills land on their phase through flgraph's fault hook (FLGRAPH_CHAOS, see tests/chaos_harness.py).
This file runs a seeded, representative subset; bench/chaos.py runs every combination and the long run.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import flgraph as fg
from flgraph.store.checkpoint import RunDirectory

sys.path.insert(0, str(Path(__file__).parent))
from chaos_harness import Kill, build, flgraph_cli, mismatches, outcome, reference, trial

ROUNDS = 5
_REFERENCES: dict[str, dict] = {}


def expected(case: str, client, tmp_path_factory) -> dict:
    if case not in _REFERENCES:
        _REFERENCES[case] = reference(case, ROUNDS, client, tmp_path_factory.mktemp(f"ref-{case}") / "run.zarr")
    return _REFERENCES[case]


def test_driver_killed_before_its_first_snapshot_leaves_a_resumable_directory(tmp_path, client1, tmp_path_factory):
    # a real driver SIGKILLed while its cluster starts: the run directory exists, no snapshot was committed
    result = trial(Kill("fedavg", "cluster-start"), ROUNDS, tmp_path / "kill", resume=False)
    assert result["fired"] and result["exit"] == -signal.SIGKILL
    stuck = result["path"]
    assert (stuck / "zarr.json").exists() and not fg.store.checkpoint.RunDirectory.open(stuck).snapshot_rounds()
    want = expected("fedavg", client1, tmp_path_factory)
    copies = {name: tmp_path / f"{name}.zarr" for name in ("python", "again")}
    for copy in copies.values():
        shutil.copytree(stuck, copy)

    # 1. `flgraph resume PATH`: from round 0 with the saved configuration, to the interrupted fit's target
    cli = subprocess.run([flgraph_cli(), "resume", str(stuck), "--workers", "1", "--quiet"], capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "at round 0; running to round 5" in cli.stderr
    assert mismatches(outcome(stuck), want) == []

    # 2. flgraph.resume(path) in Python: the same, on any cluster
    with fg.resume(str(copies["python"]), cluster=client1, progress=False) as run:
        assert run.round == 0 and run.remaining == ROUNDS
        assert any("no snapshot was committed" in n for n in run.resume_notes)
        run.fit(rounds=run.remaining)
    assert mismatches(outcome(copies["python"]), want) == []

    # 3. Run(..., checkpoint=path) again: another configuration is refused with the way out (resume) ...
    pipeline, model, data, every = build("fedavg")
    with pytest.raises(fg.errors.CheckpointError, match=r"stopped before its first snapshot(.|\n)*flgraph.resume"):
        fg.Run(pipeline, model=model, data=data, seed=8, cluster=client1, progress=False,
               checkpoint=fg.Checkpoints(str(copies["again"]), **every))
    # ... and the same configuration (the same script run again) starts afresh there
    with fg.Run(pipeline, model=model, data=data, seed=7, cluster=client1, progress=False, dashboard=False,
                checkpoint=fg.Checkpoints(str(copies["again"]), **every)) as run:
        run.fit(rounds=ROUNDS)
    assert mismatches(outcome(copies["again"]), want) == []


# -- a lost scheduler: the `dask scheduler` process of a cluster reached by address, killed ---------------
# how far the run got before the driver saw the loss depends on timing; the message must name the round
# under way and the last one saved (every round is snapshotted here, so the one before), and the command it
# prints must end the run as if the scheduler had never died (checked below)
@pytest.mark.parametrize(("phase", "count", "saved"), [("round-submitted", 3, r"round (\d+) was under way\); "
                                                                             r"round (\d+) is saved in"),
                                                        ("warm-up", 1, r"no round was saved yet in")])
def test_lost_scheduler_is_a_cluster_error_with_the_command_to_continue(phase, count, saved, tmp_path, client1,
                                                                        tmp_path_factory):
    # resuming after a loss in warm-up is the stuck-directory case above; bench/chaos.py runs it too
    mid_run = phase == "round-submitted"
    result = trial(Kill("fedavg", phase, count, "scheduler"), ROUNDS, tmp_path, resume=mid_run)
    assert result["fired"] and result["exit"] == 1, result["log"]
    error = result["error"]
    assert re.search(r"ClusterError: the Dask scheduler at tcp://127\.0\.0\.1:\d+ was lost", error), error
    found = re.search(saved, error)
    assert found and f"{result['path']}" in error, error
    if mid_run:
        assert int(found.group(2)) == int(found.group(1)) - 1 >= 2, error
    assert re.search(rf"`flgraph resume {re.escape(str(result['path']))} --scheduler tcp://127\.0\.0\.1:\d+ "
                     r"--workers 1`", error), error
    ended = error[error.index("ClusterError:"):]  # what fit raised (Dask's error is only its cause)
    assert "ClosedClientError" not in ended and "FutureCancelledError" not in ended
    assert result["after_kill_s"] < 10, result["after_kill_s"]  # Dask alone waits 30 s to reconnect
    if not mid_run:
        return
    # the command (on a new scheduler, as trial runs it) ends the run as if the scheduler had never died
    assert result["resumed"] == 1
    assert mismatches(outcome(result["path"]), expected("fedavg", client1, tmp_path_factory)) == []


# -- kills at the phases of a run, per process and kind of state (the rest of the matrix: bench/chaos.py) --
SUBSET = [
    Kill("fedbuff", "snapshot-write", 3),  # the driver, mid-commit, on the virtual clock (buffer, in-flight clients)
    Kill("error-feedback", "client-state-write", 4),  # a worker, between a client's residual and its stamp
]


@pytest.mark.parametrize("kill", SUBSET, ids=lambda k: f"{k.case}-{k.process}-{k.phase}")
def test_killed_at_a_phase_ends_bit_identical(kill, tmp_path, client1, tmp_path_factory):
    result = trial(kill, ROUNDS, tmp_path)
    assert result["fired"], result["log"]
    if kill.process == "driver":
        assert result["exit"] == -signal.SIGKILL and result["resumed"] == 1
    else:  # a lost worker: its nanny starts another, the round's lost work runs again, the run goes on
        assert result["exit"] == 0 and result["resumed"] == 0, result["log"]
    assert mismatches(outcome(result["path"]), expected(kill.case, client1, tmp_path_factory)) == []


class FakeClock:
    """time.monotonic for the run's snapshot schedule: advanced by the test, 20 s a round."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def on_round(self, run, row) -> None:
        self.now += 20.0


def test_checkpoint_minutes_writes_by_time_and_resumes_exactly(tmp_path, client1, tmp_path_factory, monkeypatch):
    import flgraph.run
    import flgraph.store.writer

    clock = FakeClock()
    for module in (flgraph.run, flgraph.store.writer):
        monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=clock.monotonic, perf_counter=time.perf_counter))
    pipeline, model, data, _ = build("fedavg")
    path = tmp_path / "run.zarr"
    with fg.Run(pipeline, model=model, data=data, seed=7, cluster=client1, progress=False, dashboard=False,
                callbacks=[clock], checkpoint=fg.Checkpoints(str(path), every=None, minutes=0.5, keep_last=10)) as run:
        run.fit(rounds=4)
        # a round takes 20 s on this clock: a snapshot once 30 s passed since the last (rounds 3, 5...), and
        # the last round of each fit always gets one
        assert RunDirectory.open(path).snapshot_rounds() == [3, 4]
        run.fit(rounds=ROUNDS - 4 + 3)
        assert RunDirectory.open(path).snapshot_rounds() == [3, 4, 6, 8]
    monkeypatch.undo()
    # resumed from round 6 (the last snapshot written by time, as if round 8's were lost) to the end: exact
    shutil.rmtree(path / "snapshots" / "r00000008")
    with fg.resume(str(path), cluster=client1, progress=False) as run:
        assert run.round == 6
        run.fit(rounds=2)
    with fg.Run(pipeline, model=model, data=data, seed=7, cluster=client1, progress=False, dashboard=False) as ref:
        ref.fit(rounds=8)
        assert np.array_equal(outcome(path)["params"], ref.params.flat)


def test_directory_whose_creation_was_interrupted_is_created_again(tmp_path):
    # what a kill inside RunDirectory.create leaves: the group and its blobs, not yet its attributes
    pipeline, model, data, every = build("fedavg")
    path = tmp_path / "run.zarr"
    fg.Run(pipeline, model=model, data=data, seed=7, progress=False, dashboard=False,
           checkpoint=fg.Checkpoints(str(path), **every)).close()
    meta = json.loads((path / "zarr.json").read_text())
    (path / "zarr.json").write_text(json.dumps({**meta, "attributes": {}}))
    with pytest.raises(fg.errors.CheckpointError, match=r"stopped while it created(.|\n)*same checkpoint= path"):
        fg.resume(str(path))
    fg.Run(pipeline, model=model, data=data, seed=7, progress=False, dashboard=False,
           checkpoint=fg.Checkpoints(str(path), **every)).close()
    assert RunDirectory.open(path).meta["seed"] == 7
    # a zarr group of someone else's is never taken for one
    other = tmp_path / "other.zarr"
    shutil.copytree(path / "blobs", other / "blobs")
    (other / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"mine": 1}}')
    with pytest.raises(fg.errors.CheckpointError, match="exists and is not empty"):
        fg.Run(pipeline, model=model, data=data, seed=7, progress=False, checkpoint=str(other))
