"""The coordinator side of federated INT8 calibration: plan, merge, ranges, QDQ model.

Two kinds of plan (``make_plan(kind=...)``): the **scale** release (default,
:class:`~edge.federated.plan.ScalePlan`: a DP count and one bounded log scale per group of points
relative to the public phantoms; :func:`scale_ranges` multiplies each point's public range by its
group's scale) and per-point **histograms** (:class:`~edge.federated.plan.CalibrationPlan`), whose
steps follow. Why the scale release is the default: docs/edge.md, "What we tried next".

1. **Plan** (:func:`make_plan`): the quantization points are the tensors ONNX Runtime's own
   calibrator would collect (:func:`calibration_points`: every float input and output of the node
   types to quantize, in the pre-processed model); each point's bin edges span
   ``[-margin * a, margin * a]`` where ``a`` is the largest absolute value of that point over
   **public images** (echofleet's phantoms, which the coordinator holds). Public ranges avoid a
   first private pass (a noisy per-point maximum from the sites would itself be a release,
   charged to every site's ledger). Values beyond the edges fall into the outer bins, and the
   ranges report it (:attr:`Ranges.notes`).
2. **Merge** (:func:`merge`): the sites' noisy sums add up bin by bin (same edges everywhere);
   the noise of the sum has standard deviation ``sqrt(sum of the sites' noise variances)``.
3. **Ranges** (:func:`derive_ranges`), post-processing only (no further privacy cost): bins whose
   merged count is not above the noise are zeroed; the threshold is the standard normal quantile
   that keeps the expected number of pure-noise bins passing it at 0.05 over all points x bins (a
   multiple-comparison bound: with 83 x 256 bins, 4.6 noise standard deviations; a fixed 3 let ~29
   noise spikes through and set absurd ranges). Then ``minmax`` (default, as ONNX Runtime's
   ``quantize_static``: the outermost remaining bins' edges), or ``percentile`` (as ONNX Runtime's
   percentile calibration: the ``percentile`` of |x| for symmetric activations, both tails cut for
   asymmetric ones), clamped to the min-max range. A point with no bin above the noise takes the
   (min, max) its tensor reached on the public images; with noise, a point's range is never narrower
   than that public range (the tails sink below the threshold). Without noise the ranges are those
   of the pooled images' histograms exactly.
4. **QDQ**: :func:`edge.build.quantize.quantize` with ``ranges``: ONNX Runtime's
   ``quantize_static`` reads them from its calibration cache, with no image; the one QDQ ONNX
   serves ONNX Runtime, TensorRT (S8S8) and OpenVINO (which compiles QDQ ONNX).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.federated.plan import CalibrationPlan, Plan, ScalePlan, activation_session, plan_from_arrays

log = logging.getLogger(__name__)

#: Public images the coordinator holds (echofleet's phantoms: no patient in them).
PUBLIC_IMAGES = "phantom:24?profiles=linear-a,convex-b,linear-c&seed=1"
DEFAULT_BINS, DEFAULT_MARGIN, DEFAULT_CLIP, DEFAULT_PERCENTILE = 256, 2.0, 1.0, 99.999
FALSE_BINS = 0.05  # expected number of pure-noise bins (over all points and bins) above the threshold
METHODS = ("minmax", "percentile")


@dataclass
class SiteAnswer:
    """One site's reply to a calibration request (what left the site, and nothing else)."""

    site: str
    status: str
    reason: str = ""
    histograms: np.ndarray | None = None  # (P, B) noisy sums
    noise_std: float = 0.0
    epsilon: float | None = None
    delta: float | None = None
    not_private: bool = False

    def to_dict(self) -> dict:
        return {"site": self.site, "status": self.status, "reason": self.reason, "noise_std": self.noise_std,
                "epsilon": self.epsilon, "delta": self.delta, **({"not_private": True} if self.not_private else {})}


@dataclass
class Merged:
    """The sites' histograms added up, and the noise that sum carries."""

    sums: np.ndarray  # (P, B)
    noise_std: float
    sites: list[str]
    answers: list[SiteAnswer]


