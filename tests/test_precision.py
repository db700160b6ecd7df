"""Half precision, torch.compile, gradient checkpointing and CUDA."""

import pytest
import torch
from conftest import tiny_batch, tiny_model
from torch import nn

import adakron
from adakron import AdaKronConfig
from adakron.adapters.layer import TaskHeads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backbone_keeps_fp32_adapters_and_heads_and_its_own_output_dtype(dtype):
    model = tiny_model("bert").to(dtype)
    adakron.add_adapter(model, AdaKronConfig(init="reference", initializer_range=0.3))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".heads." in n for n in trained)  # the classifier and pooler copies
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model.bert.encoder.layer[0].output.dense.base_layer.weight.dtype == dtype
    model.train()
    out = model(**tiny_batch(), labels=torch.tensor([0, 1, 0]))
    assert out.logits.dtype == dtype
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_half_precision_identity_adapter_keeps_base_logits_up_to_bf16_rounding():
    model = tiny_model("bert").to(torch.bfloat16)
    batch = tiny_batch()
    base = model(**batch).logits
    adakron.add_adapter(model, AdaKronConfig(init="identity"))
    adapted = model(**batch).logits
    assert adapted.dtype == torch.bfloat16
    torch.testing.assert_close(adapted, base)  # the head copies compute in fp32, then round back


def test_torch_compile_matches_eager_forward_and_backward():
    model = adakron.add_adapter(tiny_model("bert"), AdaKronConfig(init="reference", initializer_range=0.3)).train()
    model.config.hidden_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch, labels = tiny_batch(), torch.tensor([0, 1, 1])
    eager = model(**batch, labels=labels)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    out = compiled(**batch, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager_grads[n])


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    def grads(checkpointing):
        model = adakron.add_adapter(tiny_model("bert"), AdaKronConfig(init="reference", initializer_range=0.3)).train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**tiny_batch(), labels=torch.tensor([0, 1, 1])).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert set(plain) == set(checkpointed)
    for name in plain:
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], plain[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_adapters_live_on_the_backbones_device():
    model = tiny_model("bert").cuda()
    adakron.add_adapter(model)
    assert all(p.is_cuda for p in model.parameters())
    batch = {k: v.cuda() for k, v in tiny_batch().items()}
    assert model(**batch).logits.is_cuda


def test_fp32_head_copy_takes_half_precision_arguments_buffers_and_tuple_outputs():
    class Head(nn.Module):  # a head with running statistics, an extra tensor argument and two outputs
        def __init__(self):
            super().__init__()
            self.norm, self.proj = nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x, shift):
            logits = self.proj(self.norm(x)) + shift
            return logits, logits.sum(-1)

    heads = TaskHeads(Head().to(torch.bfloat16)).eval()
    heads.add("a", num_labels=2, model_num_labels=2, initializer_range=0.02)
    heads.active_adapter = "a"
    copy = heads.heads["a"]
    assert all(t.dtype == torch.float32 for t in [*copy.parameters(), *copy.buffers()] if t.is_floating_point())
    logits, total = heads(torch.randn(3, 4, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16))
    assert logits.dtype == total.dtype == torch.bfloat16
