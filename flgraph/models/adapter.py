"""Bridge between a torch module and flgraph's flat :class:`~flgraph.params.Params`.

:class:`ModelAdapter` is the picklable description of a model (the module as a template and its
:class:`~flgraph.params.ParamSpec`). On a worker, :meth:`ModelAdapter.bound` gives a per-thread
:class:`BoundModel`: a private copy of the module whose parameters and buffers are zero-copy views into
one flat buffer, so loading the global weights is one memcpy and reading the trained weights is free.

Example:
    >>> import torch
    >>> from flgraph.models.adapter import ModelAdapter
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> ad = ModelAdapter.from_module(torch.nn.Linear(3, 2))
    >>> p = ad.initial_params()
    >>> bm = ad.bound("cpu")
    >>> bm.load(p.flat)
    >>> bool(torch.equal(bm.module.weight.detach().reshape(-1), torch.from_numpy(p["weight"]).reshape(-1)))
    True
"""

from __future__ import annotations

import copy
import threading
import uuid
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..params import Params, ParamSpec

__all__ = ["BoundModel", "ModelAdapter"]

# (adapter token, thread id, device) -> that thread's private bound module; emptied by forget(token)
_CACHE: dict[tuple[str, int, str], BoundModel] = {}
_LOCK = threading.Lock()


def _state_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_parameter) for the module's state, in state_dict order, tied tensors once."""
    params = {id(p) for p in module.parameters()}
    out, seen = [], set()
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, t, id(t) in params))
    return out


def _torch_dtype_name(t: torch.Tensor) -> str:
    if t.dtype == torch.bfloat16:
        return "float32"  # numpy has no bfloat16: carried and described as float32, cast back on load
    return str(t.dtype).removeprefix("torch.")


class ModelAdapter:
    """A picklable model description: the module (as a template) and its flat layout.

    Example:
        >>> import torch
        >>> ad = ModelAdapter.from_module(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
        >>> ad.spec.describe()
        '2 tensors, 15 values, float32, 0 KB'
    """

    def __init__(self, template: torch.nn.Module, spec: ParamSpec) -> None:
        self.template = template
        self.spec = spec
        self.token = uuid.uuid4().hex

    @staticmethod
    def from_module(module: torch.nn.Module) -> ModelAdapter:
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(
                f"model must be a torch.nn.Module, got {type(module).__name__}",
                fix="pass an instance, e.g. flgraph.models.mlp(784, [200, 200], 10)",
            )
        template = copy.deepcopy(module).cpu()
        items = [(n, tuple(t.shape), _torch_dtype_name(t)) for n, t, _ in _state_tensors(template)]
        if not items:
            raise ConfigError(f"model {type(module).__name__} has no parameters or buffers to federate")
        return ModelAdapter(template, ParamSpec.from_shapes(items))

    def initial_params(self) -> Params:
        """The template's current weights as flat params."""
        arrays = {n: t.detach().cpu().to(torch.float32 if t.dtype == torch.bfloat16 else t.dtype).numpy()
                  for n, t, _ in _state_tensors(self.template)}
        return Params.pack(self.spec, arrays)

    def bound(self, device: str | torch.device = "cpu") -> BoundModel:
        """This thread's private module bound to a flat buffer (created once per thread and device)."""
        key = (self.token, threading.get_ident(), str(device))
        bm = _CACHE.get(key)
        if bm is None:
            bm = BoundModel(copy.deepcopy(self.template), self.spec, torch.device(device))
            with _LOCK:
                _CACHE[key] = bm
        return bm

    @staticmethod
    def forget(token: str) -> int:
        """Drop every thread's bound copy of the model ``token`` in this process; returns how many."""
        with _LOCK:
            keys = [k for k in _CACHE if k[0] == token]
            for k in keys:
                del _CACHE[k]
        return len(keys)

    def to_module(self, params: Params) -> torch.nn.Module:
        """A new module (a copy of the template) holding ``params``."""
        module = copy.deepcopy(self.template)
        state = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in params.to_arrays().items()}
        full = module.state_dict()
        for n, t in full.items():
            if n in state:
                full[n] = state[n].to(t.dtype)
        module.load_state_dict(full)
        return module

    def __getstate__(self) -> dict[str, Any]:
        return {"template": self.template, "spec": self.spec, "token": self.token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class BoundModel:
    """A module whose tensors are views into one flat buffer (``flat_t``, on ``device``).

    Tensors whose dtype differs from the carrier (int counters, halves) are copied on load and read.
    """

    def __init__(self, module: torch.nn.Module, spec: ParamSpec, device: torch.device) -> None:
        self.module = module.to(device)
        self.modules = list(self.module.modules())  # to check train/eval mode without walking the tree
        self.params = list(self.module.parameters())  # for each client's optimizer, without walking it either
        self.spec = spec
        self.device = device
        carrier = getattr(torch, spec.carrier)
        self.flat_t = torch.zeros(spec.size, dtype=carrier, device=device)
        self.flat_np: np.ndarray | None = self.flat_t.numpy() if device.type == "cpu" else None
        self._others: list[tuple[torch.Tensor, int, int]] = []
        self._held: tuple[object, torch.Tensor] | None = None  # global weights kept on the device (load)
        entries = {e.name: e for e in spec.entries}
        for name, t, is_param in _state_tensors(self.module):
            e = entries[name]
            view = self.flat_t[e.offset : e.offset + e.size].view(e.shape)
            if t.dtype == carrier:
                with torch.no_grad():
                    view.copy_(t.detach())
                if is_param:
                    t.data = view
                else:
                    owner, attr = _owner(self.module, name)
                    owner._buffers[attr] = view
            else:
                self._others.append((t, e.offset, e.size))

    def load(self, flat: np.ndarray, key: object = None) -> None:
        """Copy global weights (flat, carrier dtype) into the module: one memcpy plus the casts.

        ``key`` names what ``flat`` holds (e.g. the round and the array): on an accelerator the weights
        stay there between loads with the same key, so the clients of a round cost a copy on the device
        each, not a transfer from the host each.
        """
        if key is not None and self.device.type != "cpu":
            if self._held is None or self._held[0] != key:
                self._held = None  # release the old copy before making the new one
                self._held = (key, torch.from_numpy(flat).to(self.device))
            src = self._held[1]
        else:
            src = torch.from_numpy(flat)
        with torch.no_grad():
            self.flat_t.copy_(src)
            for t, off, size in self._others:
                t.copy_(src[off : off + size].view(t.shape).to(t.dtype))

    def read(self) -> np.ndarray:
        """The module's current weights as a flat numpy array (a view on cpu; don't keep it)."""
        with torch.no_grad():
            for t, off, size in self._others:
                self.flat_t[off : off + size].copy_(t.detach().reshape(-1).to(self.flat_t.dtype))
        if self.flat_np is not None:
            return self.flat_np
        return self.flat_t.cpu().numpy()


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    *path, attr = name.split(".")
    owner = module
    for p in path:
        owner = getattr(owner, p)
    return owner, attr
