"""A crafted head that overflows for ONE image must not decide what the site releases.

The coordinator picks weights so that only images whose feature exceeds a threshold give infinite
logits. Before the fix, that image's NaN clip factor turned the whole (noisy) gradient sum into NaN,
and its evaluation row into an exception answered without a charge: one image decided a release, which
no noise hides (found by playing the coordinator; docs/privacy.md). Now such an example contributes
zero, exactly as if it had not been sampled, and a head holding NaN/inf is refused before any data is read.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed.dp import linear_clipped_sum, linear_input_factor
from fed.task import RoundConfig, bad_numbers, classify_contributions, finite_arrays


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
    rows = classify_contributions(logits, y, 3)
    assert torch.isfinite(rows).all()
    assert rows[1].abs().sum() == 0 and rows[2].abs().sum() == 0
    torch.testing.assert_close(rows[[0, 3]], classify_contributions(logits[[0, 3]], y[[0, 3]], 3))


def test_a_head_with_nan_or_inf_is_refused_before_any_data():
    assert finite_arrays({"w": np.ones((2, 2), np.float32)})
    assert not finite_arrays({"w": np.array([[1.0, np.nan]], np.float32)})
    assert not finite_arrays({"w": np.ones(2, np.float32), "b": np.array([np.inf], np.float32)})


def test_non_finite_or_absurd_coordinator_numbers_are_refused_before_the_ledger():
    assert bad_numbers(RoundConfig()) == ""
    for change in ({"noise_multiplier": float("inf")}, {"noise_multiplier": float("nan")}, {"lr": float("inf")},
                   {"max_grad_norm": float("nan")}, {"noise_multiplier": 1e300}, {"batch_size": 0}, {"num_rounds": 0}):
        cfg = RoundConfig(**change)
        assert bad_numbers(cfg), change


@pytest.mark.parametrize("path", [dict(grad_sample_mode="ghost"), dict(grad_sample_mode="hooks"),
                                  dict(grad_sample_mode="ghost", dropout=0.2)], ids=["ghost", "hooks", "dropout"])
def test_a_hidden_head_that_overflows_for_one_image_still_releases_finite_weights(path):
    """The Opacus path (heads with a hidden layer): the crafted head overflows only for the image
    whose feature 0 is large; that image contributes zero and the release is finite, as on the
    linear path (before: its NaN clip factor made every released weight NaN)."""
    from fed.dp import DPConfig, train_head

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    x[:, 0] = x[:, 0].clamp(-3, 3)
    x[7, 0] = 1e3  # the one image the coordinator targets
    y = torch.randint(0, 3, (40,), generator=g)
    dropout = path.pop("dropout", 0.0)
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(4, 3))
    with torch.no_grad():
        head[0].weight[0].zero_()
        head[0].weight[0, 0] = 1e36  # feature 0 = 1e3 overflows float32; |feature| <= 3 stays finite
        head[0].bias[0] = 0.0
        assert not torch.isfinite(head(x[7:8])).all() and torch.isfinite(head(torch.cat([x[:7], x[8:]]))).all()
    train_head(head, x, y, DPConfig(epochs=1, batch_size=40, lr=0.1, noise_multiplier=1.0, fast_linear=False, **path))
    assert all(torch.isfinite(p).all() for p in head.parameters())
