"""What a hospital does in a round, as plain functions (the ClientApp only moves messages).

``train_round`` and ``evaluate_round`` take the site's policy, the coordinator's round config and
the global head weights, and return only what may leave the site: head parameters, the number of
examples, metrics and privacy figures. Never an image, a feature, a file name or a patient field.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from echocare.atomic import atomic_write_bytes
from echocare.preprocess import PreprocessSpec
from fed.config import RunConfig
from fed.dp import DPConfig, MapsHead, PerImageSegLoss, sample_rate, steps_per_epoch, train_head
from fed.features import EncoderRef, map_features, pooled_features
from fed.ledger import ACCOUNTANT, PrivacyLedger, Release, calibrate_noise
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
def _features(policy: SitePolicy, encoder: EncoderRef, preprocess: str, labels: tuple[str, ...], val_fraction: float,
              seed: int, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-process memo over the on-disk cache: a site process serving many rounds reads its
    features once (the data of a running federation is assumed not to change under it)."""
    data, spec = _split_and_spec(policy, preprocess, val_fraction, seed, which)
    x, kept = pooled_features(data, encoder, spec, policy.features_dir)
    index = {name: i for i, name in enumerate(labels)}
    rows = [i for i, s in enumerate(kept) if s.label in index]
    if len(rows) < len(kept):
        log.warning("%d %s images have a label outside the federation's labels %s and are skipped",
                    len(kept) - len(rows), which, list(labels))
    y = np.array([index[kept[i].label] for i in rows], np.int64)
    x = x[rows] if len(rows) else np.zeros((0, x.shape[1] if x.ndim == 2 else 0), np.float32)
    return x, y


def site_features(policy: SitePolicy, cfg: RoundConfig, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(X float32 (N, D), y int64 (N,)) for the site's train or val split; unlabeled/unknown labels skipped."""
    return _features(policy, cfg.encoder, json.dumps(cfg.preprocess, sort_keys=True), tuple(cfg.labels),
                     cfg.val_fraction, cfg.seed, which)


@lru_cache(maxsize=6)
def _maps(policy: SitePolicy, encoder: EncoderRef, preprocess: str, val_fraction: float, seed: int, which: str,
          needs: tuple[int, ...], needs_image: bool):
    data, spec = _split_and_spec(policy, preprocess, val_fraction, seed, which)
    arrays, kept = map_features(data, encoder, spec, policy.features_dir, needs, needs_image)
    if not kept:
        return (), np.zeros((0, spec.size, spec.size), np.int64), []
    inputs = tuple(np.asarray(arrays[f"map{i}"], np.float32) for i in needs)
    if needs_image:
        inputs += (np.asarray(arrays["image"], np.float32),)
    meta = [(s.meta.get("pixel_size_mm"), s.meta.get("hc_mm"), float(sc)) for s, sc in zip(kept, arrays["f32_scale"])]
    return inputs, arrays["mask"].astype(np.int64), meta


def site_maps(policy: SitePolicy, cfg: RoundConfig, which: str, head):
    """(inputs: tuple of (N, ...) float32 arrays for the head, masks (N, S, S) int64, per-image
    (pixel_size_mm, hc_mm, scale)) for a segmentation/HC head; only the maps it needs are cached."""
    return _maps(policy, cfg.encoder, json.dumps(cfg.preprocess, sort_keys=True), cfg.val_fraction, cfg.seed, which,
                 tuple(head.needs), bool(head.needs_image))


def _build_head(cfg: RoundConfig):
    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head

    return build_head(cfg.task, get_config(cfg.encoder.config), len(cfg.labels), **cfg.head)


def _load_arrays(head, arrays: dict[str, np.ndarray]) -> None:
    import torch

    head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)


@dataclass
class Reply:
    """Everything that leaves the site after a round."""

    status: str
    site: str
    num_examples: int = 0
    arrays: dict[str, np.ndarray] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def ledger_for(policy: SitePolicy, cfg: RoundConfig, n_train: int) -> PrivacyLedger:
    path = Path(policy.state_dir) / "ledger" / f"{cfg.run_key}.json"
    return PrivacyLedger.open(path, policy.delta_for(n_train), policy.target_epsilon)


