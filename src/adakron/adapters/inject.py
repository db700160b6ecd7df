"""Adding adapters to a transformers model in place, removing them, and counting what trains."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .config import AdaKronConfig
from .kron import KronAdapter, default_initializer_range
from .layer import AdaKronLayer, TaskHeads, label_projection
from .state import STATE_ATTR, AdapterState, adakron_layers, adapter_names, set_active_adapter, state_of, task_heads
from .targets import WRAPPABLE, candidate_names, default_patterns, matches, output_width, reads_pooler

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


def find_sites(model: nn.Module, config: AdaKronConfig, heads: list[str]) -> list[str]:
    """Names of the modules the config targets; raises, listing candidates, if there are none."""
    if config.target_modules is not None:
        patterns: list[Any] = [config.target_modules]
    else:
        patterns = default_patterns(getattr(model.config, "model_type", None), config.placement)
    # Nothing inside a wrapper (its adapters, its original) or inside a task head is a site.
    skip = tuple(h + "." for h in heads)
    sites = []
    for name, module in model.named_modules():
        if name.startswith(skip) or name in heads:
            continue
        if isinstance(module, (AdaKronLayer, TaskHeads)):
            skip += (name + ".",)
        if isinstance(module, (AdaKronLayer, *WRAPPABLE)) and any(matches(name, p) for p in patterns):
            sites.append(name)
    if not sites:
        raise ValueError(
            f"target_modules {config.target_modules or patterns!r} matched no Linear/Conv1D module. "
            f"Candidates: {', '.join(candidate_names(model))}"
        )
    return sites


def head_names(model: nn.Module, config: AdaKronConfig) -> list[str]:
    """The task head: given, or every top-level module outside the base model that owns its own parameters
    (BERT `classifier`, DeBERTa `pooler`+`classifier`, GPT-2/LLaMA `score`; a tied LM head is not one), plus
    the base model's pooler when the head reads it (BERT, ALBERT)."""
    if config.head_modules is not None:
        modules = dict(model.named_modules())
        missing = [h for h in config.head_modules if not h or h not in modules]
        if missing:
            candidates = sorted(n for n in modules if n and "." not in n) + [p for p in [pooler_path(model)] if p]
            raise ValueError(f"head_modules {missing} are not modules of this model; choose from {candidates}.")
        return list(config.head_modules)
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    base_params = {id(p) for p in base.parameters()}
    own = [
        name for name, module in model.named_children()
        if module is not base and any(id(p) not in base_params for p in module.parameters())
    ]
    pooler = pooler_path(model)
    return [pooler, *own] if pooler and own else own


def pooler_path(model: nn.Module) -> str | None:
    """Where the base model's pooler (a dense layer + tanh over the first token) sits, if the head reads it.

    It belongs to the task head: RoBERTa, ELECTRA and DeBERTa heads carry that layer themselves and train it,
    and some checkpoints ship it untrained (all-MiniLM-L6-v2's is random: frozen, AdaKron and LoRA barely
    learned STS-B in 300 steps, see benchmarks/pooler_probe.py and RESULTS.md)."""
    base = getattr(model, "base_model", model)
    pooler = getattr(base, "pooler", None)
    if base is model or not isinstance(pooler, nn.Module) or next(pooler.parameters(), None) is None \
            or not reads_pooler(model):
        return None
    return next(name for name, module in model.named_modules() if module is pooler)


def _base_num_labels(model: nn.Module) -> int:
    return getattr(model, "num_labels", None) or getattr(model.config, "num_labels", 2)


def resolve_labels(config: AdaKronConfig, base_labels: dict[str, Any]) -> AdaKronConfig:
    """Fill in num_labels, label_names and problem_type from the bare model where the config leaves them open."""
    num_labels = config.num_labels or (len(config.label_names) if config.label_names else base_labels["num_labels"])
    names = config.label_names
    if names is None:
        id2label = base_labels["id2label"]
        names = tuple(str(id2label.get(i, f"LABEL_{i}")) if len(id2label) == num_labels else f"LABEL_{i}"
                      for i in range(num_labels))
    problem_type = config.problem_type or ("regression" if num_labels == 1 else "single_label_classification")
    return config.replace(num_labels=num_labels, label_names=names, problem_type=problem_type)