@dataclass
class Ranges:
    """Activation range per point, and what the coordinator should know about them."""

    ranges: dict[str, tuple[float, float]]
    method: str
    notes: list[str] = field(default_factory=list)
    saturated: list[str] = field(default_factory=list)  # mass in an outer bin: the public range may be too narrow
    public_fallback: list[str] = field(default_factory=list)  # nothing above the noise: public range used
    scales: list[float] = field(default_factory=list)  # a scale plan's group log scales (noisy)
    count: float | None = None  # a scale plan's noisy image (or patient-weighted) count


class CalibrationFailed(RuntimeError):
    """No site answered a calibration request usably (the message names each site's answer)."""


# ------------------------------------------------------------------------------------- plan
def calibration_points(model_path: str | Path, op_types: Sequence[str]) -> list[str]:
    """The tensors ONNX Runtime's calibrator collects for ``op_types`` (its
    ``select_tensors_to_calibrate``: float inputs and outputs of those nodes that are not
    initializers, as typed by shape inference), in graph order."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    infos = {v.name: v for v in (*graph.value_info, *graph.output, *graph.input)}
    inits = {i.name for i in graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    points: dict[str, None] = {}
    for node in graph.node:
        if node.op_type in op_types:
            for name in (*node.input, *node.output):
                vi = infos.get(name)
                if vi is not None and name not in inits and vi.type.HasField("tensor_type") \
                        and vi.type.tensor_type.elem_type in floats:
                    points.setdefault(name)
    return list(points)


def public_minmax(model: bytes, points: Sequence[str], images: Iterable[np.ndarray]) -> np.ndarray:
    """(min, max) of the finite values of every point over the public ``images``: (P, 2)."""
    return public_statistics(model, points, images)[0]


def public_statistics(model: bytes, points: Sequence[str], images: Iterable[np.ndarray],
                      quantile: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Over the public ``images``: (min, max) of every point (P, 2), and every image's (lo, hi) log
    magnitudes as a :class:`ScalePlan` with ``quantile`` computes them (images, P, 2)."""
    probe = CalibrationPlan(model, tuple(points), np.tile([-1.0, 0.0, 1.0], (len(points), 1)))
    scale = ScalePlan(model, tuple(points), np.zeros((len(points), 2), np.int64), np.zeros((len(points), 2)),
                      quantile=quantile)
    session, input_name = activation_session(probe)
    names = [o.name for o in session.get_outputs()]
    mm = np.zeros((len(points), 2))
    logm = []
    for x in images:
        x = np.ascontiguousarray(x[None] if x.ndim == 3 else x, np.float32)
        got = dict(zip(names, session.run(names, {input_name: x})))
        got[input_name] = x
        values = [got[p] for p in points]
        logm.append(scale.magnitudes(values))
        for i, v in enumerate(values):
            v = np.asarray(v, np.float64)
            v = v[np.isfinite(v)]
            if v.size:
                mm[i] = min(mm[i, 0], float(v.min())), max(mm[i, 1], float(v.max()))
    return mm, np.stack(logm) if logm else np.zeros((0, len(points), 2))


#: How a scale plan groups its points' sides: one scale for every low side and one for every high
#: side ("sides"), or one per (point, side) ("points").
GROUPINGS = ("sides", "points")
KINDS = ("histogram", "scale")
DEFAULT_KIND, DEFAULT_GROUPING, DEFAULT_WIDTH = "scale", "sides", 2.0


