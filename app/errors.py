"""Errors at the edge: every failure a client can cause becomes JSON {"error": {"code", "message"}}
(or {"error": "<message>"} on the Open Inference Protocol's routes)."""
from typing import Optional

from fastapi.responses import JSONResponse


class ServiceError(Exception):
    """``close_connection``: the answer closes its connection (the rest of a body that stalled, a
    server that stops)."""

    def __init__(self, status: int, code: str, message: str, retry_after: Optional[int] = None,
                 close_connection: bool = False):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        self.close_connection = close_connection


def error_json(status: int, code: str, message: str, retry_after: Optional[int] = None,
               close_connection: bool = False, v2: bool = False) -> JSONResponse:
    """``v2``: in the Open Inference Protocol's form, {"error": "<message>"}."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if close_connection:
        headers["Connection"] = "close"
    body = {"error": message} if v2 else {"error": {"code": code, "message": message}}
    return JSONResponse(body, status, headers=headers or None)
