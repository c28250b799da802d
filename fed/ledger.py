"""The site's privacy ledger: every DP-SGD release it made in a run, persisted on its own disk.

Privacy meaning: the ledger is the site's proof of how much privacy it spent. It composes every
round's DP-SGD steps (Poisson sampling rate ``q``, noise multiplier ``sigma``, ``steps``) with the
RDP accountant, so the epsilon it reports is **cumulative over the whole run** and survives process
restarts (unlike the public Flower + Opacus example, which restarts its accountant every round).

A round that is executed again after a coordinator crash with the same seed releases exactly the
same update, so it replaces its earlier entry instead of being counted twice.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from echocare.atomic import atomic_write_bytes

ACCOUNTANT = "rdp"


@lru_cache(maxsize=256)
def _rdp_per_step(q: float, sigma: float):
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of composed DP-SGD runs ``(sigma, q, steps)`` — Opacus' RDP accountant
    (same orders): RDP adds up over steps and runs, then converts to (epsilon, delta) once."""
    from opacus.accountants.analysis.rdp import get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    if not history:
        return 0.0
    rdp = sum(_rdp_per_step(q, sigma) * steps for sigma, q, steps in history)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is then looser than it could be (a higher
        # epsilon is reported), never optimistic; not worth a warning per site and round.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, q: float, steps: int, tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon) that keeps ``steps`` DP-SGD steps at
    sampling rate ``q`` within (``target_epsilon``, ``delta``).

    Privacy meaning: the returned sigma never overshoots the target (the search keeps the upper end
    of its bracket). Same search as Opacus' ``get_noise_multiplier``, but on the memoised per-step
    RDP, so each candidate sigma costs one RDP evaluation whatever ``steps`` is, and the ledger's later
    epsilon checks at the chosen sigma are free. Memoised: virtual sites of a simulation that share a
    process and the same (q, steps, delta) calibrate once.
    """
    if not (target_epsilon > 0 and 0 < delta < 1 and 0 < q <= 1 and steps > 0):
        raise ValueError(f"cannot calibrate noise for epsilon={target_epsilon}, delta={delta}, q={q}, steps={steps}")
    eps = lambda sigma: epsilon_of([(sigma, q, steps)], delta)  # noqa: E731
    low, high = 0.0, 10.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"epsilon {target_epsilon} at delta {delta} is out of reach for q={q}, steps={steps}")
        eps_high = eps(high)
    while target_epsilon - eps_high > tolerance:
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid < target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


@dataclass
class Release:
    """One round's DP-SGD: ``steps`` noisy steps of sampling rate ``sample_rate``."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float


@dataclass
class PrivacyLedger:
    """Cumulative (epsilon, delta) of one site in one federated run."""

    path: Path
    delta: float
    budget_epsilon: float
    releases: list[Release] = field(default_factory=list)
    planned_noise_multiplier: float | None = None

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, delta: float, budget_epsilon: float) -> "PrivacyLedger":
        """Load the ledger at ``path`` or start an empty one. ``delta`` is fixed at creation."""
        path = Path(path)
        if path.exists():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise RuntimeError(f"privacy ledger {path} is corrupt ({e}); refusing to train without it") from e
            return cls(path, float(raw["delta"]), budget_epsilon, [Release(**r) for r in raw["releases"]],
                       raw.get("planned_noise_multiplier"))
        return cls(path, delta, budget_epsilon)

    def save(self) -> None:
        """Atomic write: a crash leaves the previous ledger intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"accountant": ACCOUNTANT, "delta": self.delta, "budget_epsilon": self.budget_epsilon,
                "planned_noise_multiplier": self.planned_noise_multiplier,
                "releases": [asdict(r) for r in self.releases]}
        atomic_write_bytes(self.path, json.dumps(data, indent=1).encode(), 0o600)

    # -- accounting ------------------------------------------------------------------------------
    def _history(self, extra: Release | None = None) -> list[tuple[float, float, int]]:
        rel = [r for r in self.releases if extra is None or r.round != extra.round]
        if extra is not None:
            rel.append(extra)
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in rel if r.steps > 0]

    def epsilon(self, extra: Release | None = None) -> float:
        """Cumulative epsilon at ``self.delta`` (optionally with a prospective release).

        The per-step RDP of each (sigma, q) is memoised, which keeps a site's check cheap even for
        large sampling rates."""
        return epsilon_of(self._history(extra), self.delta)

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.releases)

    def would_exceed(self, release: Release) -> bool:
        return self.epsilon(release) > self.budget_epsilon * (1 + 1e-9)

    def record(self, release: Release) -> None:
        self.releases = [r for r in self.releases if r.round != release.round] + [release]
        self.releases.sort(key=lambda r: r.round)
        self.save()

    def figures(self) -> dict:
        """The privacy figures a site reports (all numbers, safe to leave the site)."""
        last = self.releases[-1] if self.releases else None
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": last.noise_multiplier if last else 0.0,
            "sample_rate": last.sample_rate if last else 0.0,
            "steps": self.steps,
        }
