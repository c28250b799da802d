"""Inference backends for edge artifacts: OpenVINO, ONNX Runtime and TensorRT engines (torch-free).

Each session takes a float32 NCHW batch and returns the model's first output as a numpy array.
The OpenVINO inference precision is always set explicitly (on CPUs with AMX/AVX512-BF16,
OpenVINO would otherwise silently run bf16) and read back after compilation, so what actually
ran is what gets recorded.

A TensorRT bundle runs as the engine that ``echofleet edge compile --target tensorrt`` built on
the device (:class:`TensorRTSession`): deserialized with the TensorRT runtime API, its tensors
bound by name (TensorRT 10's I/O tensor API, unchanged in 11.x), device memory and the stream from
NVIDIA's ``cuda-python`` runtime bindings (``cuda.bindings.runtime``), as NVIDIA's own TensorRT
Python samples do. An engine only runs on the TensorRT version and GPU that built it: the JSON
record written beside it (:class:`EngineRecord`) is checked first, and a mismatch is refused
with the command that rebuilds it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("openvino", "onnxruntime", "tensorrt")
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
        self._ov = ov
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
        """One inference. The input is shared with OpenVINO, not copied (``infer({0: x})`` copied it
        and every output on each call: 0.15 ms per call measured here, see docs/edge.md); the one
        output is copied once, out of the request's buffer that the next call overwrites."""
        req = self._request_for(len(x) if self._static else None)
        req.set_input_tensor(self._ov.Tensor(np.ascontiguousarray(x, np.float32), shared_memory=True))
        req.infer()
        return req.get_output_tensor(0).data.copy()


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


# --------------------------------------------------------------------------- TensorRT engines
ENGINE_FILE = "model.engine"


class EngineMismatch(RuntimeError):
    """A TensorRT engine that must not run here (missing, or built from another model, by another
    TensorRT version or for another GPU); the message says how to rebuild it."""


def engine_cache_dir(model_sha256: str) -> Path:
    """Where the engine of a bundle's ONNX model lives on the device.

    Outside the bundle (a verified bundle holds only the files its manifest lists), keyed by the
    ONNX model's sha256 so a new release never picks up an old engine; ``ECHOFLEET_CACHE`` moves it.
    """
    root = Path(os.environ.get("ECHOFLEET_CACHE", Path.home() / ".cache" / "echofleet"))
    return root / "trt" / model_sha256[:16]


def default_engine_path(model_sha256: str) -> Path:
    return engine_cache_dir(model_sha256) / ENGINE_FILE


def engine_record_path(engine: Path) -> Path:
    """The JSON record beside an engine (``model.engine.json``)."""
    return Path(engine).with_name(Path(engine).name + ".json")


@dataclass
class EngineRecord:
    """What an engine was built from and for: written by ``edge compile --target tensorrt``, checked before it runs."""

    onnx_sha256: str
    tensorrt: str  # tensorrt.__version__ of the build
    gpu: str  # CUDA device name of the build
    compute_capability: str  # "8.7" on Jetson Orin
    precision: str
    profile: list[int]  # min / opt / max batch
    input_name: str = "input"

    def save(self, engine: Path) -> Path:
        from echocare.atomic import atomic_write_bytes

        path = engine_record_path(engine)
        atomic_write_bytes(path, (json.dumps(asdict(self), indent=2) + "\n").encode(), 0o600)
        return path

    @classmethod
    def load(cls, engine: Path, rebuild: str) -> "EngineRecord":
        path = engine_record_path(engine)
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise EngineMismatch(f"{path}: no build record beside the engine (not built by `echofleet edge compile`); {rebuild}") from None
        except (OSError, ValueError, TypeError) as e:
            raise EngineMismatch(f"{path}: unreadable engine build record ({e}); {rebuild}") from None

    def mismatch(self, *, onnx_sha256: str | None, tensorrt: str, gpu: str, compute_capability: str) -> str | None:
        """Why this engine must not run here, or None."""
        if onnx_sha256 is not None and self.onnx_sha256 != onnx_sha256:
            return f"built from another model (ONNX sha256 {self.onnx_sha256[:12]}..., the bundle's is {onnx_sha256[:12]}...)"
        if self.tensorrt != tensorrt:
            return f"built by TensorRT {self.tensorrt}, this device runs TensorRT {tensorrt} (engines are not portable across versions)"
        if (self.gpu, self.compute_capability) != (gpu, compute_capability):
            return (f"built for {self.gpu} (compute capability {self.compute_capability}), this device is {gpu} "
                    f"(compute capability {compute_capability})")
        return None


def import_tensorrt_runtime() -> Any:
    try:
        import tensorrt  # noqa: PLC0415 - optional, NVIDIA devices only
    except ImportError:
        raise BackendUnavailable("TensorRT is not installed: on a Jetson it comes with JetPack (python3-libnvinfer)") from None
    return tensorrt


