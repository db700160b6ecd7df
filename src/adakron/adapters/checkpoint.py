"""Adapter checkpoints: adapter_config.json + adapter_model.safetensors, adapter and head weights only."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as dump_safetensors
from torch import nn

from .._version import __version__
from .config import FORMAT_VERSION, METADATA_KEYS, AdaKronConfig
from .experts import merge_experts as merge
from .experts import merged_config
from .inject import add_adapter, find_sites, head_names, remove_adapter
from .kron import KronAdapter
from .layer import AdaKronLayer, TaskHeads
from .targets import output_width
from .state import STATE_ATTR, adapter_names, set_active_adapter, state_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be loaded onto this model; the model is left unchanged."""


def adapter_state_dict(model: nn.Module, name: str, merged: bool = False) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights and its head's, keyed by module path without the adapter name; ``merged``:
    as the adapter would be after merge_experts (MAdaKron), without changing it."""
    tensors = {}
    for path, owned in _owned_modules(model, name):
        for key, tensor in _saved(owned, merged).items():
            tensors[f"{path}.{key}"] = tensor
    return tensors


def _saved(owned: nn.Module, merged: bool = False) -> dict[str, torch.Tensor]:
    """A module of an adapter as its file holds it (AdaKron's u and v as one matrix)."""
    return owned.saved_state_dict(merged) if isinstance(owned, KronAdapter) else owned.state_dict()


def _owned_modules(model: nn.Module, name: str):
    """(module path, module) of adapter ``name``'s adapters and head, the modules its checkpoint holds."""
    for path, module in model.named_modules():
        if isinstance(module, AdaKronLayer) and name in module.adakron_adapters:
            yield path, module.adakron_adapters[name]
        elif isinstance(module, TaskHeads) and name in module.heads:
            yield path, module.heads[name]


def _load_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copies checked tensors, in the file's layout, into adapter ``name`` through each module's load_state_dict
    (which splits AdaKron's fused down matrix into u and v)."""
    for path, owned in _owned_modules(model, name):
        owned.load_state_dict({key: tensors[f"{path}.{key}"] for key in _saved(owned)})


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None,
                 merge_experts: bool = False) -> Path:
    """Write adapter ``name`` (default: the active one) and its head to ``directory``.

    A MAdaKron adapter is written with its experts (to go on training), or with ``merge_experts=True`` as the
    plain AdaKron adapter they average to (to serve); the model itself is not changed.

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written
    file under the final name; the config records the weights' sha256, so a mismatched pair is caught.
    """
    state = state_of(model)
    name = name or state.active
    if name not in state.configs:
        raise ValueError(f"No adapter named {name!r} to save; adapters: {adapter_names(model)}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = merged_config(state.configs[name]) if merge_experts else state.configs[name]
    tensors = {k: v.detach().to("cpu").contiguous().clone()
               for k, v in adapter_state_dict(model, name, merged=merge_experts).items()}
    payload = dump_safetensors(tensors, metadata={"format": "pt", "adakron_format_version": str(FORMAT_VERSION)})
    metadata = {
        "format_version": FORMAT_VERSION,
        "adakron_version": __version__,
        "base_model_name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
        "model_type": getattr(model.config, "model_type", None),
        "architecture": type(model).__name__,
        "adapter_name": name,
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
    }
    config_text = json.dumps({**config.to_dict(), **metadata}, indent=2, sort_keys=True)
    _atomic_write(directory / WEIGHTS_NAME, payload)
    _atomic_write(directory / CONFIG_NAME, config_text.encode())
    return directory


def _one_line(error: Exception, limit: int = 300) -> str:
    """An error's message on one line, cut to ``limit`` characters: it may quote whatever the file held."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_adapter(directory: str | os.PathLike) -> tuple[AdaKronConfig, dict, dict[str, torch.Tensor]]:
    """Read and verify an adapter directory: (config, metadata, tensors). Raises AdapterLoadError."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterLoadError(f"{path} does not exist; an adapter directory holds {CONFIG_NAME} and "
                                   f"{WEIGHTS_NAME} (written by adakron.save_adapter).")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{config_path} is not valid JSON ({e}).") from None
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{config_path} must hold a JSON object.")
    if "peft_type" in raw:
        raise AdapterLoadError(f"{directory} holds a PEFT ({raw['peft_type']}) adapter, not an AdaKron one; load it "
                               "with peft.PeftModel.from_pretrained")
    version = raw.get("format_version")
    if version is None:
        raise AdapterLoadError(f"{config_path} is not an AdaKron adapter config (it has no format_version).")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterLoadError(f"{config_path} has format_version {version!r}; this adakron ({__version__}) reads "
                               f"up to {FORMAT_VERSION}. Upgrade adakron to load it.")
    payload = weights_path.read_bytes()
    expected = raw.get("weights_sha256")
    if expected and hashlib.sha256(payload).hexdigest() != expected:
        raise AdapterLoadError(f"{weights_path} is corrupted or truncated: its sha256 does not match the one "
                               f"recorded in {CONFIG_NAME}.")
    try:
        tensors = load_safetensors(payload)
    except SafetensorError as e:
        raise AdapterLoadError(f"{weights_path} is not a readable safetensors file ({_one_line(e)}).") from None
    try:
        config = AdaKronConfig.from_dict({k: v for k, v in raw.items() if k not in METADATA_KEYS})
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"{config_path}: {_one_line(e)}") from None
    return config, {k: raw[k] for k in METADATA_KEYS if k in raw}, tensors


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None,
                 is_trainable: bool = False, merge_experts: bool = False) -> str:
    """Add the adapter saved in ``directory`` to ``model`` under ``name`` (default: the name it was saved
    under); returns the name. Every key and shape must match, else AdapterLoadError is raised and the
    model is left as it was. A MAdaKron adapter saved with its experts loads with them, or merged into a
    plain AdaKron adapter with ``merge_experts=True`` (what serving wants)."""
    config, metadata, tensors = read_adapter(directory)
    model_type = getattr(model.config, "model_type", None)
    if metadata.get("model_type") and model_type and metadata["model_type"] != model_type:
        raise AdapterLoadError(f"{directory} was trained on a {metadata['model_type']!r} model; this model is "
                               f"{model_type!r}. Load it onto the base model it was trained with.")
    name = name or metadata.get("adapter_name") or "default"
    if name in adapter_names(model):
        raise AdapterLoadError(f"The model already has an adapter named {name!r}; pass another name=.")
    _check_sizes(model, config, tensors, directory)
    had_adapters = getattr(model, STATE_ATTR, None) is not None
    previous = state_of(model).active if had_adapters else None
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    try:
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the caller's RNG
            add_adapter(model, config, name)
    except ValueError as e:
        raise AdapterLoadError(f"{directory} does not fit this model: {e}") from None
    expected = adapter_state_dict(model, name)
    problem = _mismatch(expected, tensors)
    if problem:
        _rollback(model, name, had_adapters, previous)
        _restore_requires_grad(model, requires_grad)
        raise AdapterLoadError(f"{directory} does not fit this model (different width, depth or type?): {problem}")
    _load_tensors(model, name, tensors)
    if merge_experts:
        merge(model, name)
    if not is_trainable:
        # A loaded adapter is for inference: it stays frozen, the backbone too (as add_adapter left it),
        # and adapters that trained before still do.
        _restore_requires_grad(model, requires_grad if had_adapters else {})
    return name


