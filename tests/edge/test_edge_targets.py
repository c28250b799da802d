"""The table of edge targets: every row is complete and consistent, and the steps read it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.build.compiled import CompiledModel, CompileError, bundle_artifacts, describe_compiled, target_function
from edge.build.pipeline import BuildConfig, default_quantize_config
from edge.build.quantize import QuantizeConfig
from edge.targets import FORMAT_BACKENDS, PRECISIONS, TARGET_NAMES, TARGETS, UnknownTarget, get_target


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_every_row_is_complete(name: str) -> None:
    t = get_target(name)
    assert t.name == name and t.artifact_format in FORMAT_BACKENDS and t.suffix.startswith(".")
    assert set(t.precisions) <= set(PRECISIONS) and t.default_precision in t.precisions
    module = t.compile.partition(":")[0]
    for fn in (t.compile, f"{module}:describe_compiled") + ((t.device_build,) if t.device_build else ()):
        assert callable(target_function(fn)), fn
    for precision in t.precisions:  # the row's quantization makes the precision it is listed under
        q = default_quantize_config(name, precision)
        assert (q is None) == (precision == "fp32") and (q is None or q.precision == precision)
    assert 0 < t.selftest.probability_atol < 1 and 0 < t.selftest.mask_min_dice <= t.selftest.mask_min_agreement <= 1


def test_the_table_is_what_the_steps_read() -> None:
    assert default_quantize_config("onnxruntime-cpu", "int8") == QuantizeConfig(method="qdq", activations="asymmetric")
    assert default_quantize_config("tensorrt", "int8").calibrate_method == "percentile"
    assert default_quantize_config("openvino-cpu", "int8").method == "nncf"
    with pytest.raises(UnknownTarget, match="unknown target 'tpu'; choose one of openvino-cpu, onnxruntime-cpu, tensorrt"):
        get_target("tpu")
    with pytest.raises(ValueError, match="precision 'int4'"):
        BuildConfig(precision="int4")
    assert get_target("tensorrt").selftest.to_dict()["probability_atol"] > get_target("openvino-cpu").selftest.probability_atol
    assert list(TARGETS) == list(TARGET_NAMES)


def test_the_table_is_torch_free_and_does_not_reach_the_build_side() -> None:
    code = "import sys, edge.targets, edge.device.runtime; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('edge.build')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bundle_layout_is_the_same_for_every_target(tmp_path: Path) -> None:
    xml, bin_, onnx, cfg = (tmp_path / n for n in ("m.int8.xml", "m.int8.bin", "q.onnx", "tensorrt.json"))
    files, desc = bundle_artifacts(CompiledModel("openvino-cpu", xml, [xml, bin_], "openvino-ir", "int8", "bf16", sidecars={"weights": bin_}))
    assert files == {"model/model.xml": xml, "model/model.bin": bin_}
    assert desc == [{"path": "model/model.xml", "role": "model", "format": "openvino-ir", "precision": "int8", "target": "openvino-cpu",
                     "inference_precision": "bf16", "weights": "model/model.bin"},
                    {"path": "model/model.bin", "role": "weights", "precision": "int8", "target": "openvino-cpu"}]
    files, desc = bundle_artifacts(CompiledModel("tensorrt", onnx, [onnx, cfg], "onnx", "fp16", sidecars={"build-config": cfg}))
    assert files == {"model/model.onnx": onnx, "tensorrt.json": cfg}
    assert [d["role"] for d in desc] == ["model", "build-config"] and "inference_precision" not in desc[0]


def test_describe_compiled_checks_the_artifact_kind(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    with pytest.raises(CompileError, match="openvino-cpu bundle ships a openvino-ir model"):
        describe_compiled("openvino-cpu", onnx)
    xml = tmp_path / "model.xml"
    xml.write_text('<net><layer type="FakeQuantize"/></net>')
    with pytest.raises(CompileError, match="model.bin are not beside it"):
        describe_compiled("openvino-cpu", xml)
    (tmp_path / "model.bin").write_bytes(b"\0")
    c = describe_compiled("openvino-cpu", xml, inference_precision="f16")
    assert (c.precision, c.inference_precision, c.sidecars) == ("int8", "f16", {"weights": tmp_path / "model.bin"})
