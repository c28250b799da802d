"""A crafted head that overflows for ONE image must not decide what the site releases.

The coordinator picks weights so that only images whose feature exceeds a threshold give infinite
logits. Before the fix, that image's NaN clip factor turned the whole (noisy) gradient sum into NaN,
and its evaluation row into an exception answered without a charge: one image decided a release, which
no noise hides (found by playing the coordinator; docs/privacy.md). Now such an example contributes
zero, exactly as if it had not been sampled, and a head holding NaN/inf is refused before any data is read.
"""

from __future__ import annotations

import numpy as np
import torch

from fed.dp import linear_clipped_sum, linear_input_factor
from fed.task import RoundConfig, _bad_numbers, _classify_contributions, _finite_arrays


def _crafted(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of class 0 overflow to +inf exactly for rows whose feature 0 exceeds ``threshold``."""
    w = torch.zeros(3, x.shape[1])
    w[0, 0] = 3e38
    b = torch.tensor([-3e38 * threshold, 0.0, 0.0])
    return w, b


def test_one_overflowing_example_contributes_nothing_to_the_clipped_sum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    top = int(x[:, 0].argmax())
    threshold = float((x[:, 0].max() + x[:, 0].sort().values[-2]) / 2)  # only the top image overflows
    w, b = _crafted(x, threshold)
    with torch.no_grad():
        assert not torch.isfinite(torch.softmax(x @ w.T + b, 1)[top]).all()  # the attack does overflow that row
    gw, gb, _ = linear_clipped_sum(w, b, x, linear_input_factor(x), y, 1.0)
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all()
    keep = torch.arange(16) != top
    rw, rb, _ = linear_clipped_sum(w, b, x[keep], linear_input_factor(x[keep]), y[keep], 1.0)
    torch.testing.assert_close(gw, rw)  # exactly the sum without that image: sensitivity stays C
    torch.testing.assert_close(gb, rb)


def test_one_overflowing_image_gives_a_zero_evaluation_row():
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("inf"), 0.0, 0.0], [float("nan"), 0.0, 0.0], [2.0, 1.0, 0.0]])
    y = torch.tensor([2, 0, 1, 0])
    rows = _classify_contributions(logits, y, 3)
    assert torch.isfinite(rows).all()
    assert rows[1].abs().sum() == 0 and rows[2].abs().sum() == 0
    torch.testing.assert_close(rows[[0, 3]], _classify_contributions(logits[[0, 3]], y[[0, 3]], 3))


def test_a_head_with_nan_or_inf_is_refused_before_any_data():
    assert _finite_arrays({"w": np.ones((2, 2), np.float32)})
    assert not _finite_arrays({"w": np.array([[1.0, np.nan]], np.float32)})
    assert not _finite_arrays({"w": np.ones(2, np.float32), "b": np.array([np.inf], np.float32)})


def test_non_finite_or_absurd_coordinator_numbers_are_refused_before_the_ledger():
    assert _bad_numbers(RoundConfig()) == ""
    for change in ({"noise_multiplier": float("inf")}, {"noise_multiplier": float("nan")}, {"lr": float("inf")},
                   {"max_grad_norm": float("nan")}, {"noise_multiplier": 1e300}, {"batch_size": 0}, {"num_rounds": 0}):
        cfg = RoundConfig(**change)
        assert _bad_numbers(cfg), change
