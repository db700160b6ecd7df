"""What speed.py trains: the backbones, each method applied to one, and a Trainee holding one method's model and
optimizer across steps. Every measurement module builds its models here, so all of them compare the same things.

Methods: ``gate`` (the cheapest per-site change, see Gate), ``adakron`` (rank 16, kron_factor 4), ``adapter``
(kron_factor 1), ``lora`` (peft r=8, alpha=16, dropout 0.1, as ``adakron train``) and ``full``.

Models: the embedded all-MiniLM-L6-v2 and randomly initialised configs (no download): BERT-base-sized and tiny
2-label classifiers, and causal LMs (a SmolLM2-135M-sized LLaMA, and a tiny one) trained with the LM loss."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import torch
import transformers
from torch import nn

import adakron
from adakron import AdaKronConfig

METHODS = ("gate", "adakron", "adapter", "lora", "full")
# Measured on request (--methods ...,madakron): MAdaKron in training, Partial, 4 experts; it serves merged, as
# AdaKron exactly (same modules, same checkpoint), so its inference is AdaKron's.
EXTRA_METHODS = ("madakron",)
MADAKRON_EXPERTS = 4
RANK, KRON_FACTOR, LORA_R, LORA_ALPHA = 16, 4, 8, 16
LR = 1e-4
MIB = 1024 * 1024
BERT_SIZES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=1000, max_position_embeddings=128),
}
# SmolLM2-135M's shape (tied embeddings, as there, so the LM head is no extra trained module): 134.5M parameters.
LLAMA_SIZES = {
    "llama-smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3),
    "tiny-llama": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
}
MODELS = ("minilm", *BERT_SIZES, *LLAMA_SIZES)
COMPILE_MODES = ("layers", "model")


def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the tables (and the memory child's JSON line)."""
    print(message, file=sys.stderr, flush=True)


def backbone(name: str, seed: int = 0) -> nn.Module:
    """A fresh model: a 2-label sequence classifier, or a causal LM for the LLaMA configs; random weights are
    seeded, so equal across copies."""
    torch.manual_seed(seed)
    if name == "minilm":
        from adakron.models import load_classifier

        return load_classifier(None, 2)
    if name in LLAMA_SIZES:
        # use_cache=False: a training step needs no KV cache, and building one costs time and memory.
        config = transformers.LlamaConfig(tie_word_embeddings=True, use_cache=False, **LLAMA_SIZES[name])
        return transformers.AutoModelForCausalLM.from_config(config)
    if name not in BERT_SIZES:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    config = transformers.BertConfig(num_labels=2, **BERT_SIZES[name])
    return transformers.AutoModelForSequenceClassification.from_config(config)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model is scored with the causal-LM loss (labels = the input ids) rather than 2-way labels."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a peft wrapper
    return type(base).__name__.endswith("ForCausalLM")


class Gate(nn.Module):
    """The cheapest per-site trainable change: ``y = base_layer(x) * scale`` with a trainable d-vector."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        from adakron.adapters.targets import output_width

        weight = base_layer.weight
        self.scale = nn.Parameter(torch.ones(output_width(base_layer), device=weight.device, dtype=weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        return y * self.scale.to(y.dtype)


def add_gates(model: nn.Module) -> nn.Module:
    """Wrap exactly the modules AdaKron would wrap (its own site finder) in Gate; freeze all but gates and head."""
    from adakron.adapters.inject import find_sites, head_names

    config = AdaKronConfig(rank=RANK, kron_factor=KRON_FACTOR)
    heads = head_names(model, config)
    sites = find_sites(model, config, heads)
    for p in model.parameters():
        p.requires_grad_(False)
    for site in sites:
        parent, _, child = site.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, Gate(getattr(owner, child)))
    for head in heads:
        model.get_submodule(head).requires_grad_(True)
    return model


def with_method(model: nn.Module, method: str) -> nn.Module:
    if method == "gate":
        return add_gates(model)
    if method == "lora" and is_causal_lm(model):
        # apply_method's LoRA is a sequence classifier's; a causal LM gets peft's own defaults for its family
        # (q_proj and v_proj for LLaMA), with the same r, alpha and dropout.
        from peft import LoraConfig, TaskType, get_peft_model

        return get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=LORA_R, lora_alpha=LORA_ALPHA,
                                                lora_dropout=0.1))
    from adakron.training.trainer import TrainArgs, apply_method

    experts = MADAKRON_EXPERTS if method == "madakron" else 1
    return apply_method(model, "adakron" if method == "madakron" else method, TrainArgs(
        rank=RANK, kron_factor=KRON_FACTOR, lora_r=LORA_R, lora_alpha=LORA_ALPHA, num_experts=experts))


def vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def random_batch(model: nn.Module, batch_size: int, seq_len: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab_size(model) // 2)  # past BERT's special and unused ids
    ids = torch.randint(low, vocab_size(model), (batch_size, seq_len), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": (ids.clone() if is_causal_lm(model) else torch.randint(0, 2, (batch_size,), generator=g)).to(device),
    }


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers (BERT ``encoder.layer``, LLaMA ``model.layers``): the ModuleList that holds
    the most parameters, found the same way through any wrapper (peft's, AdaKron's)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise SystemExit(f"--compile layers: {type(model).__name__} has no ModuleList of layers; use --compile model")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def compile_model(model: nn.Module, mode: str | None, backend: str = "inductor") -> nn.Module:
    """torch.compile in place: ``layers`` compiles each transformer layer (identical layers share one compiled
    graph, so compilation costs about one layer's, and an adapter inside a layer is fused with it), ``model`` the
    whole forward (one graph per model, so compile time grows with depth)."""
    if not mode:
        return model
    import torch._dynamo

    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, limit):
            # Every method's layers and eval/no_grad variants are entries of one code object's cache: past the
            # default 8, later ones would run eager, with one warning in the log.
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
            break
    if mode == "layers":
        for block in repeated_blocks(model):
            block.compile(backend=backend)
    elif mode == "model":
        model.compile(backend=backend)
    else:
        raise SystemExit(f"unknown --compile {mode!r}; choose from {', '.join(COMPILE_MODES)}")
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


OPTIMIZER = (f"torch.optim.AdamW(lr={LR}): adakron, madakron and adapter over adakron.parameter_groups (their default "
             "recipe's per-factor lrs, as adakron train), the others over their trainable parameters")


def optimizer_groups(model: nn.Module, method: str, params: list) -> list[dict]:
    """What `adakron train` gives AdamW: for the adapter methods its per-factor groups (the default recipe's lr
    ratios and weight decay), so their cost is in every step measured; one group for the others."""
    if method not in ("adakron", "madakron", "adapter"):
        return [{"params": params, "lr": LR}]
    from adakron.training.recipes import TrainArgs, adapter_recipe

    recipe = adapter_recipe("default", method="adapter" if method == "adapter" else "adakron")
    return adakron.parameter_groups(model, LR, TrainArgs().weight_decay, recipe.down_lr_ratio, recipe.up_lr_ratio)


class Trainee:
    """One method's model and AdamW optimizer (trainable parameters only), kept alive across steps."""

    def __init__(self, model_name: str, method: str, args):
        self.method = method
        self.model = with_method(backbone(model_name, args.seed), method).to(args.device).train()
        compile_model(self.model, getattr(args, "compile", None), getattr(args, "compile_backend", "inductor"))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable, self.total = adakron.trainable_parameters(self.model)
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, method, self.params))
        self.device, self.bf16 = args.device, args.bf16

    def autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)

    def step(self, batch: dict) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def timed_step(self, batch: dict) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.step(batch)
        sync(self.device)
        return time.perf_counter() - start
