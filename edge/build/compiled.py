"""What every compile step returns (:class:`CompiledModel`) and raises (:class:`CompileError`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class CompileError(Exception):
    """A model could not be compiled for a target (names the model, the target and the reason)."""


@dataclass
class CompiledModel:
    """What a compile step produced: the files to bundle and how to run them."""

    target: str  # "openvino-cpu" | "onnxruntime-cpu" | "tensorrt"
    model_path: Path  # the file the runtime opens (.xml, .onnx, .engine)
    files: list[Path]
    format: str  # "openvino-ir" | "onnx" | "tensorrt-engine"
    precision: str  # graph precision: fp32 | fp16 | int8
    inference_precision: str | None = None  # OpenVINO only: f32 | bf16 | f16
    details: dict = field(default_factory=dict)
