"""The cost of the FL dashboard on W1's round time: W1 through flgraph with ``dashboard=True`` and ``False``.

Runs alternate (off, on, off, on, ...) so that load on the shared machine hits both alike. Each run is W1
(``w1.pipeline()``, seed 0, ``evaluate="never"``, ``metrics_log=None``) on an embedded cluster of
``--workers`` processes; reported per setting: the median over runs of the steady median ``round_time``
(rounds 2..R) and of the fit's wall time per round (which includes the callbacks between rounds).
``--browser`` also keeps the FL page open in headless Chromium during the ``on`` runs (the page then
refreshes every 0.5 s on the scheduler, which runs in the driver process).

    .venv/bin/python bench/dashboard_cost.py [--repeats 3] [--rounds 20] [--workers 2] [--browser]

Prints one line per run and a ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def one(rounds: int, workers: int, dashboard: bool, browser: bool) -> dict[str, float]:
    import w1

    import flgraph

    wl = dict(w1.WORKLOADS["W1"])
    run = flgraph.Run(w1.pipeline(clients=int(wl["clients"]), epochs=int(wl["epochs"])),
                      model=w1.initial_model(wl["model"]), data=w1.dataset(), seed=0, workers=workers,
                      progress=False, evaluate="never", metrics_log=None, dashboard=dashboard)
    chrome = None
    try:
        run.fit(1)  # starts the cluster (and the page); not timed
        if dashboard and browser:
            link = next(cb.link for cb in run.callbacks if hasattr(cb, "link"))
            exe = shutil.which("chromium")
            if exe and link:
                chrome = subprocess.Popen(
                    [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tempfile.mkdtemp()}", "--remote-debugging-port=0", link],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(3)
        t0 = time.perf_counter()
        history = run.fit(rounds - 1)
        wall = time.perf_counter() - t0
    finally:
        if chrome is not None:
            chrome.terminate()
            chrome.wait(timeout=10)
        run.close()
    times = [float(r["round_time"]) for r in history.rows[1:]]
    return {"median_round_s": statistics.median(times[1:] or times), "wall_per_round_s": wall / (rounds - 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--browser", action="store_true", help="keep the FL page open in headless Chromium")
    args = ap.parse_args(argv)
    res: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for i in range(args.repeats):
        for setting in ("off", "on"):
            r = one(args.rounds, args.workers, setting == "on", args.browser)
            res[setting].append(r)
            print(f"[{i + 1}/{args.repeats}] dashboard={setting}: median round {r['median_round_s']:.4f} s, "
                  f"wall per round {r['wall_per_round_s']:.4f} s", flush=True)
    out: dict[str, Any] = {"rounds": args.rounds, "workers": args.workers, "repeats": args.repeats,
                           "browser": args.browser}
    for metric in ("median_round_s", "wall_per_round_s"):
        off = statistics.median(r[metric] for r in res["off"])
        on = statistics.median(r[metric] for r in res["on"])
        out[metric] = {"off": round(off, 4), "on": round(on, 4), "cost_pct": round(100 * (on - off) / off, 2)}
    print(f"dashboard cost: median round {out['median_round_s']['cost_pct']:+.2f}%, "
          f"wall per round {out['wall_per_round_s']['cost_pct']:+.2f}%", flush=True)
    print("RESULT " + json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
