"""Step 2: post-training quantization of the exported FP32 ONNX model.

Three methods, one per kind of target:

- ``nncf`` (OpenVINO CPUs): NNCF PTQ on the OpenVINO model with transformer settings
  (``model_type=TRANSFORMER``, ``preset=MIXED``: symmetric weights, asymmetric activations).
  SmoothQuant is **off by default**: NNCF's own conformance scope quantizes Swin
  (``swin_base_patch4_window7_224_no_sq``) with ``smooth_quant_alphas=matmul=-1``, and a hand test
  of the full EchoCare encoder here found it doubled quantization time for the same fidelity.
  ``smooth_quant=ALPHA`` (0..1) turns it on to measure. Output: OpenVINO IR (``.xml`` + ``.bin``).
- ``qdq`` (ONNX Runtime / TensorRT): ONNX Runtime static quantization in QDQ format, INT8
  weights per channel, symmetric. ``activations="symmetric"`` (S8S8; what TensorRT's explicit
  quantization expects) or ``"asymmetric"`` (U8S8; the fast path of ONNX Runtime on x86 CPUs).
  Only MatMul/Conv/Gemm are quantized by default (quantizing every op was no faster here).
- ``fp16``: the ONNX graph converted to float16 with float32 inputs/outputs
  (``onnxruntime.transformers.float16``); sensitive ops can stay in float32.

Sensitive ops (``ignore_ops``: ``layernorm``, ``softmax``, ``gelu``, ``add`` for residual adds)
and node-name regexes (``ignore_names``) are kept in floating point by every method.
"""

from __future__ import annotations

import contextlib

import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("nncf", "qdq", "fp16")
# Sensitive op kinds -> the op types that implement them in ONNX and in OpenVINO.
SENSITIVE_OPS: dict[str, dict[str, list[str]]] = {
    "layernorm": {"onnx": ["LayerNormalization"], "openvino": ["MVN"]},
    "softmax": {"onnx": ["Softmax"], "openvino": ["Softmax"]},
    "gelu": {"onnx": ["Gelu", "Erf"], "openvino": ["Gelu"]},
    "add": {"onnx": ["Add"], "openvino": ["Add"]},
}


class QuantizeError(Exception):
    """Quantization could not run (names the model and the reason)."""


@dataclass
class QuantizeConfig:
    """Everything that decides the quantized model (recorded in the build summary and manifest)."""

    method: str = "nncf"
    ignore_ops: tuple[str, ...] = ()
    ignore_names: tuple[str, ...] = ()
    calib_size: int = 64
    # nncf
    smooth_quant: float = -1.0  # alpha for MatMul SmoothQuant; negative = off (NNCF's Swin setting)
    preset: str = "mixed"
    fast_bias_correction: bool = True
    # qdq
    activations: str = "symmetric"  # "symmetric" (S8S8, TensorRT) | "asymmetric" (U8S8, ORT CPU)
    op_types: tuple[str, ...] = ("MatMul", "Conv", "Gemm")
    calibrate_method: str = "minmax"  # "minmax" | "percentile" | "entropy"
    # fp16
    fp16_keep_io_float32: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {METHODS}")
        bad = [k for k in self.ignore_ops if k not in SENSITIVE_OPS]
        if bad:
            raise ValueError(f"unknown sensitive op kind(s) {bad}; choose from {sorted(SENSITIVE_OPS)}")
        if self.activations not in ("symmetric", "asymmetric"):
            raise ValueError(f"activations must be 'symmetric' or 'asymmetric', got {self.activations!r}")
        if self.preset not in ("mixed", "performance"):
            raise ValueError(f"preset must be 'mixed' or 'performance', got {self.preset!r}")
        for pattern in self.ignore_names:
            re.compile(pattern)

    @property
    def precision(self) -> str:
        return "fp16" if self.method == "fp16" else "int8"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizeResult:
    model_path: Path  # .xml (nncf) or .onnx (qdq, fp16)
    files: list[Path]
    format: str  # "openvino-ir" | "onnx"
    precision: str
    config: dict
    ignored_nodes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------- helpers
def _onnx_nodes_to_keep(model_path: Path, config: QuantizeConfig) -> list[str]:
    """Names of ONNX nodes that must stay in float (sensitive op types + name patterns)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    types = {t for k in config.ignore_ops for t in SENSITIVE_OPS[k]["onnx"]}
    patterns = [re.compile(p) for p in config.ignore_names]
    return [n.name for n in graph.node if n.op_type in types or any(p.search(n.name) for p in patterns)]


@contextlib.contextmanager
def _working_directory(path: str):
    """``contextlib.chdir`` (Python 3.11+) for Python 3.10, the Python of JetPack 6."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _atomic_move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


