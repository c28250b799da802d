"""TensorRT: flag/typing selection per version, the build sequence, the timing cache, the engine runtime.

TensorRT cannot be installed on the CI machines, so the builder and the engine runtime run
against the strict stand-in of ``trt_standin.py`` (argument types and return values as NVIDIA's
10.x / 11.x Python API documentation states them: misuse fails). Real engine builds are
``@pytest.mark.gpu`` and skip cleanly without an NVIDIA GPU and the ``tensorrt`` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
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
from trt_standin import Misuse, make_standin


def fake_trt(version: str, **kw):
    """The stand-in ``tensorrt`` module and its call record."""
    st = make_standin(version, **kw)
    return st.trt, st.calls


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


def _build(st, onnx: Path, engine: Path, cfg: TensorRTBuildConfig | None = None):
    return build_engine(onnx, engine, cfg or TensorRTBuildConfig(input_chw=(3, 8, 8)), trt=st.trt, cudart=st.cudart)


def test_build_engine_sequence_profile_and_timing_cache(tmp_path: Path, onnx_file: Path) -> None:
    st = make_standin("10.3.0")
    cfg = TensorRTBuildConfig(precision="int8", input_chw=(3, 16, 16), min_batch=1, opt_batch=2, max_batch=8, workspace_mb=512)
    out = _build(st, onnx_file, tmp_path / "eng" / "model.engine", cfg)
    assert out.model_path.read_bytes().startswith(b"STANDIN-ENGINE")
    assert ("profile", {"input": ((1, 3, 16, 16), (2, 3, 16, 16), (8, 3, 16, 16))}) in st.calls
    assert ("workspace", "WORKSPACE", 512 << 20) in st.calls
    assert [c[1] for c in st.calls if c[0] == "flag"] == ["INT8", "FP16"]
    assert ("set_timing_cache", False) in st.calls  # ignore_mismatch=False: a foreign cache is never used
    cache = tmp_path / "eng" / "timing.cache"
    saved = cache.read_bytes()
    assert saved.startswith(b"TIMING:")
    # the build record beside the engine: what the runtime checks before it runs the engine
    rec = json.loads((tmp_path / "eng" / "model.engine.json").read_text())
    assert rec["onnx_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert (rec["tensorrt"], rec["gpu"], rec["compute_capability"], rec["profile"]) == ("10.3.0", "Orin", "8.7", [1, 2, 8])
    # A rebuild starts from the saved timing cache, and TensorRT accepts it.
    st2 = make_standin("10.3.0")
    _build(st2, onnx_file, tmp_path / "eng" / "model.engine", cfg)
    assert ("create_timing_cache", saved) in st2.calls and cache.read_bytes() == saved
    assert [c for c in st2.calls if c[0] == "create_timing_cache"] == [("create_timing_cache", saved)]
    assert out.details["profile"] == [1, 2, 8] and out.details["tensorrt"] == "10.3.0"


def test_rejected_timing_cache_is_discarded_and_rebuilt(tmp_path: Path, onnx_file: Path, caplog) -> None:
    """set_timing_cache returns False for a cache from another GPU: never used, replaced, logged."""
    make_standin_a = make_standin("10.3.0", gpu=("NVIDIA GeForce RTX 4090", "8.9"))
    _build(make_standin_a, onnx_file, tmp_path / "model.engine")
    cache = tmp_path / "timing.cache"
    foreign = cache.read_bytes()
    st = make_standin("10.3.0")  # the Jetson
    with caplog.at_level(logging.WARNING, logger="edge.build.compile_tensorrt"):
        _build(st, onnx_file, tmp_path / "model.engine")
    assert [c for c in st.calls if c[0] in ("create_timing_cache", "set_timing_cache")] == [
        ("create_timing_cache", foreign), ("set_timing_cache", False), ("create_timing_cache", b""), ("set_timing_cache", False)]
    assert "rejected this timing cache" in caplog.text and str(cache) in caplog.text
    assert cache.read_bytes() != foreign  # the Jetson's own cache replaced the foreign one
    # and the next build on the Jetson uses it without complaint
    st3 = make_standin("10.3.0")
    caplog.clear()
    _build(st3, onnx_file, tmp_path / "model.engine")
    assert [c for c in st3.calls if c[0] == "set_timing_cache"] == [("set_timing_cache", False)] and not caplog.text


def test_build_engine_errors_name_the_model(tmp_path: Path, onnx_file: Path) -> None:
    st = make_standin("10.3.0", parse_ok=False)
    with pytest.raises(CompileError, match="cannot parse.*unsupported operator") as e:
        _build(st, onnx_file, tmp_path / "m.engine")
    assert str(onnx_file) in str(e.value)
    st = make_standin("11.0.0", build_ok=False)
    with pytest.raises(CompileError, match="failed to build"):
        _build(st, onnx_file, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.parametrize("version", ["10.3.0", "11.1.0"])
def test_standin_is_strict_about_the_documented_api(version: str, tmp_path: Path, onnx_file: Path) -> None:
    """The stand-in rejects what the real bindings reject, so the tests above would catch misuse."""
    trt = make_standin(version).trt
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    strongly = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    for bad in ([strongly], str(strongly), float(strongly), trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED):
        with pytest.raises(Misuse, match="int bit mask"):
            builder.create_network(bad)
    config = builder.create_builder_config()
    with pytest.raises(Misuse, match="MemoryPoolType"):
        config.set_memory_pool_limit("WORKSPACE", 1 << 20)
    with pytest.raises(Misuse, match="positive int"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1.5e6)
    with pytest.raises(Misuse, match="bool"):
        config.set_timing_cache(config.create_timing_cache(b""), 0)
    parser = trt.OnnxParser(builder.create_network(strongly), trt.Logger(trt.Logger.WARNING))
    with pytest.raises(Misuse, match="str path"):
        parser.parse_from_file(onnx_file)  # a Path, not a str
    if version.startswith("11"):  # 11.x: strongly typed only
        assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "INT8")
        assert not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
        with pytest.raises(Misuse, match="unknown bits"):
            builder.create_network(1 << 0)  # what EXPLICIT_BATCH was
    else:
        assert builder.create_network(1 << 0) is not None  # 10.x: EXPLICIT_BATCH deprecated, still accepted


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
    try:
        from edge.device.backends import import_cudart

        import_cudart()
    except RuntimeError as e:
        return str(e)
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_have_gpu_trt() is not None, reason=str(_have_gpu_trt()))
def test_real_engine_build_and_run(tmp_path: Path) -> None:  # pragma: no cover - needs a GPU with TensorRT
    from edge.build.export import export_task_model
    from echocare.bundle import sha256_file
    from edge.device.backends import TensorRTSession, open_session
    from edge_helpers import fresh_model

    exp = export_task_model(fresh_model(tmp_path / "m", "classify"), tmp_path / "x")
    out = build_engine(exp.onnx_path, tmp_path / "model.engine", TensorRTBuildConfig(precision="fp32", max_batch=2))
    assert out.model_path.stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0
    session = TensorRTSession(out.model_path, model_sha256=sha256_file(exp.onnx_path))
    x = np.random.default_rng(0).standard_normal((3, 3, 256, 256)).astype(np.float32)
    ref = open_session(exp.onnx_path, "onnxruntime").run(x)
    np.testing.assert_allclose(session.run(x), ref, atol=1e-2, rtol=1e-2)  # fp32 engine (TF32 may be on)
    session.close()


# ------------------------------------------------------------------------ the engine at runtime
def _trt_bundle(tmp: Path, size: int = 8) -> tuple[Path, dict]:
    """A tensorrt bundle folder as the scanner has it after install: the ONNX and tensorrt.json."""
    from echocare.preprocess import PreprocessSpec

    d = tmp / "bundle"
    (d / "model").mkdir(parents=True)
    onnx = d / "model" / "model.onnx"
    onnx.write_bytes(b"the bundle's ONNX (the stand-in parser does not read it)")
    write_build_config(TensorRTBuildConfig(precision="fp16", input_chw=(3, size, size), max_batch=4), d / "tensorrt.json")
    manifest = {"name": "trt", "version": "1", "task": "classify", "labels": ["a", "b", "c"],
                "preprocess": PreprocessSpec(size=size).to_dict(),
                "artifacts": [{"path": "model/model.onnx", "role": "model", "format": "onnx", "target": "tensorrt",
                               "precision": "fp16", "sha256": hashlib.sha256(onnx.read_bytes()).hexdigest()}]}
    return d, manifest


def test_runtime_runs_the_engine_edge_compile_built(tmp_path: Path, monkeypatch) -> None:
    from edge.build.compile_tensorrt import build_engine_on_device
    from edge.device.backends import EngineMismatch, default_engine_path
    from edge.device.runtime import BundleRuntime, choose_model
    from trt_standin import install, reference_output

    monkeypatch.setenv("ECHOFLEET_CACHE", str(tmp_path / "cache"))
    st = make_standin("10.3.0")
    install(monkeypatch, st)
    bundle, manifest = _trt_bundle(tmp_path)
    assert choose_model(manifest).backend == "tensorrt"
    # no engine yet: refused, with the command that builds it
    with pytest.raises(EngineMismatch, match="no TensorRT engine.*edge compile .*model.onnx --target tensorrt --config .*tensorrt.json"):
        BundleRuntime(bundle, manifest)
    built = build_engine_on_device(bundle / "model" / "model.onnx", bundle, config=bundle / "tensorrt.json")
    assert built.model_path == default_engine_path(manifest["artifacts"][0]["sha256"])
    assert not any(p.suffix == ".engine" for p in bundle.rglob("*"))  # a verified bundle holds only listed files
    x = np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32)
    with BundleRuntime(bundle, manifest) as rt:
        assert rt.backend == "tensorrt" and rt.describe()["session"]["tensorrt"] == "10.3.0"
        out = rt.predict_arrays(x)  # 6 > the profile's max batch 4: run as 4 + 2
    np.testing.assert_allclose(out, reference_output(built.model_path.read_bytes(), x), rtol=1e-5)
    assert [c for c in st.calls if c[0] in ("deserialize", "execute")][-3:] == [
        ("deserialize", built.model_path.stat().st_size), ("execute", 4), ("execute", 2)]
    assert not st.cudart._allocations  # close() freed every device buffer


@pytest.mark.parametrize(("device", "why"), [
    (dict(version="10.4.0"), "built by TensorRT 10.3.0, this device runs TensorRT 10.4.0"),
    (dict(version="10.3.0", gpu=("NVIDIA A100", "8.0")), r"built for Orin \(compute capability 8.7\), this device is NVIDIA A100"),
])
def test_engine_from_another_tensorrt_or_gpu_is_refused(tmp_path: Path, monkeypatch, device: dict, why: str) -> None:
    from edge.build.compile_tensorrt import build_engine_on_device
    from edge.device.backends import EngineMismatch
    from edge.device.runtime import BundleRuntime
    from trt_standin import install

    monkeypatch.setenv("ECHOFLEET_CACHE", str(tmp_path / "cache"))
    bundle, manifest = _trt_bundle(tmp_path)
    install(monkeypatch, make_standin("10.3.0"))
    build_engine_on_device(bundle / "model" / "model.onnx", bundle, config=bundle / "tensorrt.json")
    version = device.pop("version")
    install(monkeypatch, make_standin(version, **device))
    with pytest.raises(EngineMismatch, match=f"refused, {why}.*edge compile"):
        BundleRuntime(bundle, manifest)


def test_engine_of_another_model_or_unreadable_is_refused(tmp_path: Path, monkeypatch) -> None:
    from edge.device.backends import EngineMismatch, TensorRTSession
    from trt_standin import install

    st = make_standin("10.3.0")
    install(monkeypatch, st)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"model v1")
    engine = _build(st, onnx, tmp_path / "model.engine").model_path
    with pytest.raises(EngineMismatch, match="built from another model"):
        TensorRTSession(engine, model_sha256=hashlib.sha256(b"model v2").hexdigest())
    engine.write_bytes(b"truncated")  # the record still says it is fine: TensorRT itself refuses
    with pytest.raises(EngineMismatch, match="TensorRT 10.3.0 cannot deserialize the engine"):
        TensorRTSession(engine)
    (tmp_path / "model.engine.json").unlink()
    with pytest.raises(EngineMismatch, match="no build record beside the engine"):
        TensorRTSession(engine)


def test_without_tensorrt_a_trt_bundle_runs_its_onnx_elsewhere(tmp_path: Path, monkeypatch) -> None:
    """The build machine's self-test: no TensorRT there, so the ONNX runs on ONNX Runtime (not an engine)."""
    from edge.device.runtime import choose_model

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr("edge.device.runtime.backend_installed", lambda b: b != "tensorrt")
    _, manifest = _trt_bundle(tmp_path)
    assert choose_model(manifest).backend == "onnxruntime"
    with pytest.raises(Exception, match="needs tensorrt"):
        choose_model(manifest, "tensorrt")