def _check_sizes(model: nn.Module, config: AdaKronConfig, tensors: dict[str, torch.Tensor], directory) -> None:
    """Compare the adapter the config describes with the tensors in the file before anything is allocated: a
    config edited to absurd sizes (rank 10^9, a million experts or labels) is refused, not built."""
    try:
        sites = find_sites(model, config, head_names(model, config))
    except (ValueError, TypeError) as e:
        raise AdapterLoadError(f"{directory} does not fit this model: {e}") from None
    if config.num_experts > len(tensors):  # each expert is a tensor of its own in the file
        raise AdapterLoadError(f"{directory}: num_experts {config.num_experts} is more than the file's "
                               f"{len(tensors)} tensors could hold")
    stored = sum(t.numel() for t in tensors.values())
    if (config.num_labels or 0) > stored:
        raise AdapterLoadError(f"{directory}: num_labels {config.num_labels} is more than the file's "
                               f"{stored} numbers could hold")
    expected = {}
    for site in sites:
        base = model.get_submodule(site)
        base = base.base_layer if isinstance(base, AdaKronLayer) else base
        with torch.device("meta"):  # shapes only: nothing is allocated
            probe = KronAdapter(output_width(base), config)
        expected.update({f"{site}.{key}": tensor for key, tensor in probe.saved_state_dict().items()})
    problem = _mismatch(expected, {k: v for k, v in tensors.items() if ".adakron_" in k})
    if problem:
        raise AdapterLoadError(f"{directory} does not fit this model (different width, depth or type?): {problem}")


def _restore_requires_grad(model: nn.Module, requires_grad: dict[int, bool]) -> None:
    for p in model.parameters():
        p.requires_grad_(requires_grad.get(id(p), False))


def _mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if expected[k].shape != found[k].shape)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint {tuple(found[k].shape)}, "
                     f"model {tuple(expected[k].shape)})")
    return "; ".join(parts)


def _rollback(model: nn.Module, name: str, had_adapters: bool, previous: str | None) -> None:
    remove_adapter(model, name)  # the last adapter's removal is unload: the model as it was
    if had_adapters:
        set_active_adapter(model, previous)
