"""What a hospital does in a round, as plain functions (the ClientApp only moves messages).

``train_round`` and ``evaluate_round`` take the site's policy, the coordinator's round config and
the global head weights, and return only what may leave the site (docs/privacy.md): DP head
parameters, DP (accounted) or policy-disclosed metrics, a fixed weight instead of the number of
examples, and the site's lifetime epsilon and delta. Never a loss, a count, an image, a feature, a
file name or a patient field. Every release is charged to the site's lifetime ledger first; an
identical re-delivered request gets its stored reply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache, wraps
from pathlib import Path
from typing import Iterator

import numpy as np

from echocare.atomic import atomic_write_bytes
from echocare.preprocess import PreprocessSpec
from fed.config import RunConfig
from fed.dp import DPConfig, DPRandom, MapsHead, PerImageSegLoss, schedule, train_head
from fed.features import EncoderMismatch, EncoderRef, map_features, pooled_features, select_pooled, site_device
from fed.ledger import ACCOUNTANT, Disclosure, PrivacyLedger, Release, ReplyStore, calibrate_noise, locked_ledger
from fed.policy import Instruction, SitePolicy, refusal_reason

log = logging.getLogger(__name__)

STATUS_OK, STATUS_EXHAUSTED, STATUS_REFUSED = "ok", "budget-exhausted", "refused"


@dataclass
class RoundConfig:
    """The coordinator's instructions for one round (built by ``RunConfig.round_config``, sent every
    round). Defaults are the run config's (fed/config.py), never typed twice."""

    task: str = RunConfig.task
    labels: list[str] = field(default_factory=lambda: RunConfig().task_labels())
    encoder: EncoderRef = field(default_factory=lambda: RunConfig().encoder_ref())
    head: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)
    local_epochs: int = RunConfig.local_epochs
    batch_size: int = RunConfig.batch_size
    lr: float = RunConfig.lr
    max_grad_norm: float = RunConfig.max_grad_norm
    target_epsilon: float = RunConfig.target_epsilon
    noise_multiplier: float = RunConfig.noise_multiplier  # 0: each site calibrates sigma to target_epsilon over num_rounds
    num_rounds: int = RunConfig.num_server_rounds
    server_round: int = 1
    seed: int = RunConfig.seed
    run_key: str = "run"
    proximal_mu: float = 0.0  # the FedProx pull actually asked for (0 unless the strategy is fedprox)
    val_fraction: float = RunConfig.val_fraction

    def to_record(self) -> dict:
        """Flat dict of str/int/float for a Flower ConfigRecord."""
        return {
            "task": self.task, "labels": json.dumps(self.labels), "encoder-config": self.encoder.config,
            "encoder-checkpoint": self.encoder.checkpoint or "", "encoder-sha256": self.encoder.sha256 or "",
            "encoder-seed": self.encoder.seed, "head": json.dumps(self.head), "preprocess": json.dumps(self.preprocess),
            "local-epochs": self.local_epochs, "batch-size": self.batch_size, "lr": self.lr,
            "max-grad-norm": self.max_grad_norm, "target-epsilon": self.target_epsilon,
            "noise-multiplier": self.noise_multiplier, "num-rounds": self.num_rounds,
            "server-round": self.server_round, "seed": self.seed, "run-key": self.run_key,
            "proximal-mu": self.proximal_mu, "val-fraction": self.val_fraction,
        }

    @classmethod
    def from_record(cls, r) -> "RoundConfig":
        """Read :meth:`to_record`'s dict back; a missing key takes this class's default."""
        d = cls.to_record(cls())
        g = lambda k: r[k] if k in r else d[k]  # noqa: E731
        return cls(
            task=str(g("task")), labels=json.loads(g("labels")),
            encoder=EncoderRef(str(g("encoder-config")), str(g("encoder-checkpoint")) or None,
                               str(g("encoder-sha256")) or None, int(g("encoder-seed"))),
            head=json.loads(g("head")), preprocess=json.loads(g("preprocess")),
            local_epochs=int(g("local-epochs")), batch_size=int(g("batch-size")), lr=float(g("lr")),
            max_grad_norm=float(g("max-grad-norm")), target_epsilon=float(g("target-epsilon")),
            noise_multiplier=float(g("noise-multiplier")), num_rounds=int(g("num-rounds")),
            server_round=int(g("server-round")), seed=int(g("seed")), run_key=str(g("run-key")),
            proximal_mu=float(g("proximal-mu")), val_fraction=float(g("val-fraction")),
        )


def _seed(*parts) -> int:
    """A seed from public values: ONLY for the policy's insecure_deterministic_noise (tests)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


@lru_cache(maxsize=8)
def _open(data_spec: str):
    from echocare.data import open_data

    return open_data(data_spec)


def _split_file(policy: SitePolicy, cfg: RoundConfig) -> Path:
    ident = json.dumps([policy.data, policy.partition, policy.partition_index, policy.partition_count,
                        policy.partition_seed, cfg.val_fraction, cfg.seed])
    return Path(policy.state_dir) / "splits" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"


def site_split(policy: SitePolicy, cfg: RoundConfig, which: str):
    """The site's train or val split, computed once (leak-free, near-duplicates kept together) and
    remembered in its state directory so every later round and restart uses the same images."""
    from echocare.data.split import partition as split_sites, split_train_val

    data = _open(policy.data)
    path = _split_file(policy, cfg)
    if path.exists():
        keys = json.loads(path.read_text())
        by_key = {s.key: i for i, s in enumerate(data.samples)}
        if all(k in by_key for k in keys["train"] + keys["val"]):
            return data.subset([by_key[k] for k in keys[which]])
        log.warning("site data changed since the split in %s was made; splitting again", path)
    part = split_sites(data, policy.partition_count, policy.partition, seed=policy.partition_seed)[policy.partition_index] \
        if policy.partition else data
    train, val = split_train_val(part, val_fraction=cfg.val_fraction, seed=cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"train": [s.key for s in train.samples], "val": [s.key for s in val.samples]}).encode())
    return train if which == "train" else val


def _split_and_spec(policy: SitePolicy, preprocess: str, val_fraction: float, seed: int, which: str):
    """The memo functions' common start: the site's split and the round's preprocessing spec."""
    data = site_split(policy, RoundConfig(val_fraction=val_fraction, seed=seed), which)
    return data, (PreprocessSpec.from_json(preprocess) if preprocess != "{}" else PreprocessSpec())