def import_cudart() -> Any:
    """NVIDIA's CUDA runtime bindings (``cuda-python``), as TensorRT's own Python samples use them."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415 - cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # noqa: PLC0415 - cuda-python < 12.6 (the same API under its old name)
        except ImportError:
            raise BackendUnavailable("cuda-python is not installed: pip install cuda-python "
                                     "(the major version of the device's CUDA: 12.x on JetPack 6)") from None
    return cudart


def cuda_check(result: tuple) -> Any:
    """cuda-python calls return ``(cudaError_t, *values)``: raise on an error, else the value(s)."""
    err, values = result[0], result[1:]
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else (values or None)


def cuda_device_identity(cudart: Any) -> tuple[str, str]:
    """(device name, compute capability "major.minor") of the current CUDA device."""
    prop = cuda_check(cudart.cudaGetDeviceProperties(cuda_check(cudart.cudaGetDevice())))
    name = prop.name.split(b"\0")[0].decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.strip(), f"{prop.major}.{prop.minor}"


class TensorRTSession:
    """A serialized TensorRT engine (from ``edge compile --target tensorrt``) run on this device's GPU.

    The engine's build record is checked first (same ONNX model, TensorRT version and GPU), then the
    engine is deserialized; device buffers grow to the largest batch seen and are reused. ``trt``
    and ``cudart`` default to the installed ``tensorrt`` and ``cuda-python`` (tests pass stand-ins).
    """

    def __init__(self, engine_path: Path, *, model_sha256: str | None = None, graph_precision: str = "fp32",
                 rebuild: str = "rebuild it on this device with `echofleet edge compile MODEL.onnx --target tensorrt`",
                 trt: Any = None, cudart: Any = None):
        self._trt = trt if trt is not None else import_tensorrt_runtime()
        self._cudart = cudart if cudart is not None else import_cudart()
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, bytes)
        self._stream = None
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise EngineMismatch(f"{engine_path}: no TensorRT engine for this bundle's model; {rebuild}")
        record = EngineRecord.load(engine_path, rebuild)
        version = str(self._trt.__version__)
        gpu, cc = cuda_device_identity(self._cudart)
        why = record.mismatch(onnx_sha256=model_sha256, tensorrt=version, gpu=gpu, compute_capability=cc)
        if why:
            raise EngineMismatch(f"{engine_path}: refused, {why}; {rebuild}")
        trt = self._trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise EngineMismatch(f"{engine_path}: TensorRT {version} cannot deserialize the engine (see the TensorRT log above); {rebuild}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not self._outputs:
            raise RuntimeError(f"{engine_path}: expected one input and at least one output, got inputs {inputs}, outputs {self._outputs}")
        self._input = inputs[0]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        lo, _, hi = (tuple(d) for d in self._engine.get_tensor_profile_shape(self._input, 0))
        self._batch_range = (int(lo[0]), int(hi[0]))
        self._stream = cuda_check(self._cudart.cudaStreamCreate())
        self.info = SessionInfo("tensorrt", gpu, graph_precision,
                                {"engine": str(engine_path), "tensorrt": version, "compute_capability": cc,
                                 "batch_range": list(self._batch_range)})

    def _device_buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_check(self._cudart.cudaFree(ptr))
                self._buffers.pop(name)
            ptr = int(cuda_check(self._cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self._batch_range
        if len(x) > hi:  # beyond the engine's optimisation profile: in chunks it accepts
            return np.concatenate([self.run(x[i : i + hi]) for i in range(0, len(x), hi)])
        if len(x) < lo:
            raise ValueError(f"batch {len(x)} is below the engine's profile minimum {lo}")
        x = np.ascontiguousarray(x, self._dtypes[self._input])
        ctx, cudart = self._context, self._cudart
        if not ctx.set_input_shape(self._input, tuple(int(d) for d in x.shape)):
            raise ValueError(f"input shape {x.shape} does not fit the engine's optimisation profile")
        in_ptr = self._device_buffer(self._input, x.nbytes)
        ctx.set_tensor_address(self._input, in_ptr)
        outs = []
        for name in self._outputs:
            host = np.empty(tuple(int(d) for d in ctx.get_tensor_shape(name)), self._dtypes[name])
            ptr = self._device_buffer(name, max(host.nbytes, 1))
            ctx.set_tensor_address(name, ptr)
            outs.append((host, ptr))
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check(cudart.cudaMemcpyAsync(in_ptr, x.ctypes.data, x.nbytes, h2d, self._stream))
        if not ctx.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        for host, ptr in outs:
            cuda_check(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, d2h, self._stream))
        cuda_check(cudart.cudaStreamSynchronize(self._stream))
        return outs[0][0].astype(np.float32, copy=False)

    def close(self) -> None:
        """Free the device buffers and the stream (also on garbage collection)."""
        for ptr, _ in self._buffers.values():
            cuda_check(self._cudart.cudaFree(ptr))
        self._buffers.clear()
        if self._stream is not None:
            cuda_check(self._cudart.cudaStreamDestroy(self._stream))
            self._stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass


def _ov_type_name(value: str) -> str:
    """OpenVINO prints element types as e.g. ``<Type: 'float32'>`` or ``f32``; normalise to f32/bf16/f16."""
    v = value.lower()
    for name, short in (("bfloat16", "bf16"), ("bf16", "bf16"), ("float16", "f16"), ("f16", "f16"), ("float32", "f32"), ("f32", "f32")):
        if name in v:
            return short
    return value


def open_session(model_path: Path, backend: str, *, inference_precision: str = "f32", graph_precision: str = "fp32",
                 num_threads: int | None = None, providers: list | None = None):
    """Open a session on ``backend`` ("openvino" | "onnxruntime") for one model file.

    TensorRT engines are opened with :class:`TensorRTSession` (they need the bundle model's hash)."""
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
