"""The Open Inference Protocol's (KServe v2) REST messages, as pydantic models: they check the JSON
part of an inference request and make the OpenAPI docs of /v2. Field names are the protocol's."""
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# The protocol's parameter values: string, number or boolean.
Parameters = Dict[str, Union[bool, int, float, str]]


class RequestInput(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str = Field(description="images (BYTES, encoded files) or pixels (FP32, preprocessed); see model metadata")
    shape: List[int] = Field(description="images: [N] (or [N, 1]); pixels: [N, C, H, W] at the model's input size")
    datatype: str = Field(description="BYTES for images, FP32 for pixels")
    parameters: Parameters = Field(default_factory=dict, description="binary_data_size: this input's bytes after "
                                                                      "the JSON header (binary tensor data extension)")
    data: Optional[List[Any]] = Field(
        None, description="the elements, flat or nested, row-major; BYTES elements are base64-encoded files")


class RequestOutput(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str = Field(description="probabilities or heatmaps")
    parameters: Parameters = Field(
        default_factory=dict, description="classification: k, the top k as 'score:index:label' (probabilities); "
                                          "binary_data: send it after the JSON header; heatmap_layer (heatmaps)")


class InferenceRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    id: Optional[str] = Field(None, description="echoed in the response")
    parameters: Parameters = Field(
        default_factory=dict, description="binary_data_output: every output after the JSON header unless it says "
                                          "otherwise; timeout: microseconds, shortens the request's deadline")
    inputs: List[RequestInput] = Field(min_length=1, description="exactly one: images or pixels")
    outputs: Optional[List[RequestOutput]] = Field(None, description="default: probabilities")


class ResponseOutput(BaseModel):
    name: str
    shape: List[int]
    datatype: str
    parameters: Optional[Parameters] = None
    data: Optional[List[Any]] = Field(None, description="flat, row-major; absent when sent as binary data")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: Optional[str] = None
    id: Optional[str] = None
    outputs: List[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: List[int] = Field(description="-1: any size (the batch)")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: List[str]


class ModelMetadata(BaseModel):
    name: str
    versions: List[str]
    platform: str
    inputs: List[TensorMetadata]
    outputs: List[TensorMetadata]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    ready: bool


class V2Error(BaseModel):
    error: str
