"""Unit tests for flgraph.models.adapter: ModelAdapter and BoundModel on real torch modules."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
import torch
from torch import nn

import flgraph as fg
from flgraph.errors import ConfigError
from flgraph.models.adapter import BoundModel, ModelAdapter
from flgraph.params import Params


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class Tied(nn.Module):
    """Input embedding and output projection share one Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def _bn_net() -> BNNet:
    """A BNNet whose running statistics and counter are not the defaults."""
    torch.manual_seed(0)
    m = BNNet()
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 4) * 3 + 1)
    m.bn.num_batches_tracked.fill_(5)
    return m


def _same_storage(t: torch.Tensor, flat_t: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == flat_t.untyped_storage().data_ptr()


def _flat_of(module: nn.Module, adapter: ModelAdapter) -> np.ndarray:
    """The module's state packed by an independent route (state_dict -> numpy -> pack)."""
    sd = module.state_dict()
    return Params.pack(adapter.spec, {n: sd[n].cpu().numpy() for n in adapter.spec.names}).flat


# --------------------------------------------------------------------------- spec / initial params


def test_bn_spec_lists_params_and_buffers_with_their_dtypes():
    ad = ModelAdapter.from_module(_bn_net())
    assert ad.spec.names == ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "bn.running_mean",
                             "bn.running_var", "bn.num_batches_tracked", "fc2.weight", "fc2.bias"]
    assert ad.spec.entry("bn.num_batches_tracked").dtype == "int64"
    assert ad.spec.entry("bn.num_batches_tracked").shape == ()
    assert ad.spec.carrier == "float32"
    assert ad.spec.size == 24 + 6 + 6 + 6 + 6 + 6 + 1 + 18 + 3


def test_initial_params_equal_the_state_dict():
    m = _bn_net()
    ad = ModelAdapter.from_module(m)
    arrays = ad.initial_params().to_arrays()
    sd = m.state_dict()
    assert list(arrays) == list(sd)
    for name, t in sd.items():
        assert arrays[name].dtype == t.numpy().dtype, name
        assert np.array_equal(arrays[name], t.numpy()), name
    assert int(arrays["bn.num_batches_tracked"]) == 5
    assert not np.allclose(arrays["bn.running_mean"], 0.0)


def test_from_module_takes_a_copy():
    m = _bn_net()
    ad = ModelAdapter.from_module(m)
    before = ad.initial_params().flat.copy()
    with torch.no_grad():
        m.fc1.weight.fill_(123.0)
    assert np.array_equal(ad.initial_params().flat, before)
    assert ad.template is not m


def test_tied_weights_are_carried_once():
    torch.manual_seed(1)
    m = Tied()
    ad = ModelAdapter.from_module(m)
    assert "head.weight" not in ad.spec.names
    assert ad.spec.names == ["emb.weight", "mid.weight", "mid.bias"]
    assert ad.spec.size == 28 + 16 + 4
    p = ad.initial_params()
    assert np.array_equal(p["emb.weight"], m.head.weight.detach().numpy())


def test_float64_model_uses_a_float64_carrier():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ad = ModelAdapter.from_module(m)
    assert ad.spec.carrier == "float64"
    assert {e.dtype for e in ad.spec.entries} == {"float64"}
    p = ad.initial_params()
    assert p.flat.dtype == np.float64
    for name, t in m.state_dict().items():
        assert p[name].tobytes() == t.numpy().tobytes()


def test_from_module_refuses_non_modules_and_empty_modules():
    with pytest.raises(ConfigError, match=r"model must be a torch\.nn\.Module, got dict") as ei:
        ModelAdapter.from_module({"w": torch.zeros(2)})  # type: ignore[arg-type]
    assert ei.value.fix
    with pytest.raises(ConfigError, match="model ReLU has no parameters or buffers"):
        ModelAdapter.from_module(nn.ReLU())


def test_adapter_pickles_with_its_token_and_template():
    ad = ModelAdapter.from_module(_bn_net())
    ad2 = pickle.loads(pickle.dumps(ad))
    assert ad2.token == ad.token and ad2.spec == ad.spec
    assert np.array_equal(ad2.initial_params().flat, ad.initial_params().flat)
    assert ModelAdapter.from_module(_bn_net()).token != ad.token


def test_describe_of_a_reference_model():
    ad = ModelAdapter.from_module(fg.models.mlp(784, [200, 200], 10, seed=0))
    assert ad.spec.describe() == "6 tensors, 199,210 values, float32, 797 KB"


# --------------------------------------------------------------------------- BoundModel views


def test_bound_tensors_are_views_of_the_flat_buffer():
    ad = ModelAdapter.from_module(_bn_net())
    bm = BoundModel(copy.deepcopy(ad.template), ad.spec, torch.device("cpu"))
    m = bm.module
    for t in [m.fc1.weight, m.fc1.bias, m.bn.weight, m.bn.running_mean, m.bn.running_var, m.fc2.weight]:
        assert _same_storage(t, bm.flat_t)
    assert isinstance(m.fc1.weight, nn.Parameter) and m.fc1.weight.requires_grad
    assert not _same_storage(m.bn.num_batches_tracked, bm.flat_t)  # int64: copied, not a view
    assert np.shares_memory(bm.flat_np, bm.flat_t.numpy())


