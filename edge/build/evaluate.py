"""Calibration sets, labelled evaluation sets and model evaluation, as plain functions.

These run wherever the data is (a hospital, the coordinator with a public set, CI): they take a
data spec (``busi:/data/BUSI?limit=60``, ``phantom:40?seed=0``, ...) or arrays, use the same
preprocessing as training, and evaluate *any* predictor ``(N, 3, S, S) float32 -> logits``:
a PyTorch model, an ONNX Runtime or OpenVINO session, a bundle runtime. Nothing here depends
on the CLI. Sample keys and metadata stay in the returned objects (site-local); only the
metric numbers are meant to travel.

Metrics (from :mod:`echocare.metrics`):

- classify: ``auroc`` (macro one-vs-rest) and ``balanced_accuracy``;
- segment: ``dice`` (foreground, per-image mean);
- hc: ``hc_mae_mm`` (an empty predicted mask counts as a 0 mm prediction, so it is penalised,
  and is counted in ``hc_failed``) and ``dice`` against the filled head mask when available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from echocare.data.base import Problem, SiteData
from echocare.preprocess import PreprocessSpec, apply_geometry_to_mask, preprocess_image
from edge.device import postprocess as post

Predictor = Callable[[np.ndarray], np.ndarray]


class EvalDataError(Exception):
    """A calibration / validation set is unusable (names the data spec and the reason)."""


@dataclass
class EvalSet:
    """Preprocessed inputs and their targets for one task (all arrays aligned on axis 0)."""

    spec: str
    task: str
    labels: list[str]
    inputs: np.ndarray  # (N, 3, S, S) float32
    targets: np.ndarray | None = None  # classify: (N,) int class index into labels
    masks: np.ndarray | None = None  # segment/hc: (N, S, S) uint8 {0, 1}
    hc_mm: np.ndarray | None = None  # hc: (N,) true head circumference
    pixel_mm: np.ndarray | None = None  # hc: (N,) pixel size after preprocessing
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inputs)


def _open(data_spec: "str | SiteData") -> "SiteData":
    from echocare.data import open_data

    if isinstance(data_spec, SiteData):  # already opened (e.g. one part of a split made by the caller)
        return data_spec
    try:
        return open_data(data_spec)
    except Exception as e:  # readers raise FileNotFoundError / ValueError ... with the reason
        raise EvalDataError(f"{data_spec}: cannot open data ({e})") from e


def load_calibration(data_spec: "str | SiteData", preprocess: PreprocessSpec, limit: int | None = 64) -> np.ndarray:
    """Up to ``limit`` preprocessed images ``(N, 3, S, S)`` (labels are not needed); unreadable files are skipped."""
    site = _open(data_spec)
    data_spec = site.spec
    xs = []
    for _, image in site.iter_images():
        try:
            xs.append(preprocess_image(image, preprocess)[0])
        except ValueError as e:  # e.g. an empty or all-NaN image
            site.problems.append(Problem("?", str(e)))
            continue
        if limit and len(xs) >= limit:
            break
    if not xs:
        raise EvalDataError(f"{data_spec}: no readable images for calibration ({len(site.problems)} problems)")
    return np.stack(xs).astype(np.float32)


def load_eval_set(data_spec: "str | SiteData", task: str, labels: list[str], preprocess: PreprocessSpec, limit: int | None = None) -> EvalSet:
    """A labelled validation set for ``task`` from a data spec.

    classify needs each sample's label among ``labels``; segment needs masks; hc needs
    ``meta["hc_mm"]`` and ``meta["pixel_size_mm"]``. Samples lacking what the task needs are
    recorded in ``problems`` and skipped; an empty result raises :class:`EvalDataError`.
    """
    site = _open(data_spec)
    data_spec = site.spec
    index = {name: i for i, name in enumerate(labels)}
    xs, ys, ms, hcs, pms = [], [], [], [], []
    problems = site.problems
    for sample, image in site.iter_images():
        if task == "classify" and sample.label not in index:
            problems.append(Problem(sample.key, f"label {sample.label!r} is not one of the model's labels {labels}"))
            continue
        mask = None
        if task in ("segment", "hc"):
            try:
                mask = sample.mask()
            except Exception as e:  # UnreadableImage: reported, skipped
                problems.append(Problem(sample.key, f"mask unreadable ({e})"))
                continue
            if mask is None and task == "segment":
                problems.append(Problem(sample.key, "no mask"))
                continue
        if task == "hc" and not ("hc_mm" in sample.meta and "pixel_size_mm" in sample.meta):
            problems.append(Problem(sample.key, "no hc_mm / pixel_size_mm in its metadata"))
            continue
        try:
            x, g = preprocess_image(image, preprocess)
            m = apply_geometry_to_mask(mask, g) if mask is not None else None
            # inside the try: a stretched (non-square) output pixel is this image's problem, not an
            # exception for the whole set (whether a crop is square depends on the image)
            px = g.output_pixel_mm(float(sample.meta["pixel_size_mm"])) if task == "hc" else None
        except ValueError as e:
            problems.append(Problem(sample.key, str(e)))
            continue
        xs.append(x)
        if task == "classify":
            ys.append(index[sample.label])
        if m is not None:
            ms.append(m)
        if task == "hc":
            hcs.append(float(sample.meta["hc_mm"]))
            pms.append(px)
        if limit and len(xs) >= limit:
            break
    if not xs:
        raise EvalDataError(f"{data_spec}: no usable {task} samples ({len(problems)} skipped; first: {problems[0].reason if problems else '-'})")
    return EvalSet(
        spec=data_spec, task=task, labels=list(labels),
        inputs=np.stack(xs).astype(np.float32),
        targets=np.asarray(ys, np.int64) if task == "classify" else None,
        masks=np.stack(ms) if ms and len(ms) == len(xs) else None,
        hc_mm=np.asarray(hcs) if task == "hc" else None,
        pixel_mm=np.asarray(pms) if task == "hc" else None,
        problems=list(problems),
    )


def predict_all(predict: Predictor, inputs: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Run ``predict`` over ``inputs`` in batches; concatenate the outputs."""
    return np.concatenate([np.asarray(predict(inputs[i : i + batch_size])) for i in range(0, len(inputs), batch_size)])