def add_adapter(model: nn.Module, config: AdaKronConfig | None = None, name: str = "default") -> nn.Module:
    """Add an AdaKron adapter (and its own copy of the task head) to ``model`` in place; returns the model.

    The backbone is frozen; the new adapter and its head train and become active. Every check runs
    before the model is touched, so a failed call leaves it as it was.
    """
    config = config or AdaKronConfig()
    if not isinstance(config, AdaKronConfig):  # peft users may pass a dict, or another library's config
        raise TypeError(f"config must be an AdaKronConfig, not {type(config).__name__}; for a dict d, pass "
                        "AdaKronConfig.from_dict(d)")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"Adapter name {name!r} must be letters, digits, '_' or '-', e.g. 'rte'.")
    if name in adapter_names(model):
        raise ValueError(f"An adapter named {name!r} already exists; remove_adapter it first or pick another name.")
    heads = head_names(model, config)
    sites = find_sites(model, config, heads)
    state = getattr(model, STATE_ATTR, None)
    # Once adapters exist, the model's label settings follow the active one: the bare model's are in state.
    base_labels = state.base_labels if state else _label_settings(model)
    config = resolve_labels(config, base_labels).replace(head_modules=tuple(heads))
    base_num_labels = base_labels["num_labels"]
    # The logits come from the last part of the head that is not the base model's pooler (which feeds it).
    pooler = pooler_path(model)
    label_head = next((h for h in reversed(heads) if h != pooler), None)
    if config.num_labels != base_num_labels:
        found = label_projection(_original_head(model.get_submodule(label_head))) if label_head else None
        if found is None or found[1].out_features != base_num_labels:
            raise ValueError(f"Cannot give this model's head {config.num_labels} outputs: {label_head or heads} "
                             f"does not end in a Linear of {base_num_labels} outputs. Build the model with "
                             f"num_labels={config.num_labels} instead.")
    init_range = config.initializer_range or default_initializer_range(model.config)

    if state is None:
        state = AdapterState(
            original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
            base_labels=base_labels,
        )
        setattr(model, STATE_ATTR, state)
    for site in sites:
        layer = _wrap(model, site, AdaKronLayer)
        base = layer.base_layer
        layer.adakron_adapters[name] = KronAdapter(output_width(base), config, init_range).to(
            device=base.weight.device, dtype=_adapter_dtype(base))
    for head in heads:
        _wrap(model, head, TaskHeads).add(name, config.num_labels, base_num_labels, init_range,
                                          makes_labels=head == label_head)
    state.configs[name] = config
    state.sites[name] = sites
    set_trainable(model, name)
    set_active_adapter(model, name)
    return model


def _original_head(module: nn.Module) -> nn.Module:
    return module.original_module if isinstance(module, TaskHeads) else module


def _adapter_dtype(base: nn.Module):
    # Half-precision backbones keep fp32 adapters: they train, and small updates survive.
    return base.weight.dtype if base.weight.dtype.is_floating_point and base.weight.element_size() >= 4 else None


def _label_settings(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    return {
        "num_labels": _base_num_labels(model),
        "id2label": dict(getattr(cfg, "id2label", {}) or {}),
        "label2id": dict(getattr(cfg, "label2id", {}) or {}),
        "problem_type": getattr(cfg, "problem_type", None),
    }


def _wrap(model: nn.Module, path: str, wrapper: type[nn.Module]) -> Any:
    module = model.get_submodule(path)
    if isinstance(module, wrapper):
        return module
    wrapped = wrapper(module)
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, wrapped)
    return wrapped


def set_trainable(model: nn.Module, name: str) -> None:
    """Freeze everything, then let adapter ``name`` and its head train."""
    if name not in state_of(model).configs:
        raise ValueError(f"No adapter named {name!r}; adapters: {adapter_names(model)}.")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in adakron_layers(model):
        if name in module.adakron_adapters:
            module.adakron_adapters[name].requires_grad_(True)
    for module in task_heads(model):
        if name in module.heads:
            module.heads[name].requires_grad_(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors count once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_parameters(model: nn.Module, name: str) -> int:
    """Parameters of adapter ``name`` alone (no head)."""
    return sum(
        p.numel() for layer in adakron_layers(model) if name in layer.adakron_adapters
        for p in layer.adakron_adapters[name].parameters()
    )


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` and its head. Wrappers left empty give their original module back, and
    removing the last adapter is ``unload``: the model is as it was before any adapter."""
    state = state_of(model)
    if name not in state.configs:
        raise ValueError(f"No adapter named {name!r}; adapters: {adapter_names(model)}.")
    if len(state.configs) == 1:
        unload(model)
        return
    for layer in adakron_layers(model):
        if name in layer.adakron_adapters:
            del layer.adakron_adapters[name]
    for heads in task_heads(model):
        if name in heads.heads:
            del heads.heads[name]
    _unwrap(model, lambda m: (isinstance(m, AdaKronLayer) and not len(m.adakron_adapters))
            or (isinstance(m, TaskHeads) and not len(m.heads)))
    del state.configs[name]
    del state.sites[name]
    if state.active == name:
        set_active_adapter(model, next(iter(state.configs)))


def _unwrap(model: nn.Module, which) -> None:
    """Put back the original module of every AdaKronLayer/TaskHeads for which ``which`` holds."""
    for path, module in list(model.named_modules()):
        if isinstance(module, (AdaKronLayer, TaskHeads)) and which(module):
            original = module.base_layer if isinstance(module, AdaKronLayer) else module.original_module
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, original)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and head copy, putting the original modules back exactly as they were."""
    state = state_of(model)
    set_active_adapter(model, None)
    _unwrap(model, lambda module: True)
    for n, p in model.named_parameters():
        p.requires_grad_(state.original_requires_grad.get(n, p.requires_grad))
    delattr(model, STATE_ATTR)
    return model
