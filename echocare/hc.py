"""Head circumference from a segmentation mask (numpy only: the torch-free edge runtime uses it).

The fetal skull in HC18 is annotated as an ellipse, and HC is that ellipse's circumference. We
fit an ellipse to the mask from its second-order region moments: a uniformly filled ellipse with
semi-axes ``a >= b`` has covariance eigenvalues ``a²/4`` and ``b²/4`` along its axes. The
circumference is Ramanujan's second approximation (relative error < 1e-9 for HC18-like shapes).

Coordinates: ``cy, cx`` in pixels (row, column; pixel centres at integer positions), ``a, b``
semi-axes in pixels, ``theta`` the major axis' angle in radians from the +x (column) axis
towards +y (down the rows), in (-pi/2, pi/2].
"""

from __future__ import annotations

import math

import numpy as np


def fit_ellipse(mask: np.ndarray) -> tuple[float, float, float, float, float]:
    """``(cy, cx, a, b, theta)`` of the ellipse with the same area moments as ``mask`` (nonzero = inside).

    All foreground pixels count (pass a single connected region for a clean fit). Each pixel is
    treated as a unit square, which adds 1/12 px² to the variance of its centre coordinate.
    Raises ``ValueError`` for an empty or non-2-D mask.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        raise ValueError("cannot fit an ellipse to an empty mask")
    ys = ys.astype(np.float64)
    xs = xs.astype(np.float64)
    cy, cx = float(ys.mean()), float(xs.mean())
    dy, dx = ys - cy, xs - cx
    cov = np.array([[np.mean(dx * dx) + 1 / 12, np.mean(dx * dy)], [np.mean(dx * dy), np.mean(dy * dy) + 1 / 12]])
    evals, evecs = np.linalg.eigh(cov)  # ascending
    minor_var, major_var = float(evals[0]), float(evals[1])
    vx, vy = float(evecs[0, 1]), float(evecs[1, 1])
    theta = math.atan2(vy, vx)
    if theta <= -math.pi / 2:
        theta += math.pi
    elif theta > math.pi / 2:
        theta -= math.pi
    return cy, cx, 2.0 * math.sqrt(major_var), 2.0 * math.sqrt(max(minor_var, 0.0)), theta


def ellipse_circumference(a: float, b: float) -> float:
    """Perimeter of an ellipse with semi-axes ``a`` and ``b`` (Ramanujan's second approximation)."""
    if a < 0 or b < 0:
        raise ValueError(f"semi-axes must be non-negative, got a={a}, b={b}")
    if a + b == 0:
        return 0.0
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1.0 + 3.0 * h / (10.0 + math.sqrt(4.0 - 3.0 * h)))


def head_circumference_mm(mask: np.ndarray, pixel_size_mm: float) -> float:
    """HC in mm of the ellipse fitted to ``mask`` with square pixels of ``pixel_size_mm``.

    For a preprocessed (resized) mask use ``Geometry.output_pixel_mm(source_pixel_mm)``.
    """
    if not pixel_size_mm > 0:
        raise ValueError(f"pixel_size_mm must be positive, got {pixel_size_mm}")
    _, _, a, b, _ = fit_ellipse(mask)
    return ellipse_circumference(a, b) * float(pixel_size_mm)


def draw_ellipse(shape: tuple[int, int], cy: float, cx: float, a: float, b: float, theta: float) -> np.ndarray:
    """A filled uint8 {0, 1} ellipse mask (pixel centres inside the ellipse), e.g. for tests and phantoms."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(theta), math.sin(theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    return ((u / a) ** 2 + (v / b) ** 2 <= 1.0).astype(np.uint8)


def measured_hc_mm(pred_mask: np.ndarray, pixel_mm: float) -> float:
    """HC (mm) of a *predicted* mask for scoring: an empty prediction measures 0 mm, so its error
    counts in full instead of the image being skipped."""
    return head_circumference_mm(pred_mask, pixel_mm) if np.asarray(pred_mask).any() else 0.0
