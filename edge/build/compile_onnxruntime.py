"""Step 3 (target ``onnxruntime-cpu``): a portable ONNX model checked to load and run in ONNX Runtime.

The model is saved after ONNX Runtime's *basic* offline graph optimisations (constant folding,
redundant-node elimination): they keep to standard ONNX ops, so the result still opens in
OpenVINO (the runtime's fallback) and on any CPU. Hardware-specific fusions (``extended`` /
``all``) are left to the session on the device, which applies them at load time.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.build.compiled import CompiledModel, CompileError, CompileOptions
from edge.targets import get_target

TARGET = get_target("onnxruntime-cpu")
LEVELS = ("none", "basic")


def compile_onnxruntime(model_path: str | Path, out_dir: str | Path, *, graph_precision: str = "fp32",
                        optimization: str = "basic", out_name: str | None = None) -> CompiledModel:
    """Write ``out_dir/<out_name>`` (optimised offline at ``optimization`` level) and smoke-run it.

    ``out_name`` defaults to ``model.onnx``, or ``model.ort.onnx`` when that would overwrite the source."""
    import onnxruntime as ort

    if optimization not in LEVELS:
        raise CompileError(f"{model_path}: optimisation level {optimization!r} for {TARGET.name}: choose one of {LEVELS}")
    src, out_dir = Path(model_path), Path(out_dir)
    if not src.is_file():
        raise CompileError(f"{src}: no such model")
    out_dir.mkdir(parents=True, exist_ok=True)
    if out_name is None:
        out_name = "model.ort.onnx" if (out_dir / "model.onnx").resolve() == src.resolve() else "model.onnx"
    out = out_dir / out_name
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=f".{out_name}.", suffix=".onnx", dir=out_dir)
    os.close(fd)
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimization == "basic"
                                         else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        opts.optimized_model_filepath = tmp
        try:
            sess = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise CompileError(f"{src}: ONNX Runtime cannot load the model ({str(e).splitlines()[0]})") from None
        inp = sess.get_inputs()[0]
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        check = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        check.run(None, {inp.name: np.zeros(shape, np.float32)})
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return CompiledModel(TARGET.name, out, [out], TARGET.artifact_format, graph_precision, None,
                         {"compile_seconds": round(time.perf_counter() - t0, 2), "offline_optimization": optimization,
                          "onnxruntime": ort.__version__})


def compile_for_bundle(model_path: Path, out_dir: Path, options: CompileOptions) -> CompiledModel:
    """The table's compile step for ``onnxruntime-cpu`` (see :mod:`edge.build.compiled`)."""
    return compile_onnxruntime(model_path, out_dir, graph_precision=options.graph_precision)


def describe_compiled(model_path: Path, options: CompileOptions) -> CompiledModel:
    """An ONNX model compiled earlier: it ships alone."""
    return CompiledModel(TARGET.name, model_path, [model_path], TARGET.artifact_format, options.graph_precision)