def train_round(policy: SitePolicy, cfg: RoundConfig, arrays: dict[str, np.ndarray]) -> Reply:
    """One round of local DP-SGD on the head, within the site's policy and privacy budget."""
    import torch

    reason = refusal_reason(policy, Instruction(cfg.task, cfg.local_epochs, cfg.max_grad_norm))
    if reason:
        return Reply(STATUS_REFUSED, policy.site_name, reason=reason)
    head = _build_head(cfg)
    _load_arrays(head, arrays)
    if cfg.task == "classify":
        x, y = site_features(policy, cfg, "train")
        inputs, model, loss_fn = (torch.from_numpy(x),), head, None
    else:
        xs, y, _ = site_maps(policy, cfg, "train", head)
        inputs, model, loss_fn = tuple(torch.from_numpy(a) for a in xs), MapsHead(head), PerImageSegLoss()
    n = len(y)
    if n == 0:
        return Reply(STATUS_REFUSED, policy.site_name, reason="no readable, labelled training images at this site")

    ledger = ledger_for(policy, cfg, n)
    q = sample_rate(n, cfg.batch_size)
    steps = cfg.local_epochs * steps_per_epoch(n, cfg.batch_size)
    if cfg.noise_multiplier > 0:
        sigma = cfg.noise_multiplier
    else:
        if ledger.planned_noise_multiplier is None:
            # Spread the run's budget over every planned round; the site never plans above its own budget.
            ledger.planned_noise_multiplier = calibrate_noise(min(cfg.target_epsilon, policy.target_epsilon),
                                                              ledger.delta, q, steps * cfg.num_rounds)
        sigma = ledger.planned_noise_multiplier
    release = Release(cfg.server_round, sigma, q, steps, cfg.max_grad_norm)
    if ledger.would_exceed(release):
        figures = ledger.figures()
        return Reply(STATUS_EXHAUSTED, policy.site_name, metrics=figures,
                     reason=f"privacy budget exhausted: spent epsilon {figures['epsilon']:.3f} of {policy.target_epsilon}; "
                            f"this round would reach {ledger.epsilon(release):.3f}")

    torch.manual_seed(_seed(cfg.seed, policy.site_name, cfg.server_round))
    stats = train_head(model, inputs if len(inputs) > 1 else inputs[0], torch.from_numpy(y), DPConfig(
        epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, max_grad_norm=cfg.max_grad_norm,
        noise_multiplier=sigma, proximal_mu=cfg.proximal_mu, seed=_seed(cfg.seed, policy.site_name, cfg.server_round, "dp")),
        loss_fn=loss_fn)
    ledger.record(Release(cfg.server_round, sigma, stats["sample_rate"], stats["steps"], cfg.max_grad_norm))
    # Only trainable parameters leave the site (fixed buffers such as the public projection stay).
    state = {k: v.detach().cpu().numpy() for k, v in head.named_parameters()}
    return Reply(STATUS_OK, policy.site_name, n, state, {"train_loss": stats["loss"], **ledger.figures()})


def evaluate_round(policy: SitePolicy, cfg: RoundConfig, arrays: dict[str, np.ndarray]) -> Reply:
    """Evaluate the global head on the site's held-out split."""
    import torch

    from echocare.metrics import auroc_macro_ovr, balanced_accuracy

    if cfg.task not in policy.allowed_tasks:
        return Reply(STATUS_REFUSED, policy.site_name, reason=f"task '{cfg.task}' is not allowed by this site's policy")
    head = _build_head(cfg)
    _load_arrays(head, arrays)
    head.eval()
    if cfg.task != "classify":
        return _evaluate_segmentation(policy, cfg, head)
    x, y = site_features(policy, cfg, "val")
    if len(y) == 0:
        return Reply(STATUS_REFUSED, policy.site_name, reason="no labelled validation images at this site")
    with torch.no_grad():
        logits = head(torch.from_numpy(x))
        loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))
        probs = torch.softmax(logits, 1).numpy()
    return Reply(STATUS_OK, policy.site_name, len(y), metrics={
        "val_loss": loss,
        "auroc": float(auroc_macro_ovr(y, probs, len(cfg.labels))),
        "balanced_accuracy": float(balanced_accuracy(y, probs.argmax(1))),
    })


def _evaluate_segmentation(policy: SitePolicy, cfg: RoundConfig, head) -> Reply:
    import torch

    from echocare.hc import measured_hc_mm
    from echocare.metrics import dice, hc_mae_mm

    xs, y, meta = site_maps(policy, cfg, "val", head)
    if len(y) == 0:
        return Reply(STATUS_REFUSED, policy.site_name, reason="no readable validation images at this site")
    preds, losses = [], []
    model, loss_fn = MapsHead(head), PerImageSegLoss(reduction="none")
    with torch.no_grad():
        for i in range(0, len(y), 16):
            logits = model(*(torch.from_numpy(a[i:i + 16]) for a in xs))
            losses.append(loss_fn(logits, torch.from_numpy(y[i:i + 16])).numpy())
            preds.append(logits.argmax(1).numpy().astype(np.uint8))
    pred = np.concatenate(preds)
    metrics = {"val_loss": float(np.concatenate(losses).mean()), "dice": float(dice(pred > 0, y > 0))}
    if cfg.task == "hc":
        rows = [(p, m) for p, m in zip(pred, meta) if m[0] is not None and m[1] is not None]
        if rows:
            est = [measured_hc_mm(p, px / scale) for p, (px, _, scale) in rows]
            metrics["hc_mae_mm"] = float(hc_mae_mm(np.array(est), np.array([m[1] for _, m in rows])))
    return Reply(STATUS_OK, policy.site_name, len(y), metrics=metrics)


__all__ = ["RoundConfig", "Reply", "train_round", "evaluate_round", "site_features", "ACCOUNTANT",
           "STATUS_OK", "STATUS_EXHAUSTED", "STATUS_REFUSED"]
