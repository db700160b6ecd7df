"""The FastAPI app: request limits, routes, and errors as JSON."""

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

from .. import __version__
from ..adapters.checkpoint import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError
from ..training.data import is_valid_text
from .batcher import MicroBatcher
from .engine import DEFAULT_MAX_BATCH, TASK_NAME, Engine, ServedAdapter
from .schemas import (
    AdapterInfo,
    AdapterList,
    ErrorResponse,
    Health,
    LoadRequest,
    PredictRequest,
    PredictResponse,
    RemoveResponse,
    ServeError,
    error_body,
)

DEFAULT_MAX_ROWS = 64
DEFAULT_MAX_CHARS = 4096
DEFAULT_MAX_WAIT_MS = 10.0


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
    a reset connection; past that bound the server answers at once and closes."""

    def __init__(self, app, limit: int, drain: int | None = None):
        self.app, self.limit = app, limit
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
        body = error_body(413, "body_too_large", f"The request body {seen}is larger than this server accepts "
                                                 f"({self.limit} bytes; see --max-rows and --max-chars).")
        await JSONResponse(body, status_code=413, headers={"connection": "close"})(
            {"type": "http"}, _no_body, send)


async def _no_body():
    return {"type": "http.disconnect"}


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
    if not (isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms) and max_wait_ms >= 0):
        raise ServeError(400, "invalid_setting", f"max_wait_ms must be a finite number >= 0, not {max_wait_ms!r}.")
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
                      stats=engine.snapshot())

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
