"""Coordinator strategies: Flower's own, wrapped by :class:`SiteGuard`.

``build_strategy`` picks FedAvg, FedProx, FedAdam, FedMedian or FedTrimmedAvg from the run config
(optionally inside :class:`CentralDP`, Flower's server-side fixed-clipping central DP wrapper
calibrated to the sites that actually contribute). ``SiteGuard`` sits in front of it and decides
which site updates may be aggregated, and with which weight:

- replies whose site refused the instruction or has exhausted its privacy budget carry no update;
  exhausted sites are not selected again; when fewer than ``min_sites`` connected sites can still
  train, the run ends (``stopped`` says why) instead of waiting for nodes that will never come;
- updates with a NaN/Inf, or whose distance to the global model is an outlier (above
  ``outlier_factor`` x the median of the round, or above an absolute ``max_update_norm``), are
  rejected and the site is named in the log;
- a site's weight is what it sends as ``num-examples`` (a fixed ``1`` from today's sites, see
  docs/privacy.md; 1 when it sends none), counted at most ``max_weight_ratio`` x the median weight
  of the round's other sites: a claim above that is capped and the site named, a weight that is not
  a positive finite number rejects the update. The inner strategy averages by this bounded weight
  (``guard-weight``), never by a figure the site sets alone; with central DP every site weighs 1;
- the round goes on with the rest when at least ``min_sites`` remain, else the global model stays.

It also records, per round and per site, the metrics and privacy figures for the run report, and
shifts round numbers when a run resumes (``round_offset``).
"""

from __future__ import annotations

import math
import logging
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedMedian, FedProx,
                                     FedTrimmedAvg, Result, Strategy)

log = logging.getLogger("echofleet.server")

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")
SITE_WEIGHT_KEY = "num-examples"  # what a site sends as its weight (today a fixed 1; never trusted as is)
GUARD_WEIGHT_KEY = "guard-weight"  # the weight SiteGuard decided; the inner strategies average by it
NOT_METRICS = (SITE_WEIGHT_KEY, GUARD_WEIGHT_KEY, "dp-weight")  # weights, not figures for the report


class NoSiteCanTrain(RuntimeError):
    """Raised by :meth:`SiteGuard.configure_train` when too few sites can still train; ends ``start``."""


def _weighted_means(rows: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Weighted mean of each figure over the rows where it is finite (a figure no row has is left out)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for w, figures in rows:
        for key, value in figures.items():
            if math.isfinite(value):
                sums[key] = sums.get(key, 0.0) + w * value
                weights[key] = weights.get(key, 0.0) + w
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}


