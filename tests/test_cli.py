"""The `flgraph` command, run as a user would (a real process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FLGRAPH = str(Path(sys.executable).parent / "flgraph")


def test_help():
    out = subprocess.run([FLGRAPH, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "demo" in out and "usage: flgraph" in out


def test_demo_small(tmp_path):
    r = subprocess.run([FLGRAPH, "demo", "--rounds", "3", "--clients", "10", "--num-clients", "50",
                        "--workers", "2"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Dask dashboard at http://127.0.0.1:" in r.stderr
    assert "final accuracy" in r.stdout and "round" in r.stdout
    acc = float(r.stdout.split("final accuracy")[1].split(";")[0])
    assert 0.0 <= acc <= 1.0


def test_edge_device_fields_must_be_key_value():
    r = subprocess.run([FLGRAPH, "edge", "--connect", "tcp://127.0.0.1:9", "--task", "m:f", "--device", "lab-3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--device 'lab-3' is not KEY=VALUE (e.g. --device site=lab-3)" in r.stderr
