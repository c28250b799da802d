"""The one table of edge targets: every build step, the runtime and the CLI read it.

A target is where a bundle runs (an Intel cart, any CPU, a Jetson). Its row says what the build
ships (artifact format, file suffix), which precisions it builds and how the default INT8/FP16
model is quantized, the self-test tolerance the scanner applies, which module compiles it, and
what runs it on the device. Adding a target means one row here plus one ``edge/build/compile_*.py``
module (with ``compile_for_bundle`` and ``describe_compiled``, see :mod:`edge.build.compiled`).

This module is read by the scanner side too (:mod:`edge.device.runtime` takes
:data:`FORMAT_BACKENDS` from here), so it imports nothing heavy: no torch, and not
:mod:`edge.build` (import-linter checks). The compile functions are named as import paths
(``"module:function"``) that the build side resolves (:func:`edge.build.compiled.target_function`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

PRECISIONS = ("int8", "fp16", "fp32")  # graph precision of a shipped model
#: ``--precision auto``: build every candidate of the target's ``auto_candidates``, gate each, ship
#: those that pass, and let the scanner time them and run the fastest (docs/edge.md)
AUTO = "auto"

# Which device backends can run which artifact format, best first (the runtime's "auto" choice).
FORMAT_BACKENDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "openvino-ir": ("openvino",),
    "onnx": ("onnxruntime", "openvino"),
})


class UnknownTarget(ValueError):
    """A target name that is not in :data:`TARGETS` (the message lists the known ones)."""


@dataclass(frozen=True)
class SelfTestTolerance:
    """How far the scanner's self-test may drift from the outputs recorded at build time."""

    probability_atol: float = 0.05  # classify: max |p_device - p_build|
    mask_min_agreement: float = 0.98  # segment/hc: share of equal mask pixels
    mask_min_dice: float = 0.9  # segment/hc: Dice per sample (masks of >= 1 % foreground)

    def to_dict(self) -> dict[str, float]:
        return {"probability_atol": self.probability_atol, "mask_min_agreement": self.mask_min_agreement,
                "mask_min_dice": self.mask_min_dice}


