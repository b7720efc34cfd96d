"""The FastAPI app: ``create_app(settings)`` wires routes, errors, request ids, logs and metrics."""
import json
import logging
import random
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import demo, v2
from .config import Settings
from .errors import ServiceError, error_json
from .routes import predict, router
from .service import Service

access_log = logging.getLogger("halo.access")
# A client's X-Request-ID is cut to this: room for any id scheme in use (a UUID has 36 characters, a W3C
# traceparent 55), not for a header that would make every access log line and the echoed header as long.
MAX_REQUEST_ID_CHARS = 128


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
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:MAX_REQUEST_ID_CHARS]
        # Not uuid4: it reads os.urandom, a system call that lets go of Python's lock, and taking it back
        # from the threads that decode and compute cost the event loop 75 us a request under load (py-spy:
        # 8% of its samples at 32 clients). An id needs to be unique, not unguessable.
        request_id = given if given.isprintable() and given else f"{random.getrandbits(128):032x}"
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


class PredictShortPath:
    """``POST /predict`` straight to its endpoint (routes.predict), past FastAPI's exception
    middleware, router and request handler, which took a large share of the event loop's time per
    request at 32 clients (py-spy, docs/performance.md): time the model's core then lost. The
    endpoint, its error mapping (``error_response``) and the OpenAPI route stay the same; every
    other request goes on to FastAPI. Sits inside RequestContextMiddleware (ids, metrics, logs)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            await self.app(scope, receive, send)
            return
        fastapi_app: FastAPI = scope["app"]
        scope["route"] = fastapi_app.state.predict_route  # the metrics' route label
        request = Request(scope, receive, send)
        try:
            response = await predict(request)
        except Exception as error:
            response = error_response(request, error)
        await response(scope, receive, send)


def error_response(request: Request, error: Exception) -> JSONResponse:
    """Every failure as JSON {"error": {"code", "message"}} (the protocol's {"error": "..."} under
    /v2), with the status it stands for."""
    path = request.url.path
    in_v2 = path == v2.PREFIX or path.startswith(v2.PREFIX + "/")
    if isinstance(error, ServiceError):
        return error_json(error.status, error.code, error.message, error.retry_after, error.close_connection, in_v2)
    if isinstance(error, RequestValidationError):
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return error_json(422, "invalid_request", message, v2=in_v2)
    if isinstance(error, StarletteHTTPException):
        response = error_json(error.status_code, "http_error", str(error.detail), v2=in_v2)
        response.headers.update(error.headers or {})  # what the status needs, such as a 405's Allow
        return response
    logging.getLogger("halo.service").exception("unhandled error in %s", path)
    return error_json(500, "internal_error", f"{type(error).__name__}: {error}", v2=in_v2)


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
    app.include_router(v2.router)
    if settings.demo_page:
        demo.install(app)
    app.state.predict_route = next(r for r in router.routes if getattr(r, "path", None) == "/predict")

    async def handle(request: Request, error: Exception) -> JSONResponse:
        return error_response(request, error)

    for error_type in (ServiceError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(error_type, handle)
    app.add_middleware(PredictShortPath)  # added first: inside the request context
    app.add_middleware(RequestContextMiddleware)
    return app
