"""What a training run is: its arguments, the per-task recipes and the adapter recipes, one source for every
default that `adakron train` and the Python API share."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..adapters.config import AdaKronConfig
from ..adapters.optim import (DOWN_LR_MAX, DOWN_LR_RATIO, OUTER_LR_MAX, OUTER_LR_RATIO, REFERENCE_RANK, UP_LR_RATIO,
                              default_rates, outer_ratio, rank_scale)
from ..errors import UsageError

# The shortest --max-length: [CLS] a [SEP] b [SEP] with a token of each text left, and some room.
MIN_MAX_LENGTH = 8

METHODS = ("adakron", "adapter", "lora", "full")
ADAPTERS = ("adakron", "adapter")
# `adakron train`'s settings that only some methods read (the others train as if the flag were not there).
METHOD_FLAGS = {"rank": ADAPTERS, "kron_factor": ("adakron",), "recipe": ADAPTERS, "init": ADAPTERS,
                "outer_bias": ADAPTERS, "down_lr_ratio": ADAPTERS, "up_lr_ratio": ADAPTERS,
                "outer_lr_ratio": ("adakron",), "down_lr_max": ADAPTERS, "outer_lr_max": ("adakron",),
                "placement": ADAPTERS,
                "num_experts": ADAPTERS, "experts": ADAPTERS, "consistency_weight": ADAPTERS,
                "lora_r": ("lora",), "lora_alpha": ("lora",)}


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int
    max_length: int
    lr: float | None = None  # for adakron, adapter and lora; None = the method's (default_lr)


# Per-task defaults, sized for a 2-core CPU (the paper runs 20-80 epochs on a GPU); see README.
RECIPES = {
    # CoLA's own lr: at AdaKron's 4e-3 (its choice on MRPC) this 10-epoch schedule stuck at the majority class
    # (Matthews 0.0 at every epoch, seed 42; the GLUE grid's 8 epochs learned); at 2e-3, every other PEFT
    # method's choice, it learned (README, "Measured here").
    "cola": Recipe(10, 32, 64, lr=2e-3),
    "sst2": Recipe(2, 32, 64),
    "mrpc": Recipe(10, 32, 128),
    "qqp": Recipe(1, 32, 128),
    "stsb": Recipe(10, 32, 128),
    "mnli": Recipe(1, 32, 128),
    "qnli": Recipe(1, 32, 128),
    "rte": Recipe(10, 32, 256),
    "wnli": Recipe(5, 32, 128),
}
OWN_DATA_RECIPE = Recipe(5, 32, 128)
# A causal LM on instruction data (e.g. SmolLM2-135M): a step at batch 4 x 256 tokens takes seconds on one CPU core.
CAUSAL_LM_RECIPE = Recipe(1, 4, 256, lr=5e-4)
# Each PEFT method's lr where neither --lr nor the task's recipe sets one: the lr the GLUE grid chose for it on MRPC
# (of 5e-4, 1e-3, 2e-3, 4e-3; benchmarks/RESULTS.md), AdaKron's for its default recipe and for the authors'.
METHOD_LR = {"adakron": 4e-3, "adapter": 2e-3, "lora": 2e-3}
PAPER_LR = 2e-3  # AdaKron with --recipe paper
CAPPED_LR = 2e-3  # AdaKron with --recipe capped: its MRPC scan's choice (at 4e-3 it is the default)
RECIPE_LR = {"paper": PAPER_LR, "capped": CAPPED_LR}  # AdaKron's lr under a recipe other than the default
FULL_LR = 5e-5


def default_lr(method: str, recipe: str, task_recipe: Recipe) -> float:
    """The lr of a run that gives no --lr."""
    if method == "full":
        return FULL_LR
    if task_recipe.lr is not None:
        return task_recipe.lr
    if method == "adakron" and recipe in RECIPE_LR:
        return RECIPE_LR[recipe]
    return METHOD_LR[method]


@dataclass(frozen=True)
class AdapterRecipe:
    """How an AdaKron adapter starts and how fast each of its factors learns (relative to ``--lr``)."""

    init: str
    outer_bias: float
    down_lr_ratio: float
    up_lr_ratio: float
    outer_lr_ratio: float | None = None  # u's rate where it differs from v's; None: down_lr_ratio
    down_lr_max: float | None = None  # caps on v's and u's rates, absolute (optim.parameter_groups); None: none
    outer_lr_max: float | None = None  # u's cap where it differs from v's; None: down_lr_max


_CONFIG_DEFAULTS = {f.name: f.default for f in fields(AdaKronConfig)}
ADAPTER_RECIPES = {
    # The library's defaults, set from benchmarks/recipe.py and the GLUE grid: read from where they are defined. The
    # factor rates are those up to rank 32; adapter_recipe scales them for larger ranks (optim.default_rates).
    "default": AdapterRecipe(_CONFIG_DEFAULTS["init"], _CONFIG_DEFAULTS["outer_bias"], DOWN_LR_RATIO, UP_LR_RATIO,
                             OUTER_LR_RATIO),
    # The authors' code (DetectiveMB/AdaKron): every adapter weight N(0, 0.02), zero biases, one lr.
    "paper": AdapterRecipe("reference", 0.0, 1.0, 1.0),
    # The default's init with its factor rates at lr 4e-3 as caps: u at min(lr, 5e-4), v at min(lr, 2e-3), B at lr
    # (optim.DOWN_LR_MAX, OUTER_LR_MAX; benchmarks/recipe.py's `id-bias1-capped`).
    "capped": AdapterRecipe(_CONFIG_DEFAULTS["init"], _CONFIG_DEFAULTS["outer_bias"], 1.0, UP_LR_RATIO, 1.0,
                            DOWN_LR_MAX, OUTER_LR_MAX),
}
# The recipe study ran on encoders (GLUE) only, so a causal LM keeps what it shipped with: the authors' recipe
# but starting from the base model (B = 0). A random up-projection on SmolLM2's feed-forward outputs, whose values
# reach about 22,500, took an SST-2 batch's loss from 1.01 to 12.4 before any training (benchmarks/llm.py).
CAUSAL_LM_ADAPTER_RECIPE = replace(ADAPTER_RECIPES["paper"], init="identity")
# The study was of AdaKron's three-factor product; the plain adapter (one factor) did well with the authors' recipe
# in the GLUE grid (the best PEFT average there), so that stays its default.
PLAIN_ADAPTER_RECIPE = ADAPTER_RECIPES["paper"]


@dataclass
class TrainArgs:
    """Everything a run depends on; saved in results.json."""

    task: str | None = None
    model: str | None = None
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str = "label"
    task_type: str | None = None  # classification | regression; None = inferred from the labels
    method: str = "adakron"
    rank: int = _CONFIG_DEFAULTS["rank"]
    kron_factor: int = _CONFIG_DEFAULTS["kron_factor"]
    # The adapter recipe: None = from --recipe ("default": AdaKronConfig's and optim's defaults; "paper": the
    # authors' code, i.e. their init and one learning rate for everything).
    recipe: str = "default"
    init: str | None = None
    outer_bias: float | None = None
    down_lr_ratio: float | None = None
    up_lr_ratio: float | None = None
    outer_lr_ratio: float | None = None  # AdaKron's outer factor u; --down-lr-ratio's if given, else the recipe's
    down_lr_max: float | None = None  # caps on the factors' rates (absolute); None: the recipe's
    outer_lr_max: float | None = None  # u's cap; --down-lr-max's if given, else the recipe's
    placement: str = _CONFIG_DEFAULTS["placement"]
    # MAdaKron: experts on the down-projection(s), merged for evaluation and for the saved adapter.
    num_experts: int = _CONFIG_DEFAULTS["num_experts"]
    experts: str = _CONFIG_DEFAULTS["experts"]
    consistency_weight: float = 0.0  # AdaMix's consistency loss between two forward passes (0 = off)
    lora_r: int = 8
    lora_alpha: int = 16
    epochs: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_length: int | None = None
    warmup_ratio: float = 0.06
    weight_decay: float = 0.1
    seed: int = 42
    output_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_steps: int | None = None  # stop after this many optimizer steps (overrides --epochs for the schedule)
    eval_steps: int | None = None  # evaluate (and checkpoint) every N steps instead of every epoch
    pad_to_max_length: bool = False
    # Measured (benchmarks/speed.py --epoch-cost): an SST-2 epoch costs 0.34x of random batches.
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    resume: bool = False
    overwrite: bool = False
    plot: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def adapter_recipe(name: str, causal_lm: bool = False, method: str = "adakron",
                   rank: int = REFERENCE_RANK) -> AdapterRecipe:
    """The adapter recipe ``name`` for an adapter of size ``rank``. In place of the default:
    ``CAUSAL_LM_ADAPTER_RECIPE`` for a causal LM, ``PLAIN_ADAPTER_RECIPE`` for the plain adapter (``--method
    adapter``), and above rank 32 the default's factor rates times 32 / rank (``optim.default_rates``); the capped
    recipe's rates and caps scale the same way. ``capped`` is given as it is to whatever asks for it (it was measured
    on AdaKron and encoders only)."""
    if name not in ADAPTER_RECIPES:
        raise UsageError(f"unknown --recipe {name!r}; choose one of {', '.join(ADAPTER_RECIPES)}")
    if name == "default" and causal_lm:
        return CAUSAL_LM_ADAPTER_RECIPE
    if name == "default" and method == "adapter":
        return PLAIN_ADAPTER_RECIPE
    if name == "default":
        rates = default_rates(rank) if isinstance(rank, int) and rank > 0 else default_rates(REFERENCE_RANK)
        return replace(ADAPTER_RECIPES[name], down_lr_ratio=rates.down, up_lr_ratio=rates.up,
                       outer_lr_ratio=rates.outer)
    if name == "capped" and isinstance(rank, int) and rank > 0:  # rates and caps scale as the default's do
        scale, capped = rank_scale(rank), ADAPTER_RECIPES[name]
        return replace(capped, **{k: getattr(capped, k) * scale for k in ("down_lr_ratio", "up_lr_ratio",
                                                                            "outer_lr_ratio", "down_lr_max",
                                                                            "outer_lr_max")})
    return ADAPTER_RECIPES[name]


def with_recipe(args: TrainArgs, recipe: Recipe, causal_lm: bool = False) -> TrainArgs:
    """Fill what the user left open from the task's recipe, then check every number."""
    # A bad --rank is refused below, with the other numbers; the rates of the reference rank stand in until then.
    adapter_recipe_ = adapter_recipe(args.recipe, causal_lm, args.method, args.rank)
    chosen = dict(
        **{k: getattr(adapter_recipe_, k) if getattr(args, k) is None else getattr(args, k)
           for k in asdict(adapter_recipe_)},
        epochs=recipe.epochs if args.epochs is None else args.epochs,
        lr=default_lr(args.method, args.recipe, recipe) if args.lr is None else args.lr,
        batch_size=recipe.batch_size if args.batch_size is None else args.batch_size,
        max_length=recipe.max_length if args.max_length is None else args.max_length,
    )
    # Where the recipe gives u no rate of its own, u trains at v's.
    recipe_outer = adapter_recipe_.outer_lr_ratio
    chosen["outer_lr_ratio"] = outer_ratio(args.outer_lr_ratio, args.down_lr_ratio,
                                           chosen["down_lr_ratio"] if recipe_outer is None else recipe_outer)
    # u's cap follows the same rule: its own, else a --down-lr-max given alone, else the recipe's.
    recipe_outer_max = adapter_recipe_.outer_lr_max
    chosen["outer_lr_max"] = outer_ratio(args.outer_lr_max, args.down_lr_max,
                                         chosen["down_lr_max"] if recipe_outer_max is None else recipe_outer_max)
    numbers = {**{k: getattr(args, k) for k in ("rank", "kron_factor", "lora_r", "lora_alpha", "max_train_samples",
                                                "max_eval_samples", "eval_steps", "max_steps")},
               **{k: v for k, v in chosen.items() if k not in ("init", "outer_bias")}}
    for key, value in numbers.items():  # inf passes `> 0` and trains to NaN weights: finite too
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--{key.replace('_', '-')} must be a finite positive number, got {value}")
    if not 0 <= args.seed < 2**32:  # numpy's range, which transformers.set_seed seeds too
        raise UsageError(f"--seed must be an integer from 0 to 2**32 - 1, got {args.seed}")
    if chosen["max_length"] is not None and chosen["max_length"] < MIN_MAX_LENGTH:
        raise UsageError(f"--max-length must be at least {MIN_MAX_LENGTH} tokens (room for a pair of texts and the "
                         f"special tokens), got {chosen['max_length']}")
    if not (args.consistency_weight >= 0 and math.isfinite(args.consistency_weight)):
        raise UsageError(f"--consistency-weight must be a finite number >= 0, got {args.consistency_weight}")
    if args.consistency_weight and args.method not in ("adakron", "adapter"):
        raise UsageError("--consistency-weight is for MAdaKron (adakron or adapter with --num-experts)")
    if args.num_experts != 1 and args.method not in ("adakron", "adapter"):
        raise UsageError(f"--num-experts is for --method adakron or adapter (MAdaKron), not {args.method}")
    if args.consistency_weight and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DDP marks each parameter ready once per backward; the loss's two forward passes would mark it twice.
        raise UsageError("--consistency-weight runs in one process only (its two forward passes per step do not "
                         "work under DDP): run it without torchrun, or drop the flag")
    if not 0 <= args.warmup_ratio < 1:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise UsageError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if args.method in ("adakron", "adapter"):
        adakron_config(TrainArgs(**{**asdict(args), **chosen}))  # a UsageError now, not after tokenizing
    return TrainArgs(**{**asdict(args), **chosen})


def adakron_config(args: TrainArgs, method: str | None = None) -> AdaKronConfig:
    """The adapter of ``--method adakron`` (or ``adapter``: the one-factor case) from the run's flags."""
    method = method or args.method
    recipe = adapter_recipe(args.recipe if args.recipe in ADAPTER_RECIPES else "default", method=method)
    try:
        return AdaKronConfig(rank=args.rank, kron_factor=1 if method == "adapter" else
                             args.kron_factor, placement=args.placement,
                             init=recipe.init if args.init is None else args.init,
                             num_experts=args.num_experts, experts=args.experts,
                             outer_bias=recipe.outer_bias if args.outer_bias is None else args.outer_bias)
    except ValueError as e:
        raise UsageError(str(e)) from None
