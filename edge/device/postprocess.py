"""Model outputs -> answers (numpy + Pillow only; shared by evaluation, the gate and the edge runtime).

- classify: logits ``(N, K)`` -> probabilities (softmax);
- segment / hc: logits ``(N, C, H, W)`` -> a label mask ``(N, H, W)`` (C == 1: ``logit > 0``;
  C > 1: argmax, class 0 = background), resized to the input size when the model's output is
  smaller;
- hc: the mask's head circumference in mm (:func:`echocare.hc.head_circumference_mm`) from the
  pixel size after preprocessing;
- :func:`mask_to_source` undoes the preprocessing geometry so a predicted mask lies on the
  original image pixel for pixel (what a Dice against a hand-drawn mask needs).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from echocare.preprocess import Geometry

TASKS = ("classify", "segment", "hc")


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64, returned as float32."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def masks_from_logits(logits: np.ndarray, size: int | None = None) -> np.ndarray:
    """``(N, C, h, w)`` segmentation logits -> uint8 label masks ``(N, size, size)``."""
    a = np.asarray(logits)
    if a.ndim != 4:
        raise ValueError(f"segmentation logits must be (N, C, H, W), got shape {a.shape}")
    masks = (a[:, 0] > 0).astype(np.uint8) if a.shape[1] == 1 else a.argmax(axis=1).astype(np.uint8)
    if size is not None and masks.shape[1:] != (size, size):
        masks = np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in masks])
    return masks


def foreground(masks: np.ndarray) -> np.ndarray:
    """Label masks -> binary {0, 1} foreground (any class but background)."""
    return (np.asarray(masks) > 0).astype(np.uint8)


def mask_to_source(mask: np.ndarray, g: Geometry) -> np.ndarray:
    """A preprocessed-space mask ``(size, size)`` -> the source image's ``(H, W)`` (nearest neighbour)."""
    m = np.asarray(mask, np.uint8)
    top, left = g.pad
    rh, rw = g.resized
    inner = m[top : top + rh, left : left + rw]
    y0, y1, x0, x1 = g.crop
    back = np.asarray(Image.fromarray(inner).resize((x1 - x0, y1 - y0), Image.NEAREST))
    out = np.zeros(tuple(g.src_shape), np.uint8)
    out[y0:y1, x0:x1] = back
    return out


def dice_binary(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def hc_from_mask(mask: np.ndarray, pixel_mm: float) -> float:
    """Head circumference (mm) of a predicted head mask; NaN when the mask is empty."""
    from echocare.hc import head_circumference_mm  # numpy-only module of the core package

    m = foreground(mask)
    if not m.any():
        return float("nan")
    return float(head_circumference_mm(m, pixel_mm))
