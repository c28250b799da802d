"""The coordinator's Flower ServerApp.

Reads the run config (``[tool.flwr.app.config]`` in pyproject.toml, or overrides) into
:class:`fed.config.RunConfig`, builds the strategy, runs it with Flower's ``strategy.start()``,
checkpoints after every round, resumes from the last completed round when asked, and writes the
run report and the global head. A federation in which no site trained ends cleanly: the report
names every site's answer, the log says why, and no global head is written.

The coordinator never sees an image or a feature: only head parameters, example counts, metrics
and privacy figures arrive from the sites.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from echocare.atomic import atomic_write_bytes
from fed.config import RunConfig
from fed.features import EncoderRef
from fed.task import RoundConfig
from server.coordinator.checkpoint import CheckpointStore, config_hash
from server.coordinator.provenance import record_app
from server.coordinator.report import build_report, write_csv, write_report
from server.coordinator.strategy import SiteGuard, build_strategy

log = logging.getLogger("echofleet.server")
app = ServerApp()


def initial_head(rc: RoundConfig, cfg: RunConfig | None = None) -> dict[str, np.ndarray]:
    """Deterministic initial head weights (seeded), as numpy arrays; with the public projection set."""
    import torch

    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head

    torch.manual_seed(rc.seed)
    head = build_head(rc.task, get_config(rc.encoder.config), len(rc.labels), **rc.head)
    if rc.task == "classify":
        # Zero output layer: the federation starts from "no opinion" (uniform probabilities) instead of
        # a random direction that DP noise would then have to undo.
        last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        if getattr(head, "proj_dim", 0) > 0:
            from echocare.preprocess import PreprocessSpec
            from server.coordinator.public_features import DEFAULT_REFERENCE, public_projection

            cache = Path(cfg.public_cache_dir) if cfg and cfg.public_cache_dir else Path(cfg.run_dir if cfg else ".") / "public-features"
            mean, matrix = public_projection(rc.encoder, PreprocessSpec.from_dict(rc.preprocess), head.proj_dim, cache,
                                             (cfg.projection_reference if cfg else "") or DEFAULT_REFERENCE, head.stages)
            head.set_projection(torch.from_numpy(mean), torch.from_numpy(matrix))
    return {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}


def pinned_encoder(ref: EncoderRef) -> EncoderRef:
    """``ref`` with the checkpoint's sha256 pinned: the run config's ``encoder-sha256``, else the
    sha256 of the coordinator's own copy (:func:`echocare.models.encoder.checkpoint_sha256`,
    computed once). Every site loads the encoder with this expected hash, so each proves it loaded
    the same file; a site whose file differs refuses, naming both hashes. Without a checkpoint
    (seeded random initialisation) there is nothing to pin. A checkpoint the coordinator cannot
    read and no ``encoder-sha256``: a clear error, since the sites could not prove anything."""
    if not ref.checkpoint:
        return ref
    from echocare.models.encoder import CheckpointError, checkpoint_sha256

    try:
        sha = checkpoint_sha256(ref.checkpoint)
    except CheckpointError as e:
        if ref.sha256:
            return dataclasses.replace(ref, sha256=ref.sha256.lower())
        raise RuntimeError(f"run config encoder-checkpoint {ref.checkpoint}: {e}; set encoder-sha256 to the file's "
                           f"sha256 so that every site proves it loaded the same file") from None
    if ref.sha256 and ref.sha256.lower() != sha:
        raise RuntimeError(f"run config encoder-sha256 {ref.sha256} differs from the sha256 {sha} of the coordinator's "
                           f"copy of {ref.checkpoint}")
    return dataclasses.replace(ref, sha256=sha)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def run_federation(grid: Grid, cfg: RunConfig, progress=None) -> dict:
    """Run (or resume) a federation to completion. Returns the run report."""
    record_app(Path(cfg.run_dir), grid)  # RUN/app.json: the FAB hash, or the app's source hash in simulation
    from server.coordinator.secagg import SecAggSettings, run_federation_secagg  # (it imports this module)
    if SecAggSettings.from_run_config(cfg).secure_aggregation:  # training rounds under SecAgg+: only sums here
        return run_federation_secagg(grid, cfg, progress=progress)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    chash = config_hash(cfg.as_run_config())
    run_key = f"{run_dir.name}-{chash}"
    rc = cfg.round_config(run_key)
    rc.encoder = pinned_encoder(rc.encoder)  # every site proves it loaded this very checkpoint file
    store = CheckpointStore(run_dir)
    num_sites = cfg.num_sites or len(list(grid.get_node_ids()))
    inner = build_strategy(cfg.strategy, min_sites=cfg.min_sites, proximal_mu=cfg.proximal_mu, server_lr=cfg.server_lr,
                           trim_beta=cfg.trim_beta, central_dp_noise=cfg.central_dp_noise,
                           central_dp_clip=cfg.central_dp_clip, num_sites=max(1, num_sites))
    guard = SiteGuard(inner, min_sites=cfg.min_sites, max_update_norm=cfg.max_update_norm, outlier_factor=cfg.outlier_factor)

    weights, done, latest = _resume(store, cfg, chash, guard, initial_head(rc, cfg))
    if latest is not None:
        guard.round_offset = done  # Flower's own round numbers restart at 1
        guard.load_inner_state(latest.strategy_arrays)

    config = ConfigRecord(rc.to_record())
    if done == 0:
        _evaluate_initial(grid, guard, weights, config)
        if progress:
            progress(0, guard.rounds.get(0))

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        rnd = server_round + guard.round_offset
        state = {"config_hash": chash, "strategy": cfg.strategy, "run_key": run_key,
                 "exhausted_sites": sorted(guard.exhausted_sites),
                 "rounds": {str(k): dataclasses.asdict(v) for k, v in guard.rounds.items()}}
        store.save(rnd, {k: v.numpy() for k, v in arrays.items()}, guard.inner_state(), state)
        if progress:
            progress(rnd, guard.rounds.get(rnd))
        return None

    final = _record(weights)
    remaining = cfg.num_server_rounds - done
    if remaining > 0:
        result = guard.start(grid=grid, initial_arrays=final, num_rounds=remaining, train_config=config,
                             evaluate_config=ConfigRecord(rc.to_record()), evaluate_fn=after_round)
        # Flower's Result holds an empty ArrayRecord when no round aggregated: the global head stays.
        final = result.arrays if result.arrays else final
    final_weights = {k: v.numpy() for k, v in final.items()}
    return _finish(run_dir, cfg, rc, guard, final_weights)


def _resume(store: CheckpointStore, cfg: RunConfig, chash: str, guard: SiteGuard, weights: dict[str, np.ndarray]):
    """Where a run continues: (weights, last completed round, checkpoint or None).

    With ``cfg.resume`` and a checkpoint in the run directory: that checkpoint's weights and round,
    its round log and exhausted sites restored into ``guard``; its run config must be this one
    (hash ``chash``), else the run stops with the reason. Otherwise ``weights`` and round 0. Both
    the plain and the secure-aggregation federation call it."""
    latest = store.latest() if cfg.resume else None
    if latest is None:
        if cfg.resume:
            log.info("no checkpoint in %s: starting from round 1", store.dir.parent)
        return weights, 0, None
    if latest.state.get("config_hash") != chash:
        raise RuntimeError(f"cannot resume {store.dir.parent}: its run config differs (hash {latest.state.get('config_hash')} "
                           f"vs {chash}); start a new run directory instead")
    guard.rounds = {int(k): _roundlog(v) for k, v in latest.state["rounds"].items()}
    guard.exhausted_sites = set(latest.state.get("exhausted_sites", []))
    log.info("resuming %s after round %d", store.dir.parent, latest.round)
    return latest.weights, latest.round, latest


def no_training_reason(guard: SiteGuard) -> str | None:
    """Why no site trained in any round so far (None when at least one update was accepted).

    A federation in which no site trained has no model to write: the run ends with this reason
    (and the per-site replies in report.json) instead of saving the untrained initial head."""
    rounds = {r: rl for r, rl in guard.rounds.items() if r > 0}
    if any(e.get("status") == "ok" and site not in rl.rejected for rl in rounds.values() for site, e in rl.train.items()):
        return None
    why: dict[str, None] = {}  # distinct reasons, first seen first
    for rl in rounds.values():
        for reason in list(rl.rejected.values()) + [f"{s}: budget exhausted" for s in rl.excluded]:
            why.setdefault(" ".join(str(reason).split())[:300])
    sites = len({s for rl in rounds.values() for s in (*rl.train, *rl.rejected)})
    detail = "; ".join(list(why)[:3]) or "no site answered"
    return f"no site trained in {len(rounds)} round(s) ({sites} site(s) answered): {detail}"


def _roundlog(d: dict):
    from server.coordinator.strategy import RoundLog

    return RoundLog(**d)


def _evaluate_initial(grid: Grid, guard: SiteGuard, weights: dict[str, np.ndarray], config: ConfigRecord) -> None:
    """Round 0: every site evaluates the initial head (the baseline the run must beat)."""
    cfg0 = ConfigRecord(dict(config))
    msgs = guard.inner.configure_evaluate(0, _record(weights), cfg0, grid)
    replies = grid.send_and_receive(list(msgs), timeout=3600)
    offset, guard.round_offset = guard.round_offset, 0
    guard.aggregate_evaluate(0, replies)
    guard.round_offset = offset


def _finish(run_dir: Path, cfg: RunConfig, rc: RoundConfig, guard: SiteGuard, weights: dict[str, np.ndarray]) -> dict:
    import torch

    from echocare.models.task_model import TaskModelSpec, save_task_model

    rounds = {k: dataclasses.asdict(v) for k, v in sorted(guard.rounds.items())}
    metric = "auroc" if rc.task == "classify" else ("dice" if rc.task == "segment" else "hc_mae_mm")
    run = {
        "format": "echofleet-run-report/1", "task": rc.task, "labels": rc.labels, "strategy": cfg.strategy,
        "num_rounds": cfg.num_server_rounds, "rounds_completed": max([k for k in rounds if k > 0], default=0),
        "encoder": {"config": rc.encoder.config, "sha256": rc.encoder.sha256, "seed": rc.encoder.seed,
                    "checkpoint": rc.encoder.checkpoint},
        "head": rc.head, "preprocess": rc.preprocess,
        "dp": {"max_grad_norm": rc.max_grad_norm, "target_epsilon": rc.target_epsilon,
               "noise_multiplier": rc.noise_multiplier or "calibrated per site", "accountant": "rdp"},
        "central_dp": {"noise_multiplier": cfg.central_dp_noise, "clip": cfg.central_dp_clip} if cfg.central_dp_noise else None,
        "config": cfg.as_run_config(), "metric": metric,
        "stopped_early": guard.stopped,  # why the run ended before num_rounds (every site exhausted), else None
    }
    problem = no_training_reason(guard)
    if problem is not None:
        # No model to describe: report.json/csv name every site's answer; no model card, no global head.
        report = build_report({**run, "global_model": None, "problem": problem}, rounds)
        atomic_write_bytes(run_dir / "report.json", json.dumps(report, indent=1, default=float).encode())
        write_csv(report, run_dir / "report.csv")
        log.error("%s; no global model written (report: %s)", problem, run_dir / "report.json")
        return report
    report = write_report(run_dir, {**run, "global_model": "global"}, rounds, metric)
    last_eps = {}
    for r in report["rounds"]:
        for site, e in r["sites"].items():
            if "privacy" in e:
                last_eps[site] = e["privacy"]["epsilon"]
    final_metrics = report["rounds"][-1]["aggregated"]["evaluate"] if report["rounds"] else {}
    spec = TaskModelSpec(encoder_config=rc.encoder.config, encoder_checkpoint=rc.encoder.checkpoint,
                         encoder_sha256=rc.encoder.sha256, encoder_seed=rc.encoder.seed, task=rc.task,
                         labels=rc.labels, head=_head_kwargs(rc), preprocess=rc.preprocess,
                         provenance={"sites": sorted({s for r in report["rounds"] for s in r["sites"]}),
                                     "rounds": run["rounds_completed"], "strategy": cfg.strategy,
                                     "epsilon_per_site": last_eps, "delta_per_site": _deltas(report),
                                     "metrics": final_metrics, "run_report": "report.json"})
    save_task_model(run_dir / "global", spec, {k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return report


def _head_kwargs(rc: RoundConfig) -> dict:
    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head, head_kwargs_of

    return head_kwargs_of(build_head(rc.task, get_config(rc.encoder.config), len(rc.labels), **rc.head))


def _deltas(report: dict) -> dict:
    return {s: e["privacy"]["delta"] for r in report["rounds"] for s, e in r["sites"].items() if "privacy" in e}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    report = run_federation(grid, cfg)
    if report.get("global_model") is None:
        return  # run_federation logged why no site trained; the report is written
    log.info("run report written to %s (final: %s)", cfg.run_dir, json.dumps(report["rounds"][-1]["aggregated"]))
