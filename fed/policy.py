"""Site policy: what a hospital allows, written by the hospital, read only on the hospital side.

The coordinator's run config may ask for *less* than the policy allows, never more. An instruction
outside the policy is refused with a reason that travels back in the reply (not a crash).

A policy is a small TOML file whose path the SuperNode receives through its node config
(``flower-supernode --node-config 'policy="/etc/echofleet/policy.toml"'``)::

    site_name = "hospital-a"            # pseudonym shown in the coordinator's report
    data = "busi:/data/BUSI"            # data spec (never leaves the site)
    state_dir = "/var/lib/echofleet"    # feature cache + privacy ledger
    allowed_tasks = ["classify"]
    target_epsilon = 8.0                # total privacy budget for one federated run
    delta = 1e-5                        # default: below 1/N for N local images
    max_local_epochs = 2
    device = "auto"                     # auto: CUDA when present, else CPU
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

TASKS = ("classify", "segment", "hc")


class PolicyError(ValueError):
    """The policy file is missing or invalid (message names the file and the field)."""


@dataclass(frozen=True)
class SitePolicy:
    """A hospital's limits for federated training.

    Privacy meaning of the fields:

    - ``target_epsilon``: the most privacy loss (epsilon of (epsilon, delta)-DP, example-level,
      cumulative over all rounds of one run) the site will spend. When the next round would exceed
      it, the site answers "budget exhausted" and trains no more.
    - ``delta``: the delta of the guarantee; ``None`` means ``min(1e-5, 0.1 / N)`` for N local
      training images, i.e. well below 1/N.
    - ``max_grad_norm`` (optional cap): per-example gradient clipping bound the site accepts at most.
    """

    data: str
    site_name: str = "site"
    state_dir: str = "echofleet-site-state"
    allowed_tasks: tuple[str, ...] = ("classify",)
    target_epsilon: float = 8.0
    delta: float | None = None
    max_local_epochs: int = 5
    device: str = "auto"
    # Simulation only: which share of ``data`` this simulated hospital holds.
    partition: str | None = None  # "iid" | "dirichlet:ALPHA" | "by-device"
    partition_index: int = 0
    partition_count: int = 1
    partition_seed: int = 0
    cache_dir: str | None = None  # default: <state_dir>/features

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_tasks", tuple(self.allowed_tasks))
        bad = [t for t in self.allowed_tasks if t not in TASKS]
        if bad:
            raise PolicyError(f"allowed_tasks has unknown task(s) {bad}; known: {list(TASKS)}")
        if not self.target_epsilon > 0:
            raise PolicyError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise PolicyError(f"delta must be in (0, 1), got {self.delta}")
        if self.max_local_epochs < 1:
            raise PolicyError(f"max_local_epochs must be >= 1, got {self.max_local_epochs}")

    @property
    def features_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.state_dir) / "features"

    def delta_for(self, n_train: int) -> float:
        """The delta used for a site with ``n_train`` training images (policy value or < 1/N)."""
        return self.delta if self.delta is not None else min(1e-5, 0.1 / max(1, n_train))

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


def load_policy(path: str | Path) -> SitePolicy:
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"site policy {path} not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"site policy {path} is not valid TOML: {e}") from e
    known = set(SitePolicy.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PolicyError(f"site policy {path}: unknown field(s) {unknown}; known: {sorted(known)}")
    if "data" not in raw:
        raise PolicyError(f"site policy {path}: 'data' (a data spec) is required")
    try:
        return SitePolicy(**raw)
    except (TypeError, PolicyError) as e:
        raise PolicyError(f"site policy {path}: {e}") from e


def write_policy(policy: SitePolicy, path: str | Path) -> Path:
    """Write a policy as TOML (used by the simulation to lay out its virtual hospitals)."""

    def fmt(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {fmt(v)}\n" for k, v in policy.to_dict().items()))
    return path


@dataclass
class Instruction:
    """What the coordinator asks for in one round (from its run config)."""

    task: str
    local_epochs: int
    max_grad_norm: float


def refusal_reason(policy: SitePolicy, ins: Instruction) -> str | None:
    """Why the site refuses ``ins``, or None when it is within the policy."""
    if ins.task not in policy.allowed_tasks:
        return f"task '{ins.task}' is not allowed by this site's policy (allowed: {list(policy.allowed_tasks)})"
    if ins.local_epochs > policy.max_local_epochs:
        return f"local_epochs={ins.local_epochs} exceeds this site's max_local_epochs={policy.max_local_epochs}"
    return None