def test_writing_flat_changes_the_module_and_vice_versa():
    ad = ModelAdapter.from_module(_bn_net())
    bm = BoundModel(copy.deepcopy(ad.template), ad.spec, torch.device("cpu"))
    m = bm.module
    e = ad.spec.entry("fc2.bias")
    bm.flat_np[e.offset : e.offset + e.size] = [1.0, 2.0, 3.0]
    assert m.fc2.bias.detach().tolist() == [1.0, 2.0, 3.0]
    rm = ad.spec.entry("bn.running_mean")
    bm.flat_t[rm.offset : rm.offset + rm.size] = 4.5
    assert torch.equal(m.bn.running_mean, torch.full((6,), 4.5))
    with torch.no_grad():
        m.fc1.weight.mul_(0).add_(7.0)
    w = ad.spec.entry("fc1.weight")
    assert np.all(bm.read()[w.offset : w.offset + w.size] == 7.0)


def test_load_copies_everything_once_and_keeps_the_views():
    m = _bn_net()
    ad = ModelAdapter.from_module(m)
    bm = ad.bound("cpu")
    rng = np.random.default_rng(0)
    arrays = {n: rng.standard_normal(a.shape).astype(a.dtype) for n, a in ad.initial_params().to_arrays().items()}
    arrays["bn.running_var"] = np.abs(arrays["bn.running_var"]) + 0.5
    arrays["bn.num_batches_tracked"] = np.array(77, np.int64)
    p = Params.pack(ad.spec, arrays)
    ptr = bm.flat_t.data_ptr()
    bm.load(p.flat)
    assert bm.flat_t.data_ptr() == ptr, "load copies into the existing buffer"
    assert _same_storage(bm.module.fc1.weight, bm.flat_t), "parameters are still views after load"
    sd = bm.module.state_dict()
    for name, a in arrays.items():
        assert sd[name].dtype == torch.from_numpy(a).dtype, name
        assert np.array_equal(sd[name].numpy(), a), name
    assert not np.shares_memory(bm.flat_np, p.flat)
    p.flat[:] = 0.0  # the caller's buffer is not used afterwards
    assert np.array_equal(bm.module.fc2.bias.detach().numpy(), arrays["fc2.bias"])
    assert int(bm.module.bn.num_batches_tracked) == 77
    # the template is untouched
    assert np.array_equal(_flat_of(ad.template, ad), ad.initial_params().flat)
    assert int(ad.template.bn.num_batches_tracked) == 5


