"""HTTP request plumbing that every protocol adapter shares: the body read within its limits and
deadlines, the wait for a client's disconnect, and validation errors as one message."""
import asyncio
import time
from typing import List

from fastapi import Request
from pydantic import ValidationError

from .errors import ServiceError


async def read_body(request: Request, limit: int, deadline: float, pause_s: float) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit``, and with 408
    when a part of it takes longer than ``pause_s`` to come or the request's ``deadline`` passes
    first (a client that declares a large body and stalls, or sends it a byte a second, would
    otherwise hold its connection and its memory until it gave up)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, "body_too_large", f"request body of {declared} bytes is over the limit of {limit}",
                           close_connection=True)
    chunks, size, loop = [], 0, asyncio.get_running_loop()
    try:
        async with asyncio.timeout(None) as timeout:
            stream = request.stream().__aiter__()
            while True:
                timeout.reschedule(loop.time() + min(pause_s, deadline - time.monotonic()))
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                size += len(chunk)
                if size > limit:
                    raise ServiceError(413, "body_too_large", f"request body is over the limit of {limit} bytes",
                                       close_connection=True)
                chunks.append(chunk)
    except TimeoutError as e:
        raise ServiceError(408, "body_timeout", f"the request body stopped arriving after {size} bytes (each part "
                           f"must come within HALO_BODY_TIMEOUT_S={pause_s:g} s, the whole body within the "
                           "request's deadline)", close_connection=True) from e
    body = b"".join(chunks)
    request._body = body  # let Starlette's form parser read the body we already have
    return body


def validation_message(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())


async def watch_disconnect(request: Request, gone: List[bool]) -> None:
    """Once the body is read, the next ASGI message can only be the client's disconnect: wait for it
    (no polling), and mark the request's images so the batcher drops them."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone[0] = True
            return
