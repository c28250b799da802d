"""What every compile step takes (:class:`CompileOptions`), returns (:class:`CompiledModel`) and raises
(:class:`CompileError`), and the two things done with any compiled model: find its target's
compile functions (:func:`compile_model`, :func:`describe_compiled`) and lay it out in a bundle
(:func:`bundle_artifacts`).

Each ``compile_*.py`` module named in :data:`edge.targets.TARGETS` provides

- ``compile_for_bundle(model_path, out_dir, options) -> CompiledModel``: compile on the build
  machine for a bundle (``edge build``, ``edge compile``);
- ``describe_compiled(model_path, options) -> CompiledModel``: what an already compiled file on
  disk ships as (``edge bundle``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge.targets import EdgeTarget, get_target


class CompileError(Exception):
    """A model could not be compiled for a target (names the model, the target and the reason)."""


@dataclass(frozen=True)
class CompileOptions:
    """Everything a compile step may need; each target reads the fields that apply to it."""

    graph_precision: str = "fp32"  # what the model itself is: fp32 | fp16 | int8
    inference_precision: str = "f32"  # OpenVINO: f32 | bf16 | f16 (explicit, never OpenVINO's default)
    input_chw: tuple[int, int, int] = (3, 256, 256)
    max_batch: int = 8  # TensorRT optimisation profile


@dataclass
class CompiledModel:
    """What a compile step produced: the files to bundle and how to run them."""

    target: str  # a name in edge.targets.TARGETS
    model_path: Path  # the file the runtime opens (.xml, .onnx, .engine)
    files: list[Path]
    format: str  # "openvino-ir" | "onnx" | "tensorrt-engine"
    precision: str  # graph precision: fp32 | fp16 | int8
    inference_precision: str | None = None  # OpenVINO only: f32 | bf16 | f16
    details: dict = field(default_factory=dict)
    # files shipped beside the model, by role: "weights" (OpenVINO .bin), "build-config" (tensorrt.json)
    sidecars: dict[str, Path] = field(default_factory=dict)
    # top-level manifest sections this model adds (e.g. "tensorrt": the engine build config)
    manifest: dict[str, Any] = field(default_factory=dict)


def target_function(path: str) -> Callable[..., Any]:
    """Resolve a table entry such as ``"edge.build.compile_openvino:compile_for_bundle"``."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def compile_model(target: str | EdgeTarget, model_path: str | Path, out_dir: str | Path,
                  options: CompileOptions = CompileOptions()) -> CompiledModel:
    """Compile ``model_path`` for ``target`` into ``out_dir`` with the target's own compile module."""
    t = get_target(target) if isinstance(target, str) else target
    return target_function(t.compile)(Path(model_path), Path(out_dir), options)


def describe_compiled(target: str | EdgeTarget, model_path: str | Path, *, inference_precision: str = "f32") -> CompiledModel:
    """What an already compiled model file ships as for ``target`` (its weights, build config ...);
    its graph precision is read from the graph (:func:`graph_precision`)."""
    t = get_target(target) if isinstance(target, str) else target
    model_path = Path(model_path)
    if model_path.suffix != t.suffix:
        raise CompileError(f"{model_path}: a {t.name} bundle ships a {t.artifact_format} model ({t.suffix} file); "
                           f"compile it first: echofleet edge compile {model_path.name} --target {t.name}")
    options = CompileOptions(graph_precision=graph_precision(model_path), inference_precision=inference_precision)
    module = t.compile.partition(":")[0]
    return target_function(f"{module}:describe_compiled")(model_path, options)


def graph_precision(model_path: str | Path) -> str:
    """int8 when the graph holds Q/DQ or FakeQuantize ops, fp16 when its weights are float16, else fp32."""
    model_path = Path(model_path)
    if model_path.suffix == ".xml":
        try:
            text = model_path.read_text(errors="replace")
        except OSError as e:
            raise CompileError(f"{model_path}: cannot read the model ({e.strerror})") from None
        return "int8" if 'type="FakeQuantize"' in text else "fp32"
    import onnx

    try:
        m = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError ...
        raise CompileError(f"{model_path}: not a readable ONNX model ({type(e).__name__})") from None
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger") for n in m.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer):
        return "fp16"
    return "fp32"


def bundle_artifacts(compiled: CompiledModel) -> tuple[dict[str, Path], list[dict]]:
    """(bundle path -> local file, artifact descriptions) for a compiled model.

    The layout every bundle uses: the model at ``model/model<suffix>``, its weights beside it
    (``model/model.bin``), a build config at the top (``tensorrt.json``).
    """
    t = get_target(compiled.target)
    model = f"model/model{t.suffix}"
    desc: dict[str, Any] = {"path": model, "role": "model", "format": compiled.format, "precision": compiled.precision,
                            "target": t.name}
    if compiled.inference_precision:
        desc["inference_precision"] = compiled.inference_precision
    files, descs = {model: compiled.model_path}, [desc]
    for role, path in compiled.sidecars.items():
        if role == "weights":
            rel = f"model/model{path.suffix}"
            desc["weights"] = rel
            descs.append({"path": rel, "role": role, "precision": compiled.precision, "target": t.name})
        else:
            rel = path.name
            descs.append({"path": rel, "role": role, "target": t.name})
        files[rel] = path
    return files, descs