def test_read_reflects_optimizer_steps_and_buffer_updates():
    ad = ModelAdapter.from_module(_bn_net())
    bm = ad.bound("cpu")
    p0 = ad.initial_params()
    bm.load(p0.flat)
    m = bm.module
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(3)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(m(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
        opt.step()
    flat = bm.read()
    assert np.shares_memory(flat, bm.flat_np), "on cpu read() is a view"
    assert np.array_equal(flat, _flat_of(m, ad))
    for name in ad.spec.names:
        if name == "fc1.bias":  # a bias right before BatchNorm gets a zero gradient
            continue
        changed = not np.array_equal(Params(ad.spec, flat)[name], p0[name])
        assert changed, f"{name} should have moved"
    nbt = ad.spec.entry("bn.num_batches_tracked")
    assert flat[nbt.offset] == 5 + 2


def test_to_module_yields_identical_weights_and_dtypes():
    ad = ModelAdapter.from_module(_bn_net())
    rng = np.random.default_rng(1)
    arrays = {n: rng.standard_normal(a.shape).astype(a.dtype) for n, a in ad.initial_params().to_arrays().items()}
    arrays["bn.running_var"] = np.abs(arrays["bn.running_var"]) + 0.5
    arrays["bn.num_batches_tracked"] = np.array(2**20, np.int64)
    p = Params.pack(ad.spec, arrays)
    m = ad.to_module(p)
    assert m is not ad.template and isinstance(m, BNNet)
    sd = m.state_dict()
    ref = ad.template.state_dict()
    for name, t in sd.items():
        assert t.dtype == ref[name].dtype, name
        assert np.array_equal(t.numpy(), arrays[name]), name
    assert int(m.bn.num_batches_tracked) == 2**20
    # and it computes what the bound model computes
    bm = ad.bound("cpu")
    bm.load(p.flat)
    m.eval()
    bm.module.eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        out = m(x)
        assert torch.isfinite(out).all()
        assert torch.equal(out, bm.module(x))


def test_tied_weights_stay_tied_in_bound_and_copied_modules():
    torch.manual_seed(4)
    ad = ModelAdapter.from_module(Tied())
    bm = ad.bound("cpu")
    m = bm.module
    assert m.head.weight is m.emb.weight
    assert _same_storage(m.head.weight, bm.flat_t)
    p = ad.initial_params()
    p["emb.weight"][...] = np.arange(28, dtype=np.float32).reshape(7, 4)
    bm.load(p.flat)
    assert torch.equal(m.head.weight.detach(), torch.arange(28.0).reshape(7, 4))
    # a step through both uses of the tied weight lands in the one carried tensor
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    nn.functional.cross_entropy(m(torch.tensor([0, 3, 6])), torch.tensor([1, 2, 3])).backward()
    opt.step()
    e = ad.spec.entry("emb.weight")
    assert np.array_equal(bm.read()[e.offset : e.offset + e.size].reshape(7, 4), m.head.weight.detach().numpy())
    m2 = ad.to_module(Params(ad.spec, bm.read().copy()))
    assert m2.head.weight is m2.emb.weight
    assert torch.equal(m2.head.weight, m.head.weight)
    assert torch.equal(m2.mid.weight, m.mid.weight)


def test_float64_bound_model():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ad = ModelAdapter.from_module(m)
    bm = ad.bound("cpu")
    assert bm.flat_t.dtype == torch.float64
    p = ad.initial_params()
    bm.load(p.flat)
    assert all(_same_storage(t, bm.flat_t) for t in bm.module.parameters())
    bm.flat_np[0] = np.pi
    assert bm.module[0].weight.detach().reshape(-1)[0].item() == np.pi
    out = ad.to_module(Params(ad.spec, bm.read().copy()))
    assert all(t.dtype == torch.float64 for t in out.state_dict().values())
    assert out[0].weight.detach().reshape(-1)[0].item() == np.pi


def test_mixed_float32_model_with_a_float64_buffer():
    torch.manual_seed(6)
    m = nn.Linear(3, 2)
    m.register_buffer("scale", torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    ad = ModelAdapter.from_module(m)
    assert ad.spec.carrier == "float64"
    bm = ad.bound("cpu")
    bm.load(ad.initial_params().flat)
    assert bm.module.weight.dtype == torch.float32, "parameters keep their own dtype"
    assert _same_storage(bm.module.scale, bm.flat_t)
    assert bm.module.scale.tolist() == [1 / 3, 2 / 3]
    with torch.no_grad():
        bm.module.weight.fill_(0.5)  # a float32 parameter is a copy; read() brings it back
    w = ad.spec.entry("weight")
    assert np.all(bm.read()[w.offset : w.offset + w.size] == 0.5)


def test_half_model_is_carried_in_float32():
    torch.manual_seed(7)
    m = nn.Linear(3, 2).half()
    ad = ModelAdapter.from_module(m)
    assert ad.spec.carrier == "float32"
    assert {e.dtype for e in ad.spec.entries} == {"float16"}
    p = ad.initial_params()
    bm = ad.bound("cpu")
    bm.load(p.flat)
    assert bm.module.weight.dtype == torch.float16
    assert np.array_equal(bm.module.weight.detach().numpy(), m.weight.detach().numpy())
    with torch.no_grad():
        bm.module.bias.copy_(torch.tensor([0.25, -8.0], dtype=torch.float16))
    b = ad.spec.entry("bias")
    assert bm.read()[b.offset : b.offset + b.size].tolist() == [0.25, -8.0]
    assert ad.to_module(Params(ad.spec, bm.read().copy())).bias.dtype == torch.float16


# --------------------------------------------------------------------------- per-thread cache


def test_bound_is_cached_per_thread_and_adapter():
    ad = ModelAdapter.from_module(_bn_net())
    a = ad.bound("cpu")
    assert ad.bound("cpu") is a
    assert ad.bound() is a
    assert a.module is not ad.template
    other = ModelAdapter.from_module(_bn_net())
    assert other.bound("cpu") is not a

    got: dict[str, object] = {}

    def work() -> None:
        got["first"] = ad.bound("cpu")
        got["second"] = ad.bound("cpu")

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert got["first"] is got["second"], "one BoundModel per thread"
    assert got["first"] is not a, "another thread gets its own BoundModel"
    assert got["first"].module is not a.module  # type: ignore[attr-defined]
    assert not np.shares_memory(got["first"].flat_np, a.flat_np)  # type: ignore[attr-defined]
    assert ad.bound("cpu") is a


def test_a_pickled_adapter_shares_the_threads_bound_model():
    ad = ModelAdapter.from_module(_bn_net())
    ad2 = pickle.loads(pickle.dumps(ad))
    assert ad2.bound("cpu") is ad.bound("cpu")


def test_forget_drops_every_threads_copy():
    import threading

    from flgraph.models.adapter import ModelAdapter

    ad = ModelAdapter.from_module(torch.nn.Linear(2, 2))
    ad.bound("cpu")
    t = threading.Thread(target=ad.bound, args=("cpu",))
    t.start()
    t.join()
    assert ModelAdapter.forget(ad.token) == 2
    assert ModelAdapter.forget(ad.token) == 0
