"""HTTP error responses: every error is ``{"error": {"code": ..., "message": ...}}``.

Statuses come from the one table in ``trimtab.errors``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from trimtab.errors import ErrorCode, TrimtabError

logger = logging.getLogger("trimtab.server")

_HTTP_CODES = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND}


def error_response(code: ErrorCode, message: str, status: int | None = None) -> JSONResponse:
    from trimtab.errors import ERROR_TABLE

    return JSONResponse({"error": {"code": code.value, "message": message}}, status_code=status or ERROR_TABLE[code][0])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TrimtabError)
    async def _trimtab(request: Request, exc: TrimtabError) -> JSONResponse:
        logger.info("%s %s -> %s: %s", request.method, request.url.path, exc.code.value, exc.message)
        return error_response(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        message = "; ".join(parts) or "invalid request"
        logger.info("%s %s -> invalid_request: %s", request.method, request.url.path, message)
        return error_response(ErrorCode.INVALID_REQUEST, message)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        return error_response(code, str(exc.detail), status=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ErrorCode.INTERNAL, "internal server error (logged on the server)")