# ------------------------------------------------------------------------------------- nncf
def quantize_nncf(onnx_path: Path, calib: np.ndarray, out_xml: Path, config: QuantizeConfig) -> QuantizeResult:
    """NNCF INT8 PTQ of the OpenVINO model read from ``onnx_path``; writes ``out_xml`` + ``.bin``."""
    import time

    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    t0 = time.perf_counter()
    model = ov.Core().read_model(str(onnx_path))
    ov_types = sorted({t for k in config.ignore_ops for t in SENSITIVE_OPS[k]["openvino"]})
    scope = nncf.IgnoredScope(types=ov_types, patterns=list(config.ignore_names), validate=False) if (ov_types or config.ignore_names) else None
    dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=config.smooth_quant))
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)  # NNCF logs every skipped op at INFO
    try:
        quantized = nncf.quantize(
            model, dataset,
            preset=nncf.QuantizationPreset.MIXED if config.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calib),
            fast_bias_correction=config.fast_bias_correction,
            ignored_scope=scope,
            advanced_parameters=advanced,
        )
    except Exception as e:  # nncf raises nncf.* errors and RuntimeError from OpenVINO
        raise QuantizeError(f"{onnx_path}: NNCF quantization failed ({type(e).__name__}: {e})") from e
    finally:
        nncf_log.setLevel(level)
    out_xml = Path(out_xml)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".nncf.", dir=out_xml.parent))
    try:
        ov.save_model(quantized, str(tmp_dir / out_xml.name), compress_to_fp16=False)
        _atomic_move(tmp_dir / out_xml.with_suffix(".bin").name, out_xml.with_suffix(".bin"))
        _atomic_move(tmp_dir / out_xml.name, out_xml)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return QuantizeResult(out_xml, [out_xml, out_xml.with_suffix(".bin")], "openvino-ir", "int8", config.to_dict(),
                          ov_types + list(config.ignore_names), time.perf_counter() - t0)


# -------------------------------------------------------------------------------------- qdq
class _ArrayReader:
    """ONNX Runtime CalibrationDataReader over a preprocessed array, one image per call."""

    def __init__(self, input_name: str, calib: np.ndarray):
        self._name, self._calib, self._i = input_name, calib, 0

    def get_next(self) -> dict | None:
        if self._i >= len(self._calib):
            return None
        x = self._calib[self._i : self._i + 1]
        self._i += 1
        return {self._name: np.ascontiguousarray(x, np.float32)}

    def rewind(self) -> None:
        self._i = 0


def prepare_for_qdq(onnx_path: Path, out_path: Path) -> Path:
    """ONNX Runtime's pre-processing for static quantization (shape inference, graph optimisation)
    of ``onnx_path`` into ``out_path``; the model as exported when it fails (logged).

    The federated release calibrates this pre-processed model: its tensor names are the ones the
    quantizer asks ranges for (:mod:`edge.federated`)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out_path = str(Path(onnx_path).resolve()), Path(out_path).resolve()
    with tempfile.TemporaryDirectory(prefix="echofleet-qdq-prep-", dir=out_path.parent) as tmp:
        staged = Path(tmp) / "prepped.onnx"
        # When ONNX Runtime's symbolic shape inference gives up it saves sym_shape_infer_temp.onnx and a
        # weights-sized .data file in the *working directory*: run it inside the scratch folder.
        with _working_directory(tmp):
            try:
                quant_pre_process(src, str(staged), skip_symbolic_shape=False)
            except Exception as e:  # symbolic shape inference fails on the full Swin's padded window shapes
                log.info("%s: symbolic shape inference failed (%s); pre-processing with ONNX shape inference only", onnx_path, e)
                try:
                    quant_pre_process(src, str(staged), skip_symbolic_shape=True)
                except Exception as e2:
                    log.warning("%s: quant_pre_process failed (%s); quantizing the model as exported", onnx_path, e2)
                    shutil.copyfile(src, staged)
        _atomic_move(staged, out_path)
    return out_path


def _ranges_cache(ranges: dict[str, tuple[float, float]], path: Path) -> Path:
    """ONNX Runtime's calibration cache (``calibration_cache_path``) holding given per-tensor ranges:
    ``quantize_static`` then skips its own calibration and reads these (no calibration images)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    data = {name: (np.array(lo, np.float32), np.array(hi, np.float32)) for name, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)
    return path


