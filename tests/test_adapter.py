import torch
import torch.nn.functional as F

from adakron import AdaKronConfig
from adakron.adapters.kron import KronAdapter
from adakron.adapters.layer import AdaKronLayer


def _adapter(rank=16, kron_factor=4, width=24, init="reference"):
    torch.manual_seed(0)
    adapter = KronAdapter(width, AdaKronConfig(rank=rank, kron_factor=kron_factor, init=init), initializer_range=0.5)
    with torch.no_grad():  # non-zero biases so that they are checked too
        adapter.adakron_down.bias.normal_()
        adapter.adakron_up.bias.normal_()
    return adapter


def test_down_projections_run_as_one_matmul_of_width_f_plus_r_over_f():
    adapter = _adapter(rank=16, kron_factor=4, width=24)
    assert adapter.adakron_down.weight.shape == (4 + 4, 24)
    assert adapter.adakron_up.weight.shape == (24, 16)
    assert _adapter(rank=48, kron_factor=4).adakron_down.weight.shape == (4 + 12, 24)


def test_kronecker_step_matches_torch_kron_per_token_with_outer_factor_first():
    adapter = _adapter(rank=48, kron_factor=4)
    h = torch.randn(2, 5, 24)
    down = adapter.adakron_down(h)
    u, v = down[..., :4], down[..., 4:]  # the kron_factor-wide factor is the outer index
    expected_k = torch.stack([torch.kron(u[b, t], v[b, t]) for b in range(2) for t in range(5)]).view(2, 5, 48)
    expected = F.linear(F.gelu(expected_k), adapter.adakron_up.weight, adapter.adakron_up.bias)
    torch.testing.assert_close(adapter(h), expected, atol=1e-6, rtol=0)


def test_layer_output_is_h_plus_adapter_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 24)
    layer = AdaKronLayer(base)
    layer.adakron_adapters["a"] = _adapter()
    layer.active_adapter = "a"
    x = torch.randn(3, 10)
    h = base(x)
    a = layer.adakron_adapters["a"]
    k = torch.stack([torch.kron(F.linear(h[i], a.adakron_down.weight[:4], a.adakron_down.bias[:4]),
                                F.linear(h[i], a.adakron_down.weight[4:], a.adakron_down.bias[4:])) for i in range(3)])
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
    for linear in (adapter.adakron_down, adapter.adakron_up):
        assert torch.count_nonzero(linear.bias) == 0
        assert abs(linear.weight.std().item() - 0.02) < 0.002
    assert adapter.adakron_up.weight.abs().sum() > 0  # not the identity at step 0, as the reference


def test_identity_init_zeroes_the_up_projection():
    adapter = KronAdapter(24, AdaKronConfig(init="identity"))
    assert torch.count_nonzero(adapter(torch.randn(3, 24))) == 0
    h = torch.randn(3, 24)
    adapter(h).sum().backward()
    assert adapter.adakron_up.weight.grad.abs().sum() > 0  # a zero up-projection still learns
