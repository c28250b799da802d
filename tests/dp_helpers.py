"""DP test helpers shared by several test folders (tests/ is on sys.path through its conftest)."""

from __future__ import annotations


def independent_epsilon(history, delta):
    """Google's dp-accounting (not Opacus) on the logged (sigma, q, steps)."""
    import dp_accounting

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    acc = dp_accounting.rdp.RdpAccountant(orders)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)
