"""Typed errors → HTTP responses, in Ollama's shape (`{"error": "..."}`) or, under /v1, OpenAI's
(`{"error": {"message", "type", "param", "code"}}`, ollama openai/openai.go NewError).

Status codes per the checklist §0: 400 bad input, 404 unknown model or route, 405 wrong method, 503 queue full
or a cluster that cannot hold the model, 500 otherwise. Handlers raise `APIError` (or any mapped typed error) and never build error bodies themselves.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..model.errors import ModelFileError
from ..model.options import InvalidOptionError
from ..runtime.recovery import CapacityError
from ..runtime.requests import ContextLengthError, EngineClosedError, QueueFullError
from ..scheduler.errors import InfeasiblePlanError
from ..service.generation import UnsupportedRequestError
from ..service.grammar import SchemaError
from ..service.modelfile import ModelfileError
from ..service.names import InvalidModelNameError
from ..service.settings import InvalidDurationError
from ..service.store import StoreError

log = logging.getLogger(__name__)

SERVER_BUSY = "server busy, please try again.  maximum pending requests exceeded"


class APIError(Exception):
    """An error with its HTTP status; `message` is what the client sees."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


MAPPED_ERRORS: tuple[type[BaseException], ...] = (
    APIError, InvalidModelNameError, StoreError, QueueFullError, EngineClosedError, ModelFileError,
    InvalidOptionError, InvalidDurationError, ModelfileError, ContextLengthError, UnsupportedRequestError,
    ValidationError, InfeasiblePlanError, CapacityError, SchemaError,
)


def status_and_message(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and client-facing message of any error a handler may raise."""
    if isinstance(exc, APIError):
        return exc.status, exc.message
    if isinstance(exc, InvalidModelNameError):
        return 400, f"invalid model name: {exc.reason}"
    if isinstance(exc, StoreError):
        return exc.status, str(exc)
    if isinstance(exc, QueueFullError):
        return 503, SERVER_BUSY
    if isinstance(exc, EngineClosedError):
        return 503, f"model unloaded while the request was queued: {exc}"
    if isinstance(exc, (InfeasiblePlanError, CapacityError)):
        # the cluster cannot hold the model right now (a node is gone or too small): retry when capacity returns
        return 503, str(exc)
    if isinstance(exc, (ModelFileError, InvalidOptionError, InvalidDurationError, ModelfileError,
                        ContextLengthError, UnsupportedRequestError, SchemaError)):
        return 400, str(exc)
    if isinstance(exc, ValidationError):
        return 400, describe_validation(exc.errors())
    return 500, f"internal error: {exc}"


def describe_validation(errors: list[Any]) -> str:
    """One readable line from pydantic errors: `invalid value for 'prompt': Input should be a valid string`."""
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"invalid value for '{loc}': {e.get('msg', 'invalid')}" if loc else e.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request"


def is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(request: Request, status: int, message: str) -> JSONResponse:
    if is_openai(request):
        kind = {404: "not_found_error"}.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        status, message = status_and_message(exc)
        if status >= 500 and not isinstance(exc, (APIError, QueueFullError, StoreError)):
            log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(request, status, message)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: "404 page not found", 405: "405 method not allowed"}.get(exc.status_code, str(exc.detail))
        response = error_response(request, exc.status_code, message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 400, describe_validation(list(exc.errors())))

    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    # Starlette re-raises whatever reaches a handler registered for `Exception` (its ServerErrorMiddleware), so
    # every expected error class is registered by name; anything else is a genuine 500 and is logged.
    for cls in MAPPED_ERRORS:
        app.add_exception_handler(cls, on_error)
    app.add_exception_handler(Exception, on_error)


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object: empty → 400 `missing request body`, malformed → 400 naming the
    position, a non-object → 400."""
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_body(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """Validate against a pydantic model (unknown fields ignored); wrong types → 400."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise APIError(400, describe_validation(exc.errors())) from None
