"""The FastAPI apps: request limits, routes, and errors as JSON. A classifier gets the adakron API
(``/v1/predict``, ``/v1/adapters``); a causal LM gets the OpenAI one (``openai/``)."""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from .._version import __version__
from ..adapters.checkpoint import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError
from ..training.data import is_valid_text
from ..training.lm import ensure_pad_token
from . import openai
from .batcher import MicroBatcher
from .engine import DEFAULT_MAX_BATCH, TASK_NAME, Engine, ServedAdapter
from .generation import GenerationEngine
from .schemas import (
    AdapterInfo,
    AdapterList,
    ErrorResponse,
    GenerationHealth,
    Health,
    LoadRequest,
    PredictRequest,
    PredictResponse,
    RemoveResponse,
    ServeError,
    error_body,
)
from .worker import BatchWorker

DEFAULT_MAX_ROWS = 64
DEFAULT_MAX_CHARS = 4096
DEFAULT_MAX_WAIT_MS = 10.0
DEFAULT_MAX_TOKENS = 512  # per generation request (--max-tokens)
DEFAULT_LM_BODY_BYTES = 4 * 2**20  # a request body for a causal LM: far more text than any context holds


@dataclass
class Limits:
    max_rows: int = DEFAULT_MAX_ROWS
    max_chars: int = DEFAULT_MAX_CHARS

    @property
    def max_body_bytes(self) -> int:
        """The largest body a request within --max-rows and --max-chars can take: a character outside the Basic
        Multilingual Plane arrives as a 12-byte surrogate-pair escape (\\ud83d\\ude00, as Python's json and
        requests write it by default), a row may be a pair, and the JSON around each text (quotes, commas,
        indentation) gets generous room."""
        return self.max_rows * 2 * (self.max_chars * 12 + 256) + 64 * 1024


def _rows(inputs: list[str | list[str]], info: ServedAdapter, limits: Limits) -> list[tuple[str, str | None]]:
    if len(inputs) > limits.max_rows:
        raise ServeError(413, "too_many_rows", f"{len(inputs)} rows in one request; the limit is {limits.max_rows} "
                                               "(--max-rows).")
    rows = []
    expected = info.num_texts
    for n, row in enumerate(inputs):
        texts = [row] if isinstance(row, str) else row
        for text in texts:
            if not is_valid_text(text):
                raise ServeError(422, "invalid_text", f"Row {n} holds a lone surrogate (e.g. \\ud800), which is not "
                                                      "valid Unicode text; send UTF-8 encodable strings.")
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
    """Answers 413 to a body over ``limit`` bytes, counted as it arrives (declared or chunked), before the app
    parses any of it. The rest of such a body is read and thrown away, up to ``drain`` bytes in all, so that an
    ordinary client (urllib, requests) that sends the whole body before reading gets the JSON answer instead of
    a reset connection; past that bound the server answers at once and closes. ``error(status, kind, message)``
    makes the JSON body (the adakron shape by default); ``hint`` says which settings set the limit."""

    def __init__(self, app, limit: int, drain: int | None = None, error=error_body,
                 hint: str = "; see --max-rows and --max-chars"):
        self.app, self.limit, self.error, self.hint = app, limit, error, hint
        self.drain = drain if drain is not None else max(4 * limit, 64 * 2**20)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((int(v) for k, v in scope["headers"] if k == b"content-length" and v.isdigit()), None)
        if declared is not None and declared > self.limit:
            if declared <= self.drain:
                await self._discard(receive, declared)
            await self._refuse(send, declared)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                more = message.get("more_body", False) and await self._discard(receive, self.drain - size)
                await self._refuse(send, None if more else size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _discard(receive, budget: int) -> bool:
        """Reads and drops the body until it ends (False) or ``budget`` bytes are spent (True: more remains)."""
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return False
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return False
        return True

    async def _refuse(self, send, size: int | None) -> None:
        seen = f"({size} bytes) " if size is not None else "(more than that) "
        body = self.error(413, "body_too_large", f"The request body {seen}is larger than this server accepts "
                                                 f"({self.limit} bytes{self.hint}).")
        await JSONResponse(body, status_code=413, headers={"connection": "close"})(
            {"type": "http"}, _no_body, send)


async def _no_body():
    return {"type": "http.disconnect"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def _lifespan(worker: BatchWorker):
    """The app's lifespan: ``worker`` runs while the app serves (its stop answers what is left with a 503)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    return lifespan


def generates_text(model: nn.Module) -> bool:
    """Whether ``model`` is a causal LM (``...ForCausalLM``, GPT-2's ``...LMHeadModel``): it gets the OpenAI
    routes. The model's class decides, as its config's architectures do for ``models.is_causal_lm``."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def create_app(model: nn.Module, tokenizer: Any, adapters: dict[str, str | Path] | None = None, *,
               adapter_root: str | Path | None = None, allow_admin: bool = False,
               max_rows: int = DEFAULT_MAX_ROWS, max_chars: int = DEFAULT_MAX_CHARS,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_batch: int = DEFAULT_MAX_BATCH,
               model_name: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
               max_body_bytes: int = DEFAULT_LM_BODY_BYTES) -> FastAPI:
    """A FastAPI app serving ``adapters`` ({name: directory}) on ``model`` (modified in place: the
    adapters are loaded onto it). Raises ServeError / AdapterLoadError for an adapter it cannot serve.

    A causal LM (``generates_text``) gets the OpenAI routes instead of the classifier ones: ``model_name`` is
    the name that selects the base model (default: the model's path), ``max_tokens`` the most tokens a request
    may generate, ``max_rows`` the most prompts per request, ``max_batch`` the most rows decoded together;
    ``max_body_bytes`` caps its request bodies (``max_chars``, ``adapter_root`` and admin do not apply)."""
    settings = [("max_rows", max_rows), ("max_chars", max_chars), ("max_batch", max_batch),
                ("max_tokens", max_tokens), ("max_body_bytes", max_body_bytes)]
    for name, value in settings:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ServeError(400, "invalid_setting", f"{name} must be a positive integer, not {value!r}.")
    if not (isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms) and max_wait_ms >= 0):
        raise ServeError(400, "invalid_setting", f"max_wait_ms must be a finite number >= 0, not {max_wait_ms!r}.")
    if generates_text(model):
        if allow_admin:
            raise ServeError(400, "invalid_setting", "Loading adapters at run time (--allow-admin) is not "
                                                     "supported for causal LMs; pass them with --adapter.")
        return _create_lm_app(model, tokenizer, adapters or {}, model_name=model_name, max_tokens=max_tokens,
                              max_prompts=max_rows, max_wait_ms=max_wait_ms, max_batch=max_batch,
                              max_body_bytes=max_body_bytes)
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

    app = FastAPI(title="adakron", version=__version__, lifespan=_lifespan(batcher),
                  description="Many AdaKron adapters on one frozen backbone; requests for different adapters "
                              "share forward passes.")
    app.state.engine, app.state.batcher, app.state.limits = engine, batcher, limits
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.kind, exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body(400, "malformed_json", "The request body is not valid JSON.", details),
                                status_code=400)
        return JSONResponse(error_body(422, "invalid_request", "The request does not match the schema.", details),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, "http_error", str(exc.detail)), status_code=exc.status_code,
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
        version, predictions = await batcher.submit(body.adapter, rows, info)
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
                      stats=engine.snapshot())

    return app


