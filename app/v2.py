"""The Open Inference Protocol (KServe v2) over REST: a thin adapter over the same pipeline, batcher
and limits as /predict. Health, server and model metadata, readiness, and inference with images
(BYTES: encoded files) or preprocessed pixels (FP32 [N, C, H, W]), answering probabilities, the
top k as "score:index:label" (the classification extension) and heatmaps, in JSON or as binary
tensor data (app/v2_codec.py). Errors are the protocol's {"error": "..."} (app/main.py)."""
import asyncio
import time
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from torch import Tensor

from .engine import Engine
from .errors import ServiceError
from .http_request import read_body, watch_disconnect
from .pipeline import Pipeline
from .schemas import EXAMPLE_PNG_BASE64
from .service import Service
from .v2_codec import HEADER_LENGTH, DecodedInput, OutputTensor, decompress, encode_response, parse_request
from .v2_schemas import (InferenceRequest, InferenceResponse, Liveness, ModelMetadata, ModelReadiness, Readiness,
                         ServerMetadata, TensorMetadata, V2Error)

PREFIX = "/v2"
router = APIRouter(prefix=PREFIX, tags=["KServe v2 (Open Inference Protocol)"])
EXTENSIONS = ["binary_tensor_data", "classification"]
IMAGES, PIXELS = "images", "pixels"  # the inputs
PROBABILITIES, HEATMAPS = "probabilities", "heatmaps"  # the outputs
MODEL_ERRORS = {status: {"model": V2Error} for status in (404, 503)}
# As /predict's: a bug's 500 is documented; a 499 (the client left) reaches no one.
INFER_ERRORS = {status: {"model": V2Error} for status in (400, 404, 408, 413, 415, 422, 500, 503, 504)}


def _path_parameters(*names: str) -> List[dict]:
    """The model routes' path parameters, for the docs: the endpoints read them from the request, as
    declared ones would make FastAPI document a 422 of its own that these routes never send."""
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in names]


MODEL_PATH, VERSION_PATH = _path_parameters("name"), _path_parameters("name", "version")


def _service(request: Request) -> Service:
    return request.app.state.service


def _check_model(engine: Engine, request: Request) -> None:
    """404 unless the request's path names the served model (and its version, if it names one)."""
    name, version = request.path_params["name"], request.path_params.get("version")
    if name != engine.name:
        raise ServiceError(404, "unknown_model", f"no model {name!r} here: this server serves {engine.name!r}")
    if version is not None and version != engine.version:
        raise ServiceError(404, "unknown_version", f"model {name!r} has one version, {engine.version!r}, "
                           f"not {version!r}")


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="halonet-serve", version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", response_model=Liveness, summary="The process is alive")
async def live() -> Liveness:
    return Liveness(live=True)


@router.get("/health/ready", response_model=Readiness, summary="The model is loaded and warmed up",
            responses={503: {"model": V2Error}})
async def ready(request: Request) -> Readiness:
    _service(request).require_ready()
    return Readiness(ready=True)


@router.get("/models/{name}", response_model=ModelMetadata, summary="Model metadata", responses=MODEL_ERRORS,
            openapi_extra={"parameters": MODEL_PATH})
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, summary="Model metadata",
            responses=MODEL_ERRORS, openapi_extra={"parameters": VERSION_PATH})
async def model_metadata(request: Request) -> ModelMetadata:
    engine = _service(request).require_engine()
    _check_model(engine, request)
    outputs = [TensorMetadata(name=PROBABILITIES, datatype="FP32", shape=[-1, len(engine.labels)])]
    if engine.default_heatmap_layer is not None:  # the default layer's shape; heatmap_layer may name another
        outputs.append(TensorMetadata(name=HEATMAPS, datatype="FP32",
                                      shape=[-1, *engine.map_shape(engine.default_heatmap_layer)]))
    return ModelMetadata(name=engine.name, versions=[engine.version], platform="pytorch", outputs=outputs, inputs=[
        TensorMetadata(name=IMAGES, datatype="BYTES", shape=[-1]),
        TensorMetadata(name=PIXELS, datatype="FP32", shape=[-1, *engine.cfg.input_size])])


@router.get("/models/{name}/ready", response_model=ModelReadiness, summary="The model takes requests",
            responses=MODEL_ERRORS, openapi_extra={"parameters": MODEL_PATH})
@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReadiness,
            summary="The model takes requests", responses=MODEL_ERRORS, openapi_extra={"parameters": VERSION_PATH})
