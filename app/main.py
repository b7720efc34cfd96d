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

from .config import Settings
from .errors import ServiceError, error_json
from .routes import router
from .service import Service

access_log = logging.getLogger("halo.access")


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

    @app.middleware("http")
    async def request_id_logs_and_metrics(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        started = time.perf_counter()
        response = await call_next(request)
        elapsed = time.perf_counter() - started
        response.headers["X-Request-ID"] = request_id
        route = request.scope.get("route")
        path = route.path if route is not None else "unmatched"
        service: Optional[Service] = getattr(request.app.state, "service", None)
        if service is not None:
            service.metrics.requests.labels(path, str(response.status_code)).inc()
            service.metrics.latency.labels(path, str(response.status_code)).observe(elapsed)
        access_log.info(json.dumps({
            "request_id": request_id, "method": request.method, "path": request.url.path,
            "status": response.status_code, "ms": round(elapsed * 1e3, 2),
            "client": request.client.host if request.client else None}))
        return response

    return app
