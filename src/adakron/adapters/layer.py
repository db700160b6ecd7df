"""Wrappers that hold named adapters (and task heads) around frozen modules of a model.

Both keep the original module (``base_layer`` / ``original_module``), so the model's own code runs
unchanged and the adapters can be switched off or removed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._pytree import tree_map

# Per-row routing: (adapter name or None for the bare model, indices of the rows that use it).
RowGroups = list[tuple[str | None, torch.Tensor]]
HALF = (torch.float16, torch.bfloat16)


class AdaKronLayer(nn.Module):
    """``y = base_layer(x); y + adapter(y)`` for the active adapter (or per row, see ``row_groups``)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adakron_adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.row_groups: RowGroups | None = None

    # Modeling code sometimes reads the wrapped layer's weight (e.g. T5 checks its dtype).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return y
        if self.row_groups is not None:
            return self._mixed_forward(y)
        if self.active_adapter is None or self.active_adapter not in self.adakron_adapters:
            return y
        return y + self._update(self.active_adapter, y)

    def _update(self, name: str, y: torch.Tensor) -> torch.Tensor:
        adapter = self.adakron_adapters[name]
        dtype = adapter.adakron_up.weight.dtype
        if y.dtype == dtype:
            return adapter(y)
        # Adapters are kept in fp32 on a half-precision backbone: compute in theirs, return in ours.
        return adapter(y.to(dtype)).to(y.dtype)

    def _mixed_forward(self, y: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(y)
        for name, rows in self.row_groups:
            if name is not None and name in self.adakron_adapters:
                delta[rows] = self._update(name, y[rows])
        return y + delta


class TaskHeads(nn.Module):
    """One copy of a task head per adapter; the original head stays as it was, for the bare model."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.heads = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.row_groups: RowGroups | None = None

    def add(self, name: str, num_labels: int, model_num_labels: int, initializer_range: float,
            makes_labels: bool = True) -> None:
        """A trainable copy of the head for adapter ``name``; ``makes_labels``: this part of the head produces
        the logits (not, e.g., a pooler before it), so its label projection gets ``num_labels`` outputs."""
        head = copy.deepcopy(self.original_module)
        if makes_labels and num_labels != model_num_labels:
            head = _resized(head, model_num_labels, num_labels, initializer_range)
        head.requires_grad_(False)
        for tensor in [*head.parameters(), *head.buffers()]:
            if tensor.dtype in HALF:  # the copy trains in fp32 on a half-precision backbone
                tensor.data = tensor.data.float()
        self.heads[name] = head

    def _module_for(self, name: str | None) -> nn.Module:
        if name is None or self.disabled or name not in self.heads:
            return self.original_module
        return self.heads[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_groups is None:
            return self._run(self._module_for(self.active_adapter), x, *args, **kwargs)
        # Heads may differ in width (STS-B 1, MNLI 3): pad the last dim to the widest, callers slice.
        parts = [(rows, self._run(self._module_for(name), x[rows], *args, **kwargs)) for name, rows in self.row_groups]
        width = max(out.shape[-1] for _, out in parts)
        first = parts[0][1]
        merged = first.new_zeros((x.shape[0], *first.shape[1:-1], width))
        for rows, out in parts:
            merged[rows, ..., : out.shape[-1]] = out
        return merged

    @staticmethod
    def _run(head: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dtype = next((p.dtype for p in head.parameters() if p.is_floating_point()), x.dtype)
        if x.dtype == dtype or x.dtype not in HALF:
            return head(x, *args, **kwargs)

        # An fp32 copy on a half-precision backbone: half-precision tensors go in as fp32 and come out as they came.
        def cast(to, source):
            return lambda t: t.to(to) if isinstance(t, torch.Tensor) and t.dtype == source else t

        args, kwargs = tree_map(cast(dtype, x.dtype), (args, kwargs))
        return tree_map(cast(x.dtype, dtype), head(x.to(dtype), *args, **kwargs))


def label_projection(head: nn.Module) -> tuple[str, nn.Linear] | None:
    """The Linear that produces the labels: the last Linear of the head by position (BERT's ``classifier`` is
    one, RoBERTa's ``classifier.out_proj`` ends its head), whatever its width."""
    linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _resized(head: nn.Module, old: int, new: int, initializer_range: float) -> nn.Module:
    """The head with its label projection (of ``old`` outputs) replaced by a fresh one of ``new`` outputs."""
    found = label_projection(head)
    if found is None or found[1].out_features != old:
        raise ValueError(f"the head has no label projection of {old} outputs to resize")
    path, last = found
    fresh = nn.Linear(last.in_features, new, bias=last.bias is not None, device=last.weight.device,
                      dtype=last.weight.dtype)
    with torch.no_grad():
        fresh.weight.normal_(0.0, initializer_range)
        if fresh.bias is not None:
            fresh.bias.zero_()
    if not path:  # the head is that Linear
        return fresh
    parent_path, _, child = path.rpartition(".")
    setattr(head.get_submodule(parent_path), child, fresh)
    return head
