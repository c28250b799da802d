"""A strict stand-in for the ``tensorrt`` module (10.x or 11.x) and cuda-python's ``cuda.bindings.runtime``.

TensorRT cannot be installed on the machines the tests run on, so the engine build
(:mod:`edge.build.compile_tensorrt`) and the engine runtime (:class:`edge.device.backends.
TensorRTSession`) are exercised against this stand-in. It is strict where the real bindings are:
every call checks its argument types and returns what NVIDIA's Python API documentation says it
returns, so misuse of the real API fails a test (a pybind11 binding raises ``TypeError`` on an
argument of the wrong type; this raises :class:`Misuse`, a ``TypeError``).

What it follows (TensorRT Python API 10.x, and the 10.x -> 11.x migration guide):

- ``Builder.create_network(flags: int = 0)``: an int bit mask of ``1 << NetworkDefinitionCreationFlag``
  members. 10.x has EXPLICIT_BATCH (deprecated, ignored) and STRONGLY_TYPED; 11.x is always
  strongly typed and has no EXPLICIT_BATCH.
- ``BuilderFlag.FP16`` / ``INT8`` exist in 10.x only (11.x removed every precision flag).
- ``IBuilderConfig.set_memory_pool_limit(pool: MemoryPoolType, pool_size: int)``,
  ``create_timing_cache(buffer) -> ITimingCache``, ``set_timing_cache(cache, ignore_mismatch: bool) -> bool``
  (False for a cache from another GPU or TensorRT version unless ``ignore_mismatch``),
  ``add_optimization_profile(profile) -> int``.
- ``OnnxParser.parse_from_file(model: str) -> bool``; errors through ``num_errors`` / ``get_error(i)``.
- ``Builder.build_serialized_network(network, config) -> IHostMemory | None``.
- ``Runtime(logger).deserialize_cuda_engine(buffer) -> ICudaEngine | None`` (None for an engine of
  another TensorRT version or GPU); the name-based I/O tensor API: ``num_io_tensors``,
  ``get_tensor_name(int)``, ``get_tensor_mode(str)``, ``get_tensor_dtype(str)``,
  ``get_tensor_profile_shape(str, int)``; ``IExecutionContext.set_input_shape(str, Dims) -> bool``,
  ``get_tensor_shape(str)``, ``set_tensor_address(str, int) -> bool``,
  ``execute_async_v3(stream_handle: int) -> bool``.
- cuda-python: every call returns ``(cudaError_t, *values)``; ``cudaMalloc(int)``,
  ``cudaMemcpyAsync(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream)``,
  ``cudaStreamCreate()``, ``cudaStreamSynchronize(stream)``, ``cudaFree(int)``,
  ``cudaGetDevice()``, ``cudaGetDeviceProperties(int)`` (``name`` as bytes, ``major``, ``minor``).

The "engine" is a linear classifier over the flattened input (``x.reshape(N, -1) @ W``), so a run
through the stand-in has a reference answer (:func:`reference_output`). "Device memory" is host
memory (ctypes buffers), so copies really move bytes.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import sys
import types
from dataclasses import dataclass, field

import numpy as np


class Misuse(TypeError):
    """A call the real binding would reject (wrong argument type, wrong state)."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise Misuse(what)


def _is_int(v) -> bool:
    return type(v) is int  # pybind's int arguments: an int, not a bool, float, list or enum


def _dims(v, what: str) -> tuple[int, ...]:
    _need(isinstance(v, (tuple, list, Dims)) and all(_is_int(d) for d in v), f"{what}: Dims (a tuple of ints), got {v!r}")
    return tuple(v)


def _buffer(v, what: str) -> bytes:
    _need(isinstance(v, (bytes, bytearray, memoryview)), f"{what}: a buffer (bytes-like), got {type(v).__name__}")
    return bytes(v)


class Dims(tuple):
    """tensorrt.Dims: iterable of ints."""


class IHostMemory(bytes):
    """tensorrt.IHostMemory: a buffer (``bytes(host_memory)`` gives its content)."""

    @property
    def nbytes(self) -> int:
        return len(self)


ENGINE_MAGIC = b"STANDIN-ENGINE\n"


