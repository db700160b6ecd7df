"""The served model: adapters loaded onto one frozen backbone, and mixed-adapter forward passes."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.checkpoint import adapter_state_dict, load_adapter, read_adapter
from ..adapters.experts import merge_experts
from ..adapters.inject import adapter_names, adapter_parameters, remove_adapter, state_of, task_heads
from ..adapters.switching import predict
from ..errors import UsageError
from ..models import capped_length, token_limit
from ..training.rundir import DEFAULT_MAX_LENGTH, read_task_file
from .schemas import AdapterInfo, ServeError, Stats

logger = logging.getLogger(__name__)

TASK_NAME = "task.json"
SERVABLE_METHODS = ("adakron", "adapter")  # `adakron train --method`: both save AdaKron adapters
DEFAULT_MAX_BATCH = 64
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    path: str
    task: str | None
    text_columns: tuple[str, ...] | None
    max_length: int
    labels: tuple[str, ...]
    problem_type: str
    version: str
    parameters: int
    head_parameters: int
    base_model: str | None

    @property
    def num_texts(self) -> int | None:
        return len(self.text_columns) if self.text_columns is not None else None

    def info(self) -> AdapterInfo:
        return AdapterInfo(
            name=self.name, task=self.task, labels=list(self.labels), problem_type=self.problem_type,
            num_texts=self.num_texts, text_columns=list(self.text_columns) if self.text_columns else None,
            max_length=self.max_length, parameters=self.parameters, head_parameters=self.head_parameters,
            hash=self.version, base_model=self.base_model,
        )


def read_task(directory: Path) -> dict[str, Any]:
    """The adapter's task.json (written by the training command), checked; {} when there is none."""
    try:
        task = read_task_file(directory)
    except UsageError as e:
        raise ServeError(422, "invalid_adapter", str(e)) from None
    method = task.get("method")
    if method is not None and method not in SERVABLE_METHODS:
        raise ServeError(422, "invalid_adapter", f"{directory} was trained with method {method!r}; the server "
                                                 f"serves AdaKron adapters ({' or '.join(SERVABLE_METHODS)} runs).")
    if task.get("max_length") is None:
        task["max_length"] = DEFAULT_MAX_LENGTH
    return task


@dataclass
class Pending:
    """One request waiting for the forward pass."""

    adapter: str
    rows: list[tuple[str, str | None]]
    future: asyncio.Future
    arrived: float
    # The adapter the rows were checked against (their count of texts): if the name is reloaded with other
    # weights before the forward pass, the request is refused rather than answered by the new adapter.
    served: Any = None  # the ServedAdapter (identity, not name) the request was validated against