@lru_cache(maxsize=256)
def feature_memo(policy: SitePolicy, encoder: EncoderRef, preprocess: str, labels: tuple[str, ...], val_fraction: float,
              seed: int, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-process memo over the on-disk cache: a site process serving many rounds reads its
    features once (the data of a running federation is assumed not to change under it).
    Returns (x, y, patient ids per row or None): :func:`patient_ids`. Benchmarks clear it
    (``feature_memo.cache_clear()``) to time the disk cache itself.

    Privacy meaning: site-local memory only; what it holds (features, labels, patient ids) never
    leaves the site: callers release only DP outputs computed from it."""
    data, spec = _split_and_spec(policy, preprocess, val_fraction, seed, which)
    x, kept = pooled_features(data, encoder, spec, policy.features_dir, device=site_device(policy.device))
    index = {name: i for i, name in enumerate(labels)}
    rows = [i for i, s in enumerate(kept) if s.label in index]
    if len(rows) < len(kept):
        log.warning("%d %s images have a label outside the federation's labels %s and are skipped",
                    len(kept) - len(rows), which, list(labels))
    y = np.array([index[kept[i].label] for i in rows], np.int64)
    x = x[rows] if len(rows) else np.zeros((0, x.shape[1] if x.ndim == 2 else 0), np.float32)
    return x, y, patient_ids([kept[i] for i in rows])


def site_features(policy: SitePolicy, cfg: RoundConfig, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(X float32 (N, D), y int64 (N,)) for the site's train or val split; unlabeled/unknown labels skipped.
    D is the pooled width of the maps the round's head pools (all five, or the last for ``pooling="last"``)."""
    x, y, _ = feature_memo(policy, cfg.encoder, json.dumps(cfg.preprocess, sort_keys=True), tuple(cfg.labels),
                        cfg.val_fraction, cfg.seed, which)
    return select_pooled(x, cfg.encoder.config, round_head(cfg).stages), y


@lru_cache(maxsize=6)
def _maps(policy: SitePolicy, encoder: EncoderRef, preprocess: str, val_fraction: float, seed: int, which: str,
          needs: tuple[int, ...], needs_image: bool):
    data, spec = _split_and_spec(policy, preprocess, val_fraction, seed, which)
    arrays, kept = map_features(data, encoder, spec, policy.features_dir, needs, needs_image,
                                device=site_device(policy.device))
    if not kept:
        return (), np.zeros((0, spec.size, spec.size), np.int64), [], None
    inputs = tuple(np.asarray(arrays[f"map{i}"], np.float32) for i in needs)
    if needs_image:
        inputs += (np.asarray(arrays["image"], np.float32),)
    meta = [(s.meta.get("pixel_size_mm"), s.meta.get("hc_mm"), float(sc)) for s, sc in zip(kept, arrays["f32_scale"])]
    return inputs, arrays["mask"].astype(np.int64), meta, patient_ids(kept)


def site_maps(policy: SitePolicy, cfg: RoundConfig, which: str, head):
    """(inputs: tuple of (N, ...) float32 arrays for the head, masks (N, S, S) int64, per-image
    (pixel_size_mm, hc_mm, scale)) for a segmentation/HC head; only the maps it needs are cached."""
    return _maps(policy, cfg.encoder, json.dumps(cfg.preprocess, sort_keys=True), cfg.val_fraction, cfg.seed, which,
                 tuple(head.needs), bool(head.needs_image))[:3]


# -- the unit of privacy: a patient where the site's data names patients, else an image -----------
PATIENT, IMAGE = "patient", "image"
NO_PATIENTS = ("this site's policy asks for per-patient privacy (privacy_unit = \"patient\") but its data does not "
               "name every image's patient: refused")


def patient_ids(samples) -> np.ndarray | None:
    """Dense patient numbers (0..P-1) of ``samples``, in order, or None unless every sample names its
    patient (``Sample.meta["patient"]``: DICOM PatientID, HC18's patient, a CSV ``patient`` column).
    They exist only in the site's memory: never cached, stored or sent."""
    names = [s.meta.get("patient") for s in samples]
    if not names or any(not n for n in names):
        return None
    return np.unique(np.array([str(n) for n in names]), return_inverse=True)[1].astype(np.int64)


def site_units(policy: SitePolicy, cfg: RoundConfig, which: str, head=None) -> np.ndarray | None:
    """The patient id of each row :func:`site_features` (or, given a segmentation ``head``,
    :func:`site_maps`) returns, or None when the site's unit of privacy is the image."""
    if site_unit(policy, cfg) != PATIENT:
        return None
    if head is None:
        ids = feature_memo(policy, cfg.encoder, json.dumps(cfg.preprocess, sort_keys=True), tuple(cfg.labels),
                        cfg.val_fraction, cfg.seed, which)[2]
    else:
        ids = _maps(policy, cfg.encoder, json.dumps(cfg.preprocess, sort_keys=True), cfg.val_fraction, cfg.seed, which,
                    tuple(head.needs), bool(head.needs_image))[3]
    # No row at all (e.g. no image carries the round's labels: the coordinator's choice) is still per
    # patient: zero patients, not "unknown patients". None here made the trainer step per image and the
    # site refuse ("could not answer", uncharged) exactly when a label is absent: a free yes/no.
    return np.zeros(0, np.int64) if ids is None else ids


def site_unit(policy: SitePolicy, cfg: RoundConfig) -> str:
    """``"patient"`` or ``"image"``: the policy's ``privacy_unit``, where ``auto`` means patient when
    every image of the site's dataset (train and validation split) names its patient. Raises
    ``ValueError(NO_PATIENTS)`` when the policy demands patients the data does not name."""
    if policy.privacy_unit == IMAGE:
        return IMAGE
    known = patient_ids(site_split(policy, cfg, "train").samples + site_split(policy, cfg, "val").samples) is not None
    if policy.privacy_unit == PATIENT and not known:
        raise ValueError(NO_PATIENTS)
    return PATIENT if known else IMAGE


def unit_rows(rows, units: np.ndarray | None, bound: float):
    """Per-unit contributions for an accounted evaluation: each patient's rows summed, then that sum
    scaled down to L2 norm ``bound`` (the per-image bound), so one patient moves the released sums by
    at most ``bound``, however many images it has. ``units`` None: the rows as they are (per image)."""
    import torch

    if units is None or len(rows) == 0:
        return rows
    index = torch.from_numpy(np.asarray(units, np.int64))
    sums = torch.zeros(int(index.max()) + 1, rows.shape[1], dtype=rows.dtype).index_add_(0, index, rows)
    return sums * (bound / (sums.norm(dim=1) + 1e-12)).clamp(max=1.0)[:, None]


def round_head(cfg: RoundConfig):
    """A freshly built head of the round's task, encoder config, labels and head options.

    Privacy meaning: built from the coordinator's (public) round config alone, no site data; the
    weights a site then loads into it (:func:`load_head_arrays`) are the coordinator's too."""
    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head

    return build_head(cfg.task, get_config(cfg.encoder.config), len(cfg.labels), **cfg.head)


NONFINITE_HEAD = "the global head holds non-finite values (NaN or infinity): refused"


def bad_numbers(cfg: RoundConfig) -> str:
    """Why the coordinator's numbers are refused ("" when they are fine), checked before any data is
    read or the ledger is locked (an infinite noise multiplier used to hang the RDP accountant while
    the site held its ledger lock).

    Privacy meaning: decided on the round config alone, so a refusal tells nothing about the site."""
    import math

    floats = {"noise-multiplier": cfg.noise_multiplier, "lr": cfg.lr, "max-grad-norm": cfg.max_grad_norm,
              "target-epsilon": cfg.target_epsilon}
    for key, v in floats.items():
        if not math.isfinite(v):
            return f"run config {key} is not a finite number: refused"
    if not 0 <= cfg.noise_multiplier <= 1e4:
        return "run config noise-multiplier outside [0, 10000]: refused"
    if cfg.batch_size < 1 or cfg.num_rounds < 1 or cfg.local_epochs < 0:
        return "run config batch-size and num-rounds must be >= 1, local-epochs >= 0: refused"
    return ""


def finite_arrays(arrays: dict[str, np.ndarray]) -> bool:
    """False when an array holds a NaN or infinite value.

    Privacy meaning: such a head is refused before it touches any data: a decision that depends
    only on what the coordinator sent, never on the site's images."""
    return all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in arrays.values())


