"""What checkpointing costs: snapshot size and write/read time (W1, ~100M parameters), and the cost of
checkpointing every round on W1's round time (target: at most 5%).

    .venv/bin/python bench/checkpoint_cost.py [--repeats 2] [--big 100_000_000] [--skip-w1]

Prints a table and one ``RESULT {json}`` line. Figures are noisy on a shared 2-core machine: runs with and
without checkpoints alternate, and medians are reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import w1

import flgraph as fg
from flgraph.store.checkpoint import CheckpointPolicy, RunDirectory, Snapshot


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def w1_run(checkpoint: Path | None, rounds: int) -> tuple[float, list[float], int]:
    with fg.Run(w1.pipeline(), model=w1.initial_model("mlp"), data=w1.dataset(), seed=0, workers=2,
                progress=False, evaluate="never", checkpoint=fg.Checkpoints(checkpoint, keep_last=3)) as run:
        h = run.fit(rounds=rounds)
        writes = list(run._writer.write_seconds) if run._writer else []
    times = [r["round_time"] for r in h][1:]
    size = 0
    if checkpoint is not None:
        d = RunDirectory.open(checkpoint, mode="r")
        size = d.sizes()[d.snapshot_rounds()[-1]]
    return statistics.median(times), writes, size


def big_snapshot(n: int, tmp: Path) -> dict[str, float]:
    params = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    path = tmp / "big.zarr"
    d = RunDirectory.create(path, meta={"seed": 0}, blobs={})
    rows = [{"round": 1, "loss": 1.0}]
    t0 = time.perf_counter()
    d.write(Snapshot(1, 1, params, {}, rows))
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    d.write(Snapshot(2, 2, params, {}, [*rows, {"round": 2, "loss": 0.9}]))
    d.prune(CheckpointPolicy(keep_last=1))
    write2_s = time.perf_counter() - t0
    size = RunDirectory.open(path, mode="r").sizes()[2]
    t0 = time.perf_counter()
    snap, _ = RunDirectory.open(path, mode="r").latest()
    read_s = time.perf_counter() - t0
    assert np.array_equal(snap.params, params)
    shutil.rmtree(path)
    return {"params": n, "raw_mb": params.nbytes / 1e6, "snapshot_mb": size / 1e6, "write_s": write_s,
            "write_and_prune_s": write2_s, "read_verify_s": read_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--big", type=int, default=100_000_000, help="parameters of the big snapshot (0: skip)")
    ap.add_argument("--skip-w1", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flgraph-ckpt-"))
    result: dict[str, object] = {"benchmark": "checkpoint_cost"}
    try:
        if not args.skip_w1:
            plain, ckpt, writes, sizes = [], [], [], []
            for i in range(args.repeats):
                plain.append(w1_run(None, args.rounds)[0])
                med, ws, size = w1_run(tmp / f"w1-{i}.zarr", args.rounds)
                ckpt.append(med)
                writes += ws
                sizes.append(size)
            p, c = statistics.median(plain), statistics.median(ckpt)
            print(f"W1 round, no checkpoint      {p:.4f} s  (runs {[round(x, 4) for x in plain]})")
            print(f"W1 round, snapshot per round {c:.4f} s  (runs {[round(x, 4) for x in ckpt]})")
            print(f"  overhead {100 * (c / p - 1):+.1f}%   snapshot {sizes[-1] / 1e6:.2f} MB, background write "
                  f"median {statistics.median(writes) * 1e3:.1f} ms (max {max(writes) * 1e3:.1f} ms)")
            result.update(w1_round_plain_s=p, w1_round_ckpt_s=c, w1_overhead_pct=round(100 * (c / p - 1), 2),
                          w1_snapshot_mb=sizes[-1] / 1e6, w1_write_median_ms=statistics.median(writes) * 1e3)
        if args.big:
            big = big_snapshot(args.big, tmp)
            print(f"{args.big:,} parameters: raw {big['raw_mb']:.0f} MB, snapshot {big['snapshot_mb']:.0f} MB, "
                  f"write {big['write_s']:.2f} s, write+prune {big['write_and_prune_s']:.2f} s, "
                  f"read+verify {big['read_verify_s']:.2f} s")
            result["big"] = big
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
