"""Secure aggregation at the coordinator: Flower's SecAgg+ workflow, so that only the sum of the
sites' updates is ever unmasked here.

Selected by ``secure-aggregation = true`` in the run config (``run_federation`` hands the run to
:func:`run_federation_secagg`). Every training round is one run of Flower's
``SecAggPlusWorkflow`` (four message exchanges: setup, share keys, collect masked vectors,
unmask); Flower 1.42 ships it for the legacy strategy API only, so each round builds a
``LegacyContext`` around :class:`SecureFedAvg`, a small legacy strategy that selects the sites,
reads their plain statuses and applies the unmasked mean update. Evaluation, checkpoints, resume
and the run report are the plain path's (server/coordinator/server_app.py).

What changes against the plain path (docs/privacy.md, "Secure aggregation"):

- the coordinator receives, per site, only masked integer vectors, key material and the plain
  status/privacy figures; the update it applies is the **mean of the sites' bounded updates**
  (each site weighs 1: FedAvg with equal weights, or FedProx, whose pull acts at the site);
- ``SiteGuard``'s per-site screening (NaN/Inf, ``max-update-norm``, ``outlier-factor``) cannot see
  an individual update. Each site instead clips its own update to ``secagg-update-bound`` and
  drops out on a non-finite one (fed/secagg.py); the coordinator checks the **aggregate** (finite,
  norm within the bound) and keeps the global head when it fails;
- strategies that need individual updates (FedMedian, FedTrimmedAvg, FedAdam's moments are
  possible but not wired) and Flower's server-side central DP (it clips each update) are refused;
- SecAgg+ needs at least two contributing sites per round (with two, each learns the other's
  update from the sum and its own; three or more are advised).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server import ServerConfig as LegacyServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fed.config import RunConfig, RunConfigError
from fed.secagg import PARAM_NAMES, UPDATE_BOUND, UPDATE_KEYS
from fed.task import STATUS_EXHAUSTED, STATUS_OK, RoundConfig
from server.coordinator.checkpoint import CheckpointStore, config_hash
from server.coordinator.strategy import RoundLog, SiteGuard, build_strategy

log = logging.getLogger("echofleet.server")

#: Strategies whose aggregate is a function of the sum of the updates (what SecAgg+ reveals).
SECAGG_STRATEGIES = ("fedavg", "fedprox")
#: SecAgg+ quantization: each coordinate of an update in [-bound, bound] maps to [0, 2**22]; masks mod 2**32.
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32


@dataclass(frozen=True)
class SecAggSettings:
    """The run config's secure-aggregation keys (field ``a_b`` is key ``a-b``)."""

    secure_aggregation: bool = False  # sum the sites' updates under Flower's SecAgg+
    # L2 bound each site clips its update (trained minus global head) to before masking; also
    # SecAgg+'s per-coordinate clipping range. Replaces max-update-norm/outlier-factor.
    secagg_update_bound: float = 10.0
    # share of the round's sites each site shares its key material with (1.0: all; SecAgg+ with a
    # sparse graph for large federations), and the share of those needed to unmask: lower tolerates
    # more dropouts, above one half keeps a lying coordinator from collecting both kinds of shares
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.67
    secagg_timeout: float = 3600.0  # seconds to wait for the sites at each of the four stages

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise RunConfigError(name.replace("_", "-"), f"{what}, got {getattr(self, name)!r}")

        need(self.secagg_update_bound > 0 and math.isfinite(self.secagg_update_bound), "secagg_update_bound", "must be > 0")
        need(0 < self.secagg_num_shares <= 1, "secagg_num_shares", "must be in (0, 1]")
        # above one half: a coordinator that lies about dropouts cannot collect both kinds of a site's shares
        need(0.5 < self.secagg_reconstruction_threshold <= 1, "secagg_reconstruction_threshold", "must be in (0.5, 1]")
        need(self.secagg_timeout > 0, "secagg_timeout", "must be > 0")

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> "SecAggSettings":
        """The settings from a RunConfig; a key the RunConfig does not define takes the default here."""
        return cls(**{f.name: getattr(cfg, f.name, f.default) for f in dataclasses.fields(cls)})

    def as_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def check_secagg_config(cfg: RunConfig) -> None:
    """Refuse, with one line naming the key, a run config that secure aggregation cannot serve."""
    if cfg.strategy not in SECAGG_STRATEGIES:
        raise RunConfigError("strategy", f"must be {' or '.join(SECAGG_STRATEGIES)} with secure-aggregation = true "
                                         f"(the coordinator sees only the sum of the updates), got {cfg.strategy!r}")
    if cfg.central_dp_noise > 0:
        raise RunConfigError("central-dp-noise", "must be 0 with secure-aggregation = true (Flower's central DP clips "
                                                 "each site's update at the coordinator, which never sees one)")
    if cfg.max_update_norm > 0:
        log.warning("max-update-norm=%g is a per-site check the coordinator cannot make under secure aggregation; "
                    "each site clips its update to secagg-update-bound instead", cfg.max_update_norm)


