"""Step 3 (target ``tensorrt``): a TensorRT engine from the ONNX model, built on the device itself.

A TensorRT engine only runs on the GPU model and TensorRT version that built it, so a Jetson
bundle carries the ONNX model (the explicitly quantized Q/DQ INT8 graph, or the FP16 graph)
plus ``tensorrt.json`` (this module's :class:`TensorRTBuildConfig`), and
``echofleet edge compile model.onnx --target tensorrt --config tensorrt.json`` runs on the Jetson.

Versions handled (checked through the documented Python API only):

- **TensorRT 10.x** (JetPack 6 on Jetson Orin): weakly typed by default. Precision comes from
  builder flags: ``FP16`` for an fp16 build; ``INT8`` (plus ``FP16`` for the layers left in
  float) for the Q/DQ graph, which TensorRT then runs with the graph's own scales (explicit
  quantization, no calibrator). ``strongly_typed=True`` opts into strong typing (10.x with the
  ``STRONGLY_TYPED`` creation flag); then no precision flag is set.
- **TensorRT 11.x**: every network is strongly typed and ``BuilderFlag.FP16/INT8`` no longer
  exist: precision comes from the graph (Q/DQ nodes, float16 tensors). Building an ``fp16``
  engine therefore needs the float16 ONNX (``echofleet edge quantize --method fp16``).

Always: one optimisation profile for the batch (``min/opt/max``), a persistent timing cache (so
rebuilds on the same device take seconds), and a workspace limit. ``set_timing_cache`` returns
False when TensorRT rejects the saved cache (made by another GPU or TensorRT version, with
``ignore_mismatch=False``): that cache is discarded (logged) and a fresh one is built and saved.
Without ``tensorrt`` importable, :func:`build_engine` raises :class:`TensorRTUnavailable` with a
clear message.

Beside the engine goes its build record (``model.engine.json``, :class:`~edge.device.backends.
EngineRecord`: the ONNX model's sha256, TensorRT version, GPU name and compute capability), which
the device runtime checks before it deserializes the engine. Without ``--engine`` the engine goes
to the runtime's engine cache for that ONNX model (:func:`~edge.device.backends.engine_cache_dir`),
where the runtime finds it: not into the bundle folder, whose verification refuses unlisted files.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from echocare.atomic import atomic_write_bytes
from echocare.bundle import sha256_file
from edge.build.compiled import CompiledModel, CompileError, CompileOptions
from edge.device.backends import EngineRecord, cuda_device_identity, default_engine_path, import_cudart
from edge.targets import get_target

log = logging.getLogger(__name__)

TARGET = get_target("tensorrt")
PRECISIONS = TARGET.precisions
BUILD_CONFIG = "tensorrt.json"  # beside the ONNX model, and at the top of a bundle


class TensorRTUnavailable(CompileError):
    """TensorRT's Python package is not importable here."""