def test_bench_times_the_engine(tmp_path: Path, monkeypatch) -> None:
    """`edge bench` on a Jetson times the engine itself (the ONNX on ONNX Runtime beside it)."""
    from edge.bench.latency import bench_candidates, candidates_from_bundle
    from edge.build.compile_tensorrt import build_engine_on_device
    from trt_standin import install

    monkeypatch.setenv("ECHOFLEET_CACHE", str(tmp_path / "cache"))
    st = make_standin("10.3.0")
    install(monkeypatch, st)
    bundle, manifest = _trt_bundle(tmp_path)
    build_engine_on_device(bundle / "model" / "model.onnx", bundle, config=bundle / "tensorrt.json")
    engine = [c for c in candidates_from_bundle(bundle, manifest) if c.backend == "tensorrt"]
    assert [(c.label, c.compute_precision()) for c in engine] == [("model/model.onnx [tensorrt engine]", "fp16")]
    rep = bench_candidates(engine, 8, batch=6, warmup=1, iters=3, with_peak=True)
    (row,) = rep.rows
    assert row.runs == 3 and row.backend == "tensorrt" and row.peak_gflops is None  # no matmul peak for TensorRT here
    assert ("execute", 4) in st.calls and ("execute", 2) in st.calls  # batch 6 > the profile's max 4: in two chunks
