"""Step 1 of an edge build: task model (encoder + head) -> ONNX, with a numeric parity check.

``export_task_model(RUN_DIR | TASK_MODEL_DIR, out_dir)`` writes

- ``out_dir/model.onnx``: fixed height/width, dynamic batch, opset 17, legacy (TorchScript)
  exporter (see :func:`torch_to_onnx` for why not ``dynamo=True``);
- ``out_dir/export.json``: what later steps need without torch: task, labels, preprocessing
  spec, encoder identity (config, checkpoint sha256), provenance (the model card), input/output
  names and shapes, FLOPs per image, and the parity figures.

With ``ExportConfig.graph_rewrites`` (default) the traced module is the window-order rewrite of
MONAI's Swin stages (:mod:`edge.build.rewrites`); parity always compares with the trained MONAI
module itself.

Parity: PyTorch and ONNX Runtime run the same inputs at two batch sizes (neither is the traced
one, so the dynamic batch axis is exercised); the export is refused (:class:`ExportError`, the
final files untouched) when the max abs difference exceeds ``atol * max(1, max|ref|)`` or the
cosine similarity falls below ``cosine_min``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from echocare.atomic import atomic_write_bytes
from edge.report import json_default

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from echocare.models.task_model import TaskModelSpec

INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXPORT_INFO = "export.json"


class ExportError(Exception):
    """The model cannot be exported, or its ONNX export disagrees with PyTorch. Names the file and reason."""


@dataclass
class ExportConfig:
    """How to export and how strict the parity check is."""

    opset: int = 17
    atol: float = 1e-3  # max abs diff allowed, scaled by max(1, max |reference|)
    cosine_min: float = 0.99999
    parity_batches: tuple[int, ...] = (1, 3)
    seed: int = 0  # random parity inputs (when no real samples are given)
    # Export MONAI's Swin stages in their window-order form (edge/build/rewrites.py): the same
    # function with fewer transposes and attention OpenVINO fuses; parity is checked against the
    # unrewritten (trained) model either way.
    graph_rewrites: bool = True


@dataclass
class ParityReport:
    max_abs_diff: float
    cosine: float
    tolerance: float
    cosine_min: float
    batch_sizes: list[int]
    inputs: str  # "real" | "random"

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.cosine >= self.cosine_min

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"parity {verdict}: max |torch - onnx| = {self.max_abs_diff:.3g} (tol {self.tolerance:.3g}), "
                f"cosine {self.cosine:.7f} (min {self.cosine_min}), batches {self.batch_sizes}, {self.inputs} inputs")


@dataclass
class ExportResult:
    onnx_path: Path
    info_path: Path
    info: dict
    parity: ParityReport


# ------------------------------------------------------------------------------- locating
def resolve_model_dir(source: str | Path) -> Path:
    """A federation run directory (uses ``RUN/global``) or a task-model directory -> the task-model directory."""
    p = Path(source)
    if (p / "model.json").is_file():
        return p
    if (p / "global" / "model.json").is_file():
        return p / "global"
    if not p.exists():
        raise ExportError(f"{p}: no such run or task-model directory")
    raise ExportError(f"{p}: neither a task-model directory (model.json) nor a run directory (global/model.json)")


def load_model(source: str | Path) -> tuple["nn.Module", "TaskModelSpec", Path]:
    """(TaskModel in eval mode, its spec, the task-model directory) for a run dir or task-model dir."""
    from echocare.models.task_model import load_task_model

    model_dir = resolve_model_dir(source)
    try:
        model, spec = load_task_model(model_dir)
    except Exception as e:  # CheckpointError, ValueError (spec), OSError, torch errors: all mean "unusable"
        raise ExportError(f"{model_dir}: cannot load the task model ({e})") from e
    return model.eval(), spec, model_dir


def run_report(source: str | Path) -> dict | None:
    """``RUN_DIR/report.json`` when ``source`` is a run directory, else None."""
    p = Path(source) / "report.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except ValueError as e:
            raise ExportError(f"{p}: not valid JSON ({e})") from None
    return None


# -------------------------------------------------------------------------------- export
# The legacy exporter's own deprecation notices (torch >= 2.9), silenced by category and message
# around our one call only (see torch_to_onnx); any other warning still shows.
LEGACY_EXPORTER_NOTICES = (
    r"You are using the legacy TorchScript-based ONNX export",
    r"The feature will be removed\. Please remove usage of this function",  # its exporter_context()
)


def torch_to_onnx(model: "nn.Module", out_path: Path, size: int, opset: int = 17) -> Path:
    """Export with the legacy (TorchScript) exporter: input ``(batch, 3, size, size)``, dynamic batch.

    Why not ``torch.onnx.export(..., dynamo=True)``, which torch 2.13 recommends: it does export
    MONAI's Swin-v2 here with parity (same check as below), but on this 2-core machine (both
    exporters measured under the same load) it took 27-42 s for the echocare-tiny task model
    (legacy: 6 s) and 21.5 min for the full ``echocare`` encoder (legacy: 2.1 min), and it prints
    its own progress and registry notices. Every edge build, and the test suite with its dozen
    exports, would pay that for a graph that is numerically the same, so the legacy exporter stays
    until torch removes it; docs/edge.md has the figures.
    """
    import torch

    x = torch.zeros(2, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        for notice in LEGACY_EXPORTER_NOTICES:
            warnings.filterwarnings("ignore", message=notice, category=DeprecationWarning)
        # MONAI's Swin builds window masks from the (fixed) input size while tracing: the tracer's
        # warnings about constants, and NumPy 2's notice about np.ceil on the traced sizes
        # (monai/networks/nets/swin_unetr.py), are expected for a fixed-size export.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"__array_wrap__ must accept context", category=DeprecationWarning)
        # MONAI's InstanceNorm (affine=False, no running stats) always normalises with the input's
        # own statistics; the exporter's "train=True" note about it is expected (parity checks it).
        warnings.filterwarnings("ignore", message=".*instance_norm.*", category=UserWarning)
        torch.onnx.export(
            model, (x,), str(out_path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    return out_path


def export_form(model: "nn.Module", size: int, config: ExportConfig = ExportConfig()) -> "nn.Module":
    """What the exporter traces: ``model`` itself, or (``config.graph_rewrites``) a rewritten copy
    of it (:func:`edge.build.rewrites.rewrite_for_export`); a model without MONAI Swin stages is
    exported as it is."""
    if not config.graph_rewrites:
        return model
    from edge.build.rewrites import rewritable_stages, rewrite_for_export

    return rewrite_for_export(model, size) if rewritable_stages(model) else model


def check_parity(model: "nn.Module", onnx_path: Path, samples: np.ndarray | None, size: int,
                 config: ExportConfig = ExportConfig()) -> ParityReport:
    """Run PyTorch and ONNX Runtime on the same inputs; compare (max abs diff, cosine)."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(config.seed)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    refs, outs = [], []
    for b in config.parity_batches:
        if samples is not None and len(samples):
            x = np.asarray(samples[np.arange(b) % len(samples)], np.float32)
        else:
            x = rng.standard_normal((b, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            refs.append(model(torch.from_numpy(x)).numpy().astype(np.float64).ravel())
        outs.append(sess.run(None, {INPUT_NAME: x})[0].astype(np.float64).ravel())
    ref, out = np.concatenate(refs), np.concatenate(outs)
    if ref.shape != out.shape:
        raise ExportError(f"{onnx_path}: ONNX output has {out.size} values, PyTorch {ref.size}")
    diff = float(np.abs(ref - out).max())
    denom = float(np.linalg.norm(ref) * np.linalg.norm(out))
    cosine = float(ref @ out / denom) if denom > 0 else (1.0 if diff == 0 else 0.0)
    if not np.isfinite(diff):
        diff, cosine = float("inf"), 0.0
    tol = config.atol * max(1.0, float(np.abs(ref).max()))
    return ParityReport(diff, cosine, tol, config.cosine_min, list(config.parity_batches),
                        "real" if samples is not None and len(samples) else "random")


def flops_per_image(model: "nn.Module", size: int) -> int:
    """Forward FLOPs of one image (PyTorch's FlopCounterMode: 1 MAC = 2 FLOP; matmul/conv only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())


def export_task_model(source: str | Path, out_dir: str | Path, *, samples: np.ndarray | None = None,
                      config: ExportConfig = ExportConfig()) -> ExportResult:
    """Export a run's global model (or a task-model directory) to ``out_dir/model.onnx`` + ``export.json``.

    ``samples``: preprocessed real images ``(N, 3, size, size)`` for the parity check (random
    normal inputs otherwise). Raises :class:`ExportError` when parity fails; the previous files
    in ``out_dir`` (if any) are then left as they were.
    """
    model, spec, model_dir = load_model(source)
    pre = spec.preprocess_spec()
    size = pre.size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".model.", suffix=".onnx", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            torch_to_onnx(export_form(model, size, config), tmp, size, config.opset)
        except Exception as e:  # the exporter raises many types (RuntimeError, OnnxExporterError, ...)
            raise ExportError(f"{model_dir}: ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        parity = check_parity(model, tmp, samples, size, config)
        if not parity.passed:
            raise ExportError(f"{model_dir}: exported ONNX disagrees with PyTorch beyond tolerance; {parity.describe()}")
        out_shape = _output_shape(spec, size)
        info = {
            "task": spec.task,
            "labels": list(spec.labels),
            "preprocess": pre.to_dict(),
            "encoder": {"config": spec.encoder_config, "checkpoint": spec.encoder_checkpoint,
                        "sha256": spec.encoder_sha256, "seed": spec.encoder_seed},
            "head": spec.head,
            "provenance": spec.provenance,
            "source": str(Path(model_dir).resolve()),
            "input": {"name": INPUT_NAME, "shape": [-1, 3, size, size], "dtype": "float32", "layout": "NCHW"},
            "output": {"name": OUTPUT_NAME, "shape": out_shape},
            "opset": config.opset,
            "graph_rewrites": config.graph_rewrites,
            "flops_per_image": flops_per_image(model, size),
            "parity": {**asdict(parity), "passed": parity.passed},
        }
        report = run_report(source) if Path(source).resolve() != Path(model_dir).resolve() else None
        if report is not None:
            info["run_report"] = report
        final = out_dir / "model.onnx"
        info_path = out_dir / EXPORT_INFO
        os.replace(tmp, final)
        write_json_atomic(info_path, info)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(final, info_path, info, parity)


def _output_shape(spec: "TaskModelSpec", size: int) -> list[int]:
    k = len(spec.labels)
    return [-1, k] if spec.task == "classify" else [-1, k, size, size]


def read_export_info(model_path: str | Path, info_path: str | Path | None = None) -> dict:
    """``info_path``, or else the ``export.json`` beside a model file (``model.onnx``, a quantized
    variant, an IR ``.xml``) or one folder up."""
    p = Path(model_path)
    candidates = [Path(info_path)] if info_path is not None else [p.parent / EXPORT_INFO, p.parent.parent / EXPORT_INFO]
    for f in candidates:
        if f.is_file():
            try:
                info = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise ExportError(f"{f}: not a readable export info ({e})") from None
            missing = [k for k in ("task", "labels", "preprocess", "encoder", "input", "output") if k not in info]
            if missing:
                raise ExportError(f"{f}: not an export info of `echofleet edge export` (no {', '.join(missing)})")
            return info
    if info_path is not None:
        raise ExportError(f"{info_path}: no such export info")
    raise ExportError(f"{p}: no {EXPORT_INFO} beside it (export the model with `echofleet edge export` first)")


def write_json_atomic(path: Path, data: Any) -> Path:
    """JSON to ``path`` via a temporary file and ``os.replace``."""
    return atomic_write_bytes(path, (json.dumps(data, indent=2, default=json_default) + "\n").encode(), 0o600)
