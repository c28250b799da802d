"""The run configuration of a federation: one typed dataclass, one field per key.

``[tool.flwr.app.config]`` in pyproject.toml is the truth that Flower reads (``flwr run .``);
:class:`RunConfig` mirrors it field for field (``num-server-rounds`` <-> ``num_server_rounds``)
with the same defaults, and tests/echofleet/test_config.py fails if the two ever disagree. Every
other place that needs a default (the coordinator, the round instructions sent to sites,
``echofleet simulate``'s options) reads it from here.

Reading a run config (:meth:`RunConfig.from_run_config`) is strict: an unknown key, a value of the
wrong type or out of range raises :class:`RunConfigError` naming the key.

The coordinator reads the run config; a hospital never trusts it: whatever the run config asks,
a site trains only within its own policy (fed/policy.py): its tasks, its epsilon budget, its
maximum number of local epochs.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fed.policy import TASKS

#: The data of a simulated hospital that has no policy: echofleet's phantom generator (synthetic
#: B-mode images from three emulated device vendors; no patient in them). ``echofleet simulate``
#: and ``flwr run .`` use it when no real data is named.
PHANTOM_DATA = "phantom:150?profiles=linear-a,convex-b,linear-c&seed=0"
#: What a run does (run-config key ``mode``): train a head, or release an edge build (calibration).
MODES = ("train", "release")


class RunConfigError(ValueError):
    """A run-config key is unknown, or its value has the wrong type or is out of range.

    The message names the key; ``key`` holds it (dashed), ``problem`` the message without the key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"run config: '{key}' {problem}")
        self.key, self.problem = key, problem


