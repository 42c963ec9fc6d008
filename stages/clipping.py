"""Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021, Algorithm 1): the clip norm follows a target quantile of the client update norms.

Each round every client clips its update at the current ``C`` and reports ``b_i = 1`` when its update's
norm was at most ``C`` (:class:`~flgraph.stages.ClipUpdate` writes ``clip_bit``); a reducer of its own sums
the bits, :class:`AdaptiveClip` adds ``N(0, sigma_b^2)`` to the centred sum ``sum(b_i - 1/2)``
(sensitivity 1/2), estimates the unclipped fraction ``b = (noisy sum) / m + 1/2`` (``m``: the expected
clients per round) and steps ``C <- C exp(-eta_C (b - gamma))``: geometric updates, so ``C`` reaches the
right order of magnitude from any start. ``gamma`` is the target quantile, ``eta_C`` the clip learning rate,
``sigma_b`` defaults to ``m / 20`` (the paper's choice). The clip norm is the stage's checkpointed state,
broadcast to the clients as ``clip_norm``.

The round is::

    Select >> Broadcast("params", "clip_norm") >> LocalTrain >> ClipUpdate()
           >> {"update": DPAggregate(z), "clip_bit": Aggregate(Mean())} >> AdaptiveClip(...)

Example:
    >>> from flgraph import stages as st
    >>> ac = st.AdaptiveClip(0.1, target_quantile=0.5, lr=0.2)
    >>> sorted(ac.reads()), sorted(ac.keeps), ac.count_noise_for(100.0)
    (['aggregate:clip_bit'], ['clip_norm'], 5.0)
    >>> round(float(ac.step(1.0, unclipped=0.9)), 4)  # too few updates clipped: C shrinks
    0.9231
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from flgraph.context import RoundContext
from flgraph.errors import ConfigError
from flgraph.graph import ServerStage
from flgraph.params import Params

from .dp_noise import fresh_key, gaussian, insecure_key, key_array, key_bytes, warn_insecure

__all__ = ["AdaptiveClip"]


class AdaptiveClip(ServerStage):
    """Keep the clip norm ``clip_norm`` at the ``target_quantile`` of the client update norms (Andrew et al.).

    Put it after the reducer of ``clip_bit``. ``initial``: the first round's clip norm; ``lr``: ``eta_C``;
    ``count_noise``: ``sigma_b`` (default: expected clients / 20). Its noise key is secret state like
    :class:`~flgraph.stages.DPAggregate`'s; ``insecure_seed=`` is for tests only.
    """

    keeps: ClassVar[frozenset[str]] = frozenset({"clip_norm"})

    def __init__(self, initial: float = 0.1, *, target_quantile: float = 0.5, lr: float = 0.2,
                 count_noise: float | None = None, insecure_seed: int | None = None) -> None:
        if not initial > 0 or not math.isfinite(initial):
            raise ConfigError(f"AdaptiveClip(initial={initial}): the first clip norm must be positive")
        if not 0 < target_quantile < 1:
            raise ConfigError(f"AdaptiveClip(target_quantile={target_quantile}): must be in (0, 1)",
                              fix="e.g. 0.5 (the median update norm)")
        if not lr > 0 or not math.isfinite(lr):
            raise ConfigError(f"AdaptiveClip(lr={lr}): must be positive", fix="e.g. 0.2 (the paper's eta_C)")
        if count_noise is not None and (not count_noise > 0 or not math.isfinite(count_noise)):
            raise ConfigError(f"AdaptiveClip(count_noise={count_noise}): must be positive",
                              fix="drop it for the paper's expected_clients / 20")
        if insecure_seed is not None:
            warn_insecure("AdaptiveClip", insecure_seed)
        self.initial = initial
        self.target_quantile = target_quantile
        self.lr = lr
        self.count_noise = count_noise
        self.insecure_seed = insecure_seed
        self._expected = 0.0

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in super().settings().items() if v is not None}

    def reads(self) -> frozenset[str]:
        return frozenset({"aggregate:clip_bit"})

    def writes(self) -> frozenset[str]:
        return frozenset({"clip_norm"})

    def count_noise_for(self, expected_clients: float) -> float:
        """``sigma_b``: ``count_noise``, or the paper's ``expected_clients / 20``."""
        return float(self.count_noise) if self.count_noise is not None else expected_clients / 20.0

    def prepare(self, dataset: Any, model_source: Any) -> None:
        from .select import Select

        self._expected = 0.0
        for s in getattr(self, "_stages", ()):
            if isinstance(s, Select):
                self._expected = s.rate(dataset.num_clients) * dataset.num_clients

    def see_pipeline(self, stages: tuple[Any, ...]) -> None:
        self._stages = stages

    def init_state(self, params: Params) -> dict[str, Any]:
        key = insecure_key(self.insecure_seed + 1) if self.insecure_seed is not None else fresh_key()
        # the broadcast carries the clip norm next to the params, in their dtype (the value the clients use)
        return {"clip_norm": np.array([self.initial], params.spec.carrier), "noise_key": key_array(key)}

    def step(self, clip: float, unclipped: float) -> float:
        """The geometric update ``C exp(-eta_C (b - gamma))`` from the noised unclipped fraction ``b``."""
        return clip * math.exp(-self.lr * (unclipped - self.target_quantile))

    def run(self, ctx: RoundContext) -> None:
        if not self._expected:
            raise ConfigError("AdaptiveClip needs the round's Select to know the expected clients per round",
                              fix="run it in a pipeline with st.Select(...), inside flgraph.Run")
        got = ctx.aggregates.get("clip_bit")
        if got is None:  # no client's bit was counted (every client failed): the clip norm stays
            return
        mean, count = got
        centred = float(np.asarray(mean, np.float64).reshape(-1)[0]) * count - count / 2.0
        noise = self.count_noise_for(self._expected) * float(gaussian(key_bytes(ctx.state["noise_key"]),
                                                                       "clip_bit", ctx.round, 1)[0])
        unclipped = (centred + noise) / self._expected + 0.5
        clip = ctx.state["clip_norm"]
        new = self.step(float(clip[0]), unclipped)
        ctx.state["clip_norm"] = np.array([new], clip.dtype)  # a new array: the round commits it
        ctx.metrics["dp_clip_norm"] = float(ctx.state["clip_norm"][0])
        ctx.metrics["dp_unclipped_fraction"] = unclipped