def metrics_from_outputs(outputs: np.ndarray, ev: EvalSet) -> dict[str, float]:
    """Task metrics of raw model outputs on ``ev`` (see the module docstring)."""
    from echocare import metrics as M

    if len(outputs) != len(ev):
        raise ValueError(f"{len(outputs)} outputs for {len(ev)} samples")
    if ev.task == "classify":
        probs = post.softmax(outputs)
        return {k: float(v) for k, v in M.classification_report_dict(ev.targets, probs, len(ev.labels)).items()}
    size = ev.inputs.shape[-1]
    pred = post.foreground(post.masks_from_logits(outputs, size))
    out: dict[str, float] = {}
    if ev.masks is not None:
        out["dice"] = float(M.dice(pred, ev.masks))
    if ev.task == "hc":
        hc = np.array([post.hc_from_mask(m, float(px)) for m, px in zip(pred, ev.pixel_mm)])
        failed = ~np.isfinite(hc)
        out["hc_mae_mm"] = float(M.hc_mae_mm(np.where(failed, 0.0, hc), ev.hc_mm))
        out["hc_failed"] = float(failed.sum())
    return out


def evaluate(predict: Predictor, ev: EvalSet, batch_size: int = 8) -> dict[str, float]:
    """Metrics of a predictor on an evaluation set."""
    return metrics_from_outputs(predict_all(predict, ev.inputs, batch_size), ev)


def is_defined(value: float) -> bool:
    return value is not None and not math.isnan(value)
