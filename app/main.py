"""The FastAPI app: ``create_app(settings)`` wires routes, errors, request ids, logs and metrics."""
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .errors import ServiceError, error_json
from .routes import router
from .service import Service

access_log = logging.getLogger("halo.access")


class RequestContextMiddleware:
    """Request id (X-Request-ID honoured or generated, and returned), access log line, metrics.

    Plain ASGI rather than ``@app.middleware("http")``: the latter runs every request through an
    extra task and stream, a cost the batching path would pay on each image."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = given if given.isprintable() and given else uuid.uuid4().hex
        status, started = 500, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = route.path if route is not None else "unmatched"
            service: Optional[Service] = getattr(scope["app"].state, "service", None)
            if service is not None:
                service.metrics.requests.labels(path, str(status)).inc()
                service.metrics.latency.labels(path, str(status)).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(json.dumps({
                    "request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                    "ms": round(elapsed * 1e3, 2), "client": client[0] if client else None}))


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(settings)
        app.state.service = service
        service.start()
        yield
        service.shutdown()

    app = FastAPI(title="HaloNet inference service", version="0.1.0", lifespan=lifespan,
                  description="Image classification with HaloNets: top-k labels and attention heatmaps, "
                              "dynamically batched.")
    app.include_router(router)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, error: ServiceError):
        return error_json(error.status, error.code, error.message, error.retry_after)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError):
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return error_json(422, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        return error_json(error.status_code, "http_error", str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        logging.getLogger("halo.service").exception("unhandled error in %s", request.url.path)
        return error_json(500, "internal_error", f"{type(error).__name__}: {error}")

    app.add_middleware(RequestContextMiddleware)
    return app
