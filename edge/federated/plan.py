"""What the coordinator sends for federated calibration, and the per-image histogram both sides agree on.

A :class:`CalibrationPlan` is the FP32 model (ONNX bytes, pre-processed for ONNX Runtime's
quantizer so that its tensor names are the ones the quantizer asks ranges for), the quantization
points (tensor names), fixed bin edges per point and the clipping bound of one image's
contribution. The edges are fixed by the coordinator, so the sites' histograms add up bin by bin.

One image's contribution (:func:`image_row`) is, for every point, the histogram of that tensor's
finite values over the point's bins (values outside the edges fall into the first or last bin),
divided by the number of those values (each point's histogram sums to 1, or is all zero when the
tensor has no finite value), and then the whole row (all points) is scaled down to L2 norm at most
``clip``. Hence **adding or removing one image changes a site's summed histograms by at most
``clip`` in L2 norm, whatever the model, the edges or the image** (the sensitivity the noise is
calibrated to). Clipping only reweights an image; it does not change the shape of its histograms.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

#: Limits a site enforces on a plan before it runs anything (a plan is the coordinator's input).
MAX_POINTS, MAX_BINS, MAX_MODEL_BYTES = 4096, 4096, 2_000_000_000


class PlanError(ValueError):
    """A calibration plan a site cannot run (the message says which part and why)."""


@dataclass(frozen=True)
class CalibrationPlan:
    """See the module docstring. ``edges``: (P, B + 1) strictly increasing per row. ``public_ranges``
    (P, 2): the (min, max) of every point on the coordinator's public images, kept at the coordinator
    (never sent: not part of :meth:`to_arrays` nor of :meth:`digest`)."""

    model: bytes
    points: tuple[str, ...]
    edges: np.ndarray
    clip: float = 1.0
    public_ranges: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", tuple(self.points))
        object.__setattr__(self, "edges", np.asarray(self.edges, np.float64))
        problem = self.problem()
        if problem:
            raise PlanError(problem)

    def problem(self) -> str | None:
        """Why this plan cannot run, or None."""
        e = self.edges
        if not self.points or len(self.points) > MAX_POINTS:
            return f"a plan needs 1 to {MAX_POINTS} quantization points, got {len(self.points)}"
        if len(set(self.points)) != len(self.points):
            return "the quantization points repeat a tensor name"
        if e.ndim != 2 or e.shape[0] != len(self.points) or not 2 <= e.shape[1] - 1 <= MAX_BINS:
            return f"bin edges must be (points, bins + 1) with 2 to {MAX_BINS} bins, got shape {e.shape}"
        if not np.isfinite(e).all() or not (np.diff(e, axis=1) > 0).all():
            return "bin edges must be finite and strictly increasing for every point"
        if not (math.isfinite(self.clip) and 0 < self.clip <= 1e6):
            return f"the clipping bound must be in (0, 1e6], got {self.clip}"
        if not 0 < len(self.model) <= MAX_MODEL_BYTES:
            return f"the model must be 1 byte to {MAX_MODEL_BYTES} bytes, got {len(self.model)}"
        return None

    @property
    def bins(self) -> int:
        return self.edges.shape[1] - 1

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of a site's summed histograms to one image (add or remove): ``clip``."""
        return float(self.clip)

    def digest(self) -> str:
        """sha256 of everything that decides the released numbers (model, points, edges, clip)."""
        h = hashlib.sha256(self.model)
        h.update(json.dumps([list(self.points), self.clip]).encode())
        h.update(np.ascontiguousarray(self.edges).tobytes())
        return h.hexdigest()

    # -- as message content: arrays only (no pickle), so the site's request hash covers all of it --
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"model": np.frombuffer(self.model, np.uint8), "edges": np.ascontiguousarray(self.edges),
                "points": np.frombuffer(json.dumps(list(self.points)).encode(), np.uint8),
                "clip": np.array([self.clip], np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "CalibrationPlan":
        try:
            points = json.loads(np.asarray(arrays["points"], np.uint8).tobytes().decode())
            if not isinstance(points, list) or not all(isinstance(p, str) for p in points):
                raise PlanError("the quantization points must be a list of tensor names")
            clip = np.asarray(arrays["clip"], np.float64).ravel()
            if clip.size != 1:
                raise PlanError("the clipping bound must be one number")
            return cls(np.asarray(arrays["model"], np.uint8).tobytes(), tuple(points), arrays["edges"], float(clip[0]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, PlanError):
                raise
            raise PlanError(f"not a calibration plan ({type(e).__name__}: {e})") from None


def point_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Normalised histogram (sums to 1, or all zero) of the finite ``values`` over ``edges``;
    values below the first edge count in the first bin, above the last in the last bin.
    Evenly spaced edges (what :mod:`edge.federated.coordinator` sends) take a fast path."""
    v = np.asarray(values).ravel()
    if v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float32)
    finite = np.isfinite(v)
    if not finite.all():
        v = v[finite]
    bins = len(edges) - 1
    if v.size == 0:
        return np.zeros(bins)
    widths = np.diff(edges)
    if np.allclose(widths, widths[0], rtol=1e-9, atol=0.0):
        scale = v.dtype.type(bins / (float(edges[-1]) - float(edges[0])))
        idx = (v - v.dtype.type(edges[0])) * scale  # bin positions, in the tensor's own precision
        np.clip(idx, 0, bins - 1, out=idx)
        idx = idx.astype(np.intp)  # truncation = floor on the clipped, non-negative positions
    else:
        idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, bins - 1)
    return np.bincount(idx, minlength=bins).astype(np.float64) / v.size


def image_row(values: list[np.ndarray], edges: np.ndarray, clip: float) -> np.ndarray:
    """One image's contribution (P, B): its normalised histogram per point, the whole row scaled to
    L2 norm <= ``clip`` (see the module docstring)."""
    row = np.stack([point_histogram(v, e) for v, e in zip(values, edges)])
    norm = float(np.linalg.norm(row))
    return row * (clip / norm) if norm > clip else row


def activation_session(plan: CalibrationPlan):
    """An ONNX Runtime session of the plan's model whose outputs are the plan's points (the model's
    own input, when it is a point, is taken from the feed)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(plan.model)
    graph = model.graph
    inputs = {i.name for i in graph.input}
    kinds = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.output, *graph.input)}
    present = {o.name for o in graph.output}
    outputs = [p for p in plan.points if p not in inputs and p not in present]
    graph.output.extend(onnx.helper.make_tensor_value_info(p, kinds.get(p, onnx.TensorProto.FLOAT), None) for p in outputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), graph.input[0].name
