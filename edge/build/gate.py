"""The accuracy gate: a quantized (or otherwise compiled) model may not lose more than a bound.

One primary metric per task, compared between the FP32 model and the candidate on the same
labelled validation set:

==========  =================  ======================================  ================
task        metric             drop                                    default bound
==========  =================  ======================================  ================
classify    macro OvR AUROC    (fp32 - candidate) x 100  (points)      1 point
segment     Dice               fp32 - candidate                        0.01
hc          HC MAE (mm)        candidate - fp32                        1 mm
==========  =================  ======================================  ================

The candidate passes when ``drop <= bound``. A bound below zero demands an improvement (used by
tests to force a failure). A metric that is undefined on the validation set (e.g. AUROC with a
single class present) fails the gate: an unmeasured model must not ship.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GateBounds:
    """Largest accepted drop per task (units as in the module table)."""

    auroc_points: float = 1.0
    dice: float = 0.01
    hc_mae_mm: float = 1.0

    def for_task(self, task: str) -> float:
        return {"classify": self.auroc_points, "segment": self.dice, "hc": self.hc_mae_mm}[task]


# task -> (metric key, +1 if higher is better, scale of the drop, unit of the drop)
PRIMARY = {
    "classify": ("auroc", +1, 100.0, "AUROC points"),
    "segment": ("dice", +1, 1.0, "Dice"),
    "hc": ("hc_mae_mm", -1, 1.0, "mm MAE"),
}


@dataclass
class GateResult:
    task: str
    metric: str
    fp32: float
    candidate: float
    drop: float
    bound: float
    unit: str
    passed: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


class GateFailed(Exception):
    """The candidate lost more than the bound (``str(e)`` says by how much); carries the :class:`GateResult`."""

    def __init__(self, result: GateResult):
        self.result = result
        super().__init__(result.reason)


def check_gate(task: str, fp32_metrics: dict, candidate_metrics: dict, bounds: GateBounds = GateBounds(), *,
               candidate_name: str = "quantized") -> GateResult:
    """Compare the primary metric of ``task``; never raises for a failed gate (see :func:`enforce`)."""
    if task not in PRIMARY:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(PRIMARY)}")
    key, sign, scale, unit = PRIMARY[task]
    bound = float(bounds.for_task(task))
    if not math.isfinite(bound):
        raise ValueError(f"gate bound for {task} must be a finite number, got {bound}")
    ref, cand = float(fp32_metrics.get(key, math.nan)), float(candidate_metrics.get(key, math.nan))
    if math.isnan(ref) or math.isnan(cand):
        which = "FP32" if math.isnan(ref) else candidate_name
        reason = (f"gate FAILED: {key} of the {which} model is undefined on the validation set "
                  f"(too few samples or classes?); refusing to ship an unmeasured model")
        return GateResult(task, key, ref, cand, math.nan, bound, unit, False, reason)
    drop = (ref - cand) * scale if sign > 0 else (cand - ref) * scale
    passed = drop <= bound
    verdict = "passed" if passed else "FAILED"
    reason = (f"gate {verdict}: {key} FP32 {ref:.4f} vs {candidate_name} {cand:.4f}: "
              f"drop {drop:+.3f} {unit} {'<=' if passed else '>'} bound {bound:g}")
    return GateResult(task, key, ref, cand, drop, bound, unit, passed, reason)


def enforce(result: GateResult) -> GateResult:
    """Raise :class:`GateFailed` unless the result passed."""
    if not result.passed:
        raise GateFailed(result)
    return result