def aggregate_defined_metrics(records: list, weighting_metric_name: str) -> MetricRecord:
    """Weighted mean of each evaluation metric over the sites where it is defined.

    A site whose held-out split lacks a class has no AUROC (NaN); Flower's default average would
    turn the federation's figure into NaN. Here each metric averages over the sites that have it
    finite, weighted by ``weighting_metric_name`` (SiteGuard's bounded weight)."""
    rows = []
    for record in records:
        for mr in record.metric_records.values():
            rows.append((float(mr[weighting_metric_name]),
                         {k: float(v) for k, v in mr.items() if k not in (weighting_metric_name, *NOT_METRICS)
                          and not isinstance(v, list)}))
    return MetricRecord(_weighted_means(rows))


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping central DP, calibrated per round to the sites that contribute.

    Flower's wrapper fixes ``num_sampled_clients`` once: a round that samples fewer sites (an
    exhausted site is no longer selected) raises a mismatch error, and a round in which SiteGuard
    rejected a site is skipped (strict reply count), so one NaN site stops the training for good.
    Here the count is the round's own: the sites sampled when the round is configured (what the
    accountant's event records) and the k updates actually averaged when it is aggregated. Each
    update is clipped to ``clipping_norm`` C around the global model, and the mean of the k gets
    Gaussian noise of standard deviation ``noise_multiplier`` x C / k, i.e. noise z x C on the sum,
    whose sensitivity to any one site is C.

    Privacy meaning: the guarantee (RDP accountant, no amplification, one site added or removed) is
    over the sampled population: each release hides the content of any one contributing site's
    update. Which sites took part in a round, and how many, is public (the run report lists them);
    so are SiteGuard's screening decisions (a site rejected for a NaN or an outlier norm), made on
    individual updates before the noise and not covered by the guarantee. The coordinator itself
    sees every update in the clear: central DP protects the released model, not the sites against
    the coordinator (that is the sites' own DP-SGD, docs/privacy.md).
    """

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.num_sampled_clients = max(1, len(messages))
        return self._prepare_accounting(server_round, messages)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            self.discard_round(server_round)
            return None, None
        self.num_sampled_clients = len(replies)
        return super().aggregate_train(server_round, replies)

    def discard_round(self, server_round: int) -> None:
        """A configured round whose updates are not aggregated: nothing is released, nothing is charged."""
        self._pending_events.pop(server_round, None)


def build_strategy(name: str, *, min_sites: int = 1, proximal_mu: float = 0.01, server_lr: float = 0.1,
                   trim_beta: float = 0.2, central_dp_noise: float = 0.0, central_dp_clip: float = 1.0,
                   num_sites: int = 1, central_dp_delta: float = 1e-5) -> Strategy:
    """A Flower strategy by name, to be run inside :class:`SiteGuard` (it averages by the guard's
    ``guard-weight``). ``central_dp_noise > 0`` wraps it in :class:`CentralDP` with Flower's RDP
    accountant (site-level DP: neighbouring federations differ in one site)."""
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_sites,
                  min_evaluate_nodes=min_sites, min_available_nodes=min_sites, weighted_by_key=GUARD_WEIGHT_KEY,
                  evaluate_metrics_aggr_fn=aggregate_defined_metrics)
    name = name.lower()
    if central_dp_noise > 0:
        if name != "fedavg":
            raise ValueError("central DP accounting needs plain FedAvg (equal site weights); use strategy=fedavg")
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        accountant = RdpAccountant(PrivacyConfig(target_delta=central_dp_delta, population_size=num_sites,
                                                 neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                 sampling_method=SamplingMethod.NO_AMPLIFICATION))
        return CentralDP(FedAvg(**common), noise_multiplier=central_dp_noise, clipping_norm=central_dp_clip,
                         num_sampled_clients=num_sites, accountant=accountant)
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=proximal_mu, **common)
    if name == "fedadam":
        return FedAdam(eta=server_lr, eta_l=server_lr, **common)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=trim_beta, **common)
    raise ValueError(f"unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}")


class _SelectableGrid:
    """A Grid view that hides excluded nodes from the inner strategy's sampling."""

    def __init__(self, grid: Grid, excluded: set[int]):
        self._grid, self._excluded = grid, excluded

    def get_node_ids(self):
        return [n for n in self._grid.get_node_ids() if n not in self._excluded]

    def __getattr__(self, name):
        return getattr(self._grid, name)


def _site_info(msg: Message) -> tuple[str, str, str]:
    rec = msg.content.config_records.get("site") if msg.content else None
    if rec is None:
        return f"node-{msg.metadata.src_node_id}", "ok", ""
    return str(rec.get("site")), str(rec.get("status", "ok")), str(rec.get("reason", ""))


def site_device(msg: Message) -> dict[str, str]:
    """``{"device": class}`` when the reply names the site's compute device class (a capability such
    as ``"cuda:H200"`` or ``"cpu"``, no data dependency), else ``{}``."""
    rec = msg.content.config_records.get("site") if msg.content else None
    return {"device": str(rec["device"])} if rec is not None and "device" in rec else {}


def privacy_unit(msg: Message) -> dict[str, str]:
    """``{"privacy_unit": "patient" | "image"}`` when the reply names the unit its site's DP
    guarantee protects (docs/privacy.md), else ``{}``."""
    rec = msg.content.config_records.get("site") if msg.content else None
    return {"privacy_unit": str(rec["privacy-unit"])} if rec is not None and "privacy-unit" in rec else {}


def _metrics(msg: Message) -> dict[str, float]:
    """The figures a site reported, as it reported them (its claimed ``num-examples`` included)."""
    recs = list(msg.content.metric_records.values())
    return {k: float(v) for k, v in recs[0].items()
            if k not in ("dp-weight", GUARD_WEIGHT_KEY) and not isinstance(v, list)} if recs else {}


def _claimed_weight(msg: Message) -> tuple[float | None, str]:
    """The weight a site claims (``num-examples``; 1 when it sends none), or None and why it is unusable."""
    recs = list(msg.content.metric_records.values())
    value = recs[0].get(SITE_WEIGHT_KEY) if recs else None
    if value is None:
        return 1.0, ""
    if isinstance(value, (bool, list)) or not math.isfinite(float(value)) or float(value) <= 0:
        return None, f"weight '{SITE_WEIGHT_KEY}' = {value!r} is not a positive finite number"
    return float(value), ""


@dataclass
class RoundLog:
    """What the coordinator learned in one round (goes into checkpoints and the run report)."""

    train: dict[str, dict] = field(default_factory=dict)  # site -> metrics + privacy figures
    evaluate: dict[str, dict] = field(default_factory=dict)  # site -> metrics
    rejected: dict[str, str] = field(default_factory=dict)  # site -> reason
    excluded: list[str] = field(default_factory=list)  # sites that said "budget exhausted"
    aggregated_train: dict = field(default_factory=dict)
    aggregated_evaluate: dict = field(default_factory=dict)
    central_dp: dict = field(default_factory=dict)


class SiteGuard(Strategy):
    """Filters, weighs and records site replies around an inner Flower strategy (see module docstring)."""

    def __init__(self, inner: Strategy, *, min_sites: int = 1, max_update_norm: float = 0.0,
                 outlier_factor: float = 5.0, max_weight_ratio: float = 5.0, round_offset: int = 0):
        self.inner = inner
        self.min_sites = min_sites
        self.max_update_norm = max_update_norm
        self.outlier_factor = outlier_factor
        self.max_weight_ratio = max_weight_ratio
        self.round_offset = round_offset
        # Flower's accounted central DP averages sites equally (and checks that it does).
        self.equal_weights = isinstance(inner, DifferentialPrivacyServerSideFixedClipping)
        self.excluded_nodes: set[int] = set()
        self.exhausted_sites: set[str] = set()
        self.rounds: dict[int, RoundLog] = {}
        self.stopped: str | None = None  # why the run ended before its last round (None: it did not)
        self._global: dict[str, np.ndarray] = {}
        self._latest: ArrayRecord = ArrayRecord()

    def _log(self, rnd: int) -> RoundLog:
        return self.rounds.setdefault(rnd, RoundLog())

    def summary(self) -> None:
        log.info("SiteGuard(min_sites=%d, max_update_norm=%s, outlier_factor=%s, max_weight_ratio=%s) around:",
                 self.min_sites, self.max_update_norm or "off", self.outlier_factor,
                 "equal weights" if self.equal_weights else self.max_weight_ratio)
        self.inner.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None) -> Result:
        """Flower's round loop, ended early (``stopped`` says why) when too few sites can still train.

        ``Result.arrays`` is always the last global model: the initial one when no round aggregated."""
        self._latest = initial_arrays
        try:
            result = super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout,
                                   train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)
        except NoSiteCanTrain:
            return Result(arrays=self._latest)
        if not result.arrays:
            result.arrays = self._latest
        return result

    # -- train -----------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        self._latest = arrays
        self._global = {k: v.numpy() for k, v in arrays.items()}
        can_train = [n for n in grid.get_node_ids() if n not in self.excluded_nodes]
        if self.excluded_nodes and len(can_train) < self.min_sites:
            # Flower's sampling would wait for more nodes forever: the exhausted ones never come back.
            self.stopped = (f"stopped before round {rnd}: {len(can_train)} connected site(s) can still train, "
                            f"min_sites={self.min_sites}; privacy budget exhausted: {', '.join(sorted(self.exhausted_sites))}")
            log.warning("%s", self.stopped)
            raise NoSiteCanTrain(self.stopped)
        config["server-round"] = rnd
        return self.inner.configure_train(rnd, arrays, config, _SelectableGrid(grid, self.excluded_nodes))

    def _screen(self, rnd: int, replies: list[Message]) -> list[tuple[str, Message, float]]:
        """The acceptable updates of a round as (site, message, claimed weight), sorted by site."""
        rl = self._log(rnd)
        kept: list[tuple[str, Message, float, float]] = []
        for msg in replies:
            if msg.has_error():
                rl.rejected[f"node-{msg.metadata.src_node_id}"] = f"error: {msg.error.reason}"
                log.warning("round %d: node %d failed: %s", rnd, msg.metadata.src_node_id, msg.error.reason)
                continue
            site, status, reason = _site_info(msg)
            metrics = _metrics(msg)
            rl.train[site] = {**metrics, "status": status, **site_device(msg), **privacy_unit(msg)}
            if status == "budget-exhausted":
                self.excluded_nodes.add(msg.metadata.src_node_id)
                self.exhausted_sites.add(site)
                rl.excluded.append(site)
                log.warning("round %d: site %s excluded from now on: %s", rnd, site, reason)
                continue
            if status != "ok":
                rl.rejected[site] = reason
                log.warning("round %d: site %s refused: %s", rnd, site, reason)
                continue
            weight, why = _claimed_weight(msg)
            if weight is None:
                rl.rejected[site] = why
                log.warning("round %d: rejected site %s: %s", rnd, site, why)
                continue
            if "arrays" not in msg.content:
                rl.rejected[site] = "reply carries no update"
                log.warning("round %d: rejected site %s: reply carries no update", rnd, site)
                continue
            arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            if not all(np.all(np.isfinite(a)) for a in arrays.values()):
                rl.rejected[site] = "non-finite update (NaN or Inf)"
                log.warning("round %d: rejected site %s: non-finite update (NaN or Inf)", rnd, site)
                continue
            if not arrays or not set(arrays) <= set(self._global) or any(arrays[k].shape != self._global[k].shape for k in arrays):
                rl.rejected[site] = "update does not match the global head's parameter names and shapes"
                log.warning("round %d: rejected site %s: parameter names or shapes differ", rnd, site)
                continue
            if set(arrays) != set(self._global):
                # Sites send trainable parameters only; fixed buffers (e.g. the public projection) come from the global.
                msg.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(arrays[k] if k in arrays else self._global[k]))
                                                     for k in self._global})
            norm = float(np.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - self._global[k]) ** 2)) for k in arrays)))
            rl.train[site]["update_norm"] = norm
            kept.append((site, msg, norm, weight))
        if self.max_update_norm > 0 or len(kept) >= 3:
            median = float(np.median([n for _, _, n, _ in kept])) if kept else 0.0
            screened = []
            for site, msg, norm, weight in kept:
                too_far = self.max_update_norm > 0 and norm > self.max_update_norm
                outlier = len(kept) >= 3 and median > 0 and norm > self.outlier_factor * median
                if too_far or outlier:
                    why = (f"update norm {norm:.4g} above the bound {self.max_update_norm:g}" if too_far else
                           f"update norm {norm:.4g} is an outlier (> {self.outlier_factor:g} x median {median:.4g})")
                    rl.rejected[site] = why
                    log.warning("round %d: rejected site %s: %s", rnd, site, why)
                else:
                    screened.append((site, msg, norm, weight))
            kept = screened
        kept.sort(key=lambda t: t[0])  # deterministic aggregation order (bitwise-reproducible resume)
        return [(site, msg, weight) for site, msg, _, weight in kept]

    def _bounded_weights(self, rnd: int, claimed: dict[str, float], figures: dict[str, dict]) -> dict[str, float]:
        """Each site's weight, at most ``max_weight_ratio`` x the median claim of the other sites.

        Using the others' median, no site (nor a minority of colluding sites) can raise its own cap;
        the bound holds whatever a site claims, with two sites as with many. ``figures[site]`` gets
        the weight used and, when capped, a note naming the claim (for the run report)."""
        out: dict[str, float] = {}
        for site, w in claimed.items():
            others = [v for s, v in claimed.items() if s != site]
            if self.equal_weights:
                w_used = 1.0
            elif others and self.max_weight_ratio > 0 and w > self.max_weight_ratio * float(np.median(others)):
                w_used = self.max_weight_ratio * float(np.median(others))
                note = (f"claimed weight {w:g} above {self.max_weight_ratio:g} x the median of the other sites "
                        f"({float(np.median(others)):g}); counted as {w_used:g}")
                figures.setdefault(site, {})["weight_capped"] = note
                log.warning("round %d: site %s %s", rnd, site, note)
            else:
                w_used = w
            out[site] = w_used
            figures.setdefault(site, {})["aggregation_weight"] = w_used
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        good = self._screen(rnd, list(replies))
        rl = self._log(rnd)
        if len(good) < self.min_sites:
            log.warning("round %d: only %d acceptable updates (< min_sites=%d); the global model is unchanged",
                        rnd, len(good), self.min_sites)
            if hasattr(self.inner, "discard_round"):
                self.inner.discard_round(rnd)
            return None, None
        weights = self._bounded_weights(rnd, {site: w for site, _, w in good}, rl.train)
        for site, msg, _ in good:
            # The inner strategy sees the update and the bounded weight only: a site's own figures (which
            # differ between sites whose policies disclose different things) never break its consistency checks.
            msg.content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({GUARD_WEIGHT_KEY: weights[site]})})
        arrays, _ = self.inner.aggregate_train(rnd, [msg for _, msg, _ in good])
        if arrays is None:
            log.warning("round %d: the %s strategy aggregated nothing; the global model is unchanged",
                        rnd, type(self.inner).__name__)
            return None, None
        metrics = _weighted_means([(weights[site], {k: v for k, v in rl.train[site].items() if isinstance(v, float)
                                                    and k not in (*NOT_METRICS, "update_norm", "aggregation_weight")})
                                   for site, _, _ in good])
        rl.aggregated_train = metrics
        if hasattr(self.inner, "privacy_spent") and self.inner.privacy_spent() is not None:
            spent = self.inner.privacy_spent()
            rl.central_dp = {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
                             "accountant": spent.accounting_method}
        self._latest = arrays
        return arrays, MetricRecord(metrics)

    # -- evaluate ------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        config["server-round"] = rnd
        return self.inner.configure_evaluate(rnd, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        rl = self._log(rnd)
        good: list[tuple[str, Message, float]] = []
        for msg in replies:
            if msg.has_error():
                continue
            site, status, reason = _site_info(msg)
            if status != "ok":
                continue
            rl.evaluate[site] = _metrics(msg)
            weight, why = _claimed_weight(msg)
            if weight is None:
                log.warning("round %d: evaluation of site %s left out of the average: %s", rnd, site, why)
                continue
            good.append((site, msg, weight))
        good.sort(key=lambda t: t[0])
        if not good:
            return None
        weights = self._bounded_weights(rnd, {site: w for site, _, w in good}, {})
        keys = sorted({k for site, _, _ in good for k in rl.evaluate[site] if k not in NOT_METRICS})
        for site, msg, _ in good:
            # Same keys for every site (NaN where a site has no such figure: the average skips it).
            msg.content = RecordDict({"metrics": MetricRecord({GUARD_WEIGHT_KEY: weights[site],
                                                               **{k: rl.evaluate[site].get(k, math.nan) for k in keys}})})
        metrics = self.inner.aggregate_evaluate(rnd, [m for _, m, _ in good])
        if metrics is not None:
            rl.aggregated_evaluate = {k: float(v) for k, v in metrics.items() if k not in NOT_METRICS}
        return metrics

    # -- state for checkpoints -------------------------------------------------------------------
    def inner_state(self) -> dict[str, np.ndarray]:
        """Arrays a resumed run needs to continue exactly (FedAdam's moments)."""
        out = {}
        for attr in ("m_t", "v_t"):
            for k, v in (getattr(self.inner, attr, None) or {}).items():
                out[f"{attr}/{k}"] = np.asarray(v)
        return out

    def load_inner_state(self, state: dict[str, np.ndarray]) -> None:
        for attr in ("m_t", "v_t"):
            vals = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(attr + "/")}
            if vals:
                setattr(self.inner, attr, vals)
