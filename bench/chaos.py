"""Chaos over a whole deployment: the kill table, and a long run killed every few hundred rounds.

Two parts (both use tests/chaos_harness.py, the harness of tests/test_chaos.py):

``--table``: for each case (synchronous FedAvg, FedBuff on the virtual clock, FedAdam's moments, error
feedback's per-client residuals, Ditto's personal models, snapshots by ``minutes``) and each process and
phase (the driver at cluster start, warm-up, client work, aggregation, snapshot write, snapshot prune; a
worker during client work and a client-state write; the nanny; the `dask scheduler` during warm-up and
mid-run), one SIGKILL through flgraph's fault hook at a seeded count, then ``flgraph resume`` (a lost
worker or nanny: the run goes on), and the end compared bit for bit with a never-killed run. Prints one
line per kill and a table of kills and mismatches per process and phase.

``--long ROUNDS``: a small model for ROUNDS rounds, the driver SIGKILLed (with its cluster, as a lost
machine) every ``--kill-every`` rounds (+- a seeded jitter) and resumed with ``flgraph resume``; the RSS of
the driver and of its worker process sampled every ``--sample`` seconds with the round reached. Prints the
growth in KB a round of each process (least squares of RSS on the round within each life of the process,
its first ``--settle`` rounds left out, then pooled), and whether the end equals the never-killed run's
(``--reference``: run it too, same rounds, and also sample its memory).

    .venv/bin/python bench/chaos.py --table [--cases fedavg,fedbuff] [--seed 0] [--rounds 5]
    .venv/bin/python bench/chaos.py --long 10000 --kill-every 500 [--reference]

Each line ``RESULT {json}`` holds the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from chaos_harness import (
    CASES,
    DRIVER_PHASES,
    HERE,
    Kill,
    flgraph_cli,
    mismatches,
    outcome,
    trial,
)

STATEFUL = ("error-feedback", "ditto")  # the cases whose workers write per-client state


def kills_for(case: str, rng: random.Random, rounds: int) -> list[Kill]:
    """Every process and phase for ``case``, each at a seeded count."""
    out = []
    for phase in DRIVER_PHASES:
        # a count every run of the case reaches (snapshots: at least 2 written, 1 pruned, whatever the schedule)
        count = {"round-submitted": rng.randint(1, rounds - 1), "aggregate": rng.randint(1, rounds - 1),
                 "snapshot-write": rng.randint(1, 2)}.get(phase, 1)
        if case == "fedbuff" and phase == "round-submitted":
            continue  # the asynchronous engine submits clients one by one: its "client work" is the worker's
        out.append(Kill(case, phase, count))
    out.append(Kill(case, "client-work", rng.randint(2, 12)))
    if case in STATEFUL:
        out.append(Kill(case, "client-state-write", rng.randint(2, 12)))
    out.append(Kill(case, "client-work", rng.randint(2, 12), "parent"))
    out.append(Kill(case, "warm-up", 1, "scheduler"))
    out.append(Kill(case, "aggregate", rng.randint(1, rounds - 1), "scheduler"))
    return out


def table(cases: list[str], seed: int, rounds: int, workdir: Path) -> None:
    from chaos_harness import reference
    from distributed import Client

    from flgraph.cluster import embedded

    rng = random.Random(seed)
    cluster = embedded(1)
    client = Client(cluster, set_as_default=False)
    rows: list[dict[str, Any]] = []
    try:
        for case in cases:
            want = reference(case, rounds, client, workdir / f"ref-{case}" / "run.zarr")
            for i, kill in enumerate(kills_for(case, rng, rounds)):
                t0 = time.perf_counter()
                try:
                    r = trial(kill, rounds, workdir / f"{case}-{i}")
                    bad = mismatches(outcome(r["path"]), want)
                    outcome_text = ("resumed" if r["resumed"] else "went on") if r["fired"] else "not reached"
                    err = r["error"].splitlines()[-2:] if r["error"] else []
                except AssertionError as e:  # flgraph resume failed
                    r, bad, outcome_text, err = {"fired": True, "after_kill_s": None}, ["resume failed"], \
                        "resume failed", str(e).splitlines()[-3:]
                row = {"case": case, "process": kill.process, "phase": kill.phase, "count": kill.count,
                       "fired": r["fired"], "outcome": outcome_text, "mismatches": bad,
                       "error_after_kill_s": r.get("after_kill_s") if kill.process == "scheduler" else None,
                       "error": " | ".join(err)[:300], "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        client.close()
        cluster.close()
    summary: dict[str, dict[str, int]] = {}
    for row in rows:
        k = f"{row['process']}/{row['phase']}"
        s = summary.setdefault(k, {"kills": 0, "not_reached": 0, "mismatches": 0})
        s["kills"] += int(row["fired"])
        s["not_reached"] += int(not row["fired"])
        s["mismatches"] += int(bool(row["mismatches"]))
    print(f"{'process/phase':34s} {'kills':>5s} {'not reached':>11s} {'mismatches':>10s}")
    for k, s in summary.items():
        print(f"{k:34s} {s['kills']:5d} {s['not_reached']:11d} {s['mismatches']:10d}")
    print("RESULT " + json.dumps({"table": summary, "kills": sum(s["kills"] for s in summary.values()),
                                  "mismatches": sum(s["mismatches"] for s in summary.values())}), flush=True)


# -- the long run ---------------------------------------------------------------------------------------
def _newest_round(path: Path) -> int:
    snaps = path / "snapshots"
    if not snaps.exists():
        return 0
    return max((int(p.name[1:]) for p in snaps.iterdir() if p.name.startswith("r") and (p / "zarr.json").exists()),
               default=0)


class Sampler(threading.Thread):
    """RSS of a driver process and of its largest child (the worker) every ``every`` seconds."""

    def __init__(self, pid: int, path: Path, life: int, every: float, out: list[tuple[int, int, float, float]]):
        super().__init__(daemon=True)
        self.proc, self.path, self.life, self.every, self.out = psutil.Process(pid), path, life, every, out
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                driver = self.proc.memory_info().rss
                kids = [c.memory_info().rss for c in self.proc.children(recursive=True)]
            except psutil.Error:
                return
            self.out.append((self.life, _newest_round(self.path), driver / 2**20, max(kids, default=0) / 2**20))


def slope_kb(samples: list[tuple[int, int, float, float]], column: int, settle: int) -> float | None:
    """KB per round: least squares of RSS on the round within each life, pooled (each life centred)."""
    xs, ys = [], []
    for life in sorted({s[0] for s in samples}):
        pts = [(s[1], s[column]) for s in samples if s[0] == life]
        if not pts:
            continue
        start = pts[0][0] + settle
        pts = [p for p in pts if p[0] >= start]
        if len(pts) < 5 or pts[-1][0] - pts[0][0] < 50:
            continue
        x = np.array([p[0] for p in pts], float)
        y = np.array([p[1] for p in pts], float)
        xs.append(x - x.mean())
        ys.append(y - y.mean())
    if not xs:
        return None
    x, y = np.concatenate(xs), np.concatenate(ys)
    return float((x @ y) / (x @ x) * 1024) if x @ x > 0 else None


def long_run(rounds: int, kill_every: int, seed: int, workdir: Path, sample: float, settle: int,
             kill: bool) -> dict[str, Any]:
    rng = random.Random(seed)
    path = workdir / ("killed.zarr" if kill else "reference.zarr")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLGRAPH_CHAOS")}
    cmd = [sys.executable, str(HERE), "long", str(path), str(rounds), "1"]
    samples: list[tuple[int, int, float, float]] = []
    kills, life, t0 = 0, 0, time.perf_counter()
    while True:
        log = open(workdir / f"{path.stem}-{life}.log", "wb")  # noqa: SIM115 - closed below
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        sampler = Sampler(p.pid, path, life, sample, samples)
        sampler.start()
        target = _newest_round(path) + kill_every + rng.randint(-kill_every // 4, kill_every // 4)
        killed = False
        while p.poll() is None:
            if kill and target < rounds and _newest_round(path) >= target:
                time.sleep(rng.uniform(0, 0.05))
                os.killpg(p.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.02)
        p.wait()
        sampler.stop.set()
        sampler.join()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        log.close()
        if killed:
            kills += 1
        elif p.returncode != 0:
            raise RuntimeError(f"life {life} failed (exit {p.returncode}); see {workdir}/{path.stem}-{life}.log")
        else:
            break
        life += 1
        cmd = [flgraph_cli(), "resume", str(path), "--workers", "1", "--quiet"]
        print(f"  {path.stem}: killed at round {_newest_round(path)} ({kills} kills, {time.perf_counter() - t0:.0f} s)",
              flush=True)
    (workdir / f"{path.stem}-memory.json").write_text(json.dumps(samples))  # (life, round, driver MB, worker MB)
    return {"kills": kills, "lives": life + 1, "seconds": round(time.perf_counter() - t0, 1), "path": path,
            "driver_kb_per_round": slope_kb(samples, 2, settle), "worker_kb_per_round": slope_kb(samples, 3, settle),
            "driver_mb_max": round(max(s[2] for s in samples), 1) if samples else None,
            "worker_mb_max": round(max(s[3] for s in samples), 1) if samples else None, "samples": len(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="store_true", help="the kill table")
    ap.add_argument("--cases", default=",".join(CASES), help="cases of the table (comma-separated)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each table run")
    ap.add_argument("--long", type=int, default=0, metavar="ROUNDS", help="the long run's rounds")
    ap.add_argument("--kill-every", type=int, default=500)
    ap.add_argument("--reference", action="store_true", help="also the never-killed long run, compared")
    ap.add_argument("--sample", type=float, default=1.0, help="seconds between memory samples")
    ap.add_argument("--settle", type=int, default=100, help="rounds of each life left out of the slope")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="flgraph-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"work directory {workdir}", flush=True)
    if args.table:
        table(args.cases.split(","), args.seed, args.rounds, workdir)
    if args.long:
        runs: dict[str, dict[str, Any]] = {}

        def one(kill: bool) -> None:
            runs["killed" if kill else "reference"] = long_run(args.long, args.kill_every, args.seed, workdir,
                                                               args.sample, args.settle, kill=kill)

        # the never-killed run goes alongside (both share the machine: compare slopes, not speeds)
        threads = [threading.Thread(target=one, args=(k,)) for k in ((True, False) if args.reference else (True,))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result: dict[str, Any] = {"rounds": args.long}
        result.update({name: {k: v for k, v in r.items() if k != "path"} for name, r in runs.items()})
        if "reference" in runs and "killed" in runs:
            result["mismatches"] = mismatches(outcome(runs["killed"]["path"]), outcome(runs["reference"]["path"]))
        print("RESULT " + json.dumps({"long": result}), flush=True)


if __name__ == "__main__":
    main()
