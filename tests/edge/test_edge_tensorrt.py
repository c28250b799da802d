"""TensorRT compile: flag/typing selection per TensorRT version, the build sequence, the message without TensorRT.

TensorRT cannot be installed on the CI machines, so the builder is exercised against a stand-in
module that records every call the documented Python API would receive. Real engine builds are
``@pytest.mark.gpu`` and skip cleanly without an NVIDIA GPU and the ``tensorrt`` package.
"""

from __future__ import annotations

import enum
import importlib.util
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge.build.compile_tensorrt import (
    TensorRTBuildConfig,
    TensorRTUnavailable,
    build_engine,
    import_tensorrt,
    plan_build,
    write_build_config,
)
from edge.build.compiled import CompileError


def fake_trt(version: str, *, parse_ok: bool = True, build_ok: bool = True):
    """A stand-in for the ``tensorrt`` module (10.x or 11.x surface) that records calls."""
    calls: list[tuple] = []
    major = int(version.split(".")[0])

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 1

    flags = {"TF32": 0, "REFIT": 1}
    if major < 11:  # removed in TensorRT 11 (strong typing only)
        flags.update({"FP16": 2, "INT8": 3})
    BuilderFlag = enum.IntEnum("BuilderFlag", flags)

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class Logger:
        WARNING, INFO, ERROR = 1, 2, 3

        def __init__(self, level):
            calls.append(("Logger", level))

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"TIMING:" + (self.data or b"")

    class Config:
        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", pool, size))

        def set_flag(self, flag):
            calls.append(("flag", flag.name))

        def add_optimization_profile(self, profile):
            calls.append(("profile", dict(profile.shapes)))

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, opt, mx):
            self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return SimpleNamespace()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build",))
            return b"ENGINE" if build_ok else None

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", Path(path).name))
            return parse_ok

        def get_error(self, i):
            return "In node 3 (Foo): unsupported operator"

    module = SimpleNamespace(__version__=version, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser,
                             NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, BuilderFlag=BuilderFlag,
                             MemoryPoolType=MemoryPoolType)
    return module, calls


@pytest.fixture()
def onnx_file(tmp_path: Path) -> Path:
    p = tmp_path / "model.onnx"
    p.write_bytes(b"not parsed by the fake")
    return p


@pytest.mark.parametrize(
    ("version", "precision", "strongly", "flags", "typed"),
    [
        ("10.3.0", "fp16", None, ["FP16"], False),  # JetPack 6: weakly typed, builder flag
        ("10.3.0", "int8", None, ["INT8", "FP16"], False),  # explicit Q/DQ + fp16 for the float layers
        ("10.3.0", "fp32", None, [], False),
        ("10.8.0", "int8", True, [], True),  # 10.x opting into strong typing: no precision flags
        ("11.1.0", "fp16", None, [], True),  # 11.x: always strongly typed, FP16/INT8 flags gone
        ("11.1.0", "int8", False, [], True),
    ],
)
def test_plan_per_version(version, precision, strongly, flags, typed) -> None:
    trt, _ = fake_trt(version)
    plan = plan_build(trt, TensorRTBuildConfig(precision=precision, strongly_typed=strongly))
    assert plan.builder_flags == flags and plan.strongly_typed is typed
    assert plan.network_flags == (1 << 1 if typed else 0)
    for name in plan.builder_flags:  # every chosen flag exists in that version's API
        assert hasattr(trt.BuilderFlag, name)


def test_int8_without_fp16_fallback_and_old_versions() -> None:
    trt, _ = fake_trt("10.3.0")
    assert plan_build(trt, TensorRTBuildConfig(precision="int8", allow_fp16_fallback=False)).builder_flags == ["INT8"]
    old, _ = fake_trt("8.6.1")
    with pytest.raises(CompileError, match="too old"):
        plan_build(old, TensorRTBuildConfig())


def test_build_engine_sequence_profile_and_timing_cache(tmp_path: Path, onnx_file: Path) -> None:
    trt, calls = fake_trt("10.3.0")
    cfg = TensorRTBuildConfig(precision="int8", input_chw=(3, 256, 256), min_batch=1, opt_batch=2, max_batch=8, workspace_mb=512)
    out = build_engine(onnx_file, tmp_path / "eng" / "model.engine", cfg, trt=trt)
    assert out.model_path.read_bytes() == b"ENGINE"
    assert ("profile", {"input": ((1, 3, 256, 256), (2, 3, 256, 256), (8, 3, 256, 256))}) in calls
    assert ("workspace", trt.MemoryPoolType.WORKSPACE, 512 << 20) in calls
    assert [c[1] for c in calls if c[0] == "flag"] == ["INT8", "FP16"]
    assert ("set_timing_cache", False) in calls  # a cache from another GPU is not silently used
    cache = tmp_path / "eng" / "timing.cache"
    assert cache.read_bytes() == b"TIMING:"
    # A rebuild starts from the saved timing cache.
    trt2, calls2 = fake_trt("10.3.0")
    build_engine(onnx_file, tmp_path / "eng" / "model.engine", cfg, trt=trt2)
    assert ("create_timing_cache", b"TIMING:") in calls2
    assert out.details["profile"] == [1, 2, 8] and out.details["tensorrt"] == "10.3.0"


def test_build_engine_errors_name_the_model(tmp_path: Path, onnx_file: Path) -> None:
    trt, _ = fake_trt("10.3.0", parse_ok=False)
    with pytest.raises(CompileError, match="cannot parse.*unsupported operator") as e:
        build_engine(onnx_file, tmp_path / "m.engine", TensorRTBuildConfig(), trt=trt)
    assert str(onnx_file) in str(e.value)
    trt, _ = fake_trt("11.0.0", build_ok=False)
    with pytest.raises(CompileError, match="failed to build"):
        build_engine(onnx_file, tmp_path / "m.engine", TensorRTBuildConfig(), trt=trt)
    assert not (tmp_path / "m.engine").exists()


def test_config_roundtrip_and_validation(tmp_path: Path) -> None:
    cfg = TensorRTBuildConfig(precision="fp16", max_batch=4)
    p = write_build_config(cfg, tmp_path / "tensorrt.json")
    assert TensorRTBuildConfig.load(p) == cfg
    with pytest.raises(ValueError, match="min <= opt <= max"):
        TensorRTBuildConfig(min_batch=4, opt_batch=2)
    (tmp_path / "bad.json").write_text('{"precision": "int8", "dla_core": 1}')
    with pytest.raises(CompileError, match="unknown TensorRT build option"):
        TensorRTBuildConfig.load(tmp_path / "bad.json")


def test_without_tensorrt_the_message_is_clear(monkeypatch, onnx_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from echofleet.cli.edge import edge_app

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        import_tensorrt()
    res = CliRunner().invoke(edge_app, ["compile", str(onnx_file), "--target", "tensorrt", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "TensorRT is not installed" in res.output and "NVIDIA device" in res.output.replace("\n", " ")


def _have_gpu_trt() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (TensorRT engines are built on the NVIDIA device)"
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU (nvidia-smi not found)"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_have_gpu_trt() is not None, reason=str(_have_gpu_trt()))
def test_real_engine_build(tmp_path: Path) -> None:  # pragma: no cover - needs a GPU with TensorRT
    from edge.build.export import export_task_model
    from edge_helpers import fresh_model

    exp = export_task_model(fresh_model(tmp_path / "m", "classify"), tmp_path / "x")
    out = build_engine(exp.onnx_path, tmp_path / "model.engine", TensorRTBuildConfig(precision="fp32", max_batch=2))
    assert out.model_path.stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0