def scale_groups(public: np.ndarray, grouping: str = DEFAULT_GROUPING) -> np.ndarray:
    """(P, 2) group of each point's (lo, hi) side: -1 where the public images never reach that side
    (a tensor never below 0 keeps 0 as its low end), else by ``grouping`` (:data:`GROUPINGS`)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"a scale plan groups its points by {' or '.join(GROUPINGS)}, not {grouping!r}")
    reached = np.stack([public[:, 0] < 0, public[:, 1] > 0], axis=1)
    groups = np.full(public.shape, -1, np.int64)
    if grouping == "points":
        groups[reached] = np.arange(int(reached.sum()))
    else:
        sides = [s for s in (0, 1) if reached[:, s].any()]
        for g, side in enumerate(sides):
            groups[reached[:, side], side] = g
    return groups


def make_plan(prepared_model: str | Path, op_types: Sequence[str], public_images: np.ndarray, *,
              bins: int = DEFAULT_BINS, margin: float = DEFAULT_MARGIN, clip: float = DEFAULT_CLIP,
              kind: str = DEFAULT_KIND, grouping: str = DEFAULT_GROUPING, width: float = DEFAULT_WIDTH) -> Plan:
    """The calibration request for ``prepared_model`` (the output of
    :func:`edge.build.quantize.prepare_for_qdq`): points, and per point either public bin edges
    (``kind="histogram"``, module docstring) or a group and the public images' mean log magnitude
    (``kind="scale"``: :class:`~edge.federated.plan.ScalePlan`; ``bins`` and ``margin`` unused)."""
    if kind not in KINDS:
        raise ValueError(f"a calibration plan is one of {KINDS}, not {kind!r}")
    if not margin >= 1:
        raise ValueError(f"the margin of the public ranges must be >= 1, got {margin}")
    model = Path(prepared_model).read_bytes()
    points = calibration_points(prepared_model, op_types)
    if not points:
        raise ValueError(f"{prepared_model}: no tensor to calibrate for op types {list(op_types)}")
    public, logm = public_statistics(model, points, public_images)
    if kind == "scale":
        groups = scale_groups(public, grouping)
        with np.errstate(invalid="ignore"):
            reference = np.where(groups >= 0, np.mean(np.maximum(logm, -50.0), axis=0), 0.0)
        return ScalePlan(model, tuple(points), groups, reference, width=width, clip=clip, public_ranges=public)
    half = np.maximum(np.abs(public).max(1) * margin, 1e-6)
    edges = np.stack([np.linspace(-h, h, bins + 1) for h in half])
    return CalibrationPlan(model, tuple(points), edges, clip, public_ranges=public)


# ------------------------------------------------------------------------------------ merge
def merge(answers: Sequence[SiteAnswer], plan: Plan) -> Merged:
    """Add up the sums (histograms, or a scale plan's numbers) of the sites that answered ``ok`` with
    the plan's shape; raise :class:`CalibrationFailed` naming every site's answer when none did."""
    shape = plan.release_shape
    usable = [a for a in answers if a.status == "ok" and a.histograms is not None and a.histograms.shape == shape
              and np.isfinite(a.histograms).all()]
    for a in answers:
        if a.status == "ok" and a not in usable:
            log.warning("site %s: calibration reply of shape %s (expected %s) or with non-finite values: ignored",
                        a.site, None if a.histograms is None else a.histograms.shape, shape)
    if not usable:
        detail = "; ".join(f"{a.site}: {a.status}{' (' + a.reason + ')' if a.reason else ''}" for a in answers) or "no site answered"
        raise CalibrationFailed(f"no site returned calibration histograms: {detail}")
    sums = np.sum([a.histograms for a in usable], axis=0)
    noise = math.sqrt(sum(a.noise_std ** 2 for a in usable))
    return Merged(sums, noise, [a.site for a in usable], list(answers))


# ----------------------------------------------------------------------------------- ranges
def noise_threshold_sigmas(cells: int, false_bins: float = FALSE_BINS) -> float:
    """How many noise standard deviations a bin must exceed so that, over ``cells`` bins of pure
    Gaussian noise, ``false_bins`` pass on average (one-sided)."""
    from statistics import NormalDist

    return float(NormalDist().inv_cdf(1.0 - min(0.5, false_bins / max(1, cells))))


def derive_ranges(merged: Merged, plan: Plan, method: str = "minmax", *, symmetric: bool = False,
                  percentile: float = DEFAULT_PERCENTILE, threshold_sigmas: float | None = None) -> Ranges:
    """Per-point (min, max) from the merged histograms (module docstring, step 3); ``threshold_sigmas``
    None: :func:`noise_threshold_sigmas` over the plan's points x bins. A :class:`ScalePlan`'s numbers:
    :func:`scale_ranges` (``method`` and ``percentile`` do not apply: the plan's quantile decides)."""
    if isinstance(plan, ScalePlan):
        if method not in METHODS:
            raise ValueError(f"federated calibration derives ranges by {' or '.join(METHODS)}, not {method!r}")
        return scale_ranges(merged, plan)
    if method not in METHODS:
        raise ValueError(f"federated calibration derives ranges by {' or '.join(METHODS)}, not {method!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if threshold_sigmas is None:
        threshold_sigmas = noise_threshold_sigmas(len(plan.points) * plan.bins)
    threshold = threshold_sigmas * merged.noise_std
    out = Ranges({}, method)
    for p, name in enumerate(plan.points):
        edges, hist = plan.edges[p], merged.sums[p]
        kept = np.where(hist > threshold, hist, 0.0)
        nz = np.flatnonzero(kept)
        if nz.size == 0:  # nothing above the noise: the public images' own range (else the edges)
            out.public_fallback.append(name)
            pub = plan.public_ranges[p] if plan.public_ranges is not None else (edges[0], edges[-1])
            out.ranges[name] = (float(pub[0]), float(pub[1]))
            continue
        first, last = int(nz[0]), int(nz[-1])
        if first == 0 or last == plan.bins - 1:
            out.saturated.append(name)
        lo, hi = float(edges[first]), float(edges[last + 1])
        if method == "percentile":
            lo, hi = _percentile_range(kept, edges, percentile, symmetric, lo, hi)
        if merged.noise_std > 0 and plan.public_ranges is not None:
            # a noisy histogram shows only its bulk (the tails sink below the threshold), so the sites'
            # ranges may widen the public images' range, never narrow it (measured: narrowing the 7 of
            # 83 points that rose above the noise on 479 BUSI images cost 19.6 AUROC points)
            lo, hi = min(lo, float(plan.public_ranges[p][0])), max(hi, float(plan.public_ranges[p][1]))
        out.ranges[name] = (lo, hi)
    if out.public_fallback:
        out.notes.append(f"{len(out.public_fallback)} of {len(plan.points)} points had no bin above the noise "
                         f"({threshold_sigmas:.2f} sigma): the public images' range is used there")
    if out.saturated:
        out.notes.append(f"{len(out.saturated)} of {len(plan.points)} points have mass in an outer bin: the sites' "
                         "activations reach the public range's edge there (a larger margin widens it)")
    return out


def scale_ranges(merged: Merged, plan: ScalePlan, *, count_sigmas: float = 3.0, scale_sigmas: float = 2.0) -> Ranges:
    """A scale plan's ranges: each asked side of a point is its public range's side times
    ``exp(scale of its group)``; the group's scale is the merged mean log ratio ``(S_g * width / b) /
    (S_0 / c)`` (:class:`~edge.federated.plan.ScalePlan`), clipped to ``[-width, width]``, and taken
    as 0 (the public range) unless it is more than ``scale_sigmas`` of its own noise away from 0 (a
    scale the noise could have made is not applied). When the noisy count ``S_0`` is not
    ``count_sigmas`` noise deviations above zero (too few images for the noise), every point keeps
    its public range. Post-processing only (no further privacy cost)."""
    if plan.public_ranges is None:
        raise ValueError("a scale plan's ranges need the public ranges it was made with (the coordinator's plan)")
    sums = merged.sums.ravel()
    c = b = plan.weight
    out = Ranges({}, "scale")
    public = np.asarray(plan.public_ranges, np.float64)
    if sums[0] <= count_sigmas * merged.noise_std or sums[0] <= 0:
        out.public_fallback = list(plan.points)
        out.ranges = {p: (float(lo), float(hi)) for p, (lo, hi) in zip(plan.points, public)}
        out.notes.append(f"the sites' noisy image count is not {count_sigmas:g} noise deviations above zero: "
                         "every point keeps the public images' range")
        return out
    n = sums[0] / c
    noise = merged.noise_std * plan.width / b / n
    measured = np.clip(sums[1:] * plan.width / b / n, -plan.width, plan.width)
    scale = np.where(np.abs(measured) > scale_sigmas * noise, measured, 0.0)
    out.scales = scale.tolist()
    out.count = float(n)
    for p, name in enumerate(plan.points):
        lo, hi = float(public[p, 0]), float(public[p, 1])
        g_lo, g_hi = int(plan.groups[p, 0]), int(plan.groups[p, 1])
        if g_lo >= 0 and lo < 0:
            lo *= math.exp(scale[g_lo])
        if g_hi >= 0 and hi > 0:
            hi *= math.exp(scale[g_hi])
        out.ranges[name] = (lo, hi)
    out.notes.append(f"{plan.n_groups} group scale(s) measured {', '.join(f'{x:+.2f}' for x in measured[:8])}"
                     f"{', ...' if len(measured) > 8 else ''} (noise on each about {noise:.3f}, noisy count {n:.0f}); "
                     f"{int((scale != 0).sum())} above {scale_sigmas:g} noise deviations applied, the others keep the public range")
    return out


def _percentile_range(hist: np.ndarray, edges: np.ndarray, percentile: float, symmetric: bool,
                      lo: float, hi: float) -> tuple[float, float]:
    """ONNX Runtime's percentile rule on a histogram: |x| for symmetric activations, else both tails
    cut by (100 - percentile) / 2 %; clamped to the min-max range [lo, hi]."""
    total = hist.sum()
    if symmetric:
        mag = np.maximum(np.abs(edges[:-1]), np.abs(edges[1:]))  # the largest |x| each bin can hold
        order = np.argsort(mag, kind="stable")
        cdf = np.cumsum(hist[order]) / total
        t = float(mag[order][min(int(np.searchsorted(cdf, percentile / 100.0)), len(cdf) - 1)])
        return max(-t, lo), min(t, hi)
    cut = (100.0 - percentile) / 200.0
    cdf = np.cumsum(hist) / total
    left = min(int(np.searchsorted(cdf, cut)), len(cdf) - 1)
    right = min(int(np.searchsorted(cdf, 1.0 - cut)), len(cdf) - 1)
    return max(float(edges[left]), lo), min(float(edges[right + 1]), hi)


def calibration_record(plan: Plan, merged: Merged, ranges: Ranges, *, public: str, margin: float) -> dict:
    """What the signed manifest records about a federated calibration (no site data in it)."""
    shape = ({"bins": plan.bins} if isinstance(plan, CalibrationPlan) else
             {"groups": plan.n_groups, "width": plan.width, "quantile": plan.quantile,
              "scales": [round(x, 4) for x in ranges.scales]})
    return {"method": "federated", "release": plan.kind, "ranges": ranges.method, "points": len(plan.points), **shape,
            "clip": plan.clip, "plan_sha256": plan.digest(), "public_edges": {"data": public, "margin": margin},
            "noise_std_of_sum": merged.noise_std, "sites": [a.to_dict() for a in merged.answers],
            "contributing_sites": merged.sites, "notes": ranges.notes}


# ------------------------------------------------------------------------------ over Flower
#: A way to reach the sites: plan -> their answers (in-process simulation, or a Flower grid).
SiteCalibration = Callable[[Plan], list[SiteAnswer]]
MESSAGE_TYPE = "query.calibrate"


def ask_sites(grid, plan: Plan, round_record: dict, timeout: float = 3600.0) -> list[SiteAnswer]:
    """Send the plan to every connected site (a Flower ``Grid``) and read their answers."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    arrays = plan.to_arrays()
    messages = [Message(RecordDict({"config": ConfigRecord(dict(round_record)),
                                    "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})}),
                        dst_node_id=node, message_type=MESSAGE_TYPE)
                for node in grid.get_node_ids()]
    return [answer_of(m) for m in grid.send_and_receive(messages, timeout=timeout)]


def answer_of(message) -> SiteAnswer:
    """A site's reply message (``fed.client_app.to_content`` layout) as a :class:`SiteAnswer`."""
    if message.has_error():
        return SiteAnswer(f"node-{message.metadata.src_node_id}", "error", reason=str(message.error.reason)[:300])
    content = message.content
    site = content["site"] if "site" in content else {}
    metrics = content["metrics"] if "metrics" in content else {}
    hist = None
    if "arrays" in content and "histograms" in content["arrays"]:
        hist = np.asarray(content["arrays"]["histograms"].numpy(), np.float64)
    return SiteAnswer(str(site.get("site", f"node-{message.metadata.src_node_id}")), str(site.get("status", "error")),
                      str(site.get("reason", "")), hist, float(metrics.get("noise-std", 0.0)),
                      float(metrics["epsilon"]) if "epsilon" in metrics else None,
                      float(metrics["delta"]) if "delta" in metrics else None, bool(metrics.get("not-private", 0.0)))


# ------------------------------------------------------------- files (a release over `flwr run`)
def _write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """``arrays`` as one ``.npz`` (no pickle), written atomically, readable by its owner only."""
    import io

    from echocare.atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(Path(path), buf.getvalue(), 0o600)


def save_plan(plan: Plan, path: str | Path) -> Path:
    """The plan as one ``.npz`` (no pickle), written atomically: what the release ServerApp sends."""
    return _write_npz(path, plan.to_arrays())


def load_plan(path: str | Path) -> Plan:
    with np.load(Path(path), allow_pickle=False) as z:
        return plan_from_arrays({k: z[k] for k in z.files})


def save_answers(answers: Sequence[SiteAnswer], path: str | Path) -> Path:
    """The sites' answers as one ``.npz`` (their fields as JSON bytes, histograms as arrays)."""
    import json

    meta = np.frombuffer(json.dumps([a.to_dict() for a in answers]).encode(), np.uint8)
    return _write_npz(path, {"__answers__": meta,
                             **{f"h/{i}": a.histograms for i, a in enumerate(answers) if a.histograms is not None}})


def load_answers(path: str | Path) -> list[SiteAnswer]:
    import json

    with np.load(Path(path), allow_pickle=False) as z:
        meta = json.loads(bytes(z["__answers__"]).decode())
        return [SiteAnswer(m["site"], m["status"], m["reason"], z[f"h/{i}"] if f"h/{i}" in z.files else None,
                           float(m["noise_std"]), m["epsilon"], m["delta"], bool(m.get("not_private", False)))
                for i, m in enumerate(meta)]


# ------------------------------------------------------------------ acceptance over Flower
#: A way to reach the sites for acceptance: (candidate tarball, request) -> their replies.
ACCEPT_MESSAGE_TYPE = "query.accept"


def ask_accept(grid, candidate: Path, request, timeout: float = 3600.0) -> list:
    """Send the signed candidate and the acceptance request (:mod:`edge.federated.accept`) to every
    connected site; their :class:`~edge.federated.accept.AcceptanceReply` (an error reply names the node)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from edge.federated.accept import AcceptanceReply, reply_from_record, request_record

    record = request_record(candidate, request)
    messages = [Message(RecordDict({"config": ConfigRecord(dict(record))}), dst_node_id=node, message_type=ACCEPT_MESSAGE_TYPE)
                for node in grid.get_node_ids()]
    replies = []
    for m in grid.send_and_receive(messages, timeout=timeout):
        node = f"node-{m.metadata.src_node_id}"
        if m.has_error():
            replies.append(AcceptanceReply(node, "error", str(m.error.reason)[:300]))
            continue
        try:
            replies.append(reply_from_record(m.content["acceptance"]))
        except (KeyError, ValueError) as e:
            replies.append(AcceptanceReply(node, "error", f"unreadable acceptance reply ({e})"))
    return replies
