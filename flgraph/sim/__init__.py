"""Simulation of devices: speeds, bandwidths and availability on a virtual clock.

Example:
    >>> from flgraph.sim import DevicePopulation
    >>> len(DevicePopulation.lognormal(range(10), seed=0))
    10
"""

from .devices import DevicePopulation, DeviceProfile

__all__ = ["DevicePopulation", "DeviceProfile"]
