"""Kill the driver with SIGKILL at any instant and resume: the final params equal an uninterrupted run's.

Two tests: (1) a writer process killed at each single store operation of a snapshot write (and of the
pruning after it), then the directory checked; (2) a whole flgraph run (driver + its embedded cluster)
killed at random moments several times and continued each time with `flgraph resume`.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

import flgraph as fg
from flgraph.store.checkpoint import RunDirectory

WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import zarr.storage
    from flgraph.store.checkpoint import CheckpointPolicy, RunDirectory, Snapshot

    path, kill_at = sys.argv[1], int(sys.argv[2])
    ops = [0]

    class Killing(zarr.storage.LocalStore):
        armed = False
        def _tick(self):
            if Killing.armed:
                ops[0] += 1
                if ops[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        async def set(self, key, value):
            self._tick()
            await super().set(key, value)
        async def delete(self, key):
            self._tick()
            await super().delete(key)

    d = RunDirectory.create(Killing(path), meta={"seed": 0}, blobs={})
    policy = CheckpointPolicy(keep_last=1)
    rows = []
    for r in (1, 2, 3):
        rows.append({"round": r, "loss": 1.0 / r, "clients_done": 5})
        Killing.armed = r == 3
        d.write(Snapshot(r, 3, np.full(1000, r, np.float32), {"00-aggregate": {"m": np.full(7, r, np.float64),
                                                                                "t": r}}, list(rows)))
        d.prune(policy)
    print("ops", ops[0])
""")


def test_crash_at_every_store_operation_of_a_snapshot(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    clean = subprocess.run([sys.executable, str(script), str(tmp_path / "clean.zarr"), "0"],
                           capture_output=True, text=True, timeout=120, check=True)
    total = int(clean.stdout.split()[-1])
    assert total >= 5  # arrays, the commit, then the deletions of rounds 1 and 2
    for k in range(1, total + 1):
        path = tmp_path / f"k{k}.zarr"
        p = subprocess.run([sys.executable, str(script), str(path), str(k)], capture_output=True, timeout=120)
        assert p.returncode == -signal.SIGKILL, p.stderr
        snap, skipped = RunDirectory.open(path).latest()
        assert not skipped
        assert snap.round in (2, 3), k
        assert np.array_equal(snap.params, np.full(1000, snap.round, np.float32))
        assert snap.states["00-aggregate"]["t"] == snap.round
        assert np.array_equal(snap.states["00-aggregate"]["m"], np.full(7, snap.round))
        assert [r["round"] for r in snap.rows] == list(range(1, snap.round + 1))
        assert snap.rows[-1]["loss"] == 1.0 / snap.round


DRIVER = textwrap.dedent("""
    import sys
    import flgraph as fg

    def build():
        data = fg.data.synthetic_classification(num_clients=60, samples_per_client=32, num_features=64,
                                                num_classes=4, seed=2, test_samples=100)
        pipeline = fg.recipes.fedavg(clients=6, batch_size=8, lr=0.1, evaluate_every=4)
        return pipeline, fg.models.mlp(64, [256, 256], 4, seed=0), data

    if __name__ == "__main__":
        pipeline, model, data = build()
        run = fg.Run(pipeline, model=model, data=data, seed=11, workers=1, progress=False,
                     checkpoint=fg.Checkpoints(sys.argv[1], keep_last=2))
        run.fit(rounds=int(sys.argv[2]))
        run.close()
""")

ROUNDS = 24


def _newest_round(path: Path) -> int:
    snaps = path / "snapshots"
    if not snaps.exists():
        return 0
    return max((int(p.name[1:]) for p in snaps.iterdir() if p.name.startswith("r")), default=0)


def _kill_when(proc: subprocess.Popen, path: Path, at_round: int, extra: float, limit: float = 120) -> bool:
    """SIGKILL the process group once a snapshot of ``at_round`` appears (+ ``extra`` s); False if it ended."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _newest_round(path) >= at_round:
            time.sleep(extra)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return True
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError("the run made no progress")


def test_sigkill_the_driver_at_random_moments_and_resume(tmp_path, client1):
    sys.path.insert(0, str(tmp_path))
    (tmp_path / "crashdriver.py").write_text(DRIVER)
    import crashdriver

    pipeline, model, data = crashdriver.build()
    with fg.Run(pipeline, model=model, data=data, seed=11, cluster=client1, progress=False) as ref:
        ref.fit(rounds=ROUNDS)
        expected = ref.params.flat

    rng = random.Random(1234)
    path = tmp_path / "run.zarr"
    flgraph_cli = str(Path(sys.executable).parent / "flgraph")
    cmd = [sys.executable, str(tmp_path / "crashdriver.py"), str(path), str(ROUNDS)]
    kills = 0
    for _ in range(4):
        with open(tmp_path / "driver.log", "ab") as log:  # a file, not a pipe nobody reads
            proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=log, stderr=log)
        target = min(ROUNDS - 1, _newest_round(path) + rng.randint(2, 5))
        if _kill_when(proc, path, target, rng.uniform(0.0, 0.06)):
            kills += 1
        cmd = [flgraph_cli, "resume", str(path), "--workers", "1", "--quiet"]
    assert kills >= 3
    final = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    snap, skipped = RunDirectory.open(path).latest()
    assert snap.round == ROUNDS and not skipped
    assert np.array_equal(snap.params, expected), "resumed run differs from the uninterrupted one"
    assert [r["round"] for r in snap.rows] == list(range(1, ROUNDS + 1))


def test_resume_cli_reports_errors(tmp_path):
    r = subprocess.run([str(Path(sys.executable).parent / "flgraph"), "resume", str(tmp_path / "nope.zarr")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr
