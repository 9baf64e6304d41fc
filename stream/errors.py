"""Errors of the HTTP/WebRTC side, and their JSON form: {"error": {code, message, retryable}}."""

from __future__ import annotations

import json

from aiohttp import web


class ApiError(Exception):
    """An error a client caused or can retry; rendered as JSON with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, retryable: bool = False,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": {"code": self.code, "message": self.message,
                          "retryable": self.retryable}}
        return web.Response(status=self.status, text=json.dumps(body),
                            content_type="application/json", headers=self.headers)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} does not exist (it may have ended)")


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})