async def model_ready(request: Request) -> ModelReadiness:
    service = _service(request)
    _check_model(service.require_engine(), request)
    service.require_ready()
    return ModelReadiness(name=request.path_params["name"], ready=True)


@dataclass
class WantedOutput:
    name: str
    binary: bool
    top_k: Optional[int] = None  # probabilities as the classification extension's top k
    layer: Optional[str] = None  # heatmaps: the halo layer


def _wanted_outputs(pipeline: Pipeline, request: InferenceRequest) -> List[WantedOutput]:
    default_binary = request.parameters.get("binary_data_output", False)
    if request.outputs is None:
        return [WantedOutput(PROBABILITIES, default_binary is True)]
    wanted: List[WantedOutput] = []
    for output in request.outputs:
        params = output.parameters
        if output.name not in (PROBABILITIES, HEATMAPS) or output.name in [w.name for w in wanted]:
            raise ServiceError(422, "invalid_request", f"output {output.name!r} is unknown or asked twice: this model "
                               f"has {PROBABILITIES} and {HEATMAPS}")
        if "shared_memory_region" in params:
            raise ServiceError(400, "unsupported_extension", "the shared-memory extension is not supported: outputs "
                               "come in the response")
        binary = params.get("binary_data", default_binary)
        top_k, layer = params.get("classification"), params.get("heatmap_layer")
        if not isinstance(binary, bool) or (top_k is not None and (isinstance(top_k, bool) or not isinstance(
                top_k, int) or top_k < 1)) or (layer is not None and not isinstance(layer, str)):
            raise ServiceError(422, "invalid_request", f"output {output.name!r}: binary_data is a boolean, "
                               "classification a positive integer, heatmap_layer a string")
        if output.name == PROBABILITIES and layer is not None or output.name == HEATMAPS and top_k is not None:
            raise ServiceError(422, "invalid_request", f"classification applies to {PROBABILITIES}, heatmap_layer "
                               f"to {HEATMAPS}")
        if top_k is not None:
            pipeline.check_top_k(top_k)
        wanted.append(WantedOutput(output.name, binary, top_k or None,
                                   pipeline.heatmap_layer(layer) if output.name == HEATMAPS else None))
    return wanted


def _images(engine: Engine, inputs: List[DecodedInput]) -> Union[List[bytes], Tensor]:
    """The request's one input as the pipeline takes it: encoded files, or a (N, C, H, W) batch."""
    if len(inputs) != 1 or inputs[0].spec.name not in (IMAGES, PIXELS):
        raise ServiceError(422, "invalid_request", f"send one input: {IMAGES} (BYTES, encoded image files) or "
                           f"{PIXELS} (FP32, preprocessed), not {', '.join(i.spec.name for i in inputs)}")
    spec, elements = inputs[0].spec, inputs[0].elements
    if spec.name == IMAGES:
        if spec.datatype != "BYTES" or len(spec.shape) not in (1, 2) or spec.shape[1:] not in ([], [1]):
            raise ServiceError(422, "invalid_request", f"input {IMAGES} is BYTES of shape [N] or [N, 1], not "
                               f"{spec.datatype} {spec.shape}")
    else:
        size = list(engine.cfg.input_size)
        if spec.datatype != "FP32" or len(spec.shape) != 4 or spec.shape[1:] != size:
            raise ServiceError(422, "invalid_request", f"input {PIXELS} is FP32 of shape "
                               f"[N, {', '.join(map(str, size))}] (the model's input size), not {spec.datatype} "
                               f"{spec.shape}")
        if not np.isfinite(elements).all():
            raise ServiceError(422, "invalid_request", f"input {PIXELS} holds NaN or infinite values")
    if spec.shape[0] == 0:
        raise ServiceError(422, "invalid_request", "the input holds no image")
    return elements if spec.name == IMAGES else torch.from_numpy(elements.reshape(spec.shape).copy())


def _output(engine: Engine, wanted: WantedOutput, results: list) -> OutputTensor:
    if wanted.name == HEATMAPS:
        maps = torch.stack([r.maps for r in results])
        return OutputTensor(HEATMAPS, "FP32", list(maps.shape), maps.numpy(), wanted.binary)
    if wanted.top_k is None:
        probs = torch.stack([r.probs for r in results])
        return OutputTensor(PROBABILITIES, "FP32", list(probs.shape), probs.numpy(), wanted.binary)
    # Triton's classification extension: "score:index:label", best first; the score in full (repr)
    # precision, so that it parses back to the probability itself.
    top = [f"{p['score']!r}:{p['index']}:{p['label']}" for r in results for p in engine.top_k(r.probs, wanted.top_k)]
    return OutputTensor(PROBABILITIES, "BYTES", [len(results), wanted.top_k], top, wanted.binary)


