"""Inference backends for edge artifacts: OpenVINO and ONNX Runtime (torch-free).

Each session takes a float32 NCHW batch and returns the model's first output as a numpy array.
The OpenVINO inference precision is always set explicitly (on CPUs with AMX/AVX512-BF16,
OpenVINO would otherwise silently run bf16) and read back after compilation, so what actually
ran is what gets recorded. TensorRT bundles run here through ONNX Runtime's TensorRT execution
provider when that is available (see :mod:`edge.build.compile_tensorrt` for standalone engines).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BACKENDS = ("openvino", "onnxruntime")
OV_PRECISIONS = ("f32", "bf16", "f16")


class BackendUnavailable(RuntimeError):
    """The requested backend is not installed here (message says what to install)."""


def backend_installed(name: str) -> bool:
    """Whether the Python package for a backend can be imported (without importing it)."""
    module = {"openvino": "openvino", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}.get(name)
    return module is not None and importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    return [b for b in BACKENDS if backend_installed(b)]


@dataclass
class SessionInfo:
    """What a session really runs with (recorded in bench output and build summaries)."""

    backend: str
    device: str
    precision: str  # inference precision for OpenVINO; the graph's precision for ONNX Runtime
    details: dict = field(default_factory=dict)


class OpenVINOSession:
    """An OpenVINO model (IR ``.xml`` or ``.onnx``) with an explicit inference precision.

    With ``static_batch`` (default) the model is reshaped to the exact batch size of each call and
    compiled once per size (kept in a small cache): OpenVINO's CPU plugin runs static shapes
    markedly faster than the dynamic batch axis (about 1.5x at batch 1 on the full encoder here).
    """

    MAX_COMPILED = 4

    def __init__(self, model_path: Path, inference_precision: str = "f32", *, device: str = "CPU",
                 num_threads: int | None = None, performance_hint: str = "LATENCY", graph_precision: str = "fp32",
                 static_batch: bool = True):
        if not backend_installed("openvino"):
            raise BackendUnavailable("OpenVINO is not installed: pip install 'echofleet[edge]' (or openvino)")
        if inference_precision not in OV_PRECISIONS:
            raise ValueError(f"inference precision {inference_precision!r}: choose one of {OV_PRECISIONS}")
        import openvino as ov

        self.model_path = Path(model_path)
        self._core = ov.Core()
        self._device, self._static = device, static_batch
        self._config: dict = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": performance_hint}
        if num_threads:
            self._config["INFERENCE_NUM_THREADS"] = int(num_threads)
        try:
            self._model = self._core.read_model(str(self.model_path))
        except RuntimeError as e:
            raise RuntimeError(f"{self.model_path}: OpenVINO cannot read the model ({str(e).splitlines()[0]})") from None
        self._requests: dict[int | None, object] = {}
        compiled = self._request_for(1 if static_batch else None)
        effective = str(compiled.get_compiled_model().get_property("INFERENCE_PRECISION_HINT"))
        self.info = SessionInfo("openvino", device, graph_precision,
                                {"inference_precision": _ov_type_name(effective), "requested": inference_precision,
                                 "performance_hint": performance_hint, "static_batch": static_batch})

    def _request_for(self, batch: int | None):
        """An infer request for this batch size (None: the model's own, dynamic, shape)."""
        req = self._requests.get(batch)
        if req is None:
            model = self._model
            if batch is not None:
                model = self._model.clone()
                shape = list(model.input(0).get_partial_shape())
                shape[0] = batch
                model.reshape({model.input(0): shape})
            if len(self._requests) >= self.MAX_COMPILED:
                self._requests.pop(next(iter(self._requests)))
            req = self._core.compile_model(model, self._device, self._config).create_infer_request()
            self._requests[batch] = req
        return req

    def run(self, x: np.ndarray) -> np.ndarray:
        req = self._request_for(len(x) if self._static else None)
        req.infer({0: np.ascontiguousarray(x, np.float32)})
        return np.array(req.get_output_tensor(0).data, copy=True)


class OnnxRuntimeSession:
    """An ONNX Runtime session on the best of the requested execution providers that exist here."""

    def __init__(self, model_path: Path, *, providers: list | None = None, num_threads: int | None = None,
                 graph_precision: str = "fp32"):
        if not backend_installed("onnxruntime"):
            raise BackendUnavailable("ONNX Runtime is not installed: pip install 'echofleet[edge]' (or onnxruntime)")
        import onnxruntime as ort

        self.model_path = Path(model_path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            opts.intra_op_num_threads = int(num_threads)
        have = set(ort.get_available_providers())
        wanted = providers or ["CPUExecutionProvider"]
        chosen = [p for p in wanted if (p[0] if isinstance(p, tuple) else p) in have] or ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(self.model_path), opts, providers=chosen)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise RuntimeError(f"{self.model_path}: ONNX Runtime cannot load the model ({str(e).splitlines()[0]})") from None
        self._input = self._session.get_inputs()[0].name
        used = self._session.get_providers()
        self.info = SessionInfo("onnxruntime", used[0], graph_precision, {"providers": used})

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: np.ascontiguousarray(x, np.float32)})[0]


def _ov_type_name(value: str) -> str:
    """OpenVINO prints element types as e.g. ``<Type: 'float32'>`` or ``f32``; normalise to f32/bf16/f16."""
    v = value.lower()
    for name, short in (("bfloat16", "bf16"), ("bf16", "bf16"), ("float16", "f16"), ("f16", "f16"), ("float32", "f32"), ("f32", "f32")):
        if name in v:
            return short
    return value


def open_session(model_path: Path, backend: str, *, inference_precision: str = "f32", graph_precision: str = "fp32",
                 num_threads: int | None = None, providers: list | None = None):
    """Open a session on ``backend`` ("openvino" | "onnxruntime") for one model file."""
    if backend == "openvino":
        return OpenVINOSession(model_path, inference_precision, num_threads=num_threads, graph_precision=graph_precision)
    if backend == "onnxruntime":
        return OnnxRuntimeSession(model_path, providers=providers, num_threads=num_threads, graph_precision=graph_precision)
    raise ValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")


def run_batched(session, x: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Run a session over ``x`` in chunks of ``batch_size``; concatenate the outputs."""
    if len(x) == 0:
        raise ValueError("no inputs to run")
    return np.concatenate([session.run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
