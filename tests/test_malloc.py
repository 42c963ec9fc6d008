"""flgraph.local.malloc: freed model-sized buffers are kept for the next round (fewer page faults), in the driver
and in the embedded cluster's workers; the user's own allocator settings win."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from flgraph.local import malloc

GLIBC = malloc._glibc() is not None

# A round as the driver sees it: 8 partials of W1's size (0.8 MB) arrive, are summed, and are freed.
ROUNDS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from flgraph.local import malloc
    tuned = malloc.tune_this_process() if sys.argv[1] == "tune" else False

    def minflt():
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])

    def one_round():
        parts = [np.full(199_210, 1.0, np.float32) for _ in range(8)]
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        del parts, total

    for _ in range(5):
        one_round()
    before = minflt()
    for _ in range(20):
        one_round()
    print(json.dumps({"tuned": tuned, "faults_per_round": (minflt() - before) / 20}))
""")


def _faults(mode: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    env.pop("FLGRAPH_TUNE_MALLOC", None)
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not (GLIBC and os.path.exists("/proc/self/stat")), reason="glibc on Linux only")
def test_tuned_process_reuses_freed_buffers_instead_of_faulting_in_new_pages():
    plain = _faults("plain")
    tuned = _faults("tune")
    assert tuned["tuned"] is True and plain["tuned"] is False
    # 8 x 0.8 MB = 1,600 fresh pages a round when the freed heap is given back; none once it is kept
    assert float(plain["faults_per_round"]) > 400, plain  # type: ignore[arg-type]
    assert float(tuned["faults_per_round"]) < 40, tuned  # type: ignore[arg-type]


def test_users_own_settings_and_the_switch_leave_the_allocator_alone(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("FLGRAPH_TUNE_MALLOC", raising=False)
    assert malloc.enabled()
    if GLIBC:
        assert malloc.child_environ() == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                                          "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's choice stands
    assert not malloc.enabled() and malloc.child_environ() == {}
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("FLGRAPH_TUNE_MALLOC", "0")
    assert not malloc.enabled() and malloc.child_environ() == {}


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_embedded_workers_start_with_the_settings(client2):
    """The session's embedded cluster (real worker processes): the nanny passed the variables on."""
    seen = client2.run(lambda: (os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_")))
    assert len(seen) == 2
    assert set(seen.values()) == {(str(malloc.MMAP_THRESHOLD), str(malloc.TRIM_THRESHOLD))}
