"""Metrics against small cases worked out by hand."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from echocare.metrics import (
    auroc_macro_ovr,
    auroc_per_class,
    balanced_accuracy,
    classification_report_dict,
    dice,
    hc_mae_mm,
)


def test_binary_auroc():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]  # pairs (pos > neg): 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3 of 4
    assert auroc_macro_ovr(y, s, 2) == pytest.approx(0.75)
    p2 = np.stack([1 - np.array(s), s], axis=1)
    assert auroc_macro_ovr(y, p2, 2) == pytest.approx(0.75)
    assert auroc_macro_ovr(y, [0.1, 0.2, 0.3, 0.4], 2) == 1.0
    assert auroc_macro_ovr(y, [0.4, 0.3, 0.2, 0.1], 2) == 0.0


def test_multiclass_auroc_macro_over_present_classes():
    y = [0, 0, 1, 1]  # class 2 never occurs: its AUROC is undefined and left out
    probs = np.array(
        [
            [0.6, 0.3, 0.1],
            [0.3, 0.4, 0.3],
            [0.5, 0.4, 0.1],
            [0.1, 0.8, 0.1],
        ]
    )
    # class 0 scores: neg (rows 2,3) 0.5, 0.1 vs pos 0.6, 0.3 -> 0.6>0.5, 0.6>0.1, 0.3>0.1; 0.3<0.5 -> 3/4
    # class 1 scores: pos 0.4, 0.8 vs neg 0.3, 0.4 -> 0.4>0.3, 0.4=0.4 (1/2), 0.8>both -> 3.5/4
    per = auroc_per_class(y, probs, 3)
    assert per[0] == pytest.approx(0.75) and per[1] == pytest.approx(0.875) and math.isnan(per[2])
    assert auroc_macro_ovr(y, probs, 3) == pytest.approx((0.75 + 0.875) / 2)
    perfect = np.eye(3)[[0, 1, 2, 2]]
    assert auroc_macro_ovr([0, 1, 2, 2], perfect, 3) == 1.0


def test_auroc_undefined_and_bad_input():
    assert math.isnan(auroc_macro_ovr([1, 1, 1], np.eye(3)[[1, 1, 1]], 3))
    assert math.isnan(auroc_macro_ovr([0, 0], [0.2, 0.9], 2))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        auroc_macro_ovr([0, 1], np.ones((2, 2)), 3)
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        auroc_macro_ovr([0, 2], [0.1, 0.2], 2)


def test_balanced_accuracy_and_report():
    # recall class 0 = 2/3, class 1 = 1/1 -> 5/6
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(5 / 6)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    report = classification_report_dict([0, 0, 0, 1], probs, 2)
    assert set(report) == {"auroc", "balanced_accuracy"}
    assert report["balanced_accuracy"] == pytest.approx(5 / 6)
    assert report["auroc"] == pytest.approx(1.0)  # 0.7 above all three negatives


def test_dice_known_cases():
    a = np.zeros((4, 4), np.uint8)
    a[0, :4] = 1
    b = np.zeros((4, 4), np.uint8)
    b[0, 2:4] = 1
    b[1, 0:2] = 1  # 4 px each, 2 shared -> 2*2/(4+4)
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a, np.roll(a, 2, axis=0)) == 0.0
    empty = np.zeros((4, 4))
    assert dice(empty, empty) == 1.0  # both empty: defined as 1
    assert dice(a, empty) == 0.0  # prediction on an empty truth
    batch_pred, batch_true = np.stack([a, a, empty]), np.stack([b, a, empty])
    assert dice(batch_pred, batch_true) == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert dice(a * 255, b) == pytest.approx(0.5)  # nonzero counts as foreground


def test_dice_accepts_tensors_and_rejects_shape_mismatch():
    import torch

    a = torch.zeros(2, 1, 8, 8)
    a[:, :, 2:6, 2:6] = 1
    assert dice(a, a.numpy()) == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))


def test_hc_mae():
    assert hc_mae_mm([100.0, 200.0, 150.0], [101.0, 197.0, 150.0]) == pytest.approx(4.0 / 3)
    assert math.isnan(hc_mae_mm([], []))


def test_metrics_and_hc_import_without_torch():
    code = (
        "import sys, echocare.metrics, echocare.hc; assert 'torch' not in sys.modules\n"
        "print(echocare.metrics.hc_mae_mm([1.0], [2.0]), echocare.metrics.balanced_accuracy([0, 1], [0, 0]), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.0", "0.5", "False"]
