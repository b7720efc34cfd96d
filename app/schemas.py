"""Request and response models of the HTTP API (they also make the OpenAPI docs)."""
from typing import List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class PredictOptions(BaseModel):
    top_k: int = Field(5, ge=1, description="how many classes to return, 1..num_classes")
    heatmaps: bool = Field(False, description="also return attention heatmaps")
    heatmap_format: Literal["array", "png"] = Field("array", description="numbers, or base64 PNG pictures")
    heatmap_max_side: int = Field(512, ge=16, le=2048, description="png format: the overlay is drawn on the image "
                                                                   "sent, its longer side at most this many pixels")
    heatmap_layer: Optional[str] = Field(
        None, description="module name of the halo attention layer; default: the last with at least 2x2 blocks")


# A 28x28 red PNG: an example that the service really classifies when it is sent as is.
EXAMPLE_PNG_BASE64 = ("iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAIAAAD9b0jDAAAAKElEQVR42mM8ISfHQG3AxEADMGroqKGjho4aOmroqKGjho4a"
                      "OvgMBQB+BAE8FfyCFgAAAABJRU5ErkJggg==")


class JsonPredictRequest(PredictOptions):
    # JSON has types of its own: 0 is not false nor "3" a number, as the spec says (PredictOptions stays lax for the
    # query of a multipart request, which is all text).
    model_config = ConfigDict(strict=True)

    images: List[str] = Field(..., min_length=1, description="base64-encoded image files",
                              json_schema_extra={"examples": [[EXAMPLE_PNG_BASE64]]})


class Prediction(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability")


class BlockWindow(BaseModel):
    block_row: int
    block_col: int
    feature_top: int = Field(description="window's top row in the layer's input map (may be negative: halo)")
    feature_left: int
    feature_size: int
    image_top: float = Field(description="the same in input-image pixels")
    image_left: float
    image_size: float


class HeatmapMapping(BaseModel):
    original_size: List[int] = Field(description="width, height of the image sent (upright), in its pixels")
    crop: List[float] = Field(description="left, top, right, bottom: the part of that image the model saw, "
                                          "in its pixels (the rest was cropped away)")
    placed: List[float] = Field(description="left, top, right, bottom: where that part lies in the preprocessed "
                                            "input, in input pixels (the rest of the input is padding)")


class Heatmaps(BaseModel):
    layer: str
    feature_size: List[int] = Field(description="height, width of the layer's input map")
    image_size: List[int] = Field(description="height, width of the preprocessed input image")
    blocks: List[int] = Field(description="blocks per column, per row")
    windows: List[BlockWindow]
    mapping: HeatmapMapping = Field(description="from the input's pixels to the image's: x_image = crop.left + "
                                                "(x_input - placed.left) * crop width / placed width, y alike")
    block_maps: Optional[List[List[List[float]]]] = Field(
        None, description="array format: per block, the (win x win) attention grid; each sums to 1")
    image_map: Optional[List[List[float]]] = Field(
        None, description="array format: the image-level map at input size; sums to 1")
    overlay_png: Optional[str] = Field(None, description="png format: the image-level map drawn on the image sent, "
                                                         "what was cropped away hatched, with a legend (base64)")
    mosaic_png: Optional[str] = Field(None, description="png format: each block's window grid as the blocks lie, "
                                                        "the block's own query region outlined (base64)")


class Timing(BaseModel):
    queue_ms: float = Field(description="time waiting for a batch")
    inference_ms: float = Field(description="the forward pass of the batch it ran in")
    batch_size: int = Field(description="images in that forward pass")


class ImageResult(BaseModel):
    predictions: List[Prediction]
    heatmaps: Optional[Heatmaps] = None
    timing: Timing


class PredictResponse(BaseModel):
    model: str
    version: str
    results: List[ImageResult]


class ModelInfo(BaseModel):
    name: str
    version: str
    classes: List[str]
    input_size: List[int]
    preprocessing: str = Field(description="what is done to an image sent before the model sees it")
    weights: Literal["shipped", "checkpoint", "untrained"] = Field(
        description="where the weights come from: the ones shipped with the service, HALO_CHECKPOINT, or none "
                    "(random weights: the answers mean nothing)")
    trained_on: Optional[str] = Field(description="the training data, from the model card of the shipped weights; "
                                                  "null where the service cannot know it")
    parameters: int
    backend: str = Field(description="the configured halo attention backend (HALO_BACKEND)")
    attention_backends: List[str] = Field(description="what the halo attention layers run: the configured backend, "
                                                      "or what auto chose for this device and dtype")
    device: str
    dtype: str
    threads: int = Field(description="torch CPU threads of each model worker")
    model_workers: int = Field(description="model threads, each forming and computing its own batches")
    graph: str = Field(description="compiled (on CPU: AOTInductor's program, HALO_COMPILE), traced (TorchScript "
                                   "graphs), cuda_graphs (on CUDA: a CUDA graph per batch-size bucket) or eager: what "
                                   "forwards without heatmaps run; a batch with one layer's heatmaps runs that layer's "
                                   "traced graph where the model traces (compiled or traced), one asking for several "
                                   "layers at once runs eagerly, with cuda_graphs batches with heatmaps run eagerly")
    compile_seconds: Optional[float] = Field(None, description="compiled: the seconds its start spent compiling the "
                                                               "model, or loading it from HALO_COMPILE_CACHE")
    compile_cached: Optional[bool] = Field(None, description="compiled: whether it came from HALO_COMPILE_CACHE")
    traced_batch_sizes: List[int] = Field([], description="compiled with HALO_COMPILE=auto: the batch sizes (powers "
                                                          "of two, each for the sizes up to the next) where the "
                                                          "warm-up found the traced graph faster, which run it")
    halo_layers: List[str]
    default_heatmap_layer: Optional[str]
    batch_policy: str = Field(description="adaptive or fixed: HALO_BATCH_POLICY")
    max_batch_size: int = Field(description="the configured largest batch; the adaptive policy may form smaller ones")
    max_wait_ms: float
    max_queue: int


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