@dataclass(frozen=True)
class EdgeTarget:
    """One row of the table (see the module docstring)."""

    name: str
    description: str  # for --help and docs
    artifact_format: str  # the model artifact a bundle ships: a key of FORMAT_BACKENDS
    suffix: str  # its file suffix (``model/model<suffix>`` inside a bundle)
    # keyword arguments of edge.build.quantize.QuantizeConfig per precision; a precision absent
    # here ships the exported FP32 graph unchanged (fp32)
    quantize: Mapping[str, Mapping[str, Any]] = field(hash=False)
    compile: str  # "module:function" -> CompiledModel, run on the build machine for the bundle
    runs_on: str  # what runs the model on the device (docs and --help)
    default_precision: str = "int8"
    precisions: tuple[str, ...] = PRECISIONS
    inference_precisions: tuple[str, ...] = ()  # OpenVINO's explicit inference precision; () = none to choose
    selftest: SelfTestTolerance = SelfTestTolerance()
    # "module:function" of a step that runs on the device itself before the first inference
    # (a TensorRT engine only runs on the GPU and TensorRT version that built it); None = none
    device_build: str | None = None
    # --precision auto: (candidate name, file, inference precision) built, gated and shipped together;
    # the scanner runs the fastest on its own CPU. () = the target has no auto build.
    auto_candidates: tuple[tuple[str, str, str], ...] = ()
    # --precision auto: the files those candidates run, by name (their folder ``model/<file>/`` in the
    # bundle): (graph precision, QuantizeConfig keyword arguments over the build's INT8 config, {} for
    # that config itself; None for the exported FP32 graph as is)
    auto_files: Mapping[str, tuple[str, Mapping[str, Any] | None]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        unknown = sorted({f for _, f, _ in self.auto_candidates} - set(self.auto_files))
        if unknown:
            raise ValueError(f"target {self.name}: auto_candidates run file(s) {unknown} that auto_files does not name")

    @property
    def build_precisions(self) -> tuple[str, ...]:
        """What ``--precision`` accepts for this target (its graph precisions, plus ``auto`` where it has candidates)."""
        return self.precisions + ((AUTO,) if self.auto_candidates else ())

    def file_precision(self, file: str) -> str:
        """The graph precision of the ``--precision auto`` file ``file``."""
        return self.auto_files[file][0]

    def quantize_kwargs(self, precision: str) -> dict[str, Any] | None:
        """QuantizeConfig keyword arguments for ``precision`` (None: the FP32 graph ships as is)."""
        if precision not in self.precisions:
            raise ValueError(f"target {self.name} builds {', '.join(self.precisions)}, not {precision!r}")
        kw = self.quantize.get(precision)
        return None if kw is None else dict(kw)


def _frozen(d: dict[str, dict[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({k: MappingProxyType(v) for k, v in d.items()})


_FP16 = {"method": "fp16"}

TARGETS: Mapping[str, EdgeTarget] = MappingProxyType({t.name: t for t in (
    EdgeTarget(
        name="openvino-cpu",
        description="Intel carts: OpenVINO IR, NNCF INT8, explicit inference precision",
        artifact_format="openvino-ir", suffix=".xml",
        quantize=_frozen({"int8": {"method": "nncf"}, "fp16": _FP16}),
        compile="edge.build.compile_openvino:compile_for_bundle",
        runs_on="OpenVINO CPU plugin",
        inference_precisions=("f32", "bf16", "f16"),
        # issue 13: bf16 wins on AMX, INT8 (bf16 rest) without it; fp32 as the exact fallback. Three
        # files: NNCF's MIXED INT8 IR (symmetric weights, asymmetric activations), its PERFORMANCE
        # INT8 IR (symmetric activations too: faster kernels, more accuracy at risk, so it ships only
        # where it passes the gate on its own) and the FP32 IR; INT8 at two inference precisions.
        auto_candidates=(("int8-f32", "int8", "f32"), ("int8-bf16", "int8", "bf16"),
                         ("int8-perf-f32", "int8-perf", "f32"), ("int8-perf-bf16", "int8-perf", "bf16"),
                         ("bf16", "fp32", "bf16"), ("fp32", "fp32", "f32")),
        auto_files=MappingProxyType({"int8": ("int8", MappingProxyType({})),
                                     "int8-perf": ("int8", MappingProxyType({"preset": "performance"})),
                                     "fp32": ("fp32", None)}),
    ),
    EdgeTarget(
        name="onnxruntime-cpu",
        description="any CPU: ONNX for ONNX Runtime, QDQ U8S8 INT8",
        artifact_format="onnx", suffix=".onnx",
        # U8S8: ONNX Runtime's fast x86 path
        quantize=_frozen({"int8": {"method": "qdq", "activations": "asymmetric"}, "fp16": _FP16}),
        compile="edge.build.compile_onnxruntime:compile_for_bundle",
        runs_on="ONNX Runtime CPU (OpenVINO as fallback)",
    ),
    EdgeTarget(
        name="tensorrt",
        description="Jetson Orin: Q/DQ S8S8 or FP16 ONNX; the engine is built on the device",
        artifact_format="onnx", suffix=".onnx",
        # S8S8 Q/DQ for TensorRT's explicit quantization. Percentile calibration: on BUSI with the
        # tiny config, min-max S8S8 lost ~1.9 AUROC points, percentile ~0.7 (symmetric activation
        # ranges are wasted on outliers).
        quantize=_frozen({"int8": {"method": "qdq", "activations": "symmetric", "calibrate_method": "percentile"},
                          "fp16": _FP16}),
        compile="edge.build.compile_tensorrt:compile_for_bundle",
        runs_on="TensorRT engine built on the device by `edge compile` (the ONNX on ONNX Runtime where TensorRT is absent)",
        # its own kernels and fp16 accumulation: further from the build machine than the CPU backends
        selftest=SelfTestTolerance(probability_atol=0.1, mask_min_agreement=0.95, mask_min_dice=0.85),
        device_build="edge.build.compile_tensorrt:build_engine_on_device",
    ),
)})

TARGET_NAMES: tuple[str, ...] = tuple(TARGETS)


def get_target(name: str) -> EdgeTarget:
    """The row for ``name``; :class:`UnknownTarget` names the known targets otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownTarget(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)}") from None
