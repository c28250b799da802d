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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

#: Limits a site enforces on a plan before it runs anything (a plan is the coordinator's input).
MAX_POINTS, MAX_BINS, MAX_MODEL_BYTES = 4096, 4096, 2_000_000_000


class PlanError(ValueError):
    """A calibration plan a site cannot run (the message says which part and why)."""


# -- shared by both plan kinds (CalibrationPlan, ScalePlan): the checks and the message content ---
def _points_problem(points: tuple[str, ...]) -> str | None:
    """Why a plan's quantization points cannot run, or None (the first check of every plan kind)."""
    if not points or len(points) > MAX_POINTS:
        return f"a plan needs 1 to {MAX_POINTS} quantization points, got {len(points)}"
    if len(set(points)) != len(points):
        return "the quantization points repeat a tensor name"
    return None


def _clip_and_model_problem(clip: float, model: bytes) -> str | None:
    """Why a plan's clipping bound or model cannot run, or None (the last check of every plan kind)."""
    if not (math.isfinite(clip) and 0 < clip <= 1e6):
        return f"the clipping bound must be in (0, 1e6], got {clip}"
    if not 0 < len(model) <= MAX_MODEL_BYTES:
        return f"the model must be 1 byte to {MAX_MODEL_BYTES} bytes, got {len(model)}"
    return None


def _text_array(text: str) -> np.ndarray:
    """A string as message content: its UTF-8 bytes as a uint8 array."""
    return np.frombuffer(text.encode(), np.uint8)


def _points_array(points: tuple[str, ...]) -> np.ndarray:
    """The quantization points as every plan kind sends them: a JSON list of tensor names."""
    return _text_array(json.dumps(list(points)))