@dataclass
class TensorRTBuildConfig:
    """How to build the engine on the device (travels in the bundle as ``tensorrt.json``)."""

    precision: str = "int8"  # of the ONNX graph shipped: int8 (Q/DQ) | fp16 | fp32
    input_name: str = "input"
    input_chw: tuple[int, int, int] = (3, 256, 256)
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_mb: int = 1024
    strongly_typed: bool | None = None  # None: automatic (TensorRT >= 11 always; 10.x weakly typed)
    allow_fp16_fallback: bool = True  # 10.x int8 builds: let non-quantized layers run in fp16
    timing_cache: str = "timing.cache"  # relative to the engine's folder unless absolute

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"TensorRT precision {self.precision!r}: choose one of {PRECISIONS}")
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise ValueError(f"TensorRT batch profile needs 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        self.input_chw = tuple(int(v) for v in self.input_chw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_chw"] = list(self.input_chw)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorRTBuildConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TensorRT build option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "TensorRTBuildConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise CompileError(f"{path}: not a usable TensorRT build config ({e})") from None


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` saying what to do."""
    try:
        import tensorrt  # noqa: PLC0415 - optional, device-only dependency
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed on this machine: the tensorrt target compiles on the NVIDIA device itself "
            "(Jetson Orin: JetPack 6 ships TensorRT 10 with its Python bindings). Copy the bundle there and run "
            "`echofleet edge compile model.onnx --target tensorrt --config tensorrt.json`."
        ) from None
    return tensorrt


def trt_major(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        raise CompileError(f"cannot tell the TensorRT version from tensorrt.__version__={getattr(trt, '__version__', None)!r}") from None


@dataclass
class BuildPlan:
    """The version-dependent choices, separated from the build so they can be tested without a GPU."""

    strongly_typed: bool
    network_flags: int
    builder_flags: list[str]  # names of trt.BuilderFlag members to set
    notes: list[str]


def plan_build(trt: Any, config: TensorRTBuildConfig) -> BuildPlan:
    """Decide network-creation flags and builder flags for this TensorRT version and precision."""
    major = trt_major(trt)
    notes: list[str] = []
    strongly = True if major >= 11 else bool(config.strongly_typed)
    if major >= 11 and config.strongly_typed is False:
        notes.append("TensorRT >= 11 networks are always strongly typed; strongly_typed=False ignored")
    if major < 10:
        raise CompileError(f"TensorRT {trt.__version__} is too old: this build supports TensorRT 10.x and 11.x")
    flags = 0
    if strongly:
        member = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if member is not None:  # 11.x accepts and ignores it; 10.x needs it
            flags |= 1 << int(member)
        notes.append(f"strongly typed: precision comes from the {config.precision} ONNX graph")
        builder_flags: list[str] = []
    elif config.precision == "fp16":
        builder_flags = ["FP16"]
    elif config.precision == "int8":
        builder_flags = ["INT8"] + (["FP16"] if config.allow_fp16_fallback else [])
        notes.append("explicit quantization: INT8 scales come from the graph's Q/DQ nodes (no calibrator)")
    else:
        builder_flags = []
    return BuildPlan(strongly, flags, builder_flags, notes)


def _use_timing_cache(bconf: Any, cache_path: Path) -> None:
    """Attach the saved timing cache; one TensorRT rejects is discarded and a fresh one used instead."""
    saved = cache_path.read_bytes() if cache_path.is_file() else b""
    try:
        cache = bconf.create_timing_cache(saved)
    except RuntimeError:  # an unreadable blob: treated like a rejected cache
        cache = None
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused, never used
    if cache is not None and bconf.set_timing_cache(cache, False) is True:
        return
    if not saved:
        raise CompileError(f"{cache_path}: TensorRT refused even an empty timing cache")
    log.warning("%s: TensorRT rejected this timing cache (made by another GPU or TensorRT version); "
                "discarded, building a new one", cache_path)
    cache_path.unlink()
    if bconf.set_timing_cache(bconf.create_timing_cache(b""), False) is not True:
        raise CompileError(f"{cache_path}: TensorRT refused an empty timing cache")


def build_engine(onnx_path: str | Path, engine_path: str | Path, config: TensorRTBuildConfig, *, trt: Any = None,
                 cudart: Any = None, log_level: str = "WARNING") -> CompiledModel:
    """Parse ``onnx_path``, build a serialized engine at ``engine_path`` (atomic) with its build record,
    update the timing cache.

    ``trt`` and ``cudart`` default to the installed ``tensorrt`` and ``cuda-python`` (tests pass stand-ins).
    """
    trt = trt if trt is not None else import_tensorrt()
    try:
        cudart = cudart if cudart is not None else import_cudart()
    except RuntimeError as e:  # BackendUnavailable: the runtime needs cuda-python too
        raise TensorRTUnavailable(str(e)) from None
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise CompileError(f"{onnx_path}: no such model")
    plan = plan_build(trt, config)
    t0 = time.perf_counter()
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    network = builder.create_network(plan.network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "unknown parser error"
        raise CompileError(f"{onnx_path}: TensorRT cannot parse the ONNX model ({errors})")

    bconf = builder.create_builder_config()
    bconf.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_mb) << 20)
    for name in plan.builder_flags:
        bconf.set_flag(getattr(trt.BuilderFlag, name))

    c, h, w = config.input_chw
    profile = builder.create_optimization_profile()
    profile.set_shape(config.input_name, (config.min_batch, c, h, w), (config.opt_batch, c, h, w), (config.max_batch, c, h, w))
    bconf.add_optimization_profile(profile)

    cache_path = Path(config.timing_cache)
    if not cache_path.is_absolute():
        cache_path = engine_path.parent / cache_path
    _use_timing_cache(bconf, cache_path)

    serialized = builder.build_serialized_network(network, bconf)
    if serialized is None:
        raise CompileError(f"{onnx_path}: TensorRT {trt.__version__} failed to build an engine (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine_path, bytes(serialized), 0o600)
    gpu, cc = cuda_device_identity(cudart)
    record = EngineRecord(sha256_file(onnx_path), str(trt.__version__), gpu, cc, config.precision,
                          [config.min_batch, config.opt_batch, config.max_batch], config.input_name).save(engine_path)
    atomic_write_bytes(cache_path, bytes(bconf.get_timing_cache().serialize()), 0o600)
    return CompiledModel(
        TARGET.name, engine_path, [engine_path, record], "tensorrt-engine", config.precision, None,
        {"tensorrt": str(trt.__version__), "gpu": f"{gpu} (compute capability {cc})", "strongly_typed": plan.strongly_typed,
         "builder_flags": plan.builder_flags, "profile": [config.min_batch, config.opt_batch, config.max_batch],
         "timing_cache": str(cache_path), "build_seconds": round(time.perf_counter() - t0, 2), "notes": plan.notes},
    )


def write_build_config(config: TensorRTBuildConfig, path: str | Path) -> Path:
    """``tensorrt.json`` for a bundle (what ``compile --target tensorrt`` reads on the device)."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(config.to_dict(), indent=2) + "\n").encode(), 0o600)
    return path


# ------------------------------------------------------------------------ the table's entries
def compile_for_bundle(model_path: Path, out_dir: Path, options: CompileOptions) -> CompiledModel:
    """On the build machine: the ONNX model ships as is, with ``tensorrt.json`` saying how to build the engine.

    The engine itself is built on the device (:func:`build_engine_on_device`): it only runs on the
    GPU model and TensorRT version that built it."""
    tcfg = TensorRTBuildConfig(precision=options.graph_precision, input_chw=options.input_chw, max_batch=options.max_batch)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    cfg_path = write_build_config(tcfg, Path(out_dir) / BUILD_CONFIG)
    return CompiledModel(
        TARGET.name, Path(model_path), [Path(model_path), cfg_path], TARGET.artifact_format, options.graph_precision, None,
        {"engine": f"built on the device: echofleet edge compile model/model.onnx --target tensorrt --config {BUILD_CONFIG}",
         "tensorrt": tcfg.to_dict()},
        sidecars={"build-config": cfg_path}, manifest={"tensorrt": tcfg.to_dict()})


def describe_compiled(model_path: Path, options: CompileOptions) -> CompiledModel:
    """An ONNX model prepared earlier: it ships with the ``tensorrt.json`` beside it, when there is one."""
    cfg_path = model_path.parent / BUILD_CONFIG
    if not cfg_path.is_file():
        return CompiledModel(TARGET.name, model_path, [model_path], TARGET.artifact_format, options.graph_precision)
    tcfg = TensorRTBuildConfig.load(cfg_path)
    return CompiledModel(TARGET.name, model_path, [model_path, cfg_path], TARGET.artifact_format, options.graph_precision,
                         None, {"tensorrt": tcfg.to_dict()}, sidecars={"build-config": cfg_path},
                         manifest={"tensorrt": tcfg.to_dict()})


def build_engine_on_device(model_path: Path, out_dir: Path, *, config: Path | None = None, engine: Path | None = None,
                           precision: str = "int8", max_batch: int = 8) -> CompiledModel:
    """On the device: the engine from the bundle's ONNX and ``tensorrt.json`` (or these defaults).

    Without ``engine`` it goes to the runtime's engine cache for this ONNX model (where
    :class:`~edge.device.runtime.BundleRuntime` looks); ``out_dir`` is then not used."""
    tcfg = TensorRTBuildConfig.load(config) if config else TensorRTBuildConfig(precision=precision, max_batch=max_batch)
    model_path = Path(model_path)
    if not model_path.is_file():
        raise CompileError(f"{model_path}: no such model")
    return build_engine(model_path, engine or default_engine_path(sha256_file(model_path)), tcfg)
