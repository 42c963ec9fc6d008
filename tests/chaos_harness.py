"""The chaos harness: runs of every engine and kind of state, a process killed at a chosen phase, the run
resumed (or left to go on), and the end compared bit for bit with a run that was never killed.

Used by tests/test_chaos.py (a seeded, representative subset) and bench/chaos.py (every combination).

A kill lands on its phase every time through flgraph's fault hook (``flgraph._chaos``, not part of the
API): the driver runs with ``FLGRAPH_CHAOS=PHASE:COUNT[:TARGET]`` and the process that reaches PHASE the
COUNT-th time SIGKILLs TARGET: itself (the driver, or a worker for a phase that runs in workers), its
parent (a worker's nanny), or a pid (the ``dask scheduler``).

Run as a script, this module is the driver: ``python chaos_harness.py CASE RUN.zarr ROUNDS WORKERS [SCHEDULER]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
CASES = ("fedavg", "fedbuff", "fedadam", "error-feedback", "ditto", "minutes")

# phase -> the process that reaches it (the hook kills that one, its parent, or the scheduler)
DRIVER_PHASES = ("cluster-start", "warm-up", "round-submitted", "aggregate", "snapshot-write", "snapshot-prune")
WORKER_PHASES = ("client-work", "client-state-write")


def build(case: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(pipeline, model, data, Checkpoints keywords) of a case: small, so that a kill test takes seconds."""
    import flgraph as fg
    from flgraph import stages as st
    from flgraph.sim import DevicePopulation

    data = fg.data.synthetic_classification(num_clients=40, samples_per_client=16, num_features=12,
                                            num_classes=3, seed=2, test_samples=60)
    model = fg.models.mlp(12, [16], 3, seed=0)
    every: dict[str, Any] = {"every": 1, "keep_last": 2}
    if case == "fedavg":
        p = fg.recipes.fedavg(clients=6, batch_size=8, lr=0.1, evaluate_every=3)
    elif case == "fedbuff":
        devices = DevicePopulation.lognormal(range(40), seed=2, speed=20.0, speed_sigma=1.0)
        p = fg.recipes.fedbuff(concurrency=6, buffer=3, devices=devices, batch_size=8, lr=0.1, evaluate_every=None)
    elif case == "fedadam":
        p = fg.recipes.fedadam(clients=6, server_lr=0.05, batch_size=8, lr=0.1, evaluate_every=3)
    elif case == "error-feedback":
        p = (st.Select(clients=6) >> st.Broadcast() >> st.LocalTrain(batch_size=8, lr=0.1)
             >> st.Compress(st.TopK(0.2), error_feedback=True) >> st.Aggregate())
        every = {"every": 2, "keep_last": 2}
    elif case == "ditto":
        p = fg.recipes.ditto(clients=6, batch_size=8, lr=0.1, evaluate_every=2)
    elif case == "long":  # bench/chaos.py --long: thousands of cheap rounds, milestones kept
        p = fg.recipes.fedavg(clients=4, batch_size=8, lr=0.05, evaluate_every=500)
        every = {"every": 10, "keep_last": 3, "keep_every": 1000}
    elif case == "minutes":  # snapshots by time only: which rounds get one depends on timing, the result must not
        p = fg.recipes.fedavg(clients=6, batch_size=8, lr=0.1, evaluate_every=3)
        every = {"every": None, "minutes": 0.3 / 60, "keep_last": 2}
    else:
        raise ValueError(f"unknown case {case!r}; one of {CASES}")
    return p, model, data, every


def drive(case: str, path: str, rounds: int, workers: int, scheduler: str | None = None) -> None:
    """The driver: a checkpointed run of ``case`` on an embedded cluster of ``workers`` (or ``scheduler``)."""
    import faulthandler

    import flgraph as fg

    if os.environ.get("FLGRAPH_CHAOS"):  # a hung trial's driver shows where it hangs, in the trial's log
        faulthandler.dump_traceback_later(100, exit=True)
    pipeline, model, data, every = build(case)
    with fg.Run(pipeline, model=model, data=data, seed=7, cluster=scheduler, workers=workers,
                progress=False, dashboard=False, checkpoint=fg.Checkpoints(path, **every)) as run:
        run.fit(rounds=rounds)


def reference(case: str, rounds: int, cluster: Any, path: Path) -> dict[str, Any]:
    """The never-killed run's end, through the same checkpoint code (read back from its directory)."""
    import flgraph as fg

    pipeline, model, data, every = build(case)
    with fg.Run(pipeline, model=model, data=data, seed=7, cluster=cluster, progress=False, dashboard=False,
                checkpoint=fg.Checkpoints(str(path), **every)) as run:
        run.fit(rounds=rounds)
    return outcome(path)


# metrics of the deployment, not of the computation: timings, and bytes sent once per worker (a killed run
# may have a different number of workers in a round)
_VARYING = ("time", "_s", "per_s", "wall", "bytes_held", "rss", "bytes_broadcast")


def outcome(path: Path) -> dict[str, Any]:
    """A run directory's newest snapshot: params, stage states and the metrics rows (without timings)."""
    from flgraph.store.checkpoint import RunDirectory

    snap, skipped = RunDirectory.open(path).latest()
    assert not skipped, skipped
    rows = [{k: v for k, v in r.items() if k == "sim_time" or not any(w in k for w in _VARYING)}
            for r in snap.rows]
    return {"round": snap.round, "params": snap.params, "states": snap.states, "rows": rows}