def _read_points(arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    points = json.loads(np.asarray(arrays["points"], np.uint8).tobytes().decode())
    if not isinstance(points, list) or not all(isinstance(p, str) for p in points):
        raise PlanError("the quantization points must be a list of tensor names")
    return tuple(points)


def _read_model(arrays: dict[str, np.ndarray]) -> bytes:
    return np.asarray(arrays["model"], np.uint8).tobytes()


def _read_numbers(arrays: dict[str, np.ndarray], key: str, n: int, problem: str) -> np.ndarray:
    """``arrays[key]`` as ``n`` float64 numbers; :class:`PlanError` ``problem`` when there are not ``n``."""
    numbers = np.asarray(arrays[key], np.float64).ravel()
    if numbers.size != n:
        raise PlanError(problem)
    return numbers


@contextmanager
def _reading_plan() -> Iterator[None]:
    """Any malformed message content becomes one :class:`PlanError` naming what was wrong."""
    try:
        yield
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"not a calibration plan ({type(e).__name__}: {e})") from None


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
        problem = _points_problem(self.points)
        if problem:
            return problem
        if e.ndim != 2 or e.shape[0] != len(self.points) or not 2 <= e.shape[1] - 1 <= MAX_BINS:
            return f"bin edges must be (points, bins + 1) with 2 to {MAX_BINS} bins, got shape {e.shape}"
        if not np.isfinite(e).all() or not (np.diff(e, axis=1) > 0).all():
            return "bin edges must be finite and strictly increasing for every point"
        return _clip_and_model_problem(self.clip, self.model)

    kind = "histogram"

    @property
    def bins(self) -> int:
        return self.edges.shape[1] - 1

    @property
    def release_shape(self) -> tuple[int, int]:
        """Shape of the released sums: (points, bins)."""
        return (len(self.points), self.bins)

    @property
    def describe(self) -> str:
        return f"{len(self.points)} points x {self.bins} bins"

    def row(self, values: list[np.ndarray]) -> np.ndarray:
        """One image's bounded contribution: :func:`image_row`."""
        return image_row(values, self.edges, self.clip)

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
                "points": _points_array(self.points), "clip": np.array([self.clip], np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> CalibrationPlan:
        with _reading_plan():
            points = _read_points(arrays)
            clip = _read_numbers(arrays, "clip", 1, "the clipping bound must be one number")
            return cls(_read_model(arrays), points, arrays["edges"], float(clip[0]))


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


# ------------------------------------------------------------------------- the scale release
@dataclass(frozen=True)
class ScalePlan:
    """A calibration request that asks for **one scale factor per group of points** instead of histograms.

    Why: a histogram row spreads one image's bounded contribution (L2 norm ``clip``) over every point
    and bin, so with 83 points a point receives about ``clip / sqrt(83)`` and no bin of a few hundred
    images rises above the noise a site adds (docs/edge.md, "Measured"). Here each image contributes,
    per group of (point, side), one bounded number: the mean over the group's members of
    ``clip_to(log(m) - reference, -width, width)``, where ``m`` is the magnitude the image's tensor
    reaches on that side (its maximum for ``hi``, minus its minimum for ``lo``, or the ``quantile``
    of the values and ``1 - quantile`` for a robust version) and ``reference`` the mean of the same
    log-magnitude over the coordinator's **public** images (sent: public). One more number, a
    constant, makes the released sums normalisable without the site's image count (a DP count).

    One image's row is ``[c, b * v_1 / width, ..., b * v_G / width]`` with ``c = b = clip / sqrt(G + 1)``
    and ``|v_g| <= width``, so **its L2 norm is at most ``clip`` whatever the model or the image**
    (the sensitivity, as for histograms). The coordinator's estimate of a group's log scale is
    ``(S_g * width / b) / (S_0 / c)`` (noise on it: ``sigma * clip * width / (b * N)``), and a point's
    range is its public range times ``exp`` of its group's scale.

    ``groups`` (P, 2): the group of each point's (lo, hi) side, 0 .. G-1, or -1 (not asked: the range
    of that side stays the public one, e.g. a tensor that is never negative). ``reference`` (P, 2):
    finite where the group is not -1. ``public_ranges`` is the coordinator's (never sent)."""

    model: bytes
    points: tuple[str, ...]
    groups: np.ndarray
    reference: np.ndarray
    width: float = 2.0
    quantile: float = 1.0
    clip: float = 1.0
    public_ranges: np.ndarray | None = field(default=None, compare=False, repr=False)

    kind = "scale"

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", tuple(self.points))
        object.__setattr__(self, "groups", np.asarray(self.groups, np.int64))
        object.__setattr__(self, "reference", np.asarray(self.reference, np.float64))
        problem = self.problem()
        if problem:
            raise PlanError(problem)

    def problem(self) -> str | None:
        """Why this plan cannot run, or None."""
        g, r = self.groups, self.reference
        problem = _points_problem(self.points)
        if problem:
            return problem
        if g.shape != (len(self.points), 2) or r.shape != (len(self.points), 2):
            return f"groups and reference must be (points, 2), got {g.shape} and {r.shape}"
        if g.min() < -1 or not 1 <= self.n_groups <= MAX_BINS or set(np.unique(g[g >= 0])) != set(range(self.n_groups)):
            return f"groups must number 0 .. G-1 (1 <= G <= {MAX_BINS}) or be -1, every group used"
        if not np.isfinite(r[g >= 0]).all():
            return "the reference must be finite for every asked side"
        if not (math.isfinite(self.width) and 0 < self.width <= 100):
            return f"the width of the log ratio must be in (0, 100], got {self.width}"
        if not (math.isfinite(self.quantile) and 0.5 < self.quantile <= 1):
            return f"the quantile must be in (0.5, 1], got {self.quantile}"
        return _clip_and_model_problem(self.clip, self.model)

    @property
    def n_groups(self) -> int:
        return int(self.groups.max()) + 1 if self.groups.size else 0

    @property
    def release_shape(self) -> tuple[int, int]:
        """Shape of the released sums: (1, 1 + G) (the constant, then one number per group)."""
        return (1, 1 + self.n_groups)

    @property
    def describe(self) -> str:
        return f"{len(self.points)} points in {self.n_groups} scale group(s)"

    @property
    def weight(self) -> float:
        """``c = b = clip / sqrt(G + 1)``: each released coordinate's largest share of an image's row."""
        return self.clip / math.sqrt(1 + self.n_groups)

    @property
    def sensitivity(self) -> float:
        return float(self.clip)

    def digest(self) -> str:
        h = hashlib.sha256(self.model)
        h.update(json.dumps([self.kind, list(self.points), self.width, self.quantile, self.clip]).encode())
        h.update(np.ascontiguousarray(self.groups).tobytes())
        h.update(np.ascontiguousarray(self.reference).tobytes())
        return h.hexdigest()

    def magnitudes(self, values: list[np.ndarray]) -> np.ndarray:
        """(P, 2) log magnitude of every point's (lo, hi) side for one image's tensors (-inf where the
        side is not reached: no finite value, or the tensor never goes below / above 0 there)."""
        out = np.full((len(values), 2), -np.inf)
        for i, v in enumerate(values):
            v = np.asarray(v).ravel()
            v = v[np.isfinite(v)]
            if v.size == 0:
                continue
            if self.quantile >= 1.0:
                lo, hi = float(v.min()), float(v.max())
            else:
                lo, hi = (float(q) for q in np.quantile(v, [1.0 - self.quantile, self.quantile]))
            with np.errstate(divide="ignore"):
                out[i] = np.log(max(-lo, 0.0)), np.log(max(hi, 0.0))
        return out

    def row_of_magnitudes(self, logm: np.ndarray) -> np.ndarray:
        """One image's bounded row (1, 1 + G) from its (P, 2) log magnitudes (see the class docstring)."""
        logm = np.where(np.isnan(logm), -np.inf, logm)
        v = np.clip(logm - np.where(self.groups >= 0, self.reference, 0.0), -self.width, self.width)
        sums = np.bincount(self.groups[self.groups >= 0], weights=v[self.groups >= 0], minlength=self.n_groups)
        sizes = np.bincount(self.groups[self.groups >= 0], minlength=self.n_groups)
        return np.concatenate([[self.weight], self.weight * sums / sizes / self.width])[None]

    def row(self, values: list[np.ndarray]) -> np.ndarray:
        return self.row_of_magnitudes(self.magnitudes(values))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"model": np.frombuffer(self.model, np.uint8), "kind": _text_array(self.kind),
                "points": _points_array(self.points), "groups": np.ascontiguousarray(self.groups),
                "reference": np.ascontiguousarray(self.reference),
                "numbers": np.array([self.width, self.quantile, self.clip], np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ScalePlan:
        with _reading_plan():
            points = _read_points(arrays)
            numbers = _read_numbers(arrays, "numbers", 3, "a scale plan needs three numbers (width, quantile, clip)")
            groups = np.asarray(arrays["groups"])
            if groups.dtype.kind not in "iu":
                raise PlanError("the groups must be integers")
            return cls(_read_model(arrays), points, groups, arrays["reference"],
                       float(numbers[0]), float(numbers[1]), float(numbers[2]))


#: What a coordinator may send: per-point histograms, or one scale per group of points.
Plan = CalibrationPlan | ScalePlan


def plan_from_arrays(arrays: dict[str, np.ndarray]) -> Plan:
    """A plan from message content: a :class:`ScalePlan` when ``kind`` says ``scale``, else histograms."""
    if "kind" not in arrays:
        return CalibrationPlan.from_arrays(arrays)
    try:
        kind = np.asarray(arrays["kind"], np.uint8).tobytes().decode()
    except (TypeError, ValueError, UnicodeDecodeError) as e:
        raise PlanError(f"unreadable plan kind ({e})") from None
    if kind == ScalePlan.kind:
        return ScalePlan.from_arrays(arrays)
    if kind == "histogram":
        return CalibrationPlan.from_arrays(arrays)
    raise PlanError(f"unknown plan kind {kind[:40]!r} (histogram | scale)")
