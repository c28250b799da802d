"""Site policy: what a hospital allows, written by the hospital, read only on the hospital side.

The coordinator's run config may ask for *less* than the policy allows, never more. An instruction
outside the policy is refused with a reason that travels back in the reply (not a crash).

A policy is a small TOML file whose path the SuperNode receives through its node config
(``flower-supernode --node-config 'policy="/etc/echofleet/policy.toml"'``)::

    site_name = "hospital-a"            # pseudonym shown in the coordinator's report
    data = "busi:/data/BUSI"            # data spec (never leaves the site)
    state_dir = "/var/lib/echofleet"    # feature cache, lifetime privacy ledger, stored replies
    allowed_tasks = ["classify"]
    target_epsilon = 8.0                # LIFETIME privacy budget of this dataset, over all runs
    delta = 1e-5                        # must be below 1/N (default: a power of ten <= min(1e-5, 0.1/N))
    privacy_unit = "auto"               # "patient" | "image" | "auto" (patient when the data names patients)
    size_classes_per_doubling = 4       # the site's size is disclosed only as its class (N floored to 2^(k/4))
    min_noise_multiplier = 0.5          # the least DP-SGD noise the site accepts from a coordinator
    max_local_epochs = 2
    max_grad_norm = 1.0                 # the largest clipping bound a coordinator may ask for
    evaluation = "accounted"            # or "disclosed": exact metrics, a documented disclosure
    encoder_checkpoint = ""             # this site's copy of the released encoder weights ("" = none)
    device = "auto"                     # auto: CUDA when present, else CPU

See docs/privacy.md for the threat model these fields serve.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: JetPack 6 (Jetson) ships it, and its TensorRT bindings are built for it
    import tomli as tomllib

TASKS = ("classify", "segment", "hc")
EVALUATION_MODES = ("accounted", "disclosed")
PRIVACY_UNITS = ("auto", "patient", "image")


class PolicyError(ValueError):
    """The policy file is missing or invalid (message names the file and the field)."""


@dataclass(frozen=True)
class SitePolicy:
    """A hospital's limits for federated training.

    Privacy meaning of the fields:

    - ``privacy_unit``: what one neighbouring dataset differs by. ``"patient"``: user-level DP (all
      of one patient's images; needs a patient identity for every image: DICOM PatientID, an HC18
      patient, a CSV ``patient`` column); ``"image"``: one image (a patient with k images is then
      protected roughly k times more weakly); ``"auto"`` (default): patient when every image has a
      patient identity, else image. Every statement of the guarantee names the unit.
    - ``target_epsilon``: the most privacy loss (epsilon of (epsilon, delta)-DP, per privacy unit) the
      site will ever spend on this dataset: the lifetime total over every run and every release
      (training rounds and accounted evaluations), whatever run key or round the coordinator claims.
      When the next release would exceed it, the site answers "budget exhausted".
    - ``delta``: the delta of the guarantee, which must be below 1/N for the site's N units (patients
      or images; else the site refuses), checked for the largest N of the site's size class so that
      the refusal tells only the class (:meth:`delta_problem`); ``None`` means the largest power
      of ten not above ``min(1e-5, 0.1 / N)``: a released delta then tells only N's order of magnitude, not N.
    - ``size_classes_per_doubling`` (g, default 4): DP-SGD samples and steps as if the site had
      ``N_pub`` units, its number N of privacy units (patients or images, whole dataset: training
      and validation split, every label) rounded **down** to the public grid ``floor(2^(k/g))``
      (:func:`size_class`): sampling rate ``q = min(1, B / N_pub)``, ``epochs * ceil(N_pub / B)``
      steps a round, the noisy sum divided by ``q * N_pub``. Everything a reply carries (the
      update's noise scale, epsilon and its bucket over rounds, the exhaustion round, the default
      delta) is then a function of public values and ``N_pub``: **the coordinator can learn which
      class N is in, nothing finer**. Classes are ``2^(1/g)`` apart (g = 4: about 19 %; g = 1:
      powers of two); a larger g spends a little less epsilon and discloses N more finely. With
      ``disclose_accounting`` the exact N is used instead (it is disclosed anyway).
    - ``max_grad_norm`` (optional cap): the largest per-unit clipping bound the site accepts.
    - ``min_noise_multiplier``: the least DP-SGD noise multiplier the site accepts when the
      coordinator fixes one (its calibrated sigma is never below it either). It bounds what one
      release can spend: with a tiny sigma a single (correctly charged) round could otherwise use
      the site's whole remaining lifetime budget. ``0`` disables the floor.
    - ``evaluation``: ``"accounted"`` (default): evaluation metrics are noisy (Gaussian noise with
      ``evaluation_noise_multiplier``) and charged to the ledger; ``"disclosed"``: exact metrics, at
      most ``disclosed_evaluations_per_run`` per run key and ``disclosed_evaluations_lifetime`` in
      all (the run key is the coordinator's claim; the lifetime limit is not), each logged in the
      ledger (a disclosure the hospital chooses, not a DP guarantee).
    - ``disclose_accounting``: also send the accountant's inputs (noise multiplier, sampling rate,
      steps), which reveal the number of training units; DP-SGD then samples at the exact ``B/N``
      (no size class: a slightly tighter budget). Default: only epsilon and delta leave.
    - ``projection_reference``: the public reference images (a data spec) from which this site
      recomputes a classification head's fixed projection to verify it before evaluating.
    - ``require_secure_aggregation``: train only inside SecAgg+ rounds (the coordinator then sees
      only the sum of the sites' updates); a plain training request is refused (fed/secagg.py).
    - ``calibration`` (default true): take part in federated INT8 calibration of edge builds
      (edge/federated/site.py): each request is one Gaussian release of activation histograms of
      the training split (one image's contribution bounded, noise multiplier
      ``evaluation_noise_multiplier``), charged to the lifetime ledger; false: such requests are refused.
    - ``acceptance`` (default true) and ``release_pubkey``: take part in federated acceptance of a
      candidate edge build (edge/federated/accept.py). The site runs a candidate only when it verifies
      against ``release_pubkey`` (a PEM file: the release key this site pins; "" means it runs none,
      whatever ``acceptance`` says), so its validation images meet only builds the release authority
      signed. Each request is one release about its validation split: the gate metric's difference
      (candidate - FP32), noisy and charged to the lifetime ledger (``evaluation = "accounted"``:
      noise multiplier ``evaluation_noise_multiplier``) or exact and counted against the disclosed-
      evaluation limits (``evaluation = "disclosed"``); false: such requests are refused.
    - ``encoder_checkpoint``: the path (or ``hf://`` name) of this site's copy of the released
      encoder weights; ``""`` (default): none, the site takes part only in runs on the seeded random
      initialisation. The only checkpoint file the site ever opens: a run that names a checkpoint
      gets this file, checked against the run's pinned sha256; the path the run names is ignored,
      and a run naming one at a site without this field is refused before any file is touched
      (``fed.task.site_encoder``). Privacy meaning: the coordinator cannot make the site open,
      hash or time any file of its choosing (a file-hash oracle, the answer time growing with the
      named file's size, ``hf://`` names probing the site's model cache).
    - ``insecure_deterministic_noise``: TESTS ONLY. DP noise and sampling are seeded from values the
      coordinator knows, so it can remove the noise: nothing this site releases is private, and
      every reply, ledger entry and report says so.
    """

    data: str
    site_name: str = "site"
    state_dir: str = "echofleet-site-state"
    allowed_tasks: tuple[str, ...] = ("classify",)
    target_epsilon: float = 8.0
    delta: float | None = None
    privacy_unit: str = "auto"
    size_classes_per_doubling: int = 4
    min_noise_multiplier: float = 0.5
    max_local_epochs: int = 5
    max_grad_norm: float | None = None
    evaluation: str = "accounted"
    evaluation_noise_multiplier: float = 8.0
    disclosed_evaluations_per_run: int = 12
    disclosed_evaluations_lifetime: int = 120
    disclose_accounting: bool = False
    insecure_deterministic_noise: bool = False
    projection_reference: str = ""  # public images a head's projection must come from ("": echofleet's default phantoms)
    require_secure_aggregation: bool = False  # refuse plain training rounds (fed/secagg.py)
    calibration: bool = True  # answer federated calibration requests (a charged, noisy release)
    acceptance: bool = True  # answer federated acceptance requests (only for builds signed with release_pubkey)
    release_pubkey: str = ""  # the pinned release public key (PEM path); "": this site runs no candidate build
    encoder_checkpoint: str = ""  # this site's released encoder weights (path or hf://); "": random-init runs only
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
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise PolicyError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.evaluation not in EVALUATION_MODES:
            raise PolicyError(f"evaluation must be one of {list(EVALUATION_MODES)}, got {self.evaluation!r}")
        if not self.evaluation_noise_multiplier > 0:
            raise PolicyError(f"evaluation_noise_multiplier must be > 0, got {self.evaluation_noise_multiplier}")
        if self.privacy_unit not in PRIVACY_UNITS:
            raise PolicyError(f"privacy_unit must be one of {list(PRIVACY_UNITS)}, got {self.privacy_unit!r}")
        if not (isinstance(self.size_classes_per_doubling, int) and 1 <= self.size_classes_per_doubling <= 64):
            raise PolicyError(f"size_classes_per_doubling must be an integer in [1, 64], got {self.size_classes_per_doubling!r}")
        if not 0 <= self.min_noise_multiplier <= 1e4:
            raise PolicyError(f"min_noise_multiplier must be in [0, 10000], got {self.min_noise_multiplier}")
        if self.disclosed_evaluations_lifetime < 0:
            raise PolicyError(f"disclosed_evaluations_lifetime must be >= 0, got {self.disclosed_evaluations_lifetime}")
        if self.disclosed_evaluations_per_run < 0:
            raise PolicyError(f"disclosed_evaluations_per_run must be >= 0, got {self.disclosed_evaluations_per_run}")
        from echocare.device import parse_request  # torch-free

        try:
            parse_request(self.device)
        except ValueError as e:
            raise PolicyError(str(e)) from None

    @property
    def features_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.state_dir) / "features"

    def delta_for(self, n: int) -> float:
        """The delta for a site with ``n`` privacy units (policy value, or the largest power of ten
        not above ``min(1e-5, 0.1/N)``: on a fixed grid, so that a released delta does not reveal N)."""
        return self.delta if self.delta is not None else delta_on_grid(min(1e-5, 0.1 / max(1, n)))

    def sampling_units(self, n: int) -> int:
        """The number of units DP-SGD's sampling rate and steps are computed from for a site with
        ``n`` privacy units: its public size class, or ``n`` itself when the policy discloses its
        accounting (which reveals N anyway)."""
        return max(1, n) if self.disclose_accounting else size_class(n, self.size_classes_per_doubling)

    def delta_problem(self, n: int, delta: float | None = None, unit: str = "image") -> str | None:
        """Why ``delta`` (default: this policy's) is not acceptable for ``n`` units, or None. The message
        names N: for the site's log, not for a reply.

        Privacy meaning: delta must be below 1/N. The refusal is a reply the coordinator sees, so it is
        decided on the size class, never on N itself: delta must be below 1/N_top, N_top the largest N of
        the site's class (:func:`size_class_top`). That is stricter than 1/N (N <= N_top) and the same for
        every site in one class; checked on the exact N, a policy delta with 1/delta inside a class told
        the coordinator on which side of 1/delta N lies (a bit finer than the class). With
        ``disclose_accounting`` (N is disclosed anyway) the exact N is used."""
        delta = self.delta_for(self.sampling_units(n)) if delta is None else delta
        top = max(1, n) if self.disclose_accounting else size_class_top(n, self.size_classes_per_doubling)
        if delta >= 1.0 / top:
            return (f"delta {delta:g} is not below 1/N_top = {1.0 / top:g} for this site's N = {n} {unit}s "
                    f"(size class {self.sampling_units(n)}..{top})")
        return None

    @property
    def data_identity(self) -> str:
        """What the lifetime ledger is keyed by: the site's dataset (spec and share), never the
        coordinator's run key."""
        ident = json.dumps([self.data, self.partition, self.partition_index, self.partition_count, self.partition_seed])
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    @property
    def ledger_path(self) -> Path:
        return Path(self.state_dir) / "ledger" / f"{self.data_identity}.json"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


def delta_on_grid(delta: float) -> float:
    """The largest power of ten not above ``delta`` (1e-5, 1e-6, ...)."""
    exponent = math.floor(math.log10(delta) + 1e-9)
    return float(f"1e{exponent}")


def size_class(n: int, per_doubling: int) -> int:
    """``n`` rounded **down** to the public grid ``floor(2^(k / per_doubling))``, k = 0, 1, ... (at
    least 1). Two sites in one class are indistinguishable by anything computed from the class."""
    if per_doubling < 1:
        raise ValueError(f"size classes per doubling must be >= 1, got {per_doubling}")
    if n < 2:
        return 1
    k = math.floor(per_doubling * math.log2(n))
    while math.floor(2.0 ** ((k + 1) / per_doubling)) <= n:  # guard against rounding in log2
        k += 1
    while math.floor(2.0 ** (k / per_doubling)) > n:
        k -= 1
    return math.floor(2.0 ** (k / per_doubling))


def size_class_top(n: int, per_doubling: int) -> int:
    """The largest N in ``n``'s size class (:func:`size_class`): one below the next value of the grid.
    Every site in one class has the same top, so a decision on it tells only the class."""
    low = size_class(n, per_doubling)
    k = math.floor(per_doubling * math.log2(low)) if low > 1 else 0
    while math.floor(2.0 ** (k / per_doubling)) <= low:
        k += 1
    return math.floor(2.0 ** (k / per_doubling)) - 1


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
        policy = SitePolicy(**raw)
    except (TypeError, PolicyError) as e:
        raise PolicyError(f"site policy {path}: {e}") from e
    check_device(policy, str(path))
    return policy


def check_device(policy: SitePolicy, where: str = "site policy") -> None:
    """An explicit ``cuda``/``cuda:N`` device must be usable on this machine: checked when the policy
    is loaded, before any round, so a site fails with the reason instead of mid-round. ``auto`` and
    ``cpu`` always work (``auto`` falls back to the CPU and says so in the site's log)."""
    from echocare.device import DeviceError, parse_request, resolve_device

    if parse_request(policy.device)[0] != "cuda":
        return
    try:
        resolve_device(policy.device)
    except DeviceError as e:
        raise PolicyError(f"{where}: device: {e}") from None


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
    if policy.max_grad_norm is not None and ins.max_grad_norm > policy.max_grad_norm:
        return f"max_grad_norm={ins.max_grad_norm:g} exceeds this site's cap of {policy.max_grad_norm:g}"
    if not ins.max_grad_norm > 0:
        return f"max_grad_norm must be > 0, got {ins.max_grad_norm:g}"
    return None
