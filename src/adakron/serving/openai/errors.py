"""OpenAI-style errors: the body ``{"error": {"message", "type", "param", "code"}}`` for every refusal, whatever
raised it (a route, request validation, the router, a crash)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..schemas import ServeError


class OpenAIError(Exception):
    """A refused request, answered with ``status`` and the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _respond(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}  # pydantic's names for the members of a union


def _path(loc: list) -> str:
    """``["messages", 0, "content"]`` as ``messages[0].content``, without pydantic's union-member tags."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part[:1].islower() and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """The first problem pydantic found, as OpenAI words it (400, the parameter named)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return OpenAIError(400, "The request body is not valid JSON.", code="invalid_json")
    error = errors[0]
    loc = list(error.get("loc", ()))
    loc = loc[1:] if loc[:1] == ["body"] else loc
    param = loc[0] if loc and isinstance(loc[0], str) else None
    path, kind = _path(loc), error.get("type", "")
    if not loc:
        return OpenAIError(400, "The request body must be a JSON object.", code="invalid_type")
    if kind == "missing":
        return OpenAIError(400, f"Missing required parameter: '{path}'.", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: '{path}'.", param, "unknown_parameter")
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    return OpenAIError(400, f"Invalid '{path}': {message}.", param, code)


def install_errors(app: FastAPI) -> None:
    """Every error of the app, whatever raised it, in the OpenAI shape."""

    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError) -> JSONResponse:
        return _respond(exc)

    @app.exception_handler(ServeError)
    async def _serve(request: Request, exc: ServeError) -> JSONResponse:
        return _respond(OpenAIError(exc.status, exc.message, code=exc.kind))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _respond(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        if exc.status_code == 404:
            message = (f"No such endpoint: {request.method} {request.url.path}; this server has /v1/models, "
                       "/v1/completions and /v1/chat/completions.")
        response = _respond(OpenAIError(exc.status_code, message))
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return _respond(OpenAIError(500, "The server failed on this request; see its log.", code="internal_error"))