def load_head_arrays(head, arrays: dict[str, np.ndarray]) -> None:
    """Load the coordinator's arrays into ``head`` (strict: every name and shape must match).

    Privacy meaning: none by itself; a site's round functions check the arrays first
    (:func:`finite_arrays`) and, before evaluating, the head's fixed buffers (the site recomputes
    the public projection)."""
    import torch

    head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)


@dataclass
class Reply:
    """Everything that leaves the site after a round (docs/privacy.md: only private outputs).

    ``weight`` is the fixed weight FedAvg sees as ``num-examples``: 1 for every answering site,
    never its count of examples. ``metrics`` hold DP results (accounted evaluation metrics), the
    site's lifetime epsilon and delta, and the accountant's inputs only if the policy discloses them."""

    status: str
    site: str
    weight: int = 0
    arrays: dict[str, np.ndarray] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    unit: str = ""  # the unit of privacy of this release ("patient" | "image"); "" when nothing was released

    def fields(self) -> dict:
        return {"status": self.status, "site": self.site, "weight": self.weight, "metrics": self.metrics,
                "reason": self.reason, "unit": self.unit}


NOT_PRIVATE = ("NOT PRIVATE: this site's policy sets insecure_deterministic_noise (tests only); "
               "its noise is predictable from the run seed, site and round")
SITE_ERROR = "the site could not answer this request (details in the site's own log)"
DELTA_REFUSAL = "this site's delta is not below 1/N for every N of its size class (details in the site's own log)"
# Accounted evaluation: per-image contributions bounded so that one image changes the released
# sums by at most sqrt(K + 3) (classification) or sqrt(5) (segmentation) in L2 norm.
LOSS_CAP, HC_CAP_MM, AUROC_BINS = 5.0, 100.0, 10