def _inlined(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs written where they are used (OpenAPI has no $defs)."""
    defs = schema.pop("$defs", {})

    def resolve(node: object) -> object:
        if isinstance(node, dict):
            return resolve(defs[node["$ref"].split("/")[-1]]) if "$ref" in node else {
                key: resolve(value) for key, value in node.items()}
        return [resolve(item) for item in node] if isinstance(node, list) else node

    return resolve(schema)


INFER_BODY = {"required": True, "content": {
    "application/json": {"schema": _inlined(InferenceRequest.model_json_schema()), "example": {
        "inputs": [{"name": IMAGES, "datatype": "BYTES", "shape": [1], "data": [EXAMPLE_PNG_BASE64]}],
        "outputs": [{"name": PROBABILITIES, "parameters": {"classification": 3}}]}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": (
        f"binary tensor data: the JSON request ({HEADER_LENGTH} bytes), then each input with "
        "binary_data_size in its parameters: FP32 little-endian, BYTES as a 4-byte little-endian length and "
        "the bytes of each element")}}}}
INFER_HEADERS = [
    {"name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 1},
     "description": "the JSON header's length when binary tensor data follows it"},
    {"name": "Content-Encoding", "in": "header", "required": False,
     "schema": {"type": "string", "enum": ["identity", "gzip", "deflate"]}}]
INFER_RESPONSES = {**INFER_ERRORS, 200: {"description": "JSON, or with binary outputs a JSON header of "
                                                        f"{HEADER_LENGTH} bytes and the outputs' bytes",
                                         "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                             "format": "binary"}}}}}


@router.post("/models/{name}/infer", response_model=InferenceResponse, summary="Inference", responses=INFER_RESPONSES,
             openapi_extra={"parameters": MODEL_PATH + INFER_HEADERS, "requestBody": INFER_BODY})
@router.post("/models/{name}/versions/{version}/infer", response_model=InferenceResponse, summary="Inference",
             responses=INFER_RESPONSES, openapi_extra={"parameters": VERSION_PATH + INFER_HEADERS,
                                                       "requestBody": INFER_BODY})
async def infer(request: Request) -> Response:
    """One input: `images` (BYTES [N], the files; base64 strings in JSON) or `pixels` (FP32 [N, C, H, W]).
    Outputs: `probabilities` (FP32 [N, classes]; with `classification: k` the top k as BYTES
    "score:index:label"), `heatmaps` (FP32 [N, blocks, win, win], optional `heatmap_layer`)."""
    service = _service(request)
    settings = service.settings
    deadline = time.monotonic() + settings.request_timeout_ms / 1000
    pipeline = service.require_ready()
    _check_model(pipeline.engine, request)
    pipeline.admit(1)  # the image count is not known yet: refuse now if even one would wait too long
    body = await read_body(request, settings.max_body_bytes, deadline, settings.body_timeout_s)
    body = decompress(body, request.headers.get("content-encoding", ""), settings.max_body_bytes)
    parsed, inputs = parse_request(body, request.headers.get(HEADER_LENGTH))
    images = _images(pipeline.engine, inputs)
    wanted = _wanted_outputs(pipeline, parsed)
    timeout_us = parsed.parameters.get("timeout")
    if isinstance(timeout_us, (int, float)) and not isinstance(timeout_us, bool) and timeout_us > 0:
        deadline = min(deadline, time.monotonic() + timeout_us / 1e6)
    layer = next((w.layer for w in wanted if w.name == HEATMAPS), None)
    gone = [False]
    watcher = asyncio.create_task(watch_disconnect(request, gone))
    try:
        _, results = await pipeline.classify(images, layer, deadline, client_gone=lambda: gone[0])
    finally:
        watcher.cancel()
    header = dict(model_name=pipeline.engine.name, model_version=pipeline.engine.version)
    if parsed.id is not None:
        header["id"] = parsed.id
    content, json_length = encode_response(header, [_output(pipeline.engine, w, results) for w in wanted])
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)})
