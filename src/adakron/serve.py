"""HTTP inference server: one frozen backbone, many AdaKron adapters, mixed-adapter micro-batches.

Requests for different adapters that arrive within ``max_wait_ms`` of each other run as ONE forward
pass (:func:`adakron.predict` routes each row to its own adapter and head). The forward runs in a
single worker thread, so the event loop keeps accepting and validating requests meanwhile.

Run it with ``adakron serve --adapter rte=runs/rte ...`` or ``python -m adakron.serve ...``; build an
app around a model already in memory with :func:`create_app`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import re
import signal
import socket
import sys
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from . import __version__
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError, adapter_state_dict, load_adapter, read_adapter
from .data import UsageError
from .inject import adapter_names, adapter_parameters, remove_adapter, state_of, task_heads
from .switching import predict

logger = logging.getLogger(__name__)

TASK_NAME = "task.json"
SERVABLE_METHODS = ("adakron", "adapter")  # `adakron train --method`: both save AdaKron adapters
DEFAULT_MAX_LENGTH = 128
DEFAULT_MAX_ROWS = 64
DEFAULT_MAX_CHARS = 4096
DEFAULT_MAX_WAIT_MS = 10.0
DEFAULT_MAX_BATCH = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


# --------------------------------------------------------------------------------------------- errors

class ServeError(Exception):
    """A request (or startup input) the server refuses; becomes a JSON error with ``status``."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _error_body(status: int, kind: str, message: str, details: list | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"status": status, "type": kind, "message": message}
    if details:
        error["details"] = details
    return {"error": error}


# ------------------------------------------------------------------------------------ API data models

class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"adapter": "rte", "inputs": [["A man is sleeping.", "Nobody sleeps."]]},
            {"adapter": "sst2", "inputs": ["a gripping, funny film", ["dull"]]},
        ]},
    )

    adapter: str = Field(min_length=1, max_length=64, description="Name of a loaded adapter (GET /v1/adapters).")
    inputs: list[str | list[str]] = Field(
        min_length=1,
        description="One entry per row: a text, [text], or [text_a, text_b] for a sentence-pair adapter.",
    )


class Prediction(BaseModel):
    label: str | float = Field(description="The predicted label name; for a regression adapter, the score.")
    scores: dict[str, float] | float = Field(
        description="Softmax probability per label name; for a regression adapter, the raw output.")
    version: str = Field(description="sha256 of the adapter's weights file (weights_sha256) that answered.")


class PredictResponse(BaseModel):
    adapter: str
    version: str
    predictions: list[Prediction]


class AdapterInfo(BaseModel):
    name: str
    task: str | None
    labels: list[str]
    problem_type: str
    num_texts: int | None = Field(description="Texts per row (1 or 2); null when the adapter has no task.json.")
    text_columns: list[str] | None
    max_length: int
    parameters: int = Field(description="Parameters of the adapter itself (the frozen backbone not counted).")
    head_parameters: int = Field(description="Parameters of the adapter's own task head.")
    hash: str = Field(description="sha256 of adapter_model.safetensors (weights_sha256).")
    base_model: str | None


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Name to serve the adapter under.")
    path: str = Field(min_length=1, max_length=4096, description="Adapter directory, inside --adapter-root.")


class RemoveResponse(BaseModel):
    removed: str


class Stats(BaseModel):
    requests: int = 0
    rows: int = 0
    forward_passes: int = 0
    mixed_forward_passes: int = Field(0, description="Forward passes whose rows used more than one adapter.")
    max_rows_per_pass: int = 0
    max_adapters_per_pass: int = 0


class Health(BaseModel):
    status: str
    version: str
    adapters: int
    stats: Stats


class ErrorDetail(BaseModel):
    status: int
    type: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --------------------------------------------------------------------------------- adapters, forward

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
    path = directory / TASK_NAME
    if not path.exists():
        return {}
    try:
        task = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServeError(422, "invalid_adapter", f"{path} is not readable JSON ({e}).") from None
    if not isinstance(task, dict):
        raise ServeError(422, "invalid_adapter", f"{path} must hold a JSON object.")
    columns = task.get("text_columns")
    if columns is not None and not (
            isinstance(columns, list) and 1 <= len(columns) <= 2 and all(isinstance(c, str) for c in columns)):
        raise ServeError(422, "invalid_adapter", f"{path}: text_columns must list 1 or 2 column names, "
                                                 f"not {columns!r}.")
    method = task.get("method")
    if method is not None and method not in SERVABLE_METHODS:
        raise ServeError(422, "invalid_adapter", f"{directory} was trained with method {method!r}; the server "
                                                 f"serves AdaKron adapters ({' or '.join(SERVABLE_METHODS)} runs).")
    if task.get("max_length") is None:
        task["max_length"] = DEFAULT_MAX_LENGTH
    max_length = task["max_length"]
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ServeError(422, "invalid_adapter", f"{path}: max_length must be an integer >= 2, not {max_length!r}.")
    if task.get("task") is not None and not isinstance(task["task"], str):
        raise ServeError(422, "invalid_adapter", f"{path}: task must be a string or null.")
    return task


