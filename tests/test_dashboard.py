"""The FL dashboard page: served by the scheduler, seen in headless Chromium, tolerant of failures."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

import flgraph as fg
from flgraph import stages as st
from flgraph.observe.dashboard import Dashboard

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _data():
    return fg.data.synthetic_classification(num_clients=20, samples_per_client=16, num_features=8,
                                            num_classes=3, seed=0, test_samples=60)


def _pipeline():
    return (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8)
            >> st.Aggregate(st.WeightedMean()) >> st.Evaluate())


def _dashboard(run) -> Dashboard:
    return next(cb for cb in run.callbacks if isinstance(cb, Dashboard))


def _get_json(url: str, want_round: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=5) as r:
            out = json.loads(r.read())
        if out.get("round") == want_round or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


class Chromium:
    """Headless Chromium driven through the DevTools protocol (tornado's websocket client)."""

    def __init__(self, width: int = 1400, height: int = 1900) -> None:
        self.profile = tempfile.mkdtemp(prefix="fl-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as r:
            pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
        self.ws_url = pages[0]["webSocketDebuggerUrl"]

    async def session(self, url: str, probe: str, ok, timeout: float, shot: Path) -> dict:
        """Open ``url``, evaluate ``probe`` (JSON text) until ``ok(value)``, then save a screenshot."""
        from tornado.websocket import websocket_connect

        ws = await websocket_connect(self.ws_url, max_message_size=64 * 2**20)
        ids = iter(range(1, 10**6))

        async def call(method: str, **params):
            i = next(ids)
            await ws.write_message(json.dumps({"id": i, "method": method, "params": params}))
            while True:
                msg = await asyncio.wait_for(ws.read_message(), timeout=10)
                assert msg is not None, "DevTools connection closed"
                data = json.loads(msg)
                if data.get("id") == i:
                    assert "error" not in data, data
                    return data["result"]

        try:
            await call("Page.enable")
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            value: dict = {}
            while time.monotonic() < deadline:
                res = await call("Runtime.evaluate", expression=probe, returnByValue=True)
                text = res.get("result", {}).get("value")
                value = json.loads(text) if text else {}
                if ok(value):
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # let the canvas paint the last data
            img = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            import base64

            shot.parent.mkdir(parents=True, exist_ok=True)
            shot.write_bytes(base64.b64decode(img["data"]))
            return value
        finally:
            ws.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


PROBE = """JSON.stringify((() => {
  const d = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
  if (!d) return {};
  const s = d.get_model_by_name('fl-status'), src = d.get_model_by_name('fl-rounds');
  const n = (k) => (src && src.data[k]) ? Array.from(src.data[k]).filter(v => !Number.isNaN(v)).length : 0;
  return {status: s ? s.text : '', loss: n('loss'), accuracy: n('accuracy'), rounds: n('round'),
          lines: ['line-round-loss', 'line-round-accuracy', 'line-round-bytes_up', 'line-round-round_time']
                   .filter(x => d.get_model_by_name(x) !== null)};
})())"""


def _color_pixels(png: Path, rgb: tuple[int, int, int], tol: int = 12) -> int:
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    return int((np.abs(img - np.array(rgb, dtype=np.int16)).max(axis=-1) <= tol).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install -y chromium)")
def test_page_in_headless_chromium_shows_round_and_curves(capfd):
    pytest.importorskip("PIL")
    with fg.Run(_pipeline(), model=fg.models.mlp(8, [16], 3), data=_data(), seed=0, workers=1,
                progress=True) as run:
        run.fit(rounds=4)
        link = _dashboard(run).link
        assert link.endswith("/flgraph") and link.startswith("http://127.0.0.1:")
        err = capfd.readouterr().err
        assert f"flgraph: FL dashboard at {link}" in err  # linked from the progress output
        assert _get_json(link + ".json", 4)["round"] == 4
        browser = Chromium()
        try:
            shot = ARTIFACTS / "fl_dashboard.png"
            value = asyncio.run(browser.session(
                link, PROBE, lambda v: "Round 4 of 4" in v.get("status", "") and v.get("loss") == 4
                and v.get("accuracy") == 4 and len(v.get("lines", [])) == 4, timeout=30, shot=shot))
        finally:
            browser.close()
    assert "Round 4 of 4" in value["status"], value
    assert "clients selected <b>4</b>, done <b>4</b>" in value["status"]
    assert value["loss"] == 4 and value["accuracy"] == 4 and value["rounds"] == 4
    assert len(value["lines"]) == 4, value
    # the curves are drawn: the loss line's red and the accuracy line's green are on the screenshot
    assert shot.stat().st_size > 20_000
    assert _color_pixels(shot, (0xD6, 0x27, 0x28)) > 150
    assert _color_pixels(shot, (0x2C, 0xA0, 0x2C)) > 150


def test_remote_scheduler_serves_the_page_and_groups_tasks_by_stage(tmp_path):
    env = dict(os.environ)
    sched_file = tmp_path / "scheduler.json"
    bindir = Path(sys.executable).parent
    sched = subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                              "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    worker = None
    try:
        deadline = time.monotonic() + 30
        while not sched_file.exists() or not sched_file.read_text().strip():
            assert time.monotonic() < deadline and sched.poll() is None, "dask scheduler did not start"
            time.sleep(0.05)
        time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        worker = subprocess.Popen([str(bindir / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                                   "--host", "127.0.0.1", "--no-dashboard"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        with fg.Run(_pipeline(), model=fg.models.mlp(8, [16], 3), data=_data(), seed=0, cluster=address,
                    workers=1, connect_timeout=30, progress=False) as run:
            run.fit(rounds=2)
            link = _dashboard(run).link
            assert link.startswith("http://127.0.0.1:") and link.endswith("/flgraph")
            summary = _get_json(link + ".json", 2)
            assert summary["token"] == run.token and summary["round"] == 2 and summary["status"] == "done"
            assert summary["clients"] == {"selected": 4, "done": 4, "dropped": 0, "stale": 0}
            assert summary["loss"] == pytest.approx(run.history.last("loss"))
            with urllib.request.urlopen(link, timeout=10) as r:
                page = r.read().decode()
            assert r.status == 200 and "Dask Diagnostic UI" in page and 'href="flgraph"' in page
            with urllib.request.urlopen(link.replace("/flgraph", "/status"), timeout=10) as r:
                assert 'href="flgraph"' in r.read().decode()  # in the navbar of Dask's own pages
            prefixes = run._handle.client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
            assert "local-train" in prefixes, prefixes
            # the round's params are Dask data only without the data plane (workers on another machine);
            # on this machine they travel over the plane, published under the same broadcast-r... key
            assert ("broadcast" in prefixes) == (run._transport._accel is None), prefixes
    finally:
        for p in (worker, sched):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)


def test_a_scheduler_without_dashboard_does_not_stop_the_run(caplog):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster, set_as_default=False) as client:
        with caplog.at_level(logging.WARNING, logger="flgraph"), fg.Run(
                _pipeline(), model=fg.models.mlp(8, [16], 3), data=_data(), seed=0, cluster=client,
                progress=False) as run:
            history = run.fit(rounds=2)
        assert len(history) == 2 and history.last("round") == 2
        assert any("FL dashboard page could not be set up" in r.getMessage() for r in caplog.records)
        assert _dashboard(run).link == ""


def test_two_runs_share_the_plugin_and_the_page_shows_the_latest(client2):
    links = []
    tokens = []
    for _ in range(2):
        with fg.Run(_pipeline(), model=fg.models.mlp(8, [16], 3), data=_data(), seed=0, cluster=client2,
                    progress=False) as run:
            run.fit(rounds=1)
            links.append(_dashboard(run).link)
            tokens.append(run.token)
    assert links[0] == links[1]
    assert _get_json(links[1] + ".json", 1)["token"] == tokens[1]
    names = client2.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins))
    assert names.count("flgraph-dashboard") == 1
