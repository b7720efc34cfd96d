"""The Open Inference Protocol's wire format, with no model and no HTTP framework: a request body
(JSON, or a JSON header followed by raw tensor bytes: the binary tensor data extension) into its
header and each input's elements; output tensors into a response body in either form. Malformed
bodies are ``ServiceError`` 400, elements that do not fit their shape 422."""
import base64
import binascii
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
from pydantic import ValidationError

from .errors import ServiceError
from .http_request import validation_message
from .v2_schemas import InferenceRequest, RequestInput

HEADER_LENGTH = "Inference-Header-Content-Length"
# zlib's window bits for each Content-Encoding a client may compress its request with (tritonclient
# offers both).
CONTENT_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The request body as sent before ``encoding``, refused with 413 once it would exceed
    ``limit`` bytes (a small compressed body can stand for a huge one)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in CONTENT_ENCODINGS:
        raise ServiceError(415, "unsupported_content_encoding",
                           f"Content-Encoding {encoding!r}: send gzip, deflate or an uncompressed body")
    inflater = zlib.decompressobj(CONTENT_ENCODINGS[encoding])
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ServiceError(400, "invalid_body", f"the body is not valid {encoding} data: {e}") from e
    if len(plain) > limit:
        raise ServiceError(413, "body_too_large", f"the decompressed request body is over the limit of {limit} bytes")
    return plain


@dataclass
class DecodedInput:
    """One input: its header, and its elements (BYTES: a list of bytes; numbers: a flat array)."""

    spec: RequestInput
    elements: Union[List[bytes], np.ndarray]


def parse_request(body: bytes, header_length: Optional[str]) -> Tuple[InferenceRequest, List[DecodedInput]]:
    """The request's header and its inputs' elements, whichever form each input came in."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
            raise ServiceError(400, "invalid_body", f"{HEADER_LENGTH} is {header_length!r}: it must be the length "
                               f"of the JSON header, at most the body's {len(body)} bytes")
        header, binary = body[:int(header_length)], body[int(header_length):]
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as e:
        if any(error["type"] == "json_invalid" for error in e.errors()):
            raise ServiceError(400, "invalid_body", "the inference request is not valid JSON"
                               + ("" if header_length else f" (binary tensor data needs the {HEADER_LENGTH} header)"))
        raise ServiceError(422, "invalid_request", validation_message(e)) from e
    inputs, offset = [], 0
    for spec in request.inputs:
        size = spec.parameters.get("binary_data_size")
        if size is None:
            if spec.data is None:
                raise ServiceError(422, "invalid_request", f"input {spec.name!r} has neither data nor binary_data_size")
            inputs.append(DecodedInput(spec, _json_elements(spec)))
            continue
        if spec.data is not None:
            raise ServiceError(422, "invalid_request", f"input {spec.name!r} has both data and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ServiceError(400, "invalid_body", f"input {spec.name!r}: binary_data_size {size!r} does not fit "
                               f"the {len(binary) - offset} bytes left after the JSON header")
        inputs.append(DecodedInput(spec, _binary_elements(spec, binary[offset:offset + size])))
        offset += size
    if offset != len(binary):
        raise ServiceError(400, "invalid_body", f"{len(binary) - offset} bytes after the JSON header belong to no "
                           "input (binary_data_size)")
    return request, inputs


def element_count(shape: List[int]) -> int:
    return math.prod(shape) if all(d >= 0 for d in shape) else -1


def _numeric_dtype(spec: RequestInput) -> np.dtype:
    if spec.datatype != "FP32":
        raise ServiceError(422, "invalid_request", f"input {spec.name!r}: datatype {spec.datatype} is not one this "
                           "server reads (BYTES or FP32)")
    return np.dtype("<f4")


def _json_elements(spec: RequestInput) -> Union[List[bytes], np.ndarray]:
    if spec.datatype == "BYTES":
        flat = _flatten(spec.data)
        if not all(isinstance(e, str) for e in flat):
            raise ServiceError(422, "invalid_request", f"input {spec.name!r}: BYTES elements in JSON are strings "
                               "(base64-encoded files)")
        elements = []
        for i, encoded in enumerate(flat):
            try:
                elements.append(base64.b64decode(encoded, validate=True))
            except (binascii.Error, ValueError) as e:
                raise ServiceError(400, "invalid_base64", f"input {spec.name!r}, element {i} is not valid base64 "
                                   "(BYTES elements in JSON are base64-encoded files)") from e
        return _counted(spec, elements)
    try:
        array = np.asarray(spec.data, dtype=_numeric_dtype(spec)).ravel()
    except (TypeError, ValueError) as e:
        raise ServiceError(422, "invalid_request", f"input {spec.name!r}: data is not a (nested) list of numbers "
                           "of one shape") from e
    return _counted(spec, array)


def _binary_elements(spec: RequestInput, raw: bytes) -> Union[List[bytes], np.ndarray]:
    if spec.datatype == "BYTES":  # each element: its length as 4 bytes, little-endian, then itself
        elements, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise ServiceError(400, "invalid_body", f"input {spec.name!r}: a BYTES element's length is cut off")
            (length,) = struct.unpack_from("<I", raw, offset)
            if offset + 4 + length > len(raw):
                raise ServiceError(400, "invalid_body", f"input {spec.name!r}: element {len(elements)} says "
                                   f"{length} bytes, {len(raw) - offset - 4} are left")
            elements.append(raw[offset + 4:offset + 4 + length])
            offset += 4 + length
        return _counted(spec, elements)
    dtype = _numeric_dtype(spec)
    if len(raw) % dtype.itemsize:
        raise ServiceError(400, "invalid_body", f"input {spec.name!r}: {len(raw)} bytes are not whole "
                           f"{spec.datatype} elements")
    return _counted(spec, np.frombuffer(raw, dtype=dtype))


def _flatten(data: list) -> list:
    flat: list = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def _counted(spec: RequestInput, elements: Union[List[bytes], np.ndarray]) -> Union[List[bytes], np.ndarray]:
    if element_count(spec.shape) != len(elements):
        raise ServiceError(422, "invalid_request", f"input {spec.name!r}: shape {spec.shape} holds "
                           f"{max(element_count(spec.shape), 0)} elements, the data has {len(elements)}")
    return elements


@dataclass
class OutputTensor:
    name: str
    datatype: str  # FP32 or BYTES
    shape: List[int]
    values: Union[np.ndarray, List[str]]  # FP32: any array of that many elements; BYTES: strings, row-major
    binary: bool


def encode_response(header: dict, outputs: List[OutputTensor]) -> Tuple[bytes, Optional[int]]:
    """The response body, and the JSON header's length when binary tensor data follows it."""
    blobs = []
    header["outputs"] = []
    for out in outputs:
        entry = dict(name=out.name, datatype=out.datatype, shape=out.shape)
        if out.binary:
            blob = (b"".join(struct.pack("<I", len(e)) + e for e in (s.encode() for s in out.values))
                    if out.datatype == "BYTES" else np.ascontiguousarray(out.values, dtype="<f4").tobytes())
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = list(out.values) if out.datatype == "BYTES" else np.asarray(out.values).ravel().tolist()
        header["outputs"].append(entry)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return encoded, None
    return encoded + b"".join(blobs), len(encoded)
