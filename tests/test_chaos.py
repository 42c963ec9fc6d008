"""Chaos: real processes (the driver, a worker, the nanny, the `dask scheduler`) SIGKILLed at chosen phases
of a run, the run resumed (or left to go on), and its end compared bit for bit with a never-killed run.

The kills land on their phase through flgraph's fault hook (FLGRAPH_CHAOS, see tests/chaos_harness.py).
This file runs a seeded, representative subset; bench/chaos.py runs every combination and the long run.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import flgraph as fg

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
@pytest.mark.parametrize(("phase", "count", "saved"), [("round-submitted", 3, "round 3 is saved in"),
                                                        ("warm-up", 1, "no round was saved yet in")])
def test_lost_scheduler_is_a_cluster_error_with_the_command_to_continue(phase, count, saved, tmp_path, client1,
                                                                        tmp_path_factory):
    # resuming after a loss in warm-up is the stuck-directory case above; bench/chaos.py runs it too
    mid_run = phase == "round-submitted"
    result = trial(Kill("fedavg", phase, count, "scheduler"), ROUNDS, tmp_path, resume=mid_run)
    assert result["fired"] and result["exit"] == 1, result["log"]
    error = result["error"]
    assert re.search(r"ClusterError: the Dask scheduler at tcp://127\.0\.0\.1:\d+ was lost", error), error
    assert saved in error and f"{result['path']}" in error
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
