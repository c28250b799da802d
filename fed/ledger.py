"""The site's lifetime privacy ledger: every release it ever made from one dataset, on its own disk.

Privacy meaning (see docs/privacy.md): the ledger is the site's proof of how much privacy it spent,
and the site (not the coordinator) owns it.

- **One ledger per site and dataset, across runs**: it lives under the policy's state directory,
  named after the site's data identity, never after the coordinator's run key. The run key and the
  round number the coordinator claims are labels on each release, nothing more.
- **One unit of privacy per ledger**: every release records its unit (``"patient"``: user-level
  DP, a patient's images sampled, clipped and noised together; ``"image"``: example-level). A
  ledger's releases all share one unit (:meth:`PrivacyLedger.unit_problem`): a per-patient epsilon
  and a per-image epsilon do not compose into either guarantee.
- **Every release is charged**, whatever run or round it claims: a DP-SGD round ``(sigma, q,
  steps)``, an accounted evaluation (one unsampled Gaussian release: ``q = 1``, ``steps = 1``). The
  RDP accountant composes all of them; epsilon is the lifetime total and the policy's budget bounds it.
- **An identical re-delivered request gets its stored reply** (:class:`ReplyStore`, keyed by the
  hash of the request's arrays and config) with no new charge: a coordinator that crashed and
  resumed gets exactly what it got before, and two replies to one request never differ.
- **Durable and serialised**: :func:`locked_ledger` holds an exclusive ``fcntl`` lock from the
  budget check to the record; writes are atomic (``echocare.atomic``) with a directory fsync; the
  charge is written before the reply is stored and sent (a crash over-charges, never under-charges).
"""

from __future__ import annotations

import fcntl
import io
import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from echocare.atomic import atomic_write_bytes, fsync_dir

ACCOUNTANT = "rdp"
FORMAT = "echofleet-site-ledger/1"


@lru_cache(maxsize=256)
def _rdp_per_step(q: float, sigma: float):
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def epsilon_of(history, delta: float) -> float:
    """Epsilon at ``delta`` of composed Gaussian releases ``(sigma, q, steps)`` — Opacus' RDP
    accountant (same orders): RDP adds up over steps and releases, then converts to (epsilon, delta) once."""
    from opacus.accountants.analysis.rdp import get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    history = [h for h in history if h[2] > 0]
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
def calibrate_noise(target_epsilon: float, delta: float, q: float, steps: int, tolerance: float = 0.01,
                    base: tuple[tuple[float, float, int], ...] = ()) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon) that keeps ``steps`` DP-SGD steps at
    sampling rate ``q``, composed with the releases ``base`` (already spent or planned at a fixed
    sigma), within (``target_epsilon``, ``delta``).

    Privacy meaning: the returned sigma never overshoots the target (the search keeps the upper end
    of its bracket). Same search as Opacus' ``get_noise_multiplier``, but on the memoised per-step
    RDP, so each candidate sigma costs one RDP evaluation whatever ``steps`` is. Memoised: virtual
    sites of a simulation that share a process and the same inputs calibrate once.
    """
    if not (target_epsilon > 0 and 0 < delta < 1 and 0 < q <= 1 and steps > 0):
        raise ValueError(f"cannot calibrate noise for epsilon={target_epsilon}, delta={delta}, q={q}, steps={steps}")
    eps = lambda sigma: epsilon_of([*base, (sigma, q, steps)], delta)  # noqa: E731
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Release:
    """One Gaussian release charged to the ledger: ``steps`` noisy steps at sampling rate
    ``sample_rate`` with noise multiplier ``noise_multiplier`` (an evaluation: 1.0 and 1)."""

    kind: str  # "train" | "evaluate"
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float = 0.0  # train: the clipping bound C; evaluate: the L2 sensitivity
    run: str = ""  # the coordinator's run key: a label, not how the ledger is keyed
    round: int = 0  # the round number the coordinator claimed: a label
    request: str = ""  # hash of the request (arrays + config) this release answered
    private: bool = True  # False: insecure deterministic noise (tests only): NOT private
    time: str = ""
    unit: str = "image"  # the unit of privacy: "patient" (user-level DP) or "image"; sample_rate is over these units


@dataclass
class Disclosure:
    """An exact (not DP) result the site's policy chose to disclose, e.g. an exact evaluation."""

    kind: str
    run: str
    round: int
    request: str
    time: str = ""


