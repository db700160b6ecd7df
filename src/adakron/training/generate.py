"""Text generation with adapters, on ``model.generate``: greedy unless a temperature is given, streaming, and
one batch whose rows use different adapters.

Prompts are rendered as training renders them (``lm.prompt_ids``: the chat template, or the plain one) and
left-padded, so every row's next token sits at the same last position. Adapters route per row
(``adakron.route_rows``) and act on each token's feed-forward output, so the routing holds in the prefill and
in every cached step alike: a row gives the same tokens in a mixed batch as alone with its adapter.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..adapters.switching import route_rows
from ..errors import UsageError
from .lm import ensure_pad_token, prompt_ids

Prompt = str | Sequence[dict[str, str]]  # a user message, or a conversation of {role, content} messages


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked; the defaults are greedy decoding (the same text every time)."""

    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens to generate per prompt."})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; above 0: sample at this temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Sample from the smallest set of tokens with this much "
                                                        "probability (nucleus sampling; 1: all tokens)."})
    seed: int | None = field(default=None, metadata={"help": "Seed for sampling, for repeatable samples."})

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or \
                self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise UsageError(f"--temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):  # what torch.manual_seed takes
            raise UsageError(f"--seed must be a whole number from -2**63 to 2**64 - 1, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def generation_config(model, tokenizer, sampling: Sampling):
    """The model's generation config with ``sampling`` applied. Settings a checkpoint ships for sampling (many
    chat models set a temperature, top_k or top_p) are cleared, so greedy means greedy and top_p is the only
    cut-off when sampling."""
    config = copy.deepcopy(model.generation_config)
    sample = not sampling.greedy
    config.update(max_new_tokens=sampling.max_new_tokens, do_sample=sample, num_beams=1, num_return_sequences=1,
                  temperature=sampling.temperature if sample else None, top_p=sampling.top_p if sample else None,
                  top_k=0 if sample else None, min_p=None, typical_p=None)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


def generate_ids(model, tokenizer, prompts: Sequence[Prompt], adapter_names: Sequence[str | None] | None = None,
                 template: str = "auto", sampling: Sampling | None = None, streamer=None,
                 stopping_criteria=None) -> list[list[int]]:
    """The new token ids of each prompt (up to, without, the first end-of-sequence token).

    Args:
        prompts: user messages or conversations, one per row.
        adapter_names: the adapter of each row (None in it: the bare model); None: the model as it is.
        template: ``auto`` (the tokenizer's chat template, else plain), ``plain`` or ``raw``: as in training.
        streamer: a transformers streamer (``TextStreamer``, ...), for a single prompt.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts is a list of prompts; put a single prompt in a list")
    if not prompts:
        return []
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for {len(prompts)} prompts; give one per "
                         "prompt.")
    sampling = sampling or Sampling()
    ensure_pad_token(tokenizer)
    device = next(model.parameters()).device
    rows = [prompt_ids(tokenizer, prompt, template) for prompt in prompts]
    batch = tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors="pt").to(device)
    config = generation_config(model, tokenizer, sampling)
    was_training = model.training
    model.eval()
    try:
        with route_rows(model, adapter_names) if adapter_names is not None else nullcontext(), \
                _seeded(sampling.seed, device):
            out = model.generate(**batch, generation_config=config, streamer=streamer,
                                 stopping_criteria=stopping_criteria)
    finally:
        model.train(was_training)
    eos = config.eos_token_id
    stops = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return [_until(row, stops) for row in out[:, batch["input_ids"].shape[1]:].tolist()]


def _until(ids: list[int], stops: set[int]) -> list[int]:
    # Rows that finish early are filled with pad tokens up to the batch's longest: cut at the first stop token.
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Sampling with ``seed`` inside, leaving the caller's random state as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def generate(model, tokenizer, prompts: Sequence[Prompt], adapter_names: Sequence[str | None] | None = None,
             template: str = "auto", **sampling) -> list[str]:
    """The reply to each prompt, as text (special tokens dropped).

    Args:
        adapter_names: the adapter of each row, e.g. ``["sql", "chat", None]`` (None: the bare model); None: the
            model as it is (its active adapter, if any).
        sampling: ``max_new_tokens``, ``temperature`` (0, the default, is greedy), ``top_p``, ``seed``.
    """
    ids = generate_ids(model, tokenizer, prompts, adapter_names, template, Sampling(**sampling))
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def stream(model, tokenizer, prompt: Prompt, adapter_name: str | None = None, template: str = "auto",
           **sampling) -> Iterator[str]:
    """The reply to one prompt, piece by piece as it is generated (``TextIteratorStreamer``).

    ``adapter_name`` None: the model as it is. Generation runs in a thread; closing the iterator early stops it
    at the next token, and an error in it is raised here.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    settings = Sampling(**sampling)  # bad flags fail here, before a thread starts
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop, errors = threading.Event(), []

    class _Stopped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    def work():
        try:
            generate_ids(model, tokenizer, [prompt], None if adapter_name is None else [adapter_name], template,
                         settings, streamer, StoppingCriteriaList([_Stopped()]))
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, name="adakron-generate", daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]


def load_for_generation(adapter_dir: str | None = None, model_name: str | None = None):
    """(model, tokenizer, adapter name or None) for `adakron generate`: the base model comes from the adapter's
    run (its task.json) when ``adapter_dir`` is given, else ``model_name``, else the embedded SmolLM2. An AdaKron
    adapter is loaded merged (MAdaKron's experts averaged); a LoRA run through peft."""
    from pathlib import Path

    from ..adapters.checkpoint import AdapterLoadError, load_adapter, read_adapter
    from ..models import DEFAULT_DECODER, load_causal_lm
    from .rundir import read_task_file

    if adapter_dir is None:
        model, tokenizer = load_causal_lm(model_name or DEFAULT_DECODER)
        return model.eval(), tokenizer, None
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise UsageError(f"adapter dir {folder} does not exist")
    task = read_task_file(folder)
    if task.get("method") == "full" or (folder / "model" / "config.json").is_file():  # a full fine-tuning run
        model, tokenizer = load_causal_lm(str(folder / "model"))
        return model.eval(), tokenizer, None
    if (folder / "adapter_config.json").is_file() and task.get("method") == "lora":
        from peft import PeftModel

        model, tokenizer = load_causal_lm(model_name or task.get("base_model") or DEFAULT_DECODER)
        return PeftModel.from_pretrained(model, folder).eval(), tokenizer, None
    try:
        _, metadata, _ = read_adapter(folder)
        base = model_name or task.get("base_model") or metadata.get("base_model_name_or_path") or DEFAULT_DECODER
        model, tokenizer = load_causal_lm(base)
        name = load_adapter(model, folder, merge_experts=True)
    except AdapterLoadError as e:
        raise UsageError(str(e)) from None
    return model.eval(), tokenizer, name