def engine_bytes(version: str, gpu: tuple[str, str], chw: tuple[int, int, int], profile: tuple[int, int, int],
                 classes: int = 3, seed: int = 0, input_name: str = "input") -> bytes:
    """A serialized stand-in engine: a header (TensorRT version, GPU, shapes) and the weights."""
    w = np.random.default_rng(seed).standard_normal((int(np.prod(chw)), classes)).astype(np.float32)
    header = {"version": version, "gpu": list(gpu), "chw": list(chw), "profile": list(profile), "classes": classes,
              "input": input_name, "output": "logits"}
    return ENGINE_MAGIC + json.dumps(header).encode() + b"\n" + w.tobytes()


def _parse_engine(data: bytes) -> tuple[dict, np.ndarray]:
    if not data.startswith(ENGINE_MAGIC):
        raise ValueError("not a stand-in engine")
    head, _, w = data[len(ENGINE_MAGIC):].partition(b"\n")
    h = json.loads(head)
    return h, np.frombuffer(w, np.float32).reshape(int(np.prod(h["chw"])), h["classes"])


def reference_output(engine: bytes, x: np.ndarray) -> np.ndarray:
    """What the stand-in engine computes for ``x``."""
    _, w = _parse_engine(engine)
    return x.reshape(len(x), -1).astype(np.float32) @ w


@dataclass
class StandIn:
    """The two stand-in modules and the record of calls."""

    trt: types.ModuleType
    cudart: types.ModuleType
    calls: list[tuple] = field(default_factory=list)