def request_hash(kind: str, cfg: RoundConfig, arrays: dict[str, np.ndarray]) -> str:
    """What makes two requests identical: the kind, the whole round config (run key and round
    included) and the exact bytes of every global array."""
    h = hashlib.sha256(kind.encode())
    h.update(json.dumps(cfg.to_record(), sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def site_size(policy: SitePolicy, cfg: RoundConfig, unit: str) -> int:
    """N: the privacy units (patients or images) of this site's dataset (train + validation split).

    Privacy meaning: the exact N never leaves the site. It is used only through the public size
    class (``SitePolicy.sampling_units``) and the delta check in :func:`locked_release`; a reply that
    depended on it directly would tell the coordinator the site's size."""
    samples = site_split(policy, cfg, "train").samples + site_split(policy, cfg, "val").samples
    return len({s.meta["patient"] for s in samples}) if unit == PATIENT else len(samples)


def sampling_units(policy: SitePolicy, cfg: RoundConfig, unit: str, n_train: int) -> int:
    """The number of units DP-SGD's sampling rate and steps are computed from (``DPConfig.sampling_units``).

    Default: the site's public size class (``SitePolicy.sampling_units``) of its **whole dataset**
    (:func:`site_size`: training and validation split, every label), never of the round's training
    rows: those depend on the labels, validation fraction and split seed the coordinator chooses, and
    probing them would tell it, class boundary by class boundary, how many images carry a label.
    With ``disclose_accounting`` (which sends q and the steps anyway): the exact ``n_train``."""
    if policy.disclose_accounting:
        return max(1, n_train)
    return policy.sampling_units(site_size(policy, cfg, unit))


@contextmanager
def ledger_for(policy: SitePolicy, n: int) -> Iterator[PrivacyLedger]:
    """The site's lifetime ledger of its dataset (keyed by the data, never the run), locked."""
    with locked_ledger(policy.ledger_path, policy.delta_for(n), policy.target_epsilon) as ledger:
        yield ledger


def _replies(policy: SitePolicy) -> ReplyStore:
    return ReplyStore(policy.ledger_path.parent / f"replies-{policy.data_identity}")


@contextmanager
def locked_release(policy: SitePolicy, cfg: RoundConfig, request: str) -> Iterator[tuple[PrivacyLedger, ReplyStore, Reply | None]]:
    """The site's ledger, locked for one release, and the reply store. ``early`` is the answer that
    needs no new release: the stored reply of an identical re-delivered request (no new charge), or a
    refusal when the policy's delta is not below 1/N (N: patients or images, the site's unit) or the
    ledger accounts another unit. Checked under the lock, so two concurrent requests cannot both pass
    the budget check before either is recorded.

    Privacy meaning: every release a site makes (train, evaluate, and the edge build's calibrate and
    accept) goes through this one lock, replay store and delta check; the caller checks the budget
    (``ledger.would_exceed``) and charges the ledger inside the ``with`` block, before anything leaves."""
    unit = site_unit(policy, cfg)
    size = site_size(policy, cfg, unit)
    store = _replies(policy)
    with ledger_for(policy, policy.sampling_units(size)) as ledger:  # the default delta: from the size class
        early = _stored(store, request)
        if early is None:
            problem = policy.delta_problem(size, ledger.delta, unit)
            if problem:
                log.error("site %s refuses: %s", policy.site_name, problem)
                early = Reply(STATUS_REFUSED, policy.site_name, reason=DELTA_REFUSAL)
            elif ledger.unit_problem(unit):
                early = Reply(STATUS_REFUSED, policy.site_name, reason=ledger.unit_problem(unit))
        yield ledger, store, early


def _stored(store: ReplyStore, request: str) -> Reply | None:
    got = store.get(request)
    if got is None:
        return None
    fields, arrays = got
    log.info("identical request %s… re-delivered: the stored reply, no new privacy charge", request[:12])
    return Reply(fields["status"], fields["site"], int(fields["weight"]), arrays, dict(fields["metrics"]), fields["reason"],
                 fields.get("unit", ""))


def privacy_figures(policy: SitePolicy, ledger: PrivacyLedger) -> dict[str, float]:
    """The privacy figures a reply carries: lifetime epsilon (rounded) and delta; the accountant's
    inputs (they reveal N) only when the policy discloses them.

    Privacy meaning: these are the only privacy numbers that leave the site. Without
    ``disclose_accounting`` epsilon is rounded up (:func:`released_epsilon`), because the exact
    value is a function of N; ``not-private`` flags a ledger with an insecure (predictable) release."""
    f = ledger.figures()
    out = {"epsilon": round(f["epsilon"], 3) if policy.disclose_accounting else released_epsilon(f["epsilon"]),
           "delta": f["delta"]}
    if policy.disclose_accounting:
        out.update(noise_multiplier=f["noise_multiplier"], sample_rate=f["sample_rate"], steps=f["steps"])
    if not all(r.private for r in ledger.releases):
        out["not-private"] = 1.0
    return out


EPSILON_STEP = 0.25


def released_epsilon(epsilon: float) -> float:
    """The lifetime epsilon as a reply carries it when the site does not disclose its accounting:
    rounded **up** to a multiple of :data:`EPSILON_STEP`. Exact epsilon is a function of N (for a
    coordinator-fixed sigma and batch size), so only this coarse upper bound leaves the site."""
    return math.ceil(epsilon / EPSILON_STEP - 1e-9) * EPSILON_STEP


def insecure_noise_seed(policy: SitePolicy, cfg: RoundConfig, kind: str) -> int | None:
    """Tests only (policy ``insecure_deterministic_noise``): a seed the coordinator knows. Else None: OS entropy.

    Privacy meaning: with a seed the noise is predictable from the run seed, site and round, so the
    release protects nothing; every such reply says NOT PRIVATE and the ledger records it."""
    return _seed(cfg.seed, policy.site_name, cfg.server_round, kind) if policy.insecure_deterministic_noise else None


def guarded_reply(fn):
    """Decorator for a site's round function ``(policy, cfg, arrays) -> Reply``: an unexpected error is
    logged at the site and answered with a fixed reason.

    Privacy meaning: an exception's text can name paths, files or counts, which must not leave the
    site; only the fixed :data:`SITE_ERROR` (or an encoder mismatch's public reason) does."""

    @wraps(fn)
    def run(policy: SitePolicy, cfg: RoundConfig, arrays: dict[str, np.ndarray]) -> Reply:
        try:
            return fn(policy, cfg, arrays)
        except EncoderMismatch as e:  # no usable pinned checkpoint at the named path: one fixed refusal (no path, no site hash)
            log.error("%s at site %s: %s", fn.__name__, policy.site_name, e)
            return Reply(STATUS_REFUSED, policy.site_name, reason=e.public_reason)
        except Exception:
            log.exception("%s failed at site %s", fn.__name__, policy.site_name)
            return Reply(STATUS_REFUSED, policy.site_name, reason=SITE_ERROR)

    return run


def _planned_sigma(policy: SitePolicy, cfg: RoundConfig, ledger: PrivacyLedger, q: float, steps: int) -> float | None:
    """The run's noise multiplier, planned once per run key so that the lifetime epsilon after the
    run's planned rounds and evaluations stays within min(policy budget, spent + run target);
    None when that is out of reach (the budget is spent)."""
    if cfg.run_key not in ledger.plans:
        planned_evals = 0
        if policy.evaluation == "accounted":
            done = sum(1 for r in ledger.releases if r.kind == "evaluate" and r.run == cfg.run_key)
            planned_evals = max(0, cfg.num_rounds + 1 - done)
        base = tuple(ledger.history()) + ((policy.evaluation_noise_multiplier, 1.0, planned_evals),) * (planned_evals > 0)
        target = min(policy.target_epsilon, ledger.epsilon() + cfg.target_epsilon)
        try:
            sigma = calibrate_noise(target, ledger.delta, q, steps * cfg.num_rounds, base=base)
        except ValueError:
            return None
        ledger.plans[cfg.run_key] = max(sigma, policy.min_noise_multiplier)  # never below the site's floor
        ledger.save()
    return ledger.plans[cfg.run_key]


def site_encoder(policy: SitePolicy, ref: EncoderRef) -> EncoderRef:
    """The encoder this site uses for a run asking for ``ref``: the run's config and seed; the
    **site's own** checkpoint file (policy ``encoder_checkpoint``) checked against the run's pinned
    sha256 whenever the run names a checkpoint.

    Privacy meaning: the checkpoint path in the run config is the coordinator's choice and is never
    opened; the site opens, hashes and loads only the file its hospital configured. A run naming a
    checkpoint at a site whose policy names none raises :class:`EncoderMismatch` here, before any
    file is touched, with the same public refusal as any other mismatch (missing, unreadable, other
    sha256, not loadable)."""
    if not ref.checkpoint and not ref.sha256:
        return ref  # the seeded random initialisation: no file
    if not policy.encoder_checkpoint:
        raise EncoderMismatch("(none: this site's policy names no encoder_checkpoint)", "no checkpoint at this site",
                              ref.sha256 or "")
    return EncoderRef(ref.config, policy.encoder_checkpoint, ref.sha256, ref.seed)


def _at_site(policy: SitePolicy, cfg: RoundConfig) -> RoundConfig:
    """``cfg`` with the encoder this site uses (:func:`site_encoder`): every later step (features,
    projection check, request hash) sees the site's own checkpoint, never the run's path."""
    return replace(cfg, encoder=site_encoder(policy, cfg.encoder))


#: The request-hash kinds of a training round: plain (the update leaves in clear) or inside a SecAgg+
#: round (it leaves masked; the coordinator sees only the sum). Part of the stored-reply key: a plain
#: re-delivery of a SecAgg+ round's request must not get that round's stored, unmasked update.
TRAIN_PLAIN, TRAIN_SECURE = "train", "train-secagg"


@guarded_reply
def train_round(policy: SitePolicy, cfg: RoundConfig, arrays: dict[str, np.ndarray]) -> Reply:
    """One round of local DP-SGD on the head, within the site's policy and lifetime privacy budget;
    the update leaves in clear (a plain round)."""
    return _train(policy, cfg, arrays, TRAIN_PLAIN)


@guarded_reply
def train_secure_round(policy: SitePolicy, cfg: RoundConfig, arrays: dict[str, np.ndarray]) -> Reply:
    """:func:`train_round` for a SecAgg+ round (fed/secagg.py masks the update it returns).

    Privacy meaning: the stored reply of a SecAgg+ round is keyed apart from a plain round's, so
    the same config and arrays sent plain afterwards are a new, charged release with fresh noise
    (and conversely); only an identical SecAgg+ re-delivery gets this round's stored update, which
    leaves masked again."""
    return _train(policy, cfg, arrays, TRAIN_SECURE)


def _train(policy: SitePolicy, cfg: RoundConfig, arrays: dict[str, np.ndarray], path: str) -> Reply:
    import torch

    cfg = _at_site(policy, cfg)  # first: the run's checkpoint path is never opened

    reason = refusal_reason(policy, Instruction(cfg.task, cfg.local_epochs, cfg.max_grad_norm))
    if reason:
        return Reply(STATUS_REFUSED, policy.site_name, reason=reason)
    bad = bad_numbers(cfg)
    if bad:
        return Reply(STATUS_REFUSED, policy.site_name, reason=bad)
    if 0 < cfg.noise_multiplier < policy.min_noise_multiplier:
        return Reply(STATUS_REFUSED, policy.site_name, reason=(
            f"noise-multiplier {cfg.noise_multiplier:g} is below this site's minimum {policy.min_noise_multiplier:g}: refused"))
    if not finite_arrays(arrays):
        return Reply(STATUS_REFUSED, policy.site_name, reason=NONFINITE_HEAD)
    unit = unit_or_none(policy, cfg)
    if unit is None:
        return Reply(STATUS_REFUSED, policy.site_name, reason=NO_PATIENTS)
    head = round_head(cfg)
    load_head_arrays(head, arrays)
    if cfg.task == "classify":
        x, y = site_features(policy, cfg, "train")
        units = site_units(policy, cfg, "train")
        inputs, model, loss_fn = (torch.from_numpy(x),), head, None
    else:
        xs, y, _ = site_maps(policy, cfg, "train", head)
        units = site_units(policy, cfg, "train", head)
        inputs, model, loss_fn = tuple(torch.from_numpy(a) for a in xs), MapsHead(head), PerImageSegLoss()
    # No training image carries the round's labels (the coordinator chooses them): an ordinary, charged
    # release of noise only, never an uncharged refusal, which would tell whether a label exists here.
    n_units = len(y) if units is None else len(np.unique(units))  # the sampling rate and steps count units
    request = request_hash(path, cfg, arrays)  # the path is part of the key (TRAIN_SECURE)
    with locked_release(policy, cfg, request) as (ledger, store, early):
        if early is not None:
            return early
        dp = DPConfig(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, max_grad_norm=cfg.max_grad_norm,
                      proximal_mu=cfg.proximal_mu, insecure_seed=insecure_noise_seed(policy, cfg, "train"),
                      device=site_device(policy.device).torch_device,
                      sampling_units=sampling_units(policy, cfg, unit, n_units))
        q, steps, _ = schedule(n_units, dp)
        sigma = cfg.noise_multiplier if cfg.noise_multiplier > 0 else _planned_sigma(policy, cfg, ledger, q, steps)
        release = Release("train", sigma or 0.0, q, steps, cfg.max_grad_norm, run=cfg.run_key, round=cfg.server_round,
                          request=request, private=not policy.insecure_deterministic_noise, unit=unit)
        if sigma is None or ledger.would_exceed(release):
            spent = privacy_figures(policy, ledger)["epsilon"]  # as replies carry it: exact epsilon is a function of N
            return Reply(STATUS_EXHAUSTED, policy.site_name, metrics=privacy_figures(policy, ledger),
                         reason=f"privacy budget exhausted: spent epsilon {spent:g} of this site's lifetime budget "
                                f"{policy.target_epsilon}; the next round would exceed it", unit=ledger.unit)
        dp.noise_multiplier = sigma
        # no maps at all (an empty training split) stays a tuple: the trainer then takes noise-only steps
        stats = train_head(model, inputs if len(inputs) != 1 else inputs[0], torch.from_numpy(y), dp,
                           loss_fn=loss_fn, units=None if units is None else torch.from_numpy(units))
        if (stats["sample_rate"], stats["steps"], stats["unit"]) != (q, steps, unit):  # spend exactly what is charged
            raise RuntimeError(f"trained per {stats['unit']} at q={stats['sample_rate']}, {stats['steps']} steps; "
                               f"charged per {unit} at q={q}, {steps} steps")
        ledger.charge(release)  # durable before anything leaves the site
        # Only trainable parameters leave the site (fixed buffers such as the public projection stay).
        state = {k: v.detach().cpu().numpy() for k, v in head.named_parameters()}
        reply = Reply(STATUS_OK, policy.site_name, 1, state, privacy_figures(policy, ledger),
                      NOT_PRIVATE if policy.insecure_deterministic_noise else "", unit)
        store.put(request, reply.fields(), reply.arrays)
        return reply


def unit_or_none(policy: SitePolicy, cfg: RoundConfig) -> str | None:
    """The site's unit of privacy (:func:`site_unit`), or None when its policy demands patients its
    data does not name.

    Privacy meaning: None is logged at the site only; the caller refuses with the fixed
    :data:`NO_PATIENTS` before reading any data."""
    try:
        return site_unit(policy, cfg)
    except ValueError as e:
        if str(e) != NO_PATIENTS:
            raise
        log.error("site %s: %s", policy.site_name, e)
        return None


def _verify_fixed_parts(policy: SitePolicy, cfg: RoundConfig, head) -> str | None:
    """Why the head's fixed (non-trainable) buffers are not ones this site can vouch for, or None.

    A classification head's projection must equal the site's own recomputation from the public
    reference phantoms; a head with any other buffer is refused (the site cannot tell what it does)."""
    from fed.features import DEFAULT_REFERENCE, projection_mismatch, public_projection

    buffers = {k: v.detach().cpu().numpy() for k, v in head.named_buffers()}
    if not buffers:
        return None
    if cfg.task != "classify" or set(buffers) != {"proj_mean", "proj_matrix"}:
        return f"the head has fixed buffers {sorted(buffers)} this site cannot verify"
    spec = PreprocessSpec.from_dict(cfg.preprocess) if cfg.preprocess else PreprocessSpec()
    reference = policy.projection_reference or DEFAULT_REFERENCE
    mean, matrix = public_projection(cfg.encoder, spec, int(head.proj_dim), policy.features_dir, reference, head.stages)
    problem = projection_mismatch(buffers["proj_mean"], buffers["proj_matrix"], mean, matrix)
    # The default reference is echofleet's phantom spec (public text); a policy's own reference is a data
    # spec that may hold a path on the site's machine, which never leaves it: the reply only says so.
    named = reference if reference == DEFAULT_REFERENCE else "the one this site's policy names"
    return f"evaluation refused: {problem} (public reference: {named})" if problem else None


@guarded_reply
def evaluate_round(policy: SitePolicy, cfg: RoundConfig, arrays: dict[str, np.ndarray]) -> Reply:
    """Evaluate the global head on the site's held-out split: noisy metrics charged to the lifetime
    ledger (default), or exact metrics as a counted policy disclosure; only on a verified head."""
    import torch

    cfg = _at_site(policy, cfg)  # first: the run's checkpoint path is never opened

    if cfg.task not in policy.allowed_tasks:
        return Reply(STATUS_REFUSED, policy.site_name, reason=f"task '{cfg.task}' is not allowed by this site's policy")
    if not finite_arrays(arrays):
        return Reply(STATUS_REFUSED, policy.site_name, reason=NONFINITE_HEAD)
    unit = unit_or_none(policy, cfg)
    if unit is None:
        return Reply(STATUS_REFUSED, policy.site_name, reason=NO_PATIENTS)
    head = round_head(cfg)
    load_head_arrays(head, arrays)
    head.eval()
    unverified = _verify_fixed_parts(policy, cfg, head)
    if unverified:
        return Reply(STATUS_REFUSED, policy.site_name, reason=unverified)
    if cfg.task == "classify":
        x, y = site_features(policy, cfg, "val")
        with torch.no_grad():
            logits = head(torch.from_numpy(x)) if len(y) else torch.zeros(0, len(cfg.labels))
        per_image = classify_contributions(logits, torch.from_numpy(y), len(cfg.labels))
        units = site_units(policy, cfg, "val")
        exact = lambda: _exact_classify_metrics(logits, y, len(cfg.labels))  # noqa: E731
    else:
        per_image, seg_exact = segment_contributions(policy, cfg, head)
        units = site_units(policy, cfg, "val", head)
        exact = lambda: seg_exact  # noqa: E731
    # Accounted: no rows is an ordinary, charged release (pure noise). A refusal would tell the
    # coordinator, uncharged, that none of the site's images carries the labels it chose.
    request = request_hash("evaluate", cfg, arrays)
    with locked_release(policy, cfg, request) as (ledger, store, early):
        if early is not None:
            return early
        if policy.evaluation == "disclosed":
            if ledger.disclosed_in_run("evaluate", cfg.run_key) >= policy.disclosed_evaluations_per_run:
                return Reply(STATUS_REFUSED, policy.site_name, reason=(
                    f"this site discloses at most {policy.disclosed_evaluations_per_run} exact evaluations per run"))
            if ledger.disclosed() >= policy.disclosed_evaluations_lifetime:  # every kind of exact result counts
                return Reply(STATUS_REFUSED, policy.site_name, reason=(
                    f"this site has disclosed its lifetime limit of {policy.disclosed_evaluations_lifetime} exact evaluations"))
            ledger.disclose(Disclosure("evaluate", cfg.run_key, cfg.server_round, request))
            if len(per_image) == 0:  # exact metrics of nothing are undefined; the refusal is itself an exact
                # answer ("no image here has these labels"), so it is counted above like any exact result
                reply = Reply(STATUS_REFUSED, policy.site_name, reason="no labelled validation images at this site")
                store.put(request, reply.fields(), None)
                return reply
            metrics = exact()
        else:
            sensitivity = EVALUATION_SENSITIVITY[cfg.task](len(cfg.labels))
            release = Release("evaluate", policy.evaluation_noise_multiplier, 1.0, 1, sensitivity, run=cfg.run_key,
                              round=cfg.server_round, request=request, private=not policy.insecure_deterministic_noise,
                              unit=unit)
            if ledger.would_exceed(release):
                return Reply(STATUS_EXHAUSTED, policy.site_name, metrics=privacy_figures(policy, ledger), unit=ledger.unit,
                             reason="privacy budget exhausted: an accounted evaluation would exceed this site's lifetime budget")
            rng = DPRandom(insecure_noise_seed(policy, cfg, "evaluate"))
            contributions = unit_rows(per_image, units, sensitivity)  # per patient: a patient's rows summed, clipped
            sums = contributions.sum(0).double() + rng.gaussian(policy.evaluation_noise_multiplier * sensitivity,
                                                                (per_image.shape[1],), torch.float64)
            ledger.charge(release)
            metrics = metrics_from_sums(cfg, sums)
        reply = Reply(STATUS_OK, policy.site_name, 1, None, {**metrics, **privacy_figures(policy, ledger)},
                      NOT_PRIVATE if policy.insecure_deterministic_noise else "", ledger.unit)
        store.put(request, reply.fields(), None)
        return reply


def classify_contributions(logits, y, k: int):
    """Per-image rows [loss / LOSS_CAP, one-hot class, one-hot class if correct, per class c: the
    score bin of p_c among positives or negatives of c]; each row has L2 norm <= sqrt(K + 3).

    Privacy meaning: the rows stay at the site; an accounted release sends only their sum plus Gaussian
    noise scaled to that bound (:data:`EVALUATION_SENSITIVITY`); an image whose logits overflow gets a
    zero row, so whether it overflowed shows only through that noisy sum."""
    import torch

    n = len(y)
    rows = torch.zeros(n, 1 + 2 * k + 2 * k * AUROC_BINS, dtype=torch.float64)
    if n == 0:
        return rows
    # A crafted head can make one image's logits overflow (inf/NaN): that image's row becomes zero, so
    # whether it overflowed never shows except through the noisy sum (sensitivity unchanged).
    ok = torch.isfinite(logits).all(1)
    safe = torch.where(ok[:, None], logits.double(), torch.zeros((), dtype=torch.float64))
    probs = torch.softmax(safe, 1)
    loss = torch.nn.functional.cross_entropy(safe, y, reduction="none").clamp(0, LOSS_CAP) / LOSS_CAP
    idx = torch.arange(n)
    rows[:, 0] = loss
    rows[idx, 1 + y] = 1.0
    rows[idx, 1 + k + y] = (probs.argmax(1) == y).double()
    bins = (probs * AUROC_BINS).long().clamp(min=0, max=AUROC_BINS - 1)
    for c in range(k):
        col = 1 + 2 * k + c * 2 * AUROC_BINS + (y == c).long() * AUROC_BINS + bins[:, c]
        rows[idx, col] = 1.0
    rows[~ok] = 0.0
    return rows


def _exact_classify_metrics(logits, y: np.ndarray, k: int) -> dict[str, float]:
    """Exact metrics (a policy disclosure, not DP)."""
    import torch

    from echocare.metrics import auroc_macro_ovr, balanced_accuracy

    probs = torch.softmax(logits, 1).numpy()
    return {"val_loss": float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))),
            "auroc": float(auroc_macro_ovr(y, probs, k)), "balanced_accuracy": float(balanced_accuracy(y, probs.argmax(1)))}


