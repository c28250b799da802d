"""Step 3 (target ``openvino-cpu``): an OpenVINO IR (``.xml`` + ``.bin``) and its inference precision.

OpenVINO picks bf16 by itself on CPUs with AMX / AVX512-BF16 (like this build machine) unless
told otherwise, which changes the numerics that the accuracy gate measured. So the inference
precision is always explicit (``f32`` | ``bf16`` | ``f16``), checked by compiling the IR once
here and reading the property back, and recorded in the bundle manifest, where the runtime
applies it again on the device.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from edge.build.compiled import CompiledModel, CompileError, CompileOptions
from edge.device.backends import OpenVINOSession
from edge.targets import get_target

TARGET = get_target("openvino-cpu")


def compile_openvino(model_path: str | Path, out_dir: str | Path, *, inference_precision: str = "f32",
                     graph_precision: str = "fp32", compress_to_fp16: bool = False) -> CompiledModel:
    """Write ``out_dir/model.xml`` + ``model.bin`` from an ONNX or IR model and check it compiles.

    ``compress_to_fp16`` stores float weights as fp16 (halves the IR; OpenVINO decompresses them
    at load). ``graph_precision`` is what the model itself is (``int8`` for an NNCF IR).
    """
    import openvino as ov

    if inference_precision not in TARGET.inference_precisions:
        raise CompileError(f"{model_path}: inference precision {inference_precision!r} for {TARGET.name}: "
                           f"choose one of {', '.join(TARGET.inference_precisions)}")
    src, out_dir = Path(model_path), Path(out_dir)
    if not src.is_file():
        raise CompileError(f"{src}: no such model")
    out_dir.mkdir(parents=True, exist_ok=True)
    xml, bin_ = out_dir / "model.xml", out_dir / "model.bin"
    t0 = time.perf_counter()
    try:
        model = ov.Core().read_model(str(src))
    except RuntimeError as e:
        raise CompileError(f"{src}: OpenVINO cannot read the model ({str(e).splitlines()[0]})") from None
    tmp = Path(tempfile.mkdtemp(prefix=".ov.", dir=out_dir))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=compress_to_fp16)
        session = OpenVINOSession(tmp / "model.xml", inference_precision, graph_precision=graph_precision)
        effective = session.info.details["inference_precision"]
        del session
        bin_.unlink(missing_ok=True)
        shutil.move(str(tmp / "model.bin"), bin_)
        shutil.move(str(tmp / "model.xml"), xml)
    except RuntimeError as e:
        raise CompileError(f"{src}: OpenVINO could not compile the model for CPU ({str(e).splitlines()[0]})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if effective != inference_precision:
        raise CompileError(
            f"{src}: asked OpenVINO for {inference_precision} inference but this CPU runs {effective}; "
            f"choose --precision {effective} (or f32) for this machine"
        )
    return CompiledModel(TARGET.name, xml, [xml, bin_], "openvino-ir", graph_precision, inference_precision,
                         {"compile_seconds": round(time.perf_counter() - t0, 2), "weights_fp16": compress_to_fp16,
                          "openvino": ov.get_version()}, sidecars={"weights": bin_})


def compile_for_bundle(model_path: Path, out_dir: Path, options: CompileOptions) -> CompiledModel:
    """The table's compile step for ``openvino-cpu`` (see :mod:`edge.build.compiled`)."""
    return compile_openvino(model_path, out_dir, inference_precision=options.inference_precision,
                            graph_precision=options.graph_precision)


def describe_compiled(model_path: Path, options: CompileOptions) -> CompiledModel:
    """An IR compiled earlier (``edge compile``): the ``.xml`` and its ``.bin`` weights beside it."""
    weights = model_path.with_suffix(".bin")
    if not weights.is_file():
        raise CompileError(f"{model_path}: its weights {weights.name} are not beside it")
    if options.inference_precision not in TARGET.inference_precisions:
        raise CompileError(f"{model_path}: inference precision {options.inference_precision!r} for {TARGET.name}: "
                           f"choose one of {', '.join(TARGET.inference_precisions)}")
    return CompiledModel(TARGET.name, model_path, [model_path, weights], TARGET.artifact_format, options.graph_precision,
                         options.inference_precision, sidecars={"weights": weights})