def mismatches(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """What differs between two outcomes (empty: bit-identical)."""
    out = []
    if got["round"] != want["round"]:
        out.append(f"round {got['round']} != {want['round']}")
    if got["params"].dtype != want["params"].dtype or not np.array_equal(got["params"], want["params"]):
        out.append("params differ")
    if sorted(got["states"]) != sorted(want["states"]):
        out.append(f"state keys {sorted(got['states'])} != {sorted(want['states'])}")
    for key in sorted(set(got["states"]) & set(want["states"])):
        a, b = got["states"][key], want["states"][key]
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k), b.get(k)
            same = (np.array_equal(np.asarray(x), np.asarray(y)) if isinstance(x, np.ndarray) or
                    isinstance(y, np.ndarray) else json.dumps(x, sort_keys=True, default=str) ==
                    json.dumps(y, sort_keys=True, default=str))
            if not same:
                out.append(f"state {key}/{k} differs")
    if json.dumps(got["rows"], sort_keys=True, default=str) != json.dumps(want["rows"], sort_keys=True, default=str):
        out.append("metrics rows differ")
    return out


@dataclass
class Kill:
    """One chaos trial: ``case``, killed at the ``count``-th ``phase``; ``target``: self, parent or scheduler."""

    case: str
    phase: str
    count: int = 1
    target: str = "self"

    @property
    def workers(self) -> int:
        """Worker processes of the driver's cluster: two where one is killed (the scattered run data lives on
        every worker; with one, it dies with it), else one."""
        return 2 if self.process in ("worker", "nanny") else 1

    @property
    def process(self) -> str:
        if self.target == "scheduler":
            return "scheduler"
        if self.target == "parent":
            return "nanny"
        return "worker" if self.phase in WORKER_PHASES else "driver"


def flgraph_cli() -> str:
    return str(Path(sys.executable).parent / "flgraph")


def dask_cli() -> str:
    found = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    assert found, "the dask command comes with distributed"
    return found


class AddressCluster:
    """`dask scheduler` and ``workers`` `dask worker` processes (each a nanny and its worker process) on
    127.0.0.1, as separate process groups."""

    def __init__(self, workdir: Path, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        sched_file = workdir / f"scheduler-{time.monotonic_ns()}.json"
        self.scheduler = subprocess.Popen([dask_cli(), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                           "--no-dashboard", "--scheduler-file", str(sched_file)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
        self.procs.append(self.scheduler)
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError, ValueError):
                    self.address = json.loads(sched_file.read_text())["address"]
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("dask scheduler did not start")
                time.sleep(0.1)
            for _ in range(workers):
                self.procs.append(subprocess.Popen([dask_cli(), "worker", self.address, "--nworkers", "1",
                                                    "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
                                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                   start_new_session=True))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    def __enter__(self) -> AddressCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _run(cmd: list[str], workdir: Path, env: dict[str, str], limit: float) -> tuple[int, str, float]:
    """Run ``cmd`` in its own process group; afterwards kill what is left of the group (the workers of a
    driver that was killed). Returns (exit code, the tail of its output, the time.time() it ended)."""
    log = workdir / f"log-{time.monotonic_ns()}.txt"
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            rc = p.wait(timeout=limit)
            ended = time.time()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    return rc, log.read_text(errors="replace")[-3000:], ended


def trial(kill: Kill, rounds: int, workdir: Path, limit: float = 150, resume: bool = True) -> dict[str, Any]:
    """Run ``kill``: the driver with the fault armed, then (``resume``) ``flgraph resume`` if it did not end.

    Returns what happened: ``fired`` (the kill happened), ``exit`` (the armed driver's exit code),
    ``error`` (its last line when it failed), ``resumed`` (resumes needed), ``path`` (the run directory)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "run.zarr"
    fired = workdir / "fired"
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLGRAPH_CHAOS")}
    # the scheduler and the nannies are processes of their own only in a cluster reached by address (the
    # embedded cluster's scheduler and nannies live in the driver); a nanny is killed by its worker process,
    # so there the workers get the hook, and the driver does not
    hooked = {**base, "FLGRAPH_CHAOS": f"{kill.phase}:{kill.count}:{kill.target}", "FLGRAPH_CHAOS_FIRED": str(fired)}
    cluster = None
    if kill.target in ("scheduler", "parent"):
        cluster = AddressCluster(workdir, kill.workers, env=hooked if kill.target == "parent" else base)
    try:
        env = hooked
        if kill.target == "scheduler":
            assert cluster is not None
            env = {**hooked, "FLGRAPH_CHAOS": f"{kill.phase}:{kill.count}:{cluster.scheduler.pid}"}
        elif kill.target == "parent":
            env = base
        cmd = [sys.executable, str(HERE), kill.case, str(path), str(rounds), str(kill.workers)]
        if cluster is not None:
            cmd.append(cluster.address)
        rc, text, ended = _run(cmd, workdir, env, limit)
        result: dict[str, Any] = {"fired": fired.exists(), "exit": rc, "resumed": 0, "path": path,
                                  "error": "", "log": text,
                                  "after_kill_s": ended - fired.stat().st_mtime if fired.exists() else None}
        if rc != 0 and rc != -signal.SIGKILL:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            result["error"] = "\n".join(lines[-6:])
    finally:
        if cluster is not None:
            cluster.close()
    if rc != 0 and resume:
        with contextlib.ExitStack() as stack:
            resume = [flgraph_cli(), "resume", str(path), "--quiet"]
            if kill.target == "scheduler":  # a new scheduler, as an operator would start after the loss
                fresh = stack.enter_context(AddressCluster(workdir))
                resume += ["--scheduler", fresh.address]
            resume += ["--workers", "1"]  # on an address: wait for that one worker
            rc2, text2, _ = _run(resume, workdir, base, limit)
            result["resumed"] = 1
            if rc2 != 0:
                raise AssertionError(f"flgraph resume failed after {kill}:\n{text2}")
    return result


if __name__ == "__main__":
    drive(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