def segment_contributions(policy: SitePolicy, cfg: RoundConfig, head):
    """Per-image rows [loss / LOSS_CAP, Dice, 1, HC error / HC_CAP_MM, has HC] (L2 norm <= sqrt(5)),
    and the exact metrics (global Dice, mean loss, HC MAE: a policy disclosure, not DP).

    Privacy meaning: as :func:`classify_contributions`, the rows leave only as a noisy sum; the exact
    metrics only as a counted disclosure (policy ``evaluation = "disclosed"``)."""
    import torch

    from echocare.hc import measured_hc_mm
    from echocare.metrics import dice, hc_mae_mm

    xs, y, meta = site_maps(policy, cfg, "val", head)
    rows = torch.zeros(len(y), 5, dtype=torch.float64)
    if len(y) == 0:
        return rows, {}
    model, loss_fn = MapsHead(head), PerImageSegLoss(reduction="none")
    losses, preds, est, truth = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(y), 16):
            logits = model(*(torch.from_numpy(a[i:i + 16]) for a in xs))
            loss = loss_fn(logits, torch.from_numpy(y[i:i + 16])).double()
            losses.append(loss.numpy())
            rows[i:i + 16, 0] = loss.clamp(0, LOSS_CAP) / LOSS_CAP
            pred = logits.argmax(1).numpy().astype(np.uint8)
            preds.append(pred)
            for j, (p, g) in enumerate(zip(pred > 0, y[i:i + 16] > 0)):
                total = p.sum() + g.sum()
                rows[i + j, 1] = 1.0 if total == 0 else 2.0 * (p & g).sum() / total
                rows[i + j, 2] = 1.0
                px, hc, scale = meta[i + j]
                # Metadata only decides whether an image counts for HC (never the head's prediction): a
                # pixel size or scale that is not a positive number made measured_hc_mm raise for the
                # images a crafted head predicts a mask on ("could not answer", uncharged).
                if cfg.task == "hc" and _positive(px) and _positive(scale) and hc is not None and math.isfinite(float(hc)):
                    est.append(measured_hc_mm(pred[j], px / scale))
                    truth.append(hc)
                    rows[i + j, 3] = min(abs(est[-1] - hc), HC_CAP_MM) / HC_CAP_MM
                    rows[i + j, 4] = 1.0
            # A crafted head can overflow for chosen images: their rows become zero (NaN passes
            # clamp and would make the released sums NaN: an exact bit), as in classification.
            ok = torch.isfinite(logits).flatten(1).all(1) & torch.isfinite(loss)
            rows[i:i + 16][~ok] = 0.0
    exact = {"val_loss": float(np.concatenate(losses).mean()), "dice": float(dice(np.concatenate(preds) > 0, y > 0))}
    if est:
        exact["hc_mae_mm"] = float(hc_mae_mm(np.array(est), np.array(truth)))
    return rows, exact


