"""What the decoder-LLM benchmark (llm.py) trains: the backbone (SmolLM2-135M-Instruct, or a tiny random LLaMA
for --quick), each method applied to it, the optimizer and schedule, and the recipe each result records.

Every number of the AdaKron recipe (init, outer bias, the factors' lr ratios, lr, warm-up, weight decay) is read
from the library when a run starts, never copied here: a recipe study changes the library's defaults, and a
result must say which recipe it ran under (``recipe_record``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

# AdaKron r=16 on the default targets (every mlp.down_proj). SmolLM2 ties its LM head to the embeddings, so no
# head trains: head_modules=() for AdaKron and the plain adapter, as LoRA trains no head either.
RANK = 16
# peft's usual causal-LM LoRA: r=8, alpha=16, dropout 0.05 on the attention's query and value projections.
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
# transformers.Trainer's default clipping, which `adakron train` (built on Trainer) applies too.
MAX_GRAD_NORM = 1.0
SEED = 42  # the methods' new weights, dropout and the training batches: the same for every method


def library_recipe() -> dict:
    """The library's current default recipe: the adapter recipe `adakron train` uses by default and the lr,
    warm-up ratio and weight decay it uses on a user's own data (one lr for AdaKron, the adapter and LoRA)."""
    from adakron.training.recipes import CAUSAL_LM_RECIPE, TrainArgs, adapter_recipe

    defaults = TrainArgs()
    return {"adapter_recipe": dataclasses.asdict(adapter_recipe("default", causal_lm=True)), "lr": CAUSAL_LM_RECIPE.lr,
            "warmup_ratio": defaults.warmup_ratio, "weight_decay": defaults.weight_decay}


def adapter_config(method: str):
    """AdaKron r=16 (kron_factor from the library default) or the plain adapter (kron_factor=1), with the
    default adapter recipe, training no head."""
    from adakron.training.recipes import TrainArgs, adakron_config, adapter_recipe

    recipe = adapter_recipe("default", causal_lm=True)  # what `adakron train` uses on a causal LM
    args = TrainArgs(method=method, rank=RANK, init=recipe.init, outer_bias=recipe.outer_bias)
    return adakron_config(args, method).replace(head_modules=())


def tiny_lm(seed: int = 0):
    """(model, tokenizer) for --quick: a byte-level BPE tokenizer trained on the spot with SmolLM2's ChatML chat
    template and end-of-turn token, and a randomly initialised 2-layer LLaMA with a tied LM head. Milliseconds to
    build, no file or network needed; the same seed gives the same model in every process."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["is the sentiment of this movie review positive or negative ? answer with one word .",
              "review : a gorgeous , witty , seductive movie", "user assistant system", "write a short story"] * 3
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                                     pad_token="<|pad|>")
    tokenizer.chat_template = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval(), tokenizer


def load(quick: bool):
    """A fresh (model, tokenizer): each method changes its model in place, so every run loads its own. The
    tokenizer pads on the right for training and scoring (generation pads on the left itself)."""
    if quick:
        model, tokenizer = tiny_lm()
    else:
        from adakron.models import load_causal_lm

        model, tokenizer = load_causal_lm("smollm2")
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


def with_method(model, method: str, seed: int):
    """The model ready to train with ``method`` (``base``: nothing trains); the seed fixes the new weights."""
    torch.manual_seed(seed)
    if method in ("adakron", "adapter"):
        import adakron

        return adakron.add_adapter(model, adapter_config(method))
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        return get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, **LORA))
    model.requires_grad_(method == "full")
    return model


def method_record(method: str) -> dict:
    """What the method is, for the result file: the adapter's full config, or LoRA's settings."""
    if method in ("adakron", "adapter"):
        return {"adapter_config": adapter_config(method).to_dict()}
    if method == "lora":
        return {"lora": dict(LORA, task_type="CAUSAL_LM")}
    return {}


def recipe_record(recipe: dict, lr: float, steps: int, batch_size: int) -> dict:
    """The recipe a trained run ran under, as its result file records it."""
    return {**recipe, "library_default_lr": recipe["lr"], "lr": lr, "steps": steps, "batch_size": batch_size,
            "warmup_steps": warmup_steps(recipe, steps),
            "optimizer": "torch.optim.AdamW over adakron.parameter_groups (no decay on biases and norms)",
            "schedule": "linear decay to 0 after a linear warm-up", "max_grad_norm": MAX_GRAD_NORM}


def warmup_steps(recipe: dict, steps: int) -> int:
    return math.ceil(recipe["warmup_ratio"] * steps)


def optimizer_and_schedule(model, recipe: dict, lr: float, steps: int):
    """AdamW over ``adakron.parameter_groups`` for every method: its factor ratios move only AdaKron's
    down/up-projections, and every method gets the same weight-decay rule."""
    from transformers import get_linear_schedule_with_warmup

    import adakron

    ratios = recipe["adapter_recipe"]
    groups = adakron.parameter_groups(model, lr, recipe["weight_decay"], ratios["down_lr_ratio"],
                                      ratios["up_lr_ratio"])
    optimizer = torch.optim.AdamW(groups)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup_steps(recipe, steps), steps)


def train_step(model, optimizer, schedule, batch: dict) -> float:
    """One step on the completion-token loss (labels are -100 on prompt and padding); returns the loss."""
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def parameters(model) -> dict:
    import adakron

    trainable, total = adakron.trainable_parameters(model)
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total}