class Engine:
    """The model, its tokenizer and the served adapters. Every method that touches the model holds
    ``lock``: only one forward (or adapter load/unload) runs at a time."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_batch: int = DEFAULT_MAX_BATCH):
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ServeError(400, "invalid_model", "The tokenizer has no pad token; batching needs one "
                                                   "(set tokenizer.pad_token, and model.config.pad_token_id).")
        vocab = getattr(model.config, "vocab_size", None)
        if isinstance(vocab, int) and len(tokenizer) > vocab:
            raise ServeError(400, "invalid_model", f"The tokenizer has {len(tokenizer)} tokens but the model's "
                                                   f"vocabulary only {vocab}: they do not belong together.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.lock = threading.Lock()
        # Replaced, never mutated, so the event loop can read it while the worker thread loads adapters.
        self.adapters: dict[str, ServedAdapter] = {}
        self.stats = Stats()
        self.stats_lock = threading.Lock()
        self.token_limit = token_limit(model, tokenizer)

    # -- adapters

    def load(self, name: str, directory: str | Path) -> ServedAdapter:
        """Load the adapter in ``directory`` as ``name``; on any failure the model and the served set
        stay as they were (ServeError / AdapterLoadError)."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ServeError(422, "invalid_name", f"Adapter name {name!r} must be 1-64 letters, digits, '_' or '-'.")
        directory = Path(directory)
        if not directory.is_dir():
            raise ServeError(404, "not_found", f"{directory} is not a directory.")
        task = read_task(directory)
        _, metadata, tensors = read_adapter(directory)
        with self.lock:
            if name in self.adapters or name in adapter_names(self.model):
                raise ServeError(409, "adapter_exists", f"An adapter named {name!r} is already loaded; "
                                                        "DELETE it first or pick another name.")
            load_adapter(self.model, directory, name=name)
            loaded = adapter_state_dict(self.model, name)
            if loaded.keys() != tensors.keys() or any(not torch.equal(loaded[k].cpu(), tensors[k]) for k in loaded):
                remove_adapter(self.model, name)
                raise ServeError(409, "adapter_changed", f"{directory} changed while it was being loaded; retry.")
            merge_experts(self.model, name)  # a MAdaKron adapter is served merged: AdaKron's cost
            config = state_of(self.model).configs[name]
            max_length = capped_length(task.get("max_length", DEFAULT_MAX_LENGTH), self.model, self.tokenizer)
            served = ServedAdapter(
                name=name, path=str(directory), task=task.get("task"),
                text_columns=tuple(task["text_columns"]) if task.get("text_columns") else None,
                max_length=max_length, labels=tuple(config.label_names), problem_type=config.problem_type,
                version=str(metadata.get("weights_sha256") or ""),
                parameters=adapter_parameters(self.model, name),
                head_parameters=sum(p.numel() for heads in task_heads(self.model) if name in heads.heads
                                    for p in heads.heads[name].parameters()),
                base_model=task.get("base_model") or metadata.get("base_model_name_or_path") or None,
            )
            self.adapters = {**self.adapters, name: served}
        self._warn_if_other_base(served)
        return served

    def _warn_if_other_base(self, served: ServedAdapter) -> None:
        ours = str(getattr(self.model.config, "_name_or_path", "") or "")
        theirs = served.base_model or ""
        if not ours or not theirs:
            return
        from ..models import resolve_model

        def same(a: str, b: str) -> bool:
            a, b = resolve_model(a), resolve_model(b)
            try:
                return a == b or Path(a).resolve() == Path(b).resolve()
            except OSError:
                return a == b

        if not same(ours, theirs):
            logger.warning("Adapter %r was trained on %s but the server runs %s; its answers may be wrong.",
                           served.name, theirs, ours)

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise ServeError(404, "unknown_adapter", f"No adapter named {name!r} is loaded.")
            remove_adapter(self.model, name)
            self.adapters = {k: v for k, v in self.adapters.items() if k != name}

    # -- inference

    def run(self, items: Sequence[Pending]) -> list[tuple[str, list[dict[str, Any]]] | ServeError]:
        """Answer every item (in order): (version, per-row predictions), or the error for that item.

        Items share tokenizer calls and forward passes; if that fails, each is run again on its own, so a
        request that breaks the batch gets the error and the others their answers."""
        with self.lock:
            try:
                return self._run(items)
            except Exception:
                if len(items) == 1:
                    logger.exception("A request failed inside the model")
                    return [ServeError(500, "internal_error", "The model failed on this request; see the "
                                                              "server log.")]
            return [self._run_alone(item) for item in items]

    def _run_alone(self, item: Pending) -> tuple[str, list[dict[str, Any]]] | ServeError:
        try:
            return self._run([item])[0]
        except Exception:
            logger.exception("A request failed inside the model")
            return ServeError(500, "internal_error", "The model failed on this request; see the server log.")

    def _run(self, items: Sequence[Pending]) -> list[tuple[str, list[dict[str, Any]]] | ServeError]:
        adapters = self.adapters
        results: list[Any] = [None] * len(items)
        live = []
        for i, item in enumerate(items):
            served = adapters.get(item.adapter)
            if served is None:  # unloaded while the request waited
                results[i] = ServeError(404, "unknown_adapter", f"Adapter {item.adapter!r} was unloaded.")
            elif item.served is not None and served is not item.served:
                results[i] = ServeError(409, "adapter_changed", f"Adapter {item.adapter!r} was replaced while the "
                                                                "request waited; retry.")
            else:
                live.append(i)
        rows = [(i, r) for i in live for r in range(len(items[i].rows))]
        encodings = self._tokenize([(i, items[i]) for i in live], adapters)
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        device = next(self.model.parameters()).device
        passes = []
        for start in range(0, len(rows), self.max_batch):
            chunk = rows[start:start + self.max_batch]
            names = [items[i].adapter for i, _ in chunk]
            batch = self._collate([encodings[key] for key in chunk], device)
            logits = predict(self.model, batch, names)
            for key, row in zip(chunk, logits):
                outputs[key] = row.float().cpu()
            passes.append(names)
        for i in live:
            info = adapters[items[i].adapter]
            results[i] = (info.version, [_prediction(info, outputs[(i, r)]) for r in range(len(items[i].rows))])
        self._count(passes, [len(items[i].rows) for i in live])
        return results

    def _count(self, passes: list[list[str]], rows_per_request: list[int]) -> None:
        """Adds one finished batch to the counters at once, so a snapshot never shows half of it."""
        with self.stats_lock:
            s = self.stats
            for names in passes:
                s.forward_passes += 1
                distinct = len(set(names))
                s.mixed_forward_passes += distinct > 1
                s.max_rows_per_pass = max(s.max_rows_per_pass, len(names))
                s.max_adapters_per_pass = max(s.max_adapters_per_pass, distinct)
            s.requests += len(rows_per_request)
            s.rows += sum(rows_per_request)

    def snapshot(self) -> Stats:
        """A consistent copy of the counters (the worker thread updates them while requests read them)."""
        with self.stats_lock:
            return self.stats.model_copy()

    def _tokenize(self, entries: Sequence[tuple[int, Pending]], adapters: dict[str, ServedAdapter]
                  ) -> dict[tuple[int, int], dict[str, list[int]]]:
        """Token ids per (item index, row index); rows with the same max_length and arity are tokenized
        in one call."""
        groups: dict[tuple[int, bool], list[tuple[tuple[int, int], tuple[str, str | None]]]] = {}
        for i, item in entries:
            max_length = adapters[item.adapter].max_length
            for r, row in enumerate(item.rows):
                groups.setdefault((max_length, row[1] is not None), []).append(((i, r), row))
        names = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in self.tokenizer.model_input_names]
        encodings = {}
        for (max_length, pair), members in groups.items():
            first = [row[0] for _, row in members]
            second = [row[1] for _, row in members] if pair else None
            encoded = self.tokenizer(first, second, truncation=True, max_length=max_length)
            for n, (key, _) in enumerate(members):
                encodings[key] = {k: encoded[k][n] for k in names if k in encoded}
        return encodings

    def _collate(self, encodings: list[dict[str, list[int]]], device: torch.device) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in encodings)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        batch = {}
        for key in encodings[0]:
            fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
            padded = []
            for e in encodings:
                pad = [fill] * (width - len(e[key]))
                padded.append(pad + e[key] if left else e[key] + pad)
            batch[key] = torch.tensor(padded, dtype=torch.long, device=device)
        return batch


def _prediction(info: ServedAdapter, logits: torch.Tensor) -> dict[str, Any]:
    if info.problem_type == "regression":
        value = float(logits[0])
        return {"label": value, "scores": value, "version": info.version}
    probs = torch.softmax(logits, dim=-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": info.labels[best], "scores": dict(zip(info.labels, probs)), "version": info.version}