def quantize_qdq(onnx_path: Path, calib: np.ndarray | None, out_path: Path, config: QuantizeConfig, *,
                 ranges: dict[str, tuple[float, float]] | None = None, prepared: bool = False) -> QuantizeResult:
    """ONNX Runtime static INT8 quantization, QDQ format, per-channel symmetric weights.

    Activation ranges come from ONNX Runtime's calibration on ``calib`` (``config.calibrate_method``),
    or, with ``ranges`` (tensor name -> (min, max), e.g. from the sites' merged histograms), from
    those ranges through ONNX Runtime's calibration cache, with no image at all. ``prepared``: the
    model already went through :func:`prepare_for_qdq` (the federated path calibrated that file)."""
    import time

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if ranges is None and (calib is None or len(calib) == 0):
        raise QuantizeError(f"{onnx_path}: QDQ quantization needs calibration images or activation ranges")
    t0 = time.perf_counter()
    out_path = Path(out_path).resolve()  # absolute: shape inference below runs in another working directory
    keep = _onnx_nodes_to_keep(onnx_path, config)
    input_name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[config.calibrate_method]
    symmetric = config.activations == "symmetric"
    with tempfile.TemporaryDirectory(prefix="echofleet-qdq-", dir=out_path.parent) as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        if prepared:
            shutil.copyfile(onnx_path, prepped)
        else:
            prepare_for_qdq(Path(onnx_path), prepped)
        staged = Path(tmp) / out_path.name
        source: dict = {"calibration_data_reader": _ArrayReader(input_name, calib), "calibrate_method": method}
        if ranges is not None:  # the cache holds final (min, max) per tensor: read as MinMax, nothing recomputed
            source = {"calibration_data_reader": None, "calibrate_method": CalibrationMethod.MinMax,
                      "calibration_cache_path": str(_ranges_cache(ranges, Path(tmp) / "ranges.json"))}
        try:
            quantize_static(
                str(prepped), str(staged),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(config.op_types),
                per_channel=True,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep,
                # CalibMaxIntermediateOutputs: MinMax merges every 16 images' tensors (same ranges, bounded
                # memory: one echocare-tiny image holds ~23 M calibrated values)
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "CalibMaxIntermediateOutputs": 16},
                **source,
            )
        except Exception as e:
            raise QuantizeError(f"{onnx_path}: ONNX Runtime QDQ quantization failed ({type(e).__name__}: {e})") from e
        _atomic_move(staged, out_path)
    return QuantizeResult(out_path, [out_path], "onnx", "int8", config.to_dict(), keep, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------- fp16
def convert_fp16(onnx_path: Path, out_path: Path, config: QuantizeConfig) -> QuantizeResult:
    """float16 ONNX (float32 inputs/outputs); ``ignore_ops`` / ``ignore_names`` stay float32."""
    import time

    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    t0 = time.perf_counter()
    out_path = Path(out_path).resolve()  # absolute: shape inference below runs in another working directory
    keep = _onnx_nodes_to_keep(onnx_path, config)
    op_block = sorted({t for k in config.ignore_ops for t in SENSITIVE_OPS[k]["onnx"]})
    model = onnx.load(str(onnx_path))
    try:
        half = convert_float_to_float16(model, keep_io_types=config.fp16_keep_io_float32,
                                        op_block_list=op_block or None, node_block_list=keep or None)
    except Exception as e:
        raise QuantizeError(f"{onnx_path}: float16 conversion failed ({type(e).__name__}: {e})") from e
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    os.close(fd)
    try:
        onnx.save(half, tmp)
        os.replace(tmp, out_path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return QuantizeResult(out_path, [out_path], "onnx", "fp16", config.to_dict(), keep, time.perf_counter() - t0)


def quantize(onnx_path: str | Path, calib: np.ndarray | None, out_dir: str | Path, config: QuantizeConfig, *,
             ranges: dict[str, tuple[float, float]] | None = None, prepared: bool = False) -> QuantizeResult:
    """Run ``config.method`` on ``onnx_path``; outputs go to ``out_dir`` (``model.int8.xml``, ``model.int8.onnx``, ``model.fp16.onnx``).

    ``ranges`` (``qdq`` only): activation ranges per tensor instead of calibration images (the
    federated release, :mod:`edge.federated`); ``prepared``: see :func:`quantize_qdq`."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise QuantizeError(f"{onnx_path}: no such model")
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.method == "fp16":
        return convert_fp16(onnx_path, out_dir / "model.fp16.onnx", config)
    suffix = "s8s8" if config.activations == "symmetric" else "u8s8"
    if ranges is not None:
        if config.method != "qdq":
            raise QuantizeError(f"{onnx_path}: activation ranges (federated calibration) need method qdq, not {config.method}")
        return quantize_qdq(onnx_path, None, out_dir / f"model.int8-{suffix}.onnx", config, ranges=ranges, prepared=prepared)
    if calib is None or len(calib) == 0:
        raise QuantizeError(f"{onnx_path}: INT8 quantization needs calibration images (--calib DATA_SPEC)")
    calib = np.asarray(calib[: config.calib_size], np.float32)
    if config.method == "nncf":
        return quantize_nncf(onnx_path, calib, out_dir / "model.int8.xml", config)
    return quantize_qdq(onnx_path, calib, out_dir / f"model.int8-{suffix}.onnx", config, prepared=prepared)