@dataclass(frozen=True)
class RunConfig:
    """Run config of a federation; field ``a_b`` is run-config key ``a-b`` (see the module docstring)."""

    # -- the federation -------------------------------------------------------------------------
    num_server_rounds: int = 3  # federated rounds (each: every selected site trains, then evaluates)
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg
    min_sites: int = 1  # fewer acceptable updates than this in a round: the global model stays
    num_sites: int = 0  # expected sites (population of central DP accounting); 0 = whatever connects
    seed: int = 0  # seed of the initial head, the sites' train/val splits, sampling and noise
    # -- the model: frozen EchoCare encoder + a small trainable task head ------------------------
    task: str = "classify"  # classify | segment | hc
    labels: str = "benign,malignant,normal"  # comma list of class names (classify)
    encoder_config: str = "echocare-tiny"  # echocare | echocare-small | echocare-tiny
    encoder_checkpoint: str = ""  # released encoder weights; "" = seeded random initialisation
    encoder_sha256: str = ""  # expected sha256 of the checkpoint ("" = computed from the file)
    encoder_seed: int = 0  # seed of the random initialisation when there is no checkpoint
    head_hidden: int = 0  # hidden width of the classification head (0: linear)
    # classify: a fixed whitening projection of the features, computed by the coordinator from
    # PUBLIC reference images only (never from site data); 0 = off. 128 measured better than 64 under DP
    # (docs/federation.md, "What helps under DP"); the reference set needs more images than dimensions
    feature_projection: int = 128
    projection_reference: str = ""  # data spec of the public reference images ("" = phantoms)
    public_cache_dir: str = ""  # where the coordinator caches public reference features ("" = RUN_DIR/public-features)
    # -- local training at each site: example-level DP-SGD ----------------------------------------
    local_epochs: int = 1  # asked per round; a site's policy may allow fewer (it then refuses)
    batch_size: int = 32  # expected batch size (Poisson sampling rate = batch / N)
    lr: float = 0.5  # local learning rate
    max_grad_norm: float = 1.0  # per-example clipping bound C (the sensitivity of each step)
    # epsilon of (epsilon, delta)-DP per site, example-level, for the WHOLE run; each site also
    # caps it with its own policy budget and stops training when the next round would exceed it
    target_epsilon: float = 8.0
    noise_multiplier: float = 0.0  # fixed sigma; 0 = each site calibrates sigma to target_epsilon over the rounds
    val_fraction: float = 0.2  # share of each site's data held out for the site's own evaluation
    # -- aggregation at the coordinator -----------------------------------------------------------
    max_update_norm: float = 0.0  # reject site updates farther than this from the global head (0: off)
    outlier_factor: float = 5.0  # reject updates farther than this x the round's median distance
    proximal_mu: float = 0.01  # FedProx only: pull of local training towards the global head
    server_lr: float = 0.1  # FedAdam only: server learning rate
    trim_beta: float = 0.2  # FedTrimmedAvg only: share trimmed at each end
    # central (user-level) DP: Flower's server-side fixed clipping + Gaussian noise on the
    # aggregate; neighbouring federations differ in one whole site. 0 = off (FedAvg only)
    central_dp_noise: float = 0.0
    central_dp_clip: float = 1.0  # clipping bound of each site's update for central DP
    # -- secure aggregation (Flower SecAgg+; server/coordinator/secagg.py, fed/secagg.py) --------------
    # Privacy meaning: the coordinator unmasks only the SUM of the sites' (already DP) updates; each site
    # clips its update to secagg_update_bound before masking, since no one can screen single updates.
    secure_aggregation: bool = False
    secagg_update_bound: float = 10.0  # L2 bound each site clips its update to before masking
    secagg_num_shares: float = 1.0  # share of the round's sites each site shares keys with
    secagg_reconstruction_threshold: float = 0.67  # share of those needed to unmask (> 0.5 for privacy)
    secagg_timeout: float = 3600.0  # seconds the coordinator waits at each of SecAgg+'s four stages
    # -- where things are written ---------------------------------------------------------------
    run_dir: str = "runs/federation"  # checkpoints, run report, global model (relative: to the working directory)
    resume: bool = False  # continue from the last completed round in run_dir (same config only)
    # local simulation only: where ``echofleet simulate`` laid out its virtual hospitals' policies
    # ("" under ``flwr run .``: each simulated site then uses a phantom default policy)
    sim_sites_dir: str = ""
    # -- what the run does (one ServerApp/ClientApp pair: echofleet/apps.py) --------------------------
    # "train": the federation above; "release": the sites calibrate an edge build (noisy activation
    # histograms, each a release charged to the site's ledger; edge/federated/), for
    # `echofleet edge build RUN --calib sites`
    mode: str = "train"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _typed(key_of(f.name), getattr(self, f.name), hints[f.name]))
        self._check_ranges()

    def _check_ranges(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise RunConfigError(key_of(name), f"{what}, got {getattr(self, name)!r}")

        for name in ("num_server_rounds", "min_sites", "local_epochs", "batch_size"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("lr", "max_grad_norm", "target_epsilon", "outlier_factor", "server_lr", "central_dp_clip"):
            need(getattr(self, name) > 0, name, "must be > 0")
        for name in ("num_sites", "head_hidden", "feature_projection", "noise_multiplier", "max_update_norm",
                     "proximal_mu", "central_dp_noise", "encoder_seed"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(0 < self.val_fraction < 1, "val_fraction", "must be between 0 and 1")
        need(0 <= self.trim_beta < 0.5, "trim_beta", "must be in [0, 0.5)")
        need(self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}")
        need(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}")
        from echocare.models.encoder import ENCODER_CONFIGS  # torch-free

        need(self.encoder_config in ENCODER_CONFIGS, "encoder_config", f"must be one of {', '.join(ENCODER_CONFIGS)}")

    # -- reading and writing run-config mappings --------------------------------------------------
    @classmethod
    def from_run_config(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Read Flower's run config (``context.run_config``) or any ``{key: value}`` with dashed keys.

        Missing keys take the defaults; an unknown key or a wrong type raises :class:`RunConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in dict(values).items():
            name = field_of(key)
            if name not in names or key != key_of(name):
                close = difflib.get_close_matches(key_of(key.replace("_", "-")), KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(KEYS)}"
                raise RunConfigError(key, f"is not a run-config key{hint}")
            kwargs[name] = value
        return cls(**kwargs)

    def as_run_config(self) -> dict[str, Any]:
        """The run config as Flower spells it (dashed keys), e.g. for ``flwr run --run-config``."""
        return {key_of(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some fields changed (checked like any other run config)."""
        return dataclasses.replace(self, **changes)

    # -- what the coordinator derives from it -----------------------------------------------------
    def encoder_ref(self):
        """The frozen encoder every site must use (a checkpoint's sha256 is computed when not given)."""
        from fed.features import EncoderRef

        sha = self.encoder_sha256 or None
        if self.encoder_checkpoint and not sha and Path(self.encoder_checkpoint).exists():
            from echocare.models.encoder import sha256_file

            sha = sha256_file(self.encoder_checkpoint)
        return EncoderRef(self.encoder_config, self.encoder_checkpoint or None, sha, self.encoder_seed)

    def task_labels(self) -> list[str]:
        """Class names of the task (segment/hc: the mask classes unless two or more are named)."""
        labels = [s.strip() for s in self.labels.split(",") if s.strip()]
        if self.task == "classify":
            return labels
        default = ["background", "head"] if self.task == "hc" else ["background", "lesion"]
        return labels if self.labels != RunConfig.labels and len(labels) >= 2 else default

    def round_config(self, run_key: str):
        """The instructions sent to the sites every round (:class:`fed.task.RoundConfig`)."""
        from echocare.preprocess import PreprocessSpec
        from fed.task import RoundConfig  # fed.task reads its defaults from this module

        head = ({"hidden": self.head_hidden, **({"proj_dim": self.feature_projection} if self.feature_projection > 0 else {})}
                if self.task == "classify" else {"variant": "light"})
        return RoundConfig(task=self.task, labels=self.task_labels(), encoder=self.encoder_ref(), head=head,
                           preprocess=PreprocessSpec().to_dict(), local_epochs=self.local_epochs,
                           batch_size=self.batch_size, lr=self.lr, max_grad_norm=self.max_grad_norm,
                           target_epsilon=self.target_epsilon, noise_multiplier=self.noise_multiplier,
                           num_rounds=self.num_server_rounds, seed=self.seed, run_key=run_key,
                           proximal_mu=self.proximal_mu if self.strategy == "fedprox" else 0.0,
                           val_fraction=self.val_fraction)


def key_of(field_name: str) -> str:
    """Run-config key of a field: ``num_server_rounds`` -> ``num-server-rounds``."""
    return field_name.replace("_", "-")


def field_of(key: str) -> str:
    """Field of a run-config key: ``num-server-rounds`` -> ``num_server_rounds``."""
    return key.replace("-", "_")


KEYS: tuple[str, ...] = tuple(key_of(f.name) for f in dataclasses.fields(RunConfig))

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _typed(key: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (an int is accepted for a float); anything else is a RunConfigError."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise RunConfigError(key, f"must be {_TYPE_NAMES[kind]}, got {value!r} ({type(value).__name__})")