def content_bytes(msg: Message) -> int:
    """Serialized size of a message's content (what crosses the network, less a small envelope)."""
    return recorddict_to_proto(msg.content).ByteSize() if msg.has_content() else 0


class MeteredGrid:
    """A Grid view that counts the content bytes of every message, per message type and direction."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.bytes: Counter = Counter()  # (message_type, "down" | "up") -> bytes
        self.messages: Counter = Counter()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for m in messages:
            self.bytes[(m.metadata.message_type, "down")] += content_bytes(m)
            self.messages[(m.metadata.message_type, "down")] += 1
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            self.bytes[(r.metadata.message_type, "up")] += content_bytes(r)
            self.messages[(r.metadata.message_type, "up")] += 1
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def update_keys(rc: RoundConfig) -> list[str]:
    """The head's trainable parameters (what a site's update covers), in the head's own order."""
    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head

    head = build_head(rc.task, get_config(rc.encoder.config), len(rc.labels), **rc.head)
    return [k for k, _ in head.named_parameters()]


class SecureFedAvg(LegacyStrategy):
    """The legacy strategy one SecAgg+ round runs with.

    ``configure_fit`` asks every eligible site to train from ``weights``; ``aggregate_fit`` gets
    from the workflow each site's plain status and the unmasked **mean** of the bounded updates (the
    same vector for every result), checks it and sets ``new_weights`` (None: the global stays)."""

    def __init__(self, grid: Grid, weights: dict[str, np.ndarray], keys: list[str], config: dict[str, Any],
                 bound: float, guard: SiteGuard, roundlog: RoundLog, min_sites: int = 1):
        self.grid, self.weights, self.keys, self.config = grid, weights, keys, config
        self.bound, self.guard, self.roundlog, self.min_sites = bound, guard, roundlog, min_sites
        self.new_weights: dict[str, np.ndarray] | None = None
        self.aggregated = False
        self.asked = 0

    def initialize_parameters(self, client_manager):  # noqa: D102 - the coordinator holds the weights
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        nodes = sorted(n for n in self.grid.get_node_ids() if n not in self.guard.excluded_nodes)
        self.asked = len(nodes)
        run_id = self.grid.run.run_id
        return [(GridClientProxy(n, self.grid, run_id), FitIns(parameters, dict(self.config))) for n in nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.aggregated = True
        rl, rnd = self.roundlog, int(server_round)
        summed: list[str] = []
        weights_ok = True
        for proxy, fitres in results:
            m = dict(fitres.metrics)
            site = str(m.pop("site", f"node-{proxy.node_id}"))
            status, reason = str(m.pop("status", STATUS_OK)), str(m.pop("reason", ""))
            m.pop("accountant", None)
            rl.train[site] = {**{k: float(v) for k, v in m.items() if isinstance(v, (int, float))}, "status": status,
                             **({"device": str(m["device"])} if "device" in m else {}),
                             **({"privacy_unit": str(m["privacy-unit"])} if "privacy-unit" in m else {})}
            if status == STATUS_EXHAUSTED:
                self.guard.excluded_nodes.add(proxy.node_id)
                self.guard.exhausted_sites.add(site)
                rl.excluded.append(site)
                log.warning("round %d: site %s excluded from now on: %s", rnd, site, reason)
            elif status != STATUS_OK:
                rl.rejected[site] = reason
                log.warning("round %d: site %s refused: %s", rnd, site, reason)
            if fitres.num_examples != (1 if status == STATUS_OK else 0):
                weights_ok = False  # its weight is inside the masked sum: the sum cannot be trusted
                rl.rejected[site] = f"secure aggregation: weight {fitres.num_examples} (sites weigh 1, or 0 without an update)"
            elif status == STATUS_OK:
                summed.append(site)
        # Flower's workflow may list one dropped site twice in ``failures``: count the silent ones.
        dropped = self.asked - len(results)
        if dropped:
            log.warning("round %d: %d site(s) dropped out of secure aggregation (their masks were removed): %s", rnd,
                        dropped, "; ".join(sorted({str(f)[:200] for f in failures})))
        rl.aggregated_train = {"secure_aggregation": 1.0, "sites_summed": float(len(summed)), "sites_dropped": float(dropped)}
        problem = None
        if not weights_ok:
            problem = "a site's weight is not the agreed 0 or 1"
        elif len(summed) < max(1, self.min_sites):
            problem = f"only {len(summed)} site update(s) in the sum (min-sites={self.min_sites})"
        else:
            mean = [np.asarray(a, np.float64) for a in parameters_to_ndarrays(results[0][1].parameters)]
            if len(mean) != len(self.keys) or any(a.shape != np.shape(self.weights[k]) for a, k in zip(mean, self.keys)):
                problem = "the unmasked aggregate does not have the head's shapes"
            else:
                norm = float(np.sqrt(sum(float(np.sum(a * a)) for a in mean)))
                dim = sum(a.size for a in mean)
                # each site's bounded update has norm <= bound, so has their mean, up to SecAgg+'s
                # stochastic quantization (at most one step 2*bound/Q per coordinate)
                tolerance = 2 * self.bound / QUANTIZATION_RANGE * math.sqrt(dim)
                rl.aggregated_train["update_norm"] = norm
                if not math.isfinite(norm):
                    problem = "the unmasked aggregate is not finite"
                elif norm > self.bound + tolerance:
                    problem = f"the mean update's norm {norm:.4g} exceeds the sites' bound {self.bound:g}"
                else:
                    new = dict(self.weights)
                    for k, a in zip(self.keys, mean):
                        new[k] = (np.asarray(self.weights[k], np.float64) + a).astype(np.asarray(self.weights[k]).dtype)
                    self.new_weights = new
        if problem:
            rl.aggregated_train["rejected"] = problem
            log.warning("round %d: secure aggregate rejected, the global head stays: %s", rnd, problem)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_round(grid: Grid, rnd: int, weights: dict[str, np.ndarray], rc: RoundConfig, keys: list[str],
                 settings: SecAggSettings, guard: SiteGuard, min_sites: int = 1) -> dict[str, np.ndarray] | None:
    """One training round under SecAgg+. Returns the new global head, or None when it stays.

    The round's log (``guard.rounds[rnd]``) gets every site's plain status and privacy figures,
    the number of updates summed, the aggregate's norm and, on a ``MeteredGrid``, the cost."""
    rl = guard.rounds.setdefault(rnd, RoundLog())
    names = list(weights)
    config = {**RoundConfig.to_record(dataclasses.replace(rc, server_round=rnd)),
              PARAM_NAMES: json.dumps(names), UPDATE_KEYS: json.dumps(keys), UPDATE_BOUND: float(settings.secagg_update_bound)}
    strategy = SecureFedAvg(grid, weights, keys, config, settings.secagg_update_bound, guard, rl, min_sites)
    base = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, config=LegacyServerConfig(num_rounds=1), strategy=strategy)
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.asarray(weights[k]) for k in names]), keep_input=True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    workflow = SecAggPlusWorkflow(float(settings.secagg_num_shares), float(settings.secagg_reconstruction_threshold),
                                  max_weight=1.0, clipping_range=float(settings.secagg_update_bound),
                                  quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE,
                                  timeout=settings.secagg_timeout)
    before = dict(grid.bytes) if isinstance(grid, MeteredGrid) else None
    sites = len([n for n in grid.get_node_ids() if n not in guard.excluded_nodes])
    start = time.perf_counter()
    workflow(grid, context)
    seconds = time.perf_counter() - start
    if not strategy.aggregated:
        rl.aggregated_train = {"secure_aggregation": 1.0, "rejected": "SecAgg+ halted before unmasking (too few sites "
                                                                     "answered; see the log)"}
        log.warning("round %d: secure aggregation halted; the global head stays", rnd)
    rl.aggregated_train["secagg_seconds"] = seconds
    if before is not None and sites:
        from flwr.app.message_type import MessageType

        for direction in ("down", "up"):
            key = (MessageType.TRAIN, direction)
            rl.aggregated_train[f"secagg_bytes_{direction}_per_site"] = (grid.bytes[key] - before.get(key, 0)) / sites
    return strategy.new_weights


