"""Evaluation metrics, computed by scikit-learn and MONAI (nothing hand-rolled).

Importing this module imports neither torch nor scikit-learn: each function imports what it
needs, so the torch-free edge runtime can import it.

Rules for edge cases (all documented where they apply):

- :func:`auroc_macro_ovr`: one-vs-rest AUROC per class, macro-averaged over the classes that
  are *present* in ``y_true`` (a class without positives has no defined AUROC and is left out);
  NaN when fewer than two classes are present.
- :func:`dice`: foreground Dice per image, batch mean; an image whose true and predicted masks
  are both empty scores 1, an empty truth with a non-empty prediction scores 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _probs_2d(probs, n_classes: int) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        if n_classes != 2:
            raise ValueError(f"1-D scores are only meaningful for 2 classes, got n_classes={n_classes}")
        p = np.stack([1.0 - p, p], axis=1)  # the scores of class 1
    if p.ndim != 2 or p.shape[1] != n_classes:
        raise ValueError(f"probs must be (N, {n_classes}) (or (N,) scores of class 1 when binary), got {p.shape}")
    return p


def auroc_per_class(y_true: Sequence[int], probs, n_classes: int) -> list[float]:
    """One-vs-rest AUROC of each class (``sklearn.metrics.roc_auc_score``); NaN for a class that
    has no positives or no negatives in ``y_true``."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    p = _probs_2d(probs, n_classes)
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} rows of probs")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be in 0..{n_classes - 1}, got {sorted(set(y.tolist()))}")
    out = []
    for k in range(n_classes):
        pos = y == k
        out.append(float(roc_auc_score(pos, p[:, k])) if 0 < pos.sum() < len(y) else math.nan)
    return out


def auroc_macro_ovr(y_true: Sequence[int], probs, n_classes: int) -> float:
    """Macro one-vs-rest AUROC over the classes present in ``y_true``.

    Binary (``n_classes == 2``): the ordinary AUROC of class 1 (``probs`` may be (N, 2) or the
    (N,) class-1 scores). Classes absent from ``y_true`` are left out of the mean. Returns NaN
    when ``y_true`` holds fewer than two classes (AUROC is undefined).
    """
    per = auroc_per_class(y_true, probs, n_classes)
    if n_classes == 2:
        return per[1]
    present = [a for a in per if not math.isnan(a)]
    # With two or more classes in y_true every present class has positives and negatives, so
    # ``present`` is exactly the classes found in y_true; with fewer it is empty.
    return float(np.mean(present)) if present else math.nan


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (``sklearn.metrics.balanced_accuracy_score``)."""
    from sklearn.metrics import balanced_accuracy_score

    if len(y_true) == 0:
        return math.nan
    import warnings

    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected on small splits
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(np.asarray(y_true), np.asarray(y_pred)))


def classification_report_dict(y_true: Sequence[int], probs, n_classes: int) -> dict[str, float]:
    """``{"auroc": macro OvR AUROC, "balanced_accuracy": of the argmax predictions}``."""
    p = _probs_2d(probs, n_classes)
    return {
        "auroc": auroc_macro_ovr(y_true, p, n_classes),
        "balanced_accuracy": balanced_accuracy(y_true, p.argmax(axis=1)),
    }


def dice(pred_mask, true_mask) -> float:
    """Foreground Dice of binary masks (nonzero = foreground), mean over the batch.

    Accepts numpy arrays or torch tensors shaped (H, W) or (N, H, W) (or (N, 1, H, W)).
    Computed by ``monai.metrics.compute_dice(ignore_empty=False)``: both empty -> 1,
    empty truth with any predicted foreground -> 0.
    """
    import torch
    from monai.metrics import compute_dice

    def as_batch(m) -> torch.Tensor:
        t = m.detach().cpu() if isinstance(m, torch.Tensor) else torch.from_numpy(np.asarray(m))
        t = t != 0
        if t.ndim == 2:
            t = t[None]
        if t.ndim == 4 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim != 3:
            raise ValueError(f"masks must be (H, W), (N, H, W) or (N, 1, H, W), got {tuple(t.shape)}")
        return t[:, None].float()

    p, t = as_batch(pred_mask), as_batch(true_mask)
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")
    if p.shape[0] == 0:
        return math.nan
    scores = compute_dice(p, t, include_background=True, ignore_empty=False)
    return float(scores.mean())


def hc_mae_mm(pred_mm: Sequence[float], true_mm: Sequence[float]) -> float:
    """Mean absolute head-circumference error in mm (``sklearn.metrics.mean_absolute_error``)."""
    from sklearn.metrics import mean_absolute_error

    if len(pred_mm) == 0:
        return math.nan
    return float(mean_absolute_error(np.asarray(true_mm, dtype=np.float64), np.asarray(pred_mm, dtype=np.float64)))