def _create_lm_app(model: nn.Module, tokenizer: Any, adapters: dict[str, str | Path], *, model_name: str | None,
                   max_tokens: int, max_prompts: int, max_wait_ms: float, max_batch: int,
                   max_body_bytes: int) -> FastAPI:
    """The OpenAI-compatible app of a causal LM: the base model and every adapter are `model`s, and requests
    for different ones are decoded together (generation.py)."""
    engine = Engine(model, ensure_pad_token(tokenizer), max_batch)
    # One encode settles the tokenizer backend's padding and truncation state: later encodes (on several threads)
    # then never change it, which would fail ("Already borrowed") while the worker thread decodes.
    tokenizer("warm-up")
    model_name = model_name or str(getattr(model.config, "_name_or_path", "") or "") or "base"
    for name, directory in adapters.items():
        if name == model_name:
            raise ServeError(400, "invalid_setting", f"--adapter {name}: that is the base model's name; name the "
                                                     "adapter otherwise (or set --served-model-name).")
        engine.load(name, directory)
    generator = GenerationEngine(engine, max_wait_ms / 1000.0, max_batch)
    defaults = model.generation_config.to_diff_dict() if getattr(model, "generation_config", None) else {}
    temperature, top_p = defaults.get("temperature"), defaults.get("top_p")
    limits = openai.LMLimits(
        max_tokens=max_tokens, max_prompts=max_prompts, context=engine.token_limit,
        vocab_size=model.get_input_embeddings().num_embeddings,
        # Like vLLM: sampling defaults to what the checkpoint's generation config sets, else OpenAI's 1 and 1.
        temperature=float(temperature) if isinstance(temperature, (int, float)) and 0 <= temperature <= 2 else 1.0,
        top_p=float(top_p) if isinstance(top_p, (int, float)) and 0 < top_p <= 1 else 1.0)

    app = FastAPI(title="adakron", version=__version__, lifespan=_lifespan(generator),
                  description="An OpenAI-compatible server for a causal LM and its AdaKron adapters: the request's "
                              "`model` names the adapter, and requests for different adapters are decoded together.")
    app.state.engine, app.state.generator, app.state.limits = engine, generator, limits
    app.add_middleware(_BodyLimit, limit=max_body_bytes, hint="",
                       error=lambda status, kind, message: openai.error_body(status, message, code=kind))
    openai.install_errors(app)
    app.include_router(openai.router(engine, generator, limits, model_name))

    @app.get("/healthz", response_model=GenerationHealth, tags=["health"])
    async def healthz() -> GenerationHealth:
        return GenerationHealth(status="ok", version=__version__, model=model_name, adapters=len(engine.adapters),
                                stats=generator.snapshot())

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