@dataclass
class _Item:
    """One request waiting for the forward pass."""

    adapter: str
    rows: list[tuple[str, str | None]]
    future: asyncio.Future
    arrived: float


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
        limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self.token_limit = min((v for v in limits if isinstance(v, int) and v > 0), default=None)

    # -- adapters

    def load(self, name: str, directory: str | Path) -> ServedAdapter:
        """Load the adapter in ``directory`` as ``name``; on any failure the model and the served set
        stay as they were (ServeError / AdapterLoadError)."""
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
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
            config = state_of(self.model).configs[name]
            max_length = task.get("max_length", DEFAULT_MAX_LENGTH)
            if self.token_limit:
                max_length = min(max_length, self.token_limit)
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
        from .backbone import resolve_model

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

    def run(self, items: Sequence[_Item]) -> list[tuple[str, list[dict[str, Any]]] | ServeError]:
        """Answer every item (in order): (version, per-row predictions), or the error for that item."""
        with self.lock:
            adapters = self.adapters
            results: list[Any] = [None] * len(items)
            live = []
            for i, item in enumerate(items):
                if item.adapter in adapters:
                    live.append(i)
                else:  # unloaded while the request waited
                    results[i] = ServeError(404, "unknown_adapter", f"Adapter {item.adapter!r} was unloaded.")
            rows = [(i, r) for i in live for r in range(len(items[i].rows))]
            encodings = self._tokenize([(i, items[i]) for i in live], adapters)
            outputs: dict[tuple[int, int], torch.Tensor] = {}
            device = next(self.model.parameters()).device
            for start in range(0, len(rows), self.max_batch):
                chunk = rows[start:start + self.max_batch]
                names = [items[i].adapter for i, _ in chunk]
                batch = self._collate([encodings[key] for key in chunk], device)
                logits = predict(self.model, batch, names)
                for key, row in zip(chunk, logits):
                    outputs[key] = row.float().cpu()
                self._count_pass(names)
            for i in live:
                info = adapters[items[i].adapter]
                results[i] = (info.version, [_prediction(info, outputs[(i, r)]) for r in range(len(items[i].rows))])
                self.stats.requests += 1
                self.stats.rows += len(items[i].rows)
            return results

    def _count_pass(self, names: list[str]) -> None:
        s = self.stats
        s.forward_passes += 1
        distinct = len(set(names))
        s.mixed_forward_passes += distinct > 1
        s.max_rows_per_pass = max(s.max_rows_per_pass, len(names))
        s.max_adapters_per_pass = max(s.max_adapters_per_pass, distinct)

    def _tokenize(self, entries: Sequence[tuple[int, _Item]], adapters: dict[str, ServedAdapter]
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


# --------------------------------------------------------------------------------------- micro-batcher

class MicroBatcher:
    """Collects requests for up to ``max_wait`` seconds (after the oldest arrived) or ``max_batch`` rows,
    then answers them all with one forward pass in the worker thread."""

    def __init__(self, engine: Engine, max_wait: float, max_batch: int):
        self.engine, self.max_wait, self.max_batch = engine, max_wait, max_batch
        self._pending: deque[_Item] = deque()
        self._running: list[_Item] = []  # the batch in the forward pass now
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    async def start(self) -> None:
        self._closing = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adakron-forward")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="adakron-batcher")

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for item in [*self._running, *self._pending]:
            if not item.future.done():
                item.future.set_exception(ServeError(503, "shutting_down", "The server is shutting down."))
        self._pending.clear()
        self._running = []
        if self._executor is not None:
            # wait=True: the worker thread has ended when stop() returns.
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
            self._executor = None

    async def call(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread (in turn with forward passes)."""
        if self._executor is None or self._closing:
            raise ServeError(503, "shutting_down", "The server is shutting down.")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, adapter: str, rows: list[tuple[str, str | None]]) -> tuple[str, list[dict]]:
        if self._wakeup is None or self._closing:
            raise ServeError(503, "shutting_down", "The server is shutting down.")
        loop = asyncio.get_running_loop()
        item = _Item(adapter, rows, loop.create_future(), loop.time())
        self._pending.append(item)
        self._wakeup.set()
        return await item.future

    def _pending_rows(self) -> int:
        return sum(len(i.rows) for i in self._pending)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Drop requests whose client went away before their turn.
            self._pending = deque(i for i in self._pending if not i.future.done())
            if not self._pending:
                continue
            deadline = self._pending[0].arrived + self.max_wait
            while self._pending_rows() < self.max_batch and loop.time() < deadline:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
                self._wakeup.clear()
            batch, rows = [], 0
            while self._pending and (not batch or rows + len(self._pending[0].rows) <= self.max_batch):
                item = self._pending.popleft()
                if not item.future.done():
                    batch.append(item)
                    rows += len(item.rows)
            if self._pending:
                self._wakeup.set()  # the rest goes next, without waiting again
            if not batch:
                continue
            self._running = batch
            try:
                results = await loop.run_in_executor(self._executor, self.engine.run, batch)
            except Exception as e:
                logger.exception("Forward pass failed")
                results = [ServeError(500, "internal_error", f"The forward pass failed: {type(e).__name__}: {e}")
                           ] * len(batch)
            self._running = []
            for item, result in zip(batch, results):
                if item.future.done():
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)


# ------------------------------------------------------------------------------------------- the app

@dataclass
class Limits:
    max_rows: int = DEFAULT_MAX_ROWS
    max_chars: int = DEFAULT_MAX_CHARS

    @property
    def max_body_bytes(self) -> int:
        # Every character may arrive as a 6-byte \\uXXXX escape; plus generous room for the JSON around.
        return self.max_rows * 2 * (self.max_chars * 6 + 16) + 64 * 1024


def _rows(inputs: list[str | list[str]], info: ServedAdapter, limits: Limits) -> list[tuple[str, str | None]]:
    if len(inputs) > limits.max_rows:
        raise ServeError(413, "too_many_rows", f"{len(inputs)} rows in one request; the limit is {limits.max_rows} "
                                               "(--max-rows).")
    rows = []
    expected = info.num_texts
    for n, row in enumerate(inputs):
        texts = [row] if isinstance(row, str) else row
        for text in texts:
            if len(text) > limits.max_chars:
                raise ServeError(413, "text_too_long", f"Row {n} has a text of {len(text)} characters; the limit is "
                                                       f"{limits.max_chars} (--max-chars).")
        if expected is not None and len(texts) != expected:
            columns = ", ".join(info.text_columns)
            raise ServeError(422, "wrong_input_shape", f"Adapter {info.name!r} takes {expected} text(s) per row "
                                                       f"({columns}); row {n} has {len(texts)}.")
        if not 1 <= len(texts) <= 2:
            raise ServeError(422, "wrong_input_shape", f"Row {n} has {len(texts)} texts; give 1 text or a pair "
                                                       "[text_a, text_b].")
        rows.append((texts[0], texts[1] if len(texts) == 2 else None))
    return rows


class _BodyLimit:
    """Refuses a request whose declared Content-Length exceeds the limit before its body is read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for key, value in scope["headers"]:
                if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                    body = _error_body(413, "body_too_large", f"The request body ({int(value)} bytes) is larger "
                                                              f"than this server accepts ({self.limit} bytes).")
                    await JSONResponse(body, status_code=413)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def create_app(model: nn.Module, tokenizer: Any, adapters: dict[str, str | Path] | None = None, *,
               adapter_root: str | Path | None = None, allow_admin: bool = False,
               max_rows: int = DEFAULT_MAX_ROWS, max_chars: int = DEFAULT_MAX_CHARS,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """A FastAPI app serving ``adapters`` ({name: directory}) on ``model`` (modified in place: the
    adapters are loaded onto it). Raises ServeError / AdapterLoadError for an adapter it cannot serve."""
    for name, value in (("max_rows", max_rows), ("max_chars", max_chars), ("max_batch", max_batch)):
        if not isinstance(value, int) or value < 1:
            raise ServeError(400, "invalid_setting", f"{name} must be a positive integer, not {value!r}.")
    if max_wait_ms < 0:
        raise ServeError(400, "invalid_setting", f"max_wait_ms must be >= 0, not {max_wait_ms!r}.")
    root = None
    if adapter_root is not None:
        root = Path(adapter_root)
        if not root.is_dir():
            raise ServeError(400, "invalid_setting", f"--adapter-root {root} is not a directory.")
        root = root.resolve()
    engine = Engine(model, tokenizer, max_batch)
    for name, directory in (adapters or {}).items():
        engine.load(name, directory)
    batcher = MicroBatcher(engine, max_wait_ms / 1000.0, max_batch)
    limits = Limits(max_rows, max_chars)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="adakron", version=__version__, lifespan=lifespan,
                  description="Many AdaKron adapters on one frozen backbone; requests for different adapters "
                              "share forward passes.")
    app.state.engine, app.state.batcher, app.state.limits = engine, batcher, limits
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(_error_body(exc.status, exc.kind, exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(_error_body(400, "malformed_json", "The request body is not valid JSON.", details),
                                status_code=400)
        return JSONResponse(_error_body(422, "invalid_request", "The request does not match the schema.", details),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body(exc.status_code, "http_error", str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.post("/v1/predict", response_model=PredictResponse, responses=_errors(400, 404, 413, 422, 503),
              tags=["inference"])
    async def predict_rows(body: PredictRequest) -> dict[str, Any]:
        """Predict every row with one adapter; rows of concurrent requests share forward passes."""
        info = engine.adapters.get(body.adapter)
        if info is None:
            raise ServeError(404, "unknown_adapter", f"No adapter named {body.adapter!r}; loaded: "
                                                     f"{sorted(engine.adapters)} (GET /v1/adapters).")
        rows = _rows(body.inputs, info, limits)
        version, predictions = await batcher.submit(body.adapter, rows)
        # A plain dict: FastAPI validates it against PredictResponse once, on the way out.
        return {"adapter": body.adapter, "version": version, "predictions": predictions}

    @app.get("/v1/adapters", response_model=AdapterList, tags=["adapters"])
    async def list_adapters() -> AdapterList:
        return AdapterList(adapters=[a.info() for a in engine.adapters.values()])

    def _admin() -> None:
        if not allow_admin:
            raise ServeError(403, "admin_disabled", "Loading and unloading adapters is off; start the server "
                                                    "with --allow-admin (and --adapter-root).")

    @app.post("/v1/adapters", response_model=AdapterInfo, status_code=201,
              responses=_errors(400, 403, 404, 409, 422, 503), tags=["adapters"])
    async def add(body: LoadRequest) -> AdapterInfo:
        """Load the adapter directory ``path`` (inside --adapter-root) as ``name``."""
        _admin()
        if root is None:
            raise ServeError(403, "admin_disabled", "The server has no --adapter-root to load adapters from.")
        directory = resolve_under(root, body.path)
        try:
            served = await batcher.call(engine.load, body.name, directory)
        except (AdapterLoadError, OSError) as e:
            raise ServeError(422, "adapter_load_failed", str(e)) from None
        return served.info()

    @app.delete("/v1/adapters/{name}", response_model=RemoveResponse, responses=_errors(403, 404, 503),
                tags=["adapters"])
    async def remove(name: str) -> RemoveResponse:
        _admin()
        await batcher.call(engine.unload, name)
        return RemoveResponse(removed=name)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        return Health(status="ok", version=__version__, adapters=len(engine.adapters),
                      stats=engine.stats.model_copy())

    return app


def resolve_under(root: Path, path: str) -> Path:
    """``path`` (absolute, or relative to ``root``) with every symlink resolved; refused (403) unless it,
    and the adapter files in it, lie inside ``root`` (itself resolved)."""
    try:
        candidate = Path(path)
        candidate = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise ServeError(422, "invalid_path", f"Cannot resolve path {path!r}: {e}") from None
    if not candidate.is_relative_to(root):
        raise ServeError(403, "path_outside_root", f"{path!r} is outside the adapter root.")
    if not candidate.is_dir():
        raise ServeError(404, "not_found", f"{path!r} is not a directory under the adapter root.")
    for name in (CONFIG_NAME, WEIGHTS_NAME, TASK_NAME):
        file = candidate / name
        if file.is_symlink() and not file.resolve().is_relative_to(root):
            raise ServeError(403, "path_outside_root", f"{path!r}/{name} links outside the adapter root.")
    return candidate


# ------------------------------------------------------------------------------------------------ CLI

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adakron serve", description="Serve AdaKron adapters over HTTP (FastAPI).")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="Serve the adapter saved in DIR as NAME (repeat for more).")
    p.add_argument("--model", default=None, help="Base model path or hub id (default: the embedded all-MiniLM-L6-v2).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port.")
    p.add_argument("--adapter-root", default=None, help="The only directory POST /v1/adapters may load from.")
    p.add_argument("--allow-admin", action="store_true", help="Enable POST/DELETE /v1/adapters.")
    p.add_argument("--max-rows", type=_positive_int, default=DEFAULT_MAX_ROWS, help="Rows per request (413 above).")
    p.add_argument("--max-chars", type=_positive_int, default=DEFAULT_MAX_CHARS,
                   help="Characters per text (413 above).")
    p.add_argument("--max-wait-ms", type=_non_negative_float, default=DEFAULT_MAX_WAIT_MS,
                   help="How long a request may wait for others to share its forward pass (0: no wait; a pass "
                        "still takes every request that queued during the previous one).")
    p.add_argument("--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH, help="Rows per forward pass.")
    p.add_argument("--device", default="cpu", help="torch device for the model, e.g. cpu or cuda.")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's).")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _parse_adapters(values: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not _NAME_RE.fullmatch(name) or not directory:
            raise ServeError(400, "invalid_setting", f"--adapter {value!r}: expected NAME=DIR with NAME made of "
                                                     "letters, digits, '_' or '-', e.g. --adapter rte=runs/rte.")
        if name in adapters:
            raise ServeError(400, "invalid_setting", f"--adapter {name!r} is given twice.")
        if not Path(directory).is_dir():
            raise ServeError(400, "invalid_setting", f"--adapter {name}={directory}: no such directory.")
        adapters[name] = directory
    return adapters


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it every response
    # waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a malformed flag (argparse has printed why)
        return int(e.code or 0)

    def fail(message: str) -> int:
        print(f"adakron serve: error: {message}", file=sys.stderr)
        return 2

    import transformers
    import uvicorn
    from transformers import AutoModelForSequenceClassification

    from .backbone import load_tokenizer, resolve_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        adapters = _parse_adapters(args.adapter)
        if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
            return fail(f"--adapter-root {args.adapter_root}: no such directory.")
        if args.allow_admin and args.adapter_root is None:
            return fail("--allow-admin needs --adapter-root DIR: the only place adapters may be loaded from.")
        if not adapters and not args.allow_admin:
            return fail("nothing to serve: pass --adapter NAME=DIR (or --allow-admin to load adapters at run time).")
        if not 0 <= args.port <= 65535:
            return fail(f"--port {args.port} is not a port number.")
        model_path = resolve_model(args.model)
        try:
            tokenizer = load_tokenizer(args.model)
            model = AutoModelForSequenceClassification.from_pretrained(model_path)
            model = model.to(args.device).eval()
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return fail(f"cannot load model {args.model or model_path!r}: {first}")
        app = create_app(model, tokenizer, adapters, adapter_root=args.adapter_root, allow_admin=args.allow_admin,
                         max_rows=args.max_rows, max_chars=args.max_chars, max_wait_ms=args.max_wait_ms,
                         max_batch=args.max_batch)
    except (ServeError, AdapterLoadError, UsageError) as e:
        return fail(str(e).splitlines()[0])
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        return fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    port = sock.getsockname()[1]
    url = f"http://[{args.host}]:{port}" if ":" in args.host else f"http://{args.host}:{port}"

    class Server(uvicorn.Server):
        stopped_by: int | None = None

        def handle_exit(self, sig, frame) -> None:
            # uvicorn re-raises the signal after shutting down, but a SIGINT inherited as ignored (a job started
            # in the background by a shell) is then lost: remember it to exit 130 either way.
            self.stopped_by = sig
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # uvicorn does not log the address of a socket it was handed
                print(f"adakron serve: {len(adapters)} adapter(s) on {args.model or 'all-MiniLM-L6-v2'}; "
                      f"Uvicorn running on {url} (Ctrl+C to stop)", file=sys.stderr, flush=True)

    config = uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=10)
    server = Server(config)
    # torch + transformers leave millions of long-lived objects; each full garbage collection walked them
    # all, stalling every request for ~200 ms every second or two under load. Exempt them from collection.
    gc.collect()
    gc.freeze()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # the re-raised SIGINT
        return 130
    finally:
        sock.close()
    if server.stopped_by == signal.SIGINT:
        return 130
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
