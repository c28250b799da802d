"""Coordinator strategies: Flower's own, wrapped by :class:`SiteGuard`.

``build_strategy`` picks FedAvg, FedProx, FedAdam, FedMedian or FedTrimmedAvg from the run config
(optionally inside Flower's server-side fixed-clipping central DP wrapper). ``SiteGuard`` sits in
front of it and decides which site updates may be aggregated:

- replies whose site refused the instruction or has exhausted its privacy budget carry no update;
  exhausted sites are not selected again;
- updates with a NaN/Inf, or whose distance to the global model is an outlier (above
  ``outlier_factor`` x the median of the round, or above an absolute ``max_update_norm``), are
  rejected and the site is named in the log;
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
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

log = logging.getLogger("echofleet.server")

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")


def aggregate_defined_metrics(records: list, weighting_metric_name: str) -> MetricRecord:
    """Example-weighted mean of each evaluation metric over the sites where it is defined.

    A site whose held-out split lacks a class has no AUROC (NaN); Flower's default average would
    turn the federation's figure into NaN. Here each metric averages over the sites that have it
    finite, weighted by their number of examples (a metric no site defines is left out)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        for mr in record.metric_records.values():
            w = float(mr[weighting_metric_name])
            for key, value in mr.items():
                if key == weighting_metric_name or isinstance(value, list) or not math.isfinite(float(value)):
                    continue
                sums[key] = sums.get(key, 0.0) + w * float(value)
                weights[key] = weights.get(key, 0.0) + w
    return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})


def build_strategy(name: str, *, min_sites: int = 1, proximal_mu: float = 0.01, server_lr: float = 0.1,
                   trim_beta: float = 0.2, central_dp_noise: float = 0.0, central_dp_clip: float = 1.0,
                   num_sites: int = 1, central_dp_delta: float = 1e-5) -> Strategy:
    """A Flower strategy by name. ``central_dp_noise > 0`` wraps it in server-side fixed clipping
    with Flower's RDP accountant (user-level DP: neighbouring federations differ in one site)."""
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_sites,
                  min_evaluate_nodes=min_sites, min_available_nodes=min_sites,
                  evaluate_metrics_aggr_fn=aggregate_defined_metrics)
    name = name.lower()
    if central_dp_noise > 0:
        if name != "fedavg":
            raise ValueError("central DP accounting needs plain FedAvg (equal site weights); use strategy=fedavg")
        from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        accountant = RdpAccountant(PrivacyConfig(target_delta=central_dp_delta, population_size=num_sites,
                                                 neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                 sampling_method=SamplingMethod.NO_AMPLIFICATION))
        return DifferentialPrivacyServerSideFixedClipping(FedAvg(weighted_by_key="dp-weight", **common),
                                                          noise_multiplier=central_dp_noise,
                                                          clipping_norm=central_dp_clip,
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


def _metrics(msg: Message) -> dict[str, float]:
    recs = list(msg.content.metric_records.values())
    return {k: float(v) for k, v in recs[0].items() if k != "dp-weight"} if recs else {}


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
    """Filters and records site replies around an inner Flower strategy (see module docstring)."""

    def __init__(self, inner: Strategy, *, min_sites: int = 1, max_update_norm: float = 0.0,
                 outlier_factor: float = 5.0, round_offset: int = 0):
        self.inner = inner
        self.min_sites = min_sites
        self.max_update_norm = max_update_norm
        self.outlier_factor = outlier_factor
        self.round_offset = round_offset
        self.excluded_nodes: set[int] = set()
        self.exhausted_sites: set[str] = set()
        self.rounds: dict[int, RoundLog] = {}
        self._global: dict[str, np.ndarray] = {}

    def _log(self, rnd: int) -> RoundLog:
        return self.rounds.setdefault(rnd, RoundLog())

    def summary(self) -> None:
        log.info("SiteGuard(min_sites=%d, max_update_norm=%s, outlier_factor=%s) around:",
                 self.min_sites, self.max_update_norm or "off", self.outlier_factor)
        self.inner.summary()

    # -- train -----------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        self._global = {k: v.numpy() for k, v in arrays.items()}
        config["server-round"] = rnd
        return self.inner.configure_train(rnd, arrays, config, _SelectableGrid(grid, self.excluded_nodes))

    def _screen(self, rnd: int, replies: list[Message]) -> list[Message]:
        rl = self._log(rnd)
        kept: list[tuple[str, Message, float]] = []
        for msg in replies:
            if msg.has_error():
                rl.rejected[f"node-{msg.metadata.src_node_id}"] = f"error: {msg.error.reason}"
                log.warning("round %d: node %d failed: %s", rnd, msg.metadata.src_node_id, msg.error.reason)
                continue
            site, status, reason = _site_info(msg)
            metrics = _metrics(msg)
            rl.train[site] = {**metrics, "status": status}
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
            kept.append((site, msg, norm))
        if self.max_update_norm > 0 or len(kept) >= 3:
            median = float(np.median([n for _, _, n in kept])) if kept else 0.0
            screened = []
            for site, msg, norm in kept:
                too_far = self.max_update_norm > 0 and norm > self.max_update_norm
                outlier = len(kept) >= 3 and median > 0 and norm > self.outlier_factor * median
                if too_far or outlier:
                    why = (f"update norm {norm:.4g} above the bound {self.max_update_norm:g}" if too_far else
                           f"update norm {norm:.4g} is an outlier (> {self.outlier_factor:g} x median {median:.4g})")
                    rl.rejected[site] = why
                    log.warning("round %d: rejected site %s: %s", rnd, site, why)
                else:
                    screened.append((site, msg, norm))
            kept = screened
        kept.sort(key=lambda t: t[0])  # deterministic aggregation order (bitwise-reproducible resume)
        return [m for _, m, _ in kept]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        good = self._screen(rnd, list(replies))
        if len(good) < self.min_sites:
            log.warning("round %d: only %d acceptable updates (< min_sites=%d); the global model is unchanged",
                        rnd, len(good), self.min_sites)
            return None, None
        arrays, metrics = self.inner.aggregate_train(rnd, good)
        if metrics is not None:
            self._log(rnd).aggregated_train = {k: float(v) for k, v in metrics.items() if k != "dp-weight"}
        if hasattr(self.inner, "privacy_spent") and self.inner.privacy_spent() is not None:
            spent = self.inner.privacy_spent()
            self._log(rnd).central_dp = {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
                                         "accountant": spent.accounting_method}
        return arrays, metrics

    # -- evaluate ------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        config["server-round"] = rnd
        return self.inner.configure_evaluate(rnd, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        rl = self._log(rnd)
        good = []
        for msg in replies:
            if msg.has_error():
                continue
            site, status, reason = _site_info(msg)
            if status != "ok":
                continue
            rl.evaluate[site] = _metrics(msg)
            good.append((site, msg))
        good.sort(key=lambda t: t[0])
        if not good:
            return None
        metrics = self.inner.aggregate_evaluate(rnd, [m for _, m in good])
        if metrics is not None:
            rl.aggregated_evaluate = {k: float(v) for k, v in metrics.items() if k != "dp-weight"}
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