def make_standin(version: str = "10.3.0", *, gpu: tuple[str, str] = ("Orin", "8.7"), parse_ok: bool = True,
                 build_ok: bool = True, classes: int = 3) -> StandIn:
    """``tensorrt`` ``version`` (10.x or 11.x surface) and ``cuda-python`` on a device named ``gpu``."""
    calls: list[tuple] = []
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version

    creation = {"STRONGLY_TYPED": 1} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    NetworkDefinitionCreationFlag = enum.Enum("NetworkDefinitionCreationFlag", creation)
    NetworkDefinitionCreationFlag.__int__ = lambda self: self.value  # pybind enums convert with int()
    flags = {"TF32": 6, "REFIT": 7, "VERSION_COMPATIBLE": 15}
    if major < 11:  # removed in TensorRT 11 (strong typing only)
        flags.update({"FP16": 0, "INT8": 1})
    BuilderFlag = enum.Enum("BuilderFlag", flags)
    MemoryPoolType = enum.Enum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1})
    TensorIOMode = enum.Enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    DataType = enum.Enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3})
    Severity = enum.Enum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})

    class ILogger:
        pass

    class Logger(ILogger):
        def __init__(self, min_severity=Severity.WARNING):
            _need(isinstance(min_severity, Severity), f"Logger(min_severity): a Logger.Severity, got {min_severity!r}")
            calls.append(("Logger", min_severity.name))

    for s in Severity:
        setattr(Logger, s.name, s)
    Logger.Severity = Severity

    class INetworkDefinition:
        def __init__(self, flags: int):
            self.flags, self.parsed = flags, False

    class IOptimizationProfile:
        def __init__(self):
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002 - the binding's argument names
            _need(isinstance(input, str), f"set_shape(input): a str, got {type(input).__name__}")
            mn, op, mx = (_dims(v, "set_shape") for v in (min, opt, max))
            _need(len(mn) == len(op) == len(mx) and all(a <= b <= c for a, b, c in zip(mn, op, mx)),
                  f"set_shape: need min <= opt <= max, got {mn} {op} {mx}")
            self.shapes[input] = (mn, op, mx)

    class ITimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return IHostMemory(b"TIMING:" + json.dumps([version, list(gpu)]).encode())

    class IBuilderConfig:
        def __init__(self):
            self.cache, self.profiles, self.flags = None, [], set()

        def set_memory_pool_limit(self, pool, pool_size):
            _need(isinstance(pool, MemoryPoolType), f"set_memory_pool_limit(pool): a MemoryPoolType, got {pool!r}")
            _need(_is_int(pool_size) and pool_size > 0, f"set_memory_pool_limit(pool_size): a positive int, got {pool_size!r}")
            calls.append(("workspace", pool.name, pool_size))

        def set_flag(self, flag):
            _need(isinstance(flag, BuilderFlag), f"set_flag: a BuilderFlag, got {flag!r}")
            self.flags.add(flag.name)
            calls.append(("flag", flag.name))

        def add_optimization_profile(self, profile):
            _need(isinstance(profile, IOptimizationProfile), "add_optimization_profile: an IOptimizationProfile")
            self.profiles.append(profile)
            calls.append(("profile", dict(profile.shapes)))
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            data = _buffer(serialized_timing_cache, "create_timing_cache")
            calls.append(("create_timing_cache", data))
            return ITimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            _need(isinstance(cache, ITimingCache), "set_timing_cache(cache): an ITimingCache")
            _need(type(ignore_mismatch) is bool, f"set_timing_cache(ignore_mismatch): a bool, got {ignore_mismatch!r}")
            calls.append(("set_timing_cache", ignore_mismatch))
            mine = cache.data in (b"", ITimingCache(b"").serialize())
            if not mine and not ignore_mismatch:
                return False  # another GPU / TensorRT version: refused
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            _need(isinstance(logger, ILogger), "Builder(logger): an ILogger")

        def create_network(self, flags=0):
            _need(_is_int(flags), f"create_network(flags): an int bit mask, got {type(flags).__name__} {flags!r}")
            known = 0
            for member in NetworkDefinitionCreationFlag:
                known |= 1 << member.value
            _need(flags & ~known == 0, f"create_network(flags): unknown bits in {flags:#x} for TensorRT {version}")
            calls.append(("create_network", flags))
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            _need(isinstance(network, INetworkDefinition) and network.parsed, "build_serialized_network: a parsed INetworkDefinition")
            _need(isinstance(config, IBuilderConfig), "build_serialized_network(config): an IBuilderConfig")
            _need(len(config.profiles) == 1, "build_serialized_network: a dynamic batch needs one optimization profile")
            _need(config.cache is not None, "build_serialized_network: expected a timing cache attached")
            calls.append(("build",))
            if not build_ok:
                return None
            (name, (mn, op, mx)), = config.profiles[0].shapes.items()
            return IHostMemory(engine_bytes(version, gpu, tuple(mx[1:]), (mn[0], op[0], mx[0]), classes, input_name=name))

    class ParserError:
        def __init__(self, desc: str):
            self._desc = desc

        def desc(self) -> str:
            return self._desc

        def __str__(self) -> str:
            return f"In node 3 (Foo): {self._desc}"

    class OnnxParser:
        def __init__(self, network, logger):
            _need(isinstance(network, INetworkDefinition), "OnnxParser(network): an INetworkDefinition")
            _need(isinstance(logger, ILogger), "OnnxParser(logger): an ILogger")
            self._network = network
            self.num_errors = 0

        def parse_from_file(self, model):
            _need(isinstance(model, str), f"parse_from_file(model): a str path, got {type(model).__name__}")
            calls.append(("parse", model.rsplit("/", 1)[-1]))
            self._network.parsed = parse_ok
            self.num_errors = 0 if parse_ok else 1
            return parse_ok

        def get_error(self, index):
            _need(_is_int(index) and 0 <= index < self.num_errors, f"get_error(index): 0 <= int < num_errors, got {index!r}")
            return ParserError("unsupported operator")

    # ----------------------------------------------------------------------- runtime
    cuda = _make_cudart(gpu, calls)

    class ICudaEngine:
        def __init__(self, header: dict, weights: np.ndarray):
            self.h, self.w = header, weights
            self.num_io_tensors = 2
            self.num_optimization_profiles = 1

        def get_tensor_name(self, index):
            _need(_is_int(index) and 0 <= index < 2, f"get_tensor_name(index): 0 <= int < num_io_tensors, got {index!r}")
            return (self.h["input"], self.h["output"])[index]

        def _name(self, name) -> str:
            _need(isinstance(name, str) and name in (self.h["input"], self.h["output"]), f"no I/O tensor named {name!r}")
            return name

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if self._name(name) == self.h["input"] else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            self._name(name)
            return DataType.FLOAT

        def get_tensor_shape(self, name):
            return Dims((-1, *self.h["chw"]) if self._name(name) == self.h["input"] else (-1, self.h["classes"]))

        def get_tensor_profile_shape(self, name, profile_index):
            _need(self._name(name) == self.h["input"], "get_tensor_profile_shape: input tensors only")
            _need(_is_int(profile_index) and profile_index == 0, f"get_tensor_profile_shape(profile_index): 0, got {profile_index!r}")
            return [Dims((b, *self.h["chw"])) for b in self.h["profile"]]

        def create_execution_context(self):
            return IExecutionContext(self)

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine):
            self.e, self.shape, self.addr = engine, None, {}

        def set_input_shape(self, name, shape):
            _need(self.e.get_tensor_mode(name) == TensorIOMode.INPUT, "set_input_shape: an input tensor")
            shape = _dims(shape, "set_input_shape(shape)")
            lo, hi = self.e.h["profile"][0], self.e.h["profile"][2]
            if len(shape) != 4 or list(shape[1:]) != self.e.h["chw"] or not lo <= shape[0] <= hi:
                return False
            self.shape = shape
            return True

        def get_tensor_shape(self, name):
            if self.e.get_tensor_mode(name) == TensorIOMode.INPUT:
                return Dims(self.shape or (-1, *self.e.h["chw"]))
            return Dims((self.shape[0] if self.shape else -1, self.e.h["classes"]))

        def set_tensor_address(self, name, memory):
            self.e._name(name)
            _need(_is_int(memory), f"set_tensor_address(memory): an int device pointer, got {type(memory).__name__}")
            self.addr[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            _need(_is_int(stream_handle), f"execute_async_v3(stream_handle): an int, got {type(stream_handle).__name__}")
            _need(stream_handle in cuda._streams, "execute_async_v3: not a live CUDA stream")
            _need(self.shape is not None, "execute_async_v3: set_input_shape was not called")
            h = self.e.h
            _need(set(self.addr) == {h["input"], h["output"]}, f"execute_async_v3: addresses set for {sorted(self.addr)} only")
            n = self.shape[0]
            x = cuda._view(self.addr[h["input"]], n * int(np.prod(h["chw"])) * 4)
            y = np.frombuffer(x, np.float32).reshape(n, -1) @ self.e.w
            out = cuda._view(self.addr[h["output"]], y.nbytes)
            ctypes.memmove(ctypes.addressof(out), y.ctypes.data, y.nbytes)
            calls.append(("execute", n))
            return True

    class Runtime:
        def __init__(self, logger):
            _need(isinstance(logger, ILogger), "Runtime(logger): an ILogger")

        def deserialize_cuda_engine(self, serialized_engine):
            data = _buffer(serialized_engine, "deserialize_cuda_engine")
            calls.append(("deserialize", len(data)))
            try:
                h, w = _parse_engine(data)
            except ValueError:
                return None
            if h["version"] != version or tuple(h["gpu"]) != tuple(gpu):
                return None  # TensorRT logs "engine plan file is not compatible" and returns None
            return ICudaEngine(h, w)

    def nptype(t):
        _need(isinstance(t, DataType), f"nptype: a DataType, got {t!r}")
        return {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32}[t]

    for name, value in dict(
        ILogger=ILogger, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, BuilderFlag=BuilderFlag, MemoryPoolType=MemoryPoolType,
        TensorIOMode=TensorIOMode, DataType=DataType, nptype=nptype, Dims=Dims, IHostMemory=IHostMemory,
    ).items():
        setattr(trt, name, value)
    return StandIn(trt, cuda, calls)


def _make_cudart(gpu: tuple[str, str], calls: list[tuple]) -> types.ModuleType:
    """cuda-python's runtime module (``cuda.bindings.runtime``), on host memory."""
    m = types.ModuleType("cuda.bindings.runtime")
    cudaError_t = enum.Enum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidValue": 1, "cudaErrorInvalidDevicePointer": 17})
    cudaMemcpyKind = enum.Enum("cudaMemcpyKind", {"cudaMemcpyHostToHost": 0, "cudaMemcpyHostToDevice": 1,
                                                  "cudaMemcpyDeviceToHost": 2, "cudaMemcpyDeviceToDevice": 3})
    ok = cudaError_t.cudaSuccess
    allocations: dict[int, ctypes.Array] = {}
    streams: set[int] = set()

    class cudaStream_t:
        """cuda-python's stream handle: ``int(stream)`` is the raw handle TensorRT takes."""

        def __init__(self, handle: int):
            self._h = handle

        def __int__(self) -> int:
            return self._h

    class cudaDeviceProp:
        def __init__(self):
            self.name = gpu[0].encode().ljust(256, b"\0")
            self.major, self.minor = (int(v) for v in gpu[1].split("."))

    def _owner(ptr: int, count: int) -> bool:
        return any(base <= ptr and ptr + count <= base + ctypes.sizeof(buf) for base, buf in allocations.items())

    def _view(ptr: int, count: int):
        _need(_owner(ptr, count), f"device pointer {ptr:#x} (+{count} bytes) is not inside a live cudaMalloc allocation")
        return (ctypes.c_char * count).from_address(ptr)

    def cudaGetDevice():
        return ok, 0

    def cudaGetDeviceProperties(device):
        _need(_is_int(device), f"cudaGetDeviceProperties(device): an int, got {device!r}")
        return ok, cudaDeviceProp()

    def cudaMalloc(size):
        _need(_is_int(size) and size > 0, f"cudaMalloc(size): a positive int, got {size!r}")
        buf = ctypes.create_string_buffer(size)
        allocations[ctypes.addressof(buf)] = buf
        calls.append(("cudaMalloc", size))
        return ok, ctypes.addressof(buf)

    def cudaFree(devPtr):
        _need(_is_int(devPtr) and devPtr in allocations, f"cudaFree: not a live allocation: {devPtr!r}")
        del allocations[devPtr]
        calls.append(("cudaFree",))
        return (ok,)

    def cudaStreamCreate():
        s = cudaStream_t(0x5000 + len(streams) + 1)
        streams.add(int(s))
        return ok, s

    def _stream(stream, what: str) -> None:
        _need(isinstance(stream, cudaStream_t) and int(stream) in streams, f"{what}(stream): a live cudaStream_t")

    def cudaStreamDestroy(stream):
        _stream(stream, "cudaStreamDestroy")
        streams.discard(int(stream))
        return (ok,)

    def cudaStreamSynchronize(stream):
        _stream(stream, "cudaStreamSynchronize")
        return (ok,)

    def cudaMemcpyAsync(dst, src, count, kind, stream):
        for v, what in ((dst, "dst"), (src, "src"), (count, "count")):
            _need(_is_int(v), f"cudaMemcpyAsync({what}): an int, got {type(v).__name__}")
        _need(isinstance(kind, cudaMemcpyKind), f"cudaMemcpyAsync(kind): a cudaMemcpyKind, got {kind!r}")
        _stream(stream, "cudaMemcpyAsync")
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            _view(dst, count)
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            _view(src, count)
        else:
            raise Misuse(f"cudaMemcpyAsync: unexpected kind {kind}")
        ctypes.memmove(dst, src, count)
        calls.append(("memcpy", kind.name, count))
        return (ok,)

    for name, value in dict(
        cudaError_t=cudaError_t, cudaMemcpyKind=cudaMemcpyKind, cudaStream_t=cudaStream_t, cudaGetDevice=cudaGetDevice,
        cudaGetDeviceProperties=cudaGetDeviceProperties, cudaMalloc=cudaMalloc, cudaFree=cudaFree,
        cudaStreamCreate=cudaStreamCreate, cudaStreamDestroy=cudaStreamDestroy, cudaStreamSynchronize=cudaStreamSynchronize,
        cudaMemcpyAsync=cudaMemcpyAsync, _view=_view, _streams=_StreamSet(streams), _allocations=allocations,
    ).items():
        setattr(m, name, value)
    return m


class _StreamSet:
    """``handle in cudart._streams`` for the raw int handles TensorRT receives."""

    def __init__(self, streams: set[int]):
        self._s = streams

    def __contains__(self, handle) -> bool:
        return handle in self._s


def install(monkeypatch, st: StandIn) -> None:
    """Make ``import tensorrt`` and ``from cuda.bindings import runtime`` find the stand-ins."""
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.__spec__ = importlib.machinery.ModuleSpec("cuda", None, is_package=True)
    bindings.__spec__ = importlib.machinery.ModuleSpec("cuda.bindings", None, is_package=True)
    cuda.bindings, bindings.runtime = bindings, st.cudart
    for name, module in (("tensorrt", st.trt), ("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", st.cudart)):
        monkeypatch.setitem(sys.modules, name, module)
