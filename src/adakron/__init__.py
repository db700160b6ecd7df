"""AdaKron: Kronecker-product bottleneck adapters for Hugging Face transformers models."""

from ._version import __version__

from .adapters.checkpoint import AdapterLoadError, load_adapter, read_adapter, save_adapter
from .adapters.config import AdaKronConfig
from .adapters.experts import merge_experts
from .adapters.optim import parameter_groups
from .adapters.inject import (
    adapter_names,
    adapter_parameters,
    add_adapter,
    remove_adapter,
    set_trainable,
    trainable_parameters,
    unload,
)
from .adapters.switching import active_adapter, disable_adapters, predict, route_rows, set_active_adapter, use_adapter

__all__ = [
    "AdaKronConfig",
    "AdapterLoadError",
    "__version__",
    "active_adapter",
    "adapter_names",
    "adapter_parameters",
    "add_adapter",
    "disable_adapters",
    "load_adapter",
    "merge_experts",
    "parameter_groups",
    "predict",
    "read_adapter",
    "remove_adapter",
    "route_rows",
    "save_adapter",
    "set_active_adapter",
    "set_trainable",
    "trainable_parameters",
    "unload",
    "use_adapter",
]
