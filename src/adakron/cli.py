"""`adakron train | eval | predict | params | targets | serve`: thin argument parsing over plain functions."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from dataclasses import MISSING, fields

from .adapters.checkpoint import AdapterLoadError
from .adapters.config import EXPERT_SITES, INITS, PLACEMENTS
from .adapters.optim import REFERENCE_RANK
from .errors import Parser, UsageError
from .training.generate import Sampling
from .training.inference import BATCH_SIZE, PREDICTION_COLUMN, SCORE_COLUMN
from .training.recipes import (ADAPTER_RECIPES, CAPPED_LR, CAUSAL_LM_RECIPE, FULL_LR, METHOD_FLAGS, METHOD_LR, METHODS,
                               PAPER_LR, TrainArgs)

# One source for every default: the flags show TrainArgs' own (which reads the adapter's from AdaKronConfig).
DEFAULTS = {f.name: f.default for f in fields(TrainArgs) if f.default is not MISSING}
SAMPLING_DEFAULTS = {f.name: f.default for f in fields(Sampling)}


def _columns(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def build_parser() -> Parser:
    parser = Parser(prog="adakron", description="Parameter-efficient fine-tuning with AdaKron adapters.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser("train", help="fine-tune on a GLUE task or your own data")
    data = train.add_argument_group("data")
    data.add_argument("--task", help="GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli")
    data.add_argument("--data-dir", help="folder in GLUE layout <dir>/<TASK>/{train,dev}.tsv (default: $GLUE_DIR, "
                                         "else the hub)")
    data.add_argument("--train-file", help="your own training data (.csv, .tsv or .jsonl); for a causal LM (e.g. "
                                          "--model smollm2) JSON/JSONL instruction data: prompt/completion, chat "
                                          "messages, Alpaca instruction/input/output or text")
    data.add_argument("--validation-file", help="your own labelled dev data, same format")
    data.add_argument("--text-columns", type=_columns, help="one or two text columns, comma-separated")
    data.add_argument("--label-column", default=DEFAULTS["label_column"])
    data.add_argument("--task-type", choices=["classification", "regression"],
                      help="default: regression for non-integer numeric labels, else classification")
    data.add_argument("--max-train-samples", type=int)
    data.add_argument("--max-eval-samples", type=int)
    method = train.add_argument_group("method")
    method.add_argument("--model", help="minilm (the embedded all-MiniLM-L6-v2, the default), smollm2 (the "
                                        "embedded SmolLM2-135M-Instruct decoder), a local folder or a hub id")
    method.add_argument("--method", default=DEFAULTS["method"], choices=METHODS)
    # The flags of one method have no default here: train_args tells a typed flag from one left out, refuses it
    # under a method that would ignore it (METHOD_FLAGS) and fills in the default.
    method.add_argument("--rank", type=int, help=f"adapter size r (adakron, adapter; default: {DEFAULTS['rank']})")
    method.add_argument("--kron-factor", type=int,
                        help=f"outer factor width f (adakron; default: {DEFAULTS['kron_factor']})")
    method.add_argument("--recipe", choices=list(ADAPTER_RECIPES),
                        help="adakron/adapter recipe: 'default' (this library's, see README), 'paper' (the "
                             "authors' code: their init, one lr for everything) or 'capped' (the default's init, "
                             "its factor rates at lr 4e-3 as caps); the seven flags below override it")
    ours, paper = ADAPTER_RECIPES["default"], ADAPTER_RECIPES["paper"]
    method.add_argument("--init", choices=list(INITS), help="'identity': up-projection zeroed, so training starts "
                        "from the base model; 'reference': every adapter weight N(0, 0.02) "
                        f"(adakron default: {ours.init}; paper and --method adapter: {paper.init})")
    method.add_argument("--outer-bias", type=float, help="initial bias of the f-wide outer factor u "
                        f"(adakron default: {ours.outer_bias:g}; paper: {paper.outer_bias:g})")
    method.add_argument("--down-lr-ratio", type=float, help="the down-projections v and u (u unless "
                        "--outer-lr-ratio is given) train at --lr times this "
                        f"(adakron default: {ours.down_lr_ratio:g} up to --rank {REFERENCE_RANK}, "
                        f"times {REFERENCE_RANK}/rank above; paper and --method adapter: {paper.down_lr_ratio:g})")
    method.add_argument("--outer-lr-ratio", type=float, help="the f-wide outer factor u alone trains at --lr times "
                        f"this (default: --down-lr-ratio's if that is given, else the recipe's: "
                        f"{ours.outer_lr_ratio:g} up to --rank {REFERENCE_RANK}, times {REFERENCE_RANK}/rank above; "
                        "paper: 1)")
    method.add_argument("--up-lr-ratio", type=float, help="the up-projection B trains at --lr times this "
                        f"(default: {ours.up_lr_ratio:g} up to --rank {REFERENCE_RANK}, "
                        f"times {REFERENCE_RANK}/rank above; paper: {paper.up_lr_ratio:g})")
    capped = ADAPTER_RECIPES["capped"]
    method.add_argument("--down-lr-max", type=float, help="a cap on the rate of v (and of u unless --outer-lr-max "
                        "is given), in absolute terms: v trains at min(--lr times --down-lr-ratio, this) (default: "
                        f"none; --recipe capped: {capped.down_lr_max:g})")
    method.add_argument("--outer-lr-max", type=float, help="a cap on the rate of the outer factor u alone (default: "
                        f"--down-lr-max's if that is given, else the recipe's: none; capped: {capped.outer_lr_max:g})")
    method.add_argument("--num-experts", type=int,
                        help="MAdaKron: experts per down-projection, one drawn per step, merged for evaluation and "
                             "in the saved adapter (its experts are kept in <output-dir>/experts); default 1 = "
                             "AdaKron")
    method.add_argument("--experts", choices=list(EXPERT_SITES),
                        help="with --num-experts > 1, which down-projections hold experts: 'outer' (the f-wide "
                             f"factor; Partial MAdaKron) or 'both' (Full); default: {DEFAULTS['experts']}")
    method.add_argument("--consistency-weight", type=float,
                        help="MAdaKron: weight of AdaMix's consistency loss between two forward passes (doubles "
                             "the forward cost of a step); default 0 = off")
    method.add_argument("--placement", choices=list(PLACEMENTS),
                        help=f"which sub-layers get adapters (adakron, adapter; default: {DEFAULTS['placement']})")
    method.add_argument("--lora-r", type=int, help=f"LoRA's rank (lora; default: {DEFAULTS['lora_r']})")
    method.add_argument("--lora-alpha", type=int, help=f"LoRA's alpha (lora; default: {DEFAULTS['lora_alpha']})")
    recipe = train.add_argument_group("recipe (defaults per task: see README)")
    recipe.add_argument("--epochs", type=float)
    recipe.add_argument("--lr", type=float, help="the task head's learning rate (default: "
                        + ", ".join(f"{m} {lr:g}" for m, lr in METHOD_LR.items())
                        + f", adakron --recipe paper {PAPER_LR:g}, --recipe capped {CAPPED_LR:g}, full {FULL_LR:g}; "
                        f"causal LMs {CAUSAL_LM_RECIPE.lr:g}; a task's recipe may set its own: see README)")
    recipe.add_argument("--batch-size", type=int)
    recipe.add_argument("--max-length", type=int)
    recipe.add_argument("--warmup-ratio", type=float, default=DEFAULTS["warmup_ratio"])
    recipe.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    recipe.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    recipe.add_argument("--eval-steps", type=int, help="evaluate every N steps instead of every epoch")
    recipe.add_argument("--max-steps", type=int, help="stop after N optimizer steps (the schedule spans N steps)")
    recipe.add_argument("--pad-to-max-length", action="store_true", help="pad every batch to --max-length")
    recipe.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                        default=DEFAULTS["group_by_length"],
                        help="batch examples of similar length (default; about 3x cheaper epochs than random "
                             "batches with dynamic padding)")
    recipe.add_argument("--gradient-checkpointing", action="store_true")
    recipe.add_argument("--bf16", action="store_true")
    recipe.add_argument("--fp16", action="store_true")
    run = train.add_argument_group("run")
    run.add_argument("--output-dir", help="default: runs/<task>-<method>")
    run.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last epoch")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    run.add_argument("--no-plot", dest="plot", action="store_false")

    ev = sub.add_parser("eval", help="evaluate a trained adapter on labelled data")
    ev.add_argument("--adapter", required=True, help="a run's output dir")
    ev.add_argument("--task")
    ev.add_argument("--data-dir")
    ev.add_argument("--validation-file")
    ev.add_argument("--text-columns", type=_columns)
    ev.add_argument("--label-column", default=DEFAULTS["label_column"])
    ev.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    ev.add_argument("--max-eval-samples", type=int)
    ev.add_argument("--batch-size", type=int, default=BATCH_SIZE)

    pr = sub.add_parser("predict", help="label new data with a trained adapter")
    pr.add_argument("--adapter", required=True)
    pr.add_argument("--input", required=True, help=".csv, .tsv or .jsonl with the adapter's text columns")
    pr.add_argument("--output", required=True, help=".csv, .tsv or .jsonl to write")
    pr.add_argument("--text-columns", type=_columns)
    pr.add_argument("--model")
    pr.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    pr.add_argument("--prediction-column", default=PREDICTION_COLUMN,
                    help="name of the added column with the predicted label (or score); an input column of that "
                         "name is never overwritten: the run is refused and asks for another name")
    pr.add_argument("--score-column", default=SCORE_COLUMN,
                    help="name of the added column with the predicted class's probability (classification)")
    pr.add_argument("--batch-size", type=int, default=BATCH_SIZE)

    gen = sub.add_parser("generate", help="generate text with a causal LM, with or without a trained adapter")
    gen.add_argument("prompt", help="the prompt (the chat template is applied for chat models)")
    gen.add_argument("--adapter", help="a run's output dir (its base model is used unless --model is given)")
    gen.add_argument("--model", help="smollm2 (the embedded SmolLM2-135M-Instruct, the default), a folder or hub id")
    gen.add_argument("--max-new-tokens", type=int, default=SAMPLING_DEFAULTS["max_new_tokens"])
    gen.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS["temperature"],
                     help="0 = greedy (the default: the same text every time)")
    gen.add_argument("--top-p", type=float, default=SAMPLING_DEFAULTS["top_p"])
    gen.add_argument("--seed", type=int, default=SAMPLING_DEFAULTS["seed"])

    params = sub.add_parser("params", help="trainable/total parameters of each method on a model")
    params.add_argument("--model")
    params.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    params.add_argument("--kron-factor", type=int, default=DEFAULTS["kron_factor"])
    params.add_argument("--lora-r", type=int, default=DEFAULTS["lora_r"])
    params.add_argument("--num-labels", type=int, default=2)

    targets = sub.add_parser("targets", help="list a model's Linear/Conv1D modules and the default targets")
    targets.add_argument("--model")
    targets.add_argument("--placement", default=DEFAULTS["placement"], choices=list(PLACEMENTS))

    sub.add_parser("serve", help="HTTP inference server for many adapters (see `adakron serve --help`)",
                   add_help=False)
    return parser


def train_args(ns: argparse.Namespace) -> TrainArgs:
    """`adakron train`'s flags as TrainArgs, refusing those that would be ignored: left unchecked, `--method lora
    --rank 16` would train LoRA at its own rank without saying so."""
    for dest, methods in METHOD_FLAGS.items():
        if getattr(ns, dest) is not None and ns.method not in methods:
            raise UsageError(f"--{dest.replace('_', '-')} is for --method {' or '.join(methods)}; "
                             f"--method {ns.method} would ignore it: drop it")
    fields = {k: v for k, v in vars(ns).items() if k in TrainArgs.__dataclass_fields__}
    args = TrainArgs(**{**fields, **{dest: DEFAULTS[dest] for dest in METHOD_FLAGS if fields[dest] is None}})
    for flag in ("outer_lr_ratio", "outer_lr_max"):
        if getattr(ns, flag) is not None and args.kron_factor == 1:
            raise UsageError(f"--{flag.replace('_', '-')} is for AdaKron's outer factor u, which --kron-factor 1 (the "
                             "plain bottleneck adapter) does not have: drop it")
    if ns.experts is not None and args.num_experts == 1:
        raise UsageError(f"--experts {ns.experts} places experts, but --num-experts is 1 (AdaKron, no experts): "
                         "add --num-experts 4 (the authors' MAdaKron), or drop --experts")
    return args


def cmd_train(ns: argparse.Namespace) -> int:
    from .training.trainer import fit

    results = fit(train_args(ns))
    if results:
        best = {k: v for k, v in results["best"].items()}
        print(f"best dev: {json.dumps(best)}; trainable {results['trainable_params']:,} of "
              f"{results['total_params']:,} ({results['trainable_percent']}%); saved to "
              f"{results['hyperparameters']['output_dir'] or 'runs/'}", flush=True)
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from .training.inference import evaluate
    from .training.metrics import undefined_note

    results = evaluate(ns.adapter, ns.task, ns.data_dir, ns.validation_file, ns.text_columns, ns.label_column,
                       ns.model, ns.max_eval_samples, ns.batch_size)
    note = undefined_note(results)
    shown = {split: {k: None if v != v else v for k, v in metrics.items()} for split, metrics in results.items()}
    print(json.dumps({**shown, "note": note} if note else shown, indent=2))
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    from .training.inference import predict

    count = predict(ns.adapter, ns.input, ns.output, ns.text_columns, ns.model, ns.overwrite, ns.batch_size,
                    ns.prediction_column, ns.score_column)
    print(f"wrote {count} predictions to {ns.output}")
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from .training.generate import Sampling, load_for_generation, stream

    sampling = Sampling(ns.max_new_tokens, ns.temperature, ns.top_p, ns.seed)  # bad flags fail before loading
    model, tokenizer, name = load_for_generation(ns.adapter, ns.model)
    for piece in stream(model, tokenizer, ns.prompt, name, **vars(sampling)):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_params(ns: argparse.Namespace) -> int:
    from .adapters.inject import trainable_parameters
    from .models import load_classifier
    from .training.recipes import adakron_config
    from .training.trainer import apply_method

    if ns.num_labels < 1:
        raise UsageError(f"--num-labels must be at least 1 (1: a regression head), got {ns.num_labels}")
    args = TrainArgs(rank=ns.rank, kron_factor=ns.kron_factor, lora_r=ns.lora_r)
    adakron_config(args)  # a bad --rank/--kron-factor is a usage error, before any model is loaded
    print(f"{'method':<10}{'trainable':>14}{'total':>14}{'%':>9}")
    for method in METHODS:
        model = apply_method(load_classifier(ns.model, ns.num_labels), method, args)
        trainable, total = trainable_parameters(model)
        print(f"{method:<10}{trainable:>14,}{total:>14,}{100 * trainable / total:>8.3f}%")
    return 0


def cmd_targets(ns: argparse.Namespace) -> int:
    from .adapters.config import AdaKronConfig
    from .adapters.inject import find_sites, head_names
    from .adapters.targets import WRAPPABLE
    from .models import load_classifier

    model = load_classifier(ns.model, 2)
    config = AdaKronConfig(placement=ns.placement)
    heads = head_names(model, config)
    try:
        defaults = set(find_sites(model, config, heads))
    except ValueError as e:
        print(e, file=sys.stderr)
        defaults = set()
    for name, module in model.named_modules():
        if isinstance(module, WRAPPABLE):
            in_head = any(name == h or name.startswith(h + ".") for h in heads)
            mark = "*" if name in defaults else ("head" if in_head else "")
            print(f"{mark:>5}  {name}  ({type(module).__name__})")
    print(f"* = default AdaKron target ({ns.placement}); head = trained with each adapter")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "generate": cmd_generate,
            "params": cmd_params,
            "targets": cmd_targets}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv[:1] == ["serve"]:
        from .serving import main as serve_main

        return serve_main(argv[1:])
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed on one line
        return e.code
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; training keeps its own
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return COMMANDS[ns.command](ns)
    except (UsageError, AdapterLoadError) as e:
        message = " ".join(str(e).splitlines())  # one line, whatever a file's contents put into the message
        print(f"adakron {ns.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: a full disk, a folder without write permission
        where = f": {e.filename}" if e.filename else ""
        print(f"adakron {ns.command}: error: {e.strerror or e}{where}" + (
            "; free some space, then run again with --resume" if e.errno in (errno.ENOSPC, errno.EDQUOT)
            and ns.command == "train" else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