def _positive(v) -> bool:
    """A finite number above zero (metadata such as a pixel size may be missing, zero or NaN)."""
    try:
        return v is not None and math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        return False


#: Task -> (number of labels -> L2 bound of one image's evaluation row): the sensitivity the noise of
#: an accounted evaluation (and of federated acceptance) is calibrated to.
EVALUATION_SENSITIVITY = {"classify": lambda k: math.sqrt(k + 3), "segment": lambda k: math.sqrt(5), "hc": lambda k: math.sqrt(5)}


def metrics_from_sums(cfg: RoundConfig, sums) -> dict[str, float]:
    """The metrics from (noisy) sums of per-image contributions.
    Noisy counts are clamped at zero; a metric without enough (noisy) support is left out.

    Privacy meaning: post-processing of already noisy sums: no extra privacy cost."""
    s = sums.clamp(min=0.0).numpy()
    if cfg.task != "classify":
        n = max(float(s[2]), 1.0)
        metrics = {"val_loss": float(s[0]) / n * LOSS_CAP, "dice": min(1.0, float(s[1]) / n)}
        if cfg.task == "hc" and s[4] >= 1.0:
            metrics["hc_mae_mm"] = float(s[3]) / float(s[4]) * HC_CAP_MM
        return metrics
    k = len(cfg.labels)
    counts, correct = s[1:1 + k], s[1 + k:1 + 2 * k]
    metrics = {"val_loss": float(s[0]) / max(float(counts.sum()), 1.0) * LOSS_CAP}
    has = counts >= 1.0
    if has.any():
        metrics["balanced_accuracy"] = float(np.mean(np.minimum(correct[has] / counts[has], 1.0)))
    aucs = []
    for c in range(k):
        hist = s[1 + 2 * k + c * 2 * AUROC_BINS: 1 + 2 * k + (c + 1) * 2 * AUROC_BINS]
        neg, pos = hist[:AUROC_BINS], hist[AUROC_BINS:]
        if pos.sum() > 0 and neg.sum() > 0:  # P(score_pos > score_neg), ties (same bin) count half
            below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
            aucs.append(float((pos * (below + neg / 2)).sum() / (pos.sum() * neg.sum())))
    if aucs:
        metrics["auroc"] = float(np.mean(aucs))
    return metrics


__all__ = [
    # what the ClientApp and the coordinator's side use
    "RoundConfig", "Reply", "train_round", "train_secure_round", "evaluate_round", "request_hash", "ACCOUNTANT",
    "STATUS_OK", "STATUS_EXHAUSTED", "STATUS_REFUSED", "TRAIN_PLAIN", "TRAIN_SECURE",
    "site_encoder", "site_features", "site_split",
    # the pieces other site-side releases (edge.federated: calibrate, accept) are built from
    "locked_release", "guarded_reply", "privacy_figures", "insecure_noise_seed", "unit_or_none", "site_size",
    "classify_contributions", "segment_contributions", "metrics_from_sums", "EVALUATION_SENSITIVITY",
    "round_head", "load_head_arrays", "feature_memo", "bad_numbers", "finite_arrays",
]
