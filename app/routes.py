"""HTTP endpoints: parse the request, call the pipeline (app/pipeline.py), send its answer. Errors
are ServiceError, turned into JSON responses by app/main.py."""
import asyncio
import base64
import binascii
import time
from typing import List, Tuple

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.transforms import describe_preprocessing

from .batcher import AdaptiveWindow
from .errors import ServiceError
from .http_request import read_body, validation_message, watch_disconnect
from .pipeline import Pipeline
from .schemas import ErrorResponse, JsonPredictRequest, ModelInfo, PredictOptions, PredictResponse
from .service import Service

router = APIRouter()
# What /predict answers besides 200, a bug's 500 included; its 499, for a client that left, reaches no one.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 408, 413, 415, 422, 500, 503, 504)}
# The options of a multipart request, which come in its query; a JSON body carries them itself.
QUERY_OPTIONS = [{"name": name, "in": "query", "schema": schema,
                  "description": f"multipart requests only: {PredictOptions.model_fields[name].description}"}
                 for name, schema in (("top_k", {"type": "integer", "minimum": 1}), ("heatmaps", {"type": "boolean"}),
                                      ("heatmap_format", {"type": "string", "enum": ["array", "png"]}),
                                      ("heatmap_layer", {"type": "string"}),
                                      ("heatmap_max_side", {"type": "integer", "minimum": 16, "maximum": 2048}))]


def service_of(request: Request) -> Service:
    return request.app.state.service


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="The model is loaded and warmed up", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> dict:
    service = service_of(request)
    if not service.ready:
        raise service.not_ready_error()
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(service_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/model", response_model=ModelInfo, summary="The model being served",
            responses={503: {"model": ErrorResponse}})
async def model_info(request: Request) -> ModelInfo:
    service = service_of(request)
    engine = service.require_engine()
    settings = service.settings
    weights = "checkpoint" if settings.checkpoint else "shipped" if engine.cfg.weights == "shipped" else "untrained"
    return ModelInfo(
        name=engine.name, version=engine.version, classes=engine.labels, input_size=list(engine.cfg.input_size),
        preprocessing=describe_preprocessing(engine.cfg), weights=weights,
        trained_on=(engine.cfg.trained_on or None) if weights == "shipped" else None,
        parameters=engine.parameters, backend=settings.backend, attention_backends=engine.attention_backends,
        device=str(engine.device), dtype=settings.dtype, threads=engine.threads, model_workers=engine.workers,
        graph=engine.execution, compile_seconds=engine.compile_seconds,
        compile_cached=engine.compile_cached if engine.compiled is not None else None,
        traced_batch_sizes=engine.traced_sizes,
        halo_layers=list(engine.halo_layers),
        default_heatmap_layer=engine.default_heatmap_layer,
        batch_policy="adaptive" if isinstance(service.batcher.policy, AdaptiveWindow) else "fixed",
        max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue)


def _options(raw: dict) -> PredictOptions:
    try:
        return PredictOptions.model_validate(raw)
    except ValidationError as e:
        raise ServiceError(422, "invalid_options", validation_message(e)) from e


async def _parse(request: Request, pipeline: Pipeline, deadline: float) -> Tuple[List[bytes], PredictOptions]:
    settings = pipeline.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/json"):
        raise ServiceError(415, "unsupported_media_type", "send multipart/form-data (field 'file') or "
                           f"application/json, not {content_type or 'nothing'}")
    limit = settings.max_body_bytes
    body = await read_body(request, limit, deadline, settings.body_timeout_s)
    if content_type == "application/json":
        try:
            parsed = JsonPredictRequest.model_validate_json(body)
        except ValidationError as e:
            raise ServiceError(422, "invalid_request", validation_message(e)) from e
        if request.query_params:  # documented for multipart requests: here they would be silently ignored
            raise ServiceError(422, "invalid_options", "a JSON request carries its options in its body, not in "
                               f"the query ({', '.join(request.query_params)})")
        files = []
        for i, encoded in enumerate(parsed.images):
            try:
                files.append(base64.b64decode(encoded, validate=True))
            except (binascii.Error, ValueError) as e:
                raise ServiceError(400, "invalid_base64", f"images[{i}] is not valid base64") from e
        return files, parsed  # a JsonPredictRequest is a PredictOptions, already validated
    uploads = (await _form(request, pipeline, limit)).getlist("file")
    if not uploads:
        raise ServiceError(422, "no_images", "multipart request has no 'file' field")
    files = []
    for upload in uploads:
        if isinstance(upload, str):
            raise ServiceError(422, "invalid_request", "the 'file' field must be a file upload, not text")
        files.append(await upload.read())
    return files, _options(dict(request.query_params))


async def _form(request: Request, pipeline: Pipeline, part_limit: int) -> FormData:
    """The multipart body's parts. The parser stops at the first file past the image limit, so that a
    form of many tiny files costs no more than the largest request that could be answered; text parts
    carry nothing (the options come in the query) and are bounded the same way."""
    most = pipeline.settings.max_images_per_request
    try:
        return await request.form(max_files=most, max_fields=most, max_part_size=part_limit)
    except StarletteHTTPException as e:
        # Starlette tells its limits from a malformed body (400) by the message alone.
        if str(e.detail).startswith("Too many files"):
            raise pipeline.too_many_images(f"over {most}") from e
        if str(e.detail).startswith("Too many fields"):
            raise ServiceError(413, "too_many_fields", f"over {most} text fields in one request (the images go in "
                               "'file' fields, the options in the query)") from e
        raise


@router.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES,
             summary="Classify images: top-k labels, optionally attention heatmaps",
             openapi_extra={"parameters": QUERY_OPTIONS, "requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                     "file": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}},
                 "application/json": {"schema": JsonPredictRequest.model_json_schema()}}}})
async def predict(request: Request) -> JSONResponse:
    """Multipart: one or more `file` fields, options in the query (`?top_k=3&heatmaps=true`).
    JSON: `{"images": ["<base64>", ...], "top_k": 3, "heatmaps": true}`."""
    service = service_of(request)
    deadline = time.monotonic() + service.settings.request_timeout_ms / 1000
    pipeline = service.require_ready()
    pipeline.admit(1)  # the image count is not known yet: refuse now if even one would wait too long
    files, options = await _parse(request, pipeline, deadline)
    gone = [False]
    watcher = asyncio.create_task(watch_disconnect(request, gone))
    try:
        results = await pipeline.predict(files, options, deadline, client_gone=lambda: gone[0])
    finally:
        watcher.cancel()
    # Built to the PredictResponse schema (which documents it) and sent as is: validating our own
    # output again on every request would cost more than the rest of the route.
    return JSONResponse(dict(model=pipeline.engine.name, version=pipeline.engine.version, results=results))
