"""Where a client stage trains: ``device="auto"`` (the default) puts it on the workers' GPUs when they have them.

``"auto"`` is settled once per run, before anything trains, from what every worker of the run reports
(:meth:`~flgraph.graph.ClientStage.place`, called by the Dask transport with each worker's CUDA device
count): ``"cuda"`` when every worker has a CUDA device, else ``"cpu"``. One answer for the whole run,
because a client's result depends on the device it trains on (float rounding differs between kernels):
if some workers trained on a GPU and others on the CPU, a client's update would depend on where Dask
happened to run it, and the same seed would not give the same run. A cluster where only some workers have
a GPU trains on the CPU and says so; pass ``device="cuda"`` and start only GPU workers to use them.

An explicit ``"cuda"`` (or ``"cuda:N"``) on a run whose workers lack a CUDA device is refused before the
run starts, naming the workers. Where no transport places the stage (an edge agent trains on its own
hardware), ``"auto"`` is the process's own GPU when it has one.

Example:
    >>> from flgraph.stages.placement import settle
    >>> settle("LocalTrain", "auto", {"tcp://a": 1, "tcp://b": 1})
    'cuda'
    >>> settle("LocalTrain", "auto", {"tcp://a": 0, "tcp://b": 0})
    'cpu'
    >>> settle("LocalTrain", "cpu", {"tcp://a": 2})
    'cpu'
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

import torch

from flgraph.errors import ConfigError

__all__ = ["check_device", "local_device", "settle"]

log = logging.getLogger("flgraph")


def check_device(stage: str, device: object) -> str:
    """``device`` if it is ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; else a ConfigError."""
    if not (isinstance(device, str) and (device in ("auto", "cpu") or device.startswith("cuda"))):
        raise ConfigError(f"{stage}(device={device!r}): use 'auto' (the workers' GPUs when every worker has "
                          "one, else the CPU), 'cpu', or 'cuda' / 'cuda:N'")
    return device


def local_device(device: str) -> str:
    """``device`` with ``"auto"`` settled by this process alone: its GPU when it has one."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def settle(stage: str, device: str, cuda_by_worker: Mapping[str, int]) -> str:
    """The device ``stage`` trains on for the whole run, from each worker's CUDA device count."""
    without = sorted(w for w, n in cuda_by_worker.items() if n <= 0)
    if device.startswith("cuda"):
        if without:
            shown = ", ".join(without[:5]) + (f" and {len(without) - 5} more" if len(without) > 5 else "")
            raise ConfigError(f"{stage}(device={device!r}) but {len(without)} of the run's "
                              f"{len(cuda_by_worker)} workers have no CUDA device ({shown})",
                              fix="start the workers on machines with GPUs (e.g. `dask worker ... --resources "
                                  "GPU=1`), or use device='auto' to train on the CPU where some have none")
        return device
    if device == "cpu":
        return device
    if cuda_by_worker and not without:
        return "cuda"
    if without and len(without) < len(cuda_by_worker):
        msg = (f"{stage}(device='auto') trains on the CPU: {len(without)} of the run's {len(cuda_by_worker)} "
               "workers have no CUDA device, and a client must train alike wherever it runs (the same seed, "
               "the same result). Pass device='cuda' and start only workers with GPUs to use them.")
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.warning(msg)
    return "cpu"