@dataclass
class PrivacyLedger:
    """The lifetime (epsilon, delta) of one site's dataset."""

    path: Path
    delta: float
    budget_epsilon: float
    releases: list[Release] = field(default_factory=list)
    disclosures: list[Disclosure] = field(default_factory=list)
    plans: dict[str, float] = field(default_factory=dict)  # run key -> planned noise multiplier

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, delta: float, budget_epsilon: float) -> "PrivacyLedger":
        """Load the ledger at ``path`` or start an empty one. ``delta`` is fixed at creation."""
        path = Path(path)
        if not path.exists():
            return cls(path, delta, budget_epsilon)
        try:
            raw = json.loads(path.read_text())
            return cls(path, float(raw["delta"]), budget_epsilon, [Release(**r) for r in raw["releases"]],
                       [Disclosure(**d) for d in raw.get("disclosures", [])],
                       {str(k): float(v) for k, v in raw.get("plans", {}).items()})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RuntimeError(f"privacy ledger {path} is corrupt ({e}); refusing to release anything without it") from e

    @classmethod
    def load(cls, path: str | Path) -> "PrivacyLedger":
        """An existing ledger as written (its own delta and budget), for auditing."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"privacy ledger {path} not found")
        try:
            budget = float(json.loads(path.read_text())["budget_epsilon"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RuntimeError(f"privacy ledger {path} is corrupt ({e})") from e
        return cls.open(path, 0.0, budget)

    def to_dict(self) -> dict:
        """What ``echofleet site ledger --json`` prints: enough to recompose epsilon independently."""
        return {"format": FORMAT, "accountant": ACCOUNTANT, "epsilon": self.epsilon(), "delta": self.delta,
                "unit": self.unit, "budget_epsilon": self.budget_epsilon, "private": all(r.private for r in self.releases),
                "releases": [asdict(r) for r in self.releases],
                "disclosures": [asdict(d) for d in self.disclosures], "plans": self.plans}

    def save(self) -> None:
        """Atomic, durable write (file and directory fsynced): a crash leaves the previous ledger intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        data.pop("epsilon")  # derived; recomputed on reading
        data.pop("unit")
        atomic_write_bytes(self.path, json.dumps(data, indent=1).encode(), 0o600)
        fsync_dir(self.path.parent)

    # -- accounting ------------------------------------------------------------------------------
    def history(self, *extra: Release) -> list[tuple[float, float, int]]:
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in (*self.releases, *extra) if r.steps > 0]

    def epsilon(self, *extra: Release) -> float:
        """Lifetime epsilon at ``self.delta`` (optionally with prospective releases)."""
        return epsilon_of(self.history(*extra), self.delta)

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.releases if r.kind == "train")

    def would_exceed(self, *release: Release) -> bool:
        return self.epsilon(*release) > self.budget_epsilon * (1 + 1e-9)

    def charge(self, release: Release) -> None:
        """Record a release durably, before its result leaves the site. Every call is a new release."""
        release.time = release.time or _now()
        self.releases.append(release)
        self.save()

    def disclose(self, disclosure: Disclosure) -> None:
        disclosure.time = disclosure.time or _now()
        self.disclosures.append(disclosure)
        self.save()

    def disclosed_in_run(self, kind: str, run: str) -> int:
        return sum(1 for d in self.disclosures if d.kind == kind and d.run == run)

    def disclosed(self, kind: str | None = None) -> int:
        """Disclosures of ``kind`` (None: of every kind) over the ledger's lifetime, whatever run key
        they claimed. The policy's lifetime limit counts every kind: an exact acceptance result is an
        exact evaluation of the same validation split."""
        return sum(1 for d in self.disclosures if kind is None or d.kind == kind)

    @property
    def unit(self) -> str:
        """The unit of privacy of every release so far ("patient" or "image"; "image" when empty)."""
        return self.releases[0].unit if self.releases else "image"

    def unit_problem(self, unit: str) -> str | None:
        """Why a release with privacy unit ``unit`` cannot join this ledger, or None. Per-patient and
        per-image releases do not compose into one guarantee (removing one image of a patient who
        stays changes a per-patient clipped sum by up to 2C), so a ledger keeps the unit it began with."""
        if self.releases and unit != self.unit:
            return (f"this site's lifetime ledger accounts per {self.unit} (its earlier releases); a per-{unit} release "
                    f"cannot be composed with them: set privacy_unit = \"{self.unit}\" in the site policy")
        return None

    def figures(self) -> dict:
        """The site's own figures: lifetime epsilon and delta, and the accountant's inputs of the
        last training release (those reveal N: they leave the site only if its policy discloses them)."""
        last = next((r for r in reversed(self.releases) if r.kind == "train"), None)
        return {"epsilon": self.epsilon(), "delta": self.delta, "unit": self.unit,
                "noise_multiplier": last.noise_multiplier if last else 0.0,
                "sample_rate": last.sample_rate if last else 0.0, "steps": self.steps}


@contextmanager
def locked_ledger(path: str | Path, delta: float, budget_epsilon: float) -> Iterator[PrivacyLedger]:
    """The ledger at ``path`` under an exclusive lock (``fcntl.flock`` on ``<path>.lock``), held
    until the block ends: check, release and record happen as one step for every process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield PrivacyLedger.open(path, delta, budget_epsilon)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class ReplyStore:
    """Replies the site already sent, by request hash (a folder beside the ledger).

    A stored reply is one ``.npz`` (arrays plus the reply's fields as JSON bytes, no pickle),
    written atomically after its release was charged."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, request: str) -> Path:
        if not request or not all(c in "0123456789abcdef" for c in request):
            raise ValueError(f"request hash {request!r} is not hex")
        return self.root / f"{request}.npz"

    def get(self, request: str) -> tuple[dict, dict[str, np.ndarray] | None] | None:
        path = self._path(request)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            fields = json.loads(bytes(z["__reply__"]).decode())
            arrays = {k[len("a/"):]: z[k] for k in z.files if k.startswith("a/")}
        return fields, (arrays if fields.pop("has_arrays") else None)

    def put(self, request: str, fields: dict, arrays: dict[str, np.ndarray] | None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        meta = np.frombuffer(json.dumps({**fields, "has_arrays": arrays is not None}).encode(), np.uint8)
        np.savez(buf, __reply__=meta, **{f"a/{k}": np.ascontiguousarray(v) for k, v in (arrays or {}).items()})
        atomic_write_bytes(self._path(request), buf.getvalue(), 0o600)
        fsync_dir(self.root)
