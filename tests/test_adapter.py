import pytest
import torch
import torch.nn.functional as F

from adakron import AdaKronConfig
from adakron.adapters.kron import KronAdapter
from adakron.adapters.layer import AdaKronLayer


def _adapter(rank=16, kron_factor=4, width=24, init="reference"):
    torch.manual_seed(0)
    adapter = KronAdapter(width, AdaKronConfig(rank=rank, kron_factor=kron_factor, init=init), initializer_range=0.5)
    with torch.no_grad():  # non-zero biases so that they are checked too
        for linear in adapter.modules():
            if isinstance(linear, torch.nn.Linear):
                linear.bias.normal_()
    return adapter


def test_u_and_v_are_projections_of_their_own_of_widths_f_and_r_over_f():
    adapter = _adapter(rank=16, kron_factor=4, width=24)
    assert adapter.adakron_down_outer.weight.shape == (4, 24)
    assert adapter.adakron_down_inner.weight.shape == (4, 24)
    assert adapter.adakron_up.weight.shape == (24, 16)
    assert _adapter(rank=48, kron_factor=4).adakron_down_inner.weight.shape == (12, 24)


def test_u_and_v_run_as_one_matmul(monkeypatch):
    adapter, h = _adapter(rank=48, kron_factor=4), torch.randn(2, 5, 24)
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: calls.append(tuple(w.shape)) or linear(x, w, b))
    adapter(h)
    assert calls == [(4 + 12, 24), (24, 48)]  # down (u and v together), then up


def test_a_file_holds_u_and_v_as_one_matrix_outer_rows_first_and_either_layout_loads():
    adapter = _adapter(rank=16, kron_factor=4)
    saved = adapter.saved_state_dict()
    assert sorted(saved) == ["adakron_down.bias", "adakron_down.weight", "adakron_up.bias", "adakron_up.weight"]
    assert torch.equal(saved["adakron_down.weight"][:4], adapter.adakron_down_outer.weight)
    assert torch.equal(saved["adakron_down.bias"][4:], adapter.adakron_down_inner.bias)
    h = torch.randn(3, 24)
    for state in (saved, adapter.state_dict()):
        fresh = _adapter(rank=16, kron_factor=4, init="identity")
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh(h), adapter(h), atol=0, rtol=0)


def test_a_state_dict_holds_the_parameters_themselves_as_torch_promises():
    """In-place users of a state dict (an EMA of the weights, in-place loaders) write into the module."""
    adapter = _adapter(rank=16, kron_factor=4)
    state = adapter.state_dict(keep_vars=True)
    assert state["adakron_down_outer.weight"] is adapter.adakron_down_outer.weight
    adapter.state_dict()["adakron_down_inner.bias"].fill_(3.0)
    assert torch.all(adapter.adakron_down_inner.bias == 3.0)


def test_a_fused_matrix_of_another_size_is_a_size_mismatch_even_when_not_strict():
    """The Trainer reloads with strict=False: a wrong down matrix must fail there too, not be skipped."""
    other = _adapter(rank=16, kron_factor=2).saved_state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for adakron_down.weight: the checkpoint has 10 rows"):
        _adapter(rank=16, kron_factor=4).load_state_dict(other, strict=False)


def test_a_seed_draws_the_same_weights_as_when_u_and_v_were_one_module():
    torch.manual_seed(0)
    fused = torch.nn.Linear(24, 4 + 4)
    torch.nn.Linear(16, 24)  # the up-projection's module is built before any weight is drawn
    expected = torch.empty(8, 24).normal_(0.0, 0.5)
    torch.manual_seed(0)
    adapter = KronAdapter(24, AdaKronConfig(rank=16, kron_factor=4, init="reference"), initializer_range=0.5)
    del fused
    torch.testing.assert_close(adapter.merged_down()[0], expected, atol=0, rtol=0)


def test_kronecker_step_matches_torch_kron_per_token_with_outer_factor_first():
    adapter = _adapter(rank=48, kron_factor=4)
    h = torch.randn(2, 5, 24)
    u, v = adapter.adakron_down_outer(h), adapter.adakron_down_inner(h)  # the kron_factor-wide u is the outer index
    expected_k = torch.stack([torch.kron(u[b, t], v[b, t]) for b in range(2) for t in range(5)]).view(2, 5, 48)
    expected = F.linear(F.gelu(expected_k), adapter.adakron_up.weight, adapter.adakron_up.bias)
    torch.testing.assert_close(adapter(h), expected, atol=1e-6, rtol=1e-5)  # u, v apart: other rounding


def test_layer_output_is_h_plus_adapter_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 24)
    layer = AdaKronLayer(base)
    layer.adakron_adapters["a"] = _adapter()
    layer.active_adapter = "a"
    x = torch.randn(3, 10)
    h = base(x)
    a = layer.adakron_adapters["a"]
    u, v = a.adakron_down_outer, a.adakron_down_inner
    k = torch.stack([torch.kron(F.linear(h[i], u.weight, u.bias), F.linear(h[i], v.weight, v.bias)) for i in range(3)])
    expected = h + F.linear(F.gelu(k), a.adakron_up.weight) + a.adakron_up.bias
    torch.testing.assert_close(layer(x), expected)


def test_plain_adapter_is_the_one_factor_case():
    adapter = _adapter(rank=16, kron_factor=1)
    h = torch.randn(4, 24)
    assert adapter.adakron_down.weight.shape == (16, 24)
    expected = adapter.adakron_up(F.gelu(adapter.adakron_down(h)))
    torch.testing.assert_close(adapter(h), expected)


def test_reference_init_is_normal_weights_and_zero_biases():
    torch.manual_seed(0)
    adapter = KronAdapter(384, AdaKronConfig(rank=16, init="reference", outer_bias=0.0), initializer_range=0.02)
    for linear in (adapter.adakron_down_outer, adapter.adakron_down_inner, adapter.adakron_up):
        assert torch.count_nonzero(linear.bias) == 0
        assert abs(linear.weight.std().item() - 0.02) < 0.002
    assert adapter.adakron_up.weight.abs().sum() > 0  # not the identity at step 0, as the reference


def test_identity_init_zeroes_the_up_projection():
    adapter = KronAdapter(24, AdaKronConfig(init="identity"))
    assert torch.count_nonzero(adapter(torch.randn(3, 24))) == 0
    h = torch.randn(3, 24)
    adapter(h).sum().backward()
    assert adapter.adakron_up.weight.grad.abs().sum() > 0  # a zero up-projection still learns