def run_federation_secagg(grid: Grid, cfg: RunConfig, settings: SecAggSettings | None = None, progress=None) -> dict:
    """Run (or resume) a federation whose training rounds are securely aggregated. Returns the run report.

    Same run directory, checkpoints, evaluation and report as ``run_federation``; ``settings``
    default to the run config's secure-aggregation keys."""
    from server.coordinator.server_app import _evaluate_initial, _finish, _record, _resume, initial_head, pinned_encoder

    settings = settings or SecAggSettings.from_run_config(cfg)
    check_secagg_config(cfg)
    grid = grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    chash = config_hash({**cfg.as_run_config(), **settings.as_run_config()})
    run_key = f"{run_dir.name}-{chash}"
    rc = cfg.round_config(run_key)
    rc.encoder = pinned_encoder(rc.encoder)  # every site proves it loaded this very checkpoint file
    store = CheckpointStore(run_dir)
    # SiteGuard here only evaluates and keeps the round log; it never sees an update.
    guard = SiteGuard(build_strategy("fedavg", min_sites=cfg.min_sites), min_sites=cfg.min_sites)

    weights, done, _ = _resume(store, cfg, chash, guard, initial_head(rc, cfg))
    keys = update_keys(rc)

    if done == 0:
        _evaluate_initial(grid, guard, weights, ConfigRecord(rc.to_record()))
        if progress:
            progress(0, guard.rounds.get(0))
    for rnd in range(done + 1, cfg.num_server_rounds + 1):
        eligible = [n for n in grid.get_node_ids() if n not in guard.excluded_nodes]
        if len(eligible) < max(2, cfg.min_sites):
            log.error("round %d: only %d site(s) can still train; secure aggregation needs at least %d: the run stops",
                      rnd, len(eligible), max(2, cfg.min_sites))
            break
        new = secure_round(grid, rnd, weights, rc, keys, settings, guard, cfg.min_sites)
        weights = new if new is not None else weights
        evaluate = guard.inner.configure_evaluate(rnd, _record(weights), ConfigRecord({**rc.to_record(), "server-round": rnd}), grid)
        guard.aggregate_evaluate(rnd, grid.send_and_receive(list(evaluate), timeout=settings.secagg_timeout))
        state = {"config_hash": chash, "strategy": cfg.strategy, "run_key": run_key, "secure_aggregation": True,
                 "exhausted_sites": sorted(guard.exhausted_sites),
                 "rounds": {str(k): dataclasses.asdict(v) for k, v in guard.rounds.items()}}
        store.save(rnd, weights, {}, state)
        if progress:
            progress(rnd, guard.rounds.get(rnd))
    return _finish(run_dir, cfg, rc, guard, weights)


__all__ = ["SecAggSettings", "SecureFedAvg", "MeteredGrid", "check_secagg_config", "secure_round",
           "run_federation_secagg", "update_keys", "content_bytes", "SECAGG_STRATEGIES"]
